"""Block-wise prediction with Gaussian blending: exact for pointwise models, seamless, any shape."""

import numpy as np
import pytest

from brainzoo.errors import BrainzooError
from brainzoo.predict.blocks import (block_starts, gaussian_weights, head_top_centre, predict_block_below_head_top,
                                     predict_blocks)


class Recording:
    """A model that returns ``function(batch)`` and remembers the batch shapes it was given."""

    def __init__(self, function):
        self.function = function
        self.shapes = []

    def __call__(self, batch):
        assert batch.dtype == np.float32 and batch.shape[-1] == 1
        self.shapes.append(batch.shape)
        return self.function(batch)


def _volume(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_gaussian_weights_peak_at_the_centre_and_are_symmetric():
    weights = gaussian_weights((8, 9, 10))
    assert weights.max() == 1.0 and weights.min() > 0
    np.testing.assert_allclose(weights, weights[::-1, ::-1, ::-1])
    assert weights[4, 4, 5] > weights[0, 4, 5]


@pytest.mark.parametrize("size, block, overlap", [(100, 32, 0.5), (33, 32, 0.5), (64, 32, 0.0), (37, 10, 0.25)])
def test_block_starts_cover_the_axis_with_the_requested_overlap(size, block, overlap):
    starts = block_starts(size, block, overlap)
    assert starts[0] == 0 and starts[-1] == size - block
    assert max(np.diff(starts), default=0) <= block * (1 - overlap)


def test_identity_model_gives_back_the_input_exactly_for_odd_non_cubic_shapes():
    volume = _volume((37, 50, 9))
    model = Recording(lambda batch: batch)
    out = predict_blocks(volume, model, block_shape=(16, 24, 12), overlap=0.5, batch_size=3)
    assert out.shape == (37, 50, 9, 1)
    np.testing.assert_array_equal(out[..., 0], volume)
    assert all(shape[1:4] == (16, 24, 12) for shape in model.shapes)
    assert max(shape[0] for shape in model.shapes) == 3


def test_constant_model_gives_a_constant_map():
    out = predict_blocks(_volume((30, 41, 23)), lambda batch: np.full(batch.shape, 0.7, np.float32),
                         block_shape=(16, 16, 16), overlap=0.3)
    assert np.all(out == np.float32(0.7))


def test_block_border_errors_are_blended_away():
    """A model that is wrong on its outer two voxels leaves no seams where blocks overlap."""
    def edge_artefact(batch):
        out = np.full(batch.shape, 10.0, np.float32)
        out[:, 2:-2, 2:-2, 2:-2] = batch[:, 2:-2, 2:-2, 2:-2]
        return out

    volume = _volume((64, 64, 64))
    out = predict_blocks(volume, edge_artefact, block_shape=(32, 32, 32), overlap=0.5)[..., 0]
    interior = (slice(2, -2),) * 3
    # An interior voxel on one block's faulty border lies well inside another; a plain average would be off by 5.
    assert np.abs(out[interior] - volume[interior]).max() < 0.1


def test_whole_volume_when_no_block_shape_and_multichannel_output():
    volume = _volume((12, 14, 10))
    model = Recording(lambda batch: np.concatenate([batch, 2 * batch], axis=-1))
    out = predict_blocks(volume, model)
    assert model.shapes == [(1, 12, 14, 10, 1)]
    np.testing.assert_allclose(out[..., 1], 2 * volume, rtol=1e-6)


def test_volume_smaller_than_a_block_is_padded_and_cropped_back():
    volume = _volume((10, 40, 7))
    model = Recording(lambda batch: batch[..., 0])
    out = predict_blocks(volume, model, block_shape=(16, 16, 16))
    np.testing.assert_array_equal(out[..., 0], volume)
    assert all(shape[1:4] == (16, 16, 16) for shape in model.shapes)


@pytest.mark.parametrize("options, message", [
    ({"block_shape": (8, 8, 8), "overlap": 1.0}, "overlap"),
    ({"block_shape": (8, 8, 8), "batch_size": 0}, "batch size"),
    ({"block_shape": (8, 8)}, "three positive integers"),
])
def test_bad_options_are_reported(options, message):
    with pytest.raises(BrainzooError, match=message):
        predict_blocks(_volume((8, 8, 8)), lambda batch: batch, **options)


def test_model_with_the_wrong_output_shape_is_reported():
    with pytest.raises(BrainzooError, match="returned shape"):
        predict_blocks(_volume((8, 8, 8)), lambda batch: batch[:, :4])


def _tall_head(top=50, brain_z=(30, 46)):
    """A dim 'head' (0.3) from z 4 to ``top`` with a bright 'brain' (1) at ``brain_z``, on a 40x40x60 grid."""
    head = np.zeros((40, 40, 60), np.float32)
    head[8:32, 8:32, 4:top + 1] = 0.3
    head[14:26, 12:28, brain_z[0]:brain_z[1]] = 1.0
    return head


def _brain_model(batch):
    return (batch > 0.5).astype(np.float32)


def test_the_block_below_the_head_top_runs_once_where_the_brain_is():
    head = _tall_head()
    brain = head == 1.0
    head[20, 20, 58] = 1.0  # a stray bright voxel above the head is not its top
    assert head_top_centre(head, (2, 2, 2), 20).tolist() == [19.5, 19.5, 40.0]  # 20 mm = 10 voxels below z 50
    model = Recording(_brain_model)
    output, start = predict_block_below_head_top(head, model, block_shape=(24, 24, 24), spacing_mm=(2, 2, 2),
                                                 below_mm=20)
    assert model.shapes == [(1, 24, 24, 24, 1)] and start == (8, 8, 28)
    np.testing.assert_array_equal(output[..., 0], brain)


def test_the_block_below_the_head_top_ignores_what_the_model_finds():
    """A block placed too high cuts the brain, and stays: the distance below the top is the spec's to get right."""
    head = _tall_head()
    model = Recording(_brain_model)
    output, start = predict_block_below_head_top(head, model, block_shape=(24, 24, 24), spacing_mm=(2, 2, 2),
                                                 below_mm=2)
    assert len(model.shapes) == 1 and start == (8, 8, 36)  # centre z 49 -> 37..60, moved inside the grid
    np.testing.assert_array_equal(output[..., 0], (head == 1.0) & (np.arange(60) >= 36))


def test_the_block_below_the_head_top_stays_inside_the_grid():
    head = _tall_head(top=59, brain_z=(40, 60))  # the field of view cuts the top of the head
    output, start = predict_block_below_head_top(head, _brain_model, block_shape=(24, 24, 24),
                                                 spacing_mm=(2, 2, 2), below_mm=10)
    assert start[2] == 36
    np.testing.assert_array_equal(output[..., 0], head == 1.0)


@pytest.mark.parametrize("block", [(24, 24, 70), (0, 8, 8), (8, 8)])
def test_the_block_must_fit_the_grid(block):
    with pytest.raises(BrainzooError, match="brain-centred block"):
        predict_block_below_head_top(_tall_head(), _brain_model, block_shape=block, spacing_mm=(2, 2, 2), below_mm=20)


def test_an_empty_volume_places_the_block_in_the_middle():
    empty = np.zeros((30, 30, 30), np.float32)
    assert head_top_centre(empty, (1, 1, 1), 80).tolist() == [14.5, 14.5, 14.5]
    output, start = predict_block_below_head_top(empty, _brain_model, block_shape=(16, 16, 16),
                                                 spacing_mm=(1, 1, 1), below_mm=80)
    assert start == (6, 6, 6) and not output.any()  # 14.5 rounds to 14, minus 8
