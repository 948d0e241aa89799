"""Thresholding and cleaning a probability map into a brain mask."""

import numpy as np
import pytest
from scipy import ndimage

from brainzoo.errors import BrainzooError
from brainzoo.predict.postprocess import binarize, clean_mask, fill_holes, largest_component


def _blobs():
    """A 6x6x6 cube with a closed cavity, a 2x2x2 blob apart from it, and a corner-touching voxel."""
    mask = np.zeros((16, 16, 16), bool)
    mask[2:8, 2:8, 2:8] = True
    mask[4:6, 4:6, 4:6] = False
    mask[12:14, 12:14, 12:14] = True
    mask[8, 8, 8] = True
    return mask


def test_binarize_keeps_voxels_at_or_above_the_threshold():
    probability = np.array([0.1, 0.5, 0.49, 0.9]).reshape(4, 1, 1)
    np.testing.assert_array_equal(binarize(probability, 0.5).ravel(), [False, True, False, True])
    with pytest.raises(BrainzooError, match="between 0 and 1"):
        binarize(probability, 1.5)


def test_largest_component_drops_blobs_and_diagonal_neighbours():
    kept = largest_component(_blobs())
    assert kept.sum() == 6**3 - 2**3
    assert not kept[12:14, 12:14, 12:14].any() and not kept[8, 8, 8]
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()


def test_fill_holes_fills_closed_cavities_only():
    filled = fill_holes(_blobs())
    assert filled[4:6, 4:6, 4:6].all()
    tunnel = np.zeros((10, 10, 10), bool)
    tunnel[2:8, 2:8, 2:8] = True
    tunnel[4:6, 4:6, 0:8] = False
    np.testing.assert_array_equal(fill_holes(tunnel), tunnel)


def test_clean_mask_options():
    probability = _blobs().astype(np.float32) * 0.8
    assert clean_mask(probability).sum() == 6**3
    assert clean_mask(probability, keep_largest=False, fill=False).sum() == _blobs().sum()
    assert clean_mask(probability, 0.9).sum() == 0


@pytest.mark.parametrize("seed", range(4))
def test_clean_mask_on_the_box_equals_the_whole_array(seed):
    """Random blobs and cavities, some touching the array's faces: the boxed clean-up changes nothing."""
    rng = np.random.default_rng(seed)
    probability = ndimage.gaussian_filter(rng.random((30, 26, 34)), 1.5)
    probability = (probability - probability.min()) / np.ptp(probability)
    probability[:, :, :3] = 0  # an empty side, so the box does not reach every face
    whole = ndimage.binary_fill_holes(largest_component(probability >= 0.5))
    np.testing.assert_array_equal(clean_mask(probability), whole)
    np.testing.assert_array_equal(clean_mask(probability, keep_largest=False),
                                  ndimage.binary_fill_holes(probability >= 0.5))
    assert not clean_mask(np.zeros((4, 4, 4))).any()
