"""Array preprocessing steps: values checked against hand-computed ones, geometry against the index maps."""

import nibabel as nib
import numpy as np
import pytest

from brainzoo.errors import BrainzooError
from brainzoo.predict.steps import apply_array_step, centre_crop, centre_pad, resize, zscore
from brainzoo.predict.volumes import GriddedVolume
from brainzoo.spec import Step


def _volume(data):
    return GriddedVolume.native(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4)))


def _ramp(shape):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_crop_takes_sfcn_centre_and_maps_back():
    data = _ramp((182, 218, 182))
    cropped, new_to_old = centre_crop(data, [160, 192, 160])
    np.testing.assert_array_equal(cropped, data[11:171, 13:205, 11:171])
    np.testing.assert_array_equal(new_to_old[:3, 3], [11, 13, 11])
    volume = apply_array_step(_volume(data), Step("crop", {"shape": [160, 192, 160]}))
    back = volume.to_native_grid(volume.data)
    np.testing.assert_array_equal(back[11:171, 13:205, 11:171], cropped)
    assert not back[:11].any()


def test_pad_puts_the_extra_voxel_after_and_maps_back():
    data = _ramp((3, 4, 5)) + 1
    padded, new_to_old = centre_pad(data, [6, 4, 8])
    assert padded.shape == (6, 4, 8)
    np.testing.assert_array_equal(padded[1:4, :, 1:6], data)
    assert padded.sum() == data.sum()
    volume = apply_array_step(_volume(data), Step("pad", {"shape": [6, 4, 8]}))
    np.testing.assert_array_equal(volume.to_native_grid(volume.data), data)


def test_resize_matches_torch_align_corners_false_by_hand():
    line = np.array([0.0, 4.0, 8.0, 20.0], np.float32).reshape(4, 1, 1)
    halved, _ = resize(line, [2, 1, 1])
    # Output voxel i samples (i + 0.5) * 2 - 0.5 = 0.5, 2.5.
    np.testing.assert_allclose(halved.ravel(), [2.0, 14.0])
    doubled, _ = resize(line[:2], [4, 1, 1])
    # Samples at -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1) of [0, 4].
    np.testing.assert_allclose(doubled.ravel(), [0.0, 1.0, 3.0, 4.0])


def test_resize_keeps_world_geometry():
    volume = apply_array_step(_volume(_ramp((182, 218, 182))), Step("resize", {"shape": [121, 145, 121]}))
    assert volume.data.shape == (121, 145, 121)
    # The field of view is unchanged: the outer voxel faces stay where they were.
    first_face = volume.affine @ [-0.5, -0.5, -0.5, 1]
    last_face = volume.affine @ [120.5, 144.5, 120.5, 1]
    np.testing.assert_allclose(first_face[:3], [-0.5, -0.5, -0.5])
    np.testing.assert_allclose(last_face[:3], [181.5, 217.5, 181.5])


def test_zscore_over_nonzero_voxels_leaves_background_at_zero():
    data = np.zeros((4, 4, 4), np.float32)
    data[0, 0, :2] = [2.0, 4.0]
    out = zscore(data, nonzero=True)
    np.testing.assert_allclose(out[0, 0, :2], [-1.0, 1.0])
    assert np.count_nonzero(out) == 2
    everywhere = zscore(data)
    assert abs(everywhere.mean()) < 1e-6 and abs(everywhere.std() - 1) < 1e-6


@pytest.mark.parametrize("step, expected", [
    ({"step": "divide-by-mean"}, [0.0, 0.5, 1.0, 2.5]),
    ({"step": "minmax"}, [0.0, 0.2, 0.4, 1.0]),
    ({"step": "scale", "factor": 0.5}, [0.0, 1.0, 2.0, 5.0]),
    # percentiles 25 and 75 of (0, 2, 4, 10) are 1.5 and 5.5: clipped, then that window scaled to [0, 1]
    ({"step": "percentile", "low": 25, "high": 75}, [0.0, 0.125, 0.625, 1.0]),
])
def test_intensity_steps_by_hand(step, expected):
    data = np.array([0.0, 2.0, 4.0, 10.0], np.float32).reshape(4, 1, 1)
    out = apply_array_step(_volume(data), Step.from_spec(step, "step"))
    np.testing.assert_allclose(out.data.ravel(), expected, rtol=1e-6)
    np.testing.assert_array_equal(out.to_native, np.eye(4))


@pytest.mark.parametrize("step, message", [
    ({"step": "crop"}, "missing option"),
    ({"step": "crop", "shape": [4, 4, 4], "mode": "edge"}, "unknown option"),
    ({"step": "crop", "shape": [4, 4]}, "three positive integers"),
    ({"step": "crop", "shape": [9, 4, 4]}, "larger"),
    ({"step": "pad", "shape": [2, 8, 8]}, "smaller"),
    ({"step": "scale", "factor": "2"}, "must be a number"),
    ({"step": "minmax", "range": [0, 1]}, "unknown option"),
    ({"step": "percentile", "low": 99.5, "high": 0.5}, "must be below"),
    ({"step": "percentile", "high": 101}, r"in \[0, 100\]"),
])
def test_bad_step_options_are_reported(step, message):
    with pytest.raises(BrainzooError, match=message):
        apply_array_step(_volume(_ramp((8, 8, 8))), Step.from_spec(step, "step"))


def test_constant_input_to_a_normalisation_is_reported():
    with pytest.raises(BrainzooError, match="constant"):
        apply_array_step(_volume(np.ones((3, 3, 3))), Step("zscore"))
    with pytest.raises(BrainzooError, match="mean is 0"):
        apply_array_step(_volume(np.zeros((3, 3, 3))), Step("divide-by-mean"))
    with pytest.raises(BrainzooError, match="percentiles are equal"):
        apply_array_step(_volume(np.ones((3, 3, 3))), Step("percentile"))
