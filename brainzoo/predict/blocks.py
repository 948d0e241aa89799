"""Running a model over a volume in overlapping blocks, blended with Gaussian weights so no seams show;
or in one block placed on the brain, a fixed distance below the top of the head.

Block predictions are weakest near their borders (the receptive field runs out of context there), so each
block's output is weighted by a Gaussian centred on the block (sigma = 1/8 of the block size, as nnU-Net) and
the weighted sum is divided by the summed weights. Sums are kept in float64, so a model that returns its
input gives back the volume exactly. A volume smaller than a block is zero-padded and the padding cut off.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np

from brainzoo.errors import BrainzooError

Model = Callable[[np.ndarray], object]

# Head voxels, for finding the top of the head: above this fraction of the volume's 99.5th percentile.
HEAD_FRACTION = 0.1
# The top of the head whose middle gives a block's left-right and front-back centre.
TOP_SLAB_MM = 40.0


def gaussian_weights(block_shape: Sequence[int], sigma_fraction: float = 0.125) -> np.ndarray:
    """A separable Gaussian over a block, 1 at its centre."""
    weights = np.ones((), dtype=np.float64)
    for size in block_shape:
        position = np.arange(size) - (size - 1) / 2
        axis = np.exp(-0.5 * (position / (sigma_fraction * size)) ** 2)
        weights = np.multiply.outer(weights, axis)
    return weights / weights.max()


def block_starts(size: int, block: int, overlap: float) -> list[int]:
    """Block start positions on one axis: first at 0, last at ``size - block``, spaced at most
    ``block * (1 - overlap)`` apart."""
    if size <= block:
        return [0]
    count = int(np.ceil((size - block) / (block * (1 - overlap)))) + 1
    return sorted(set(np.round(np.linspace(0, size - block, count)).astype(int).tolist()))


def run_model(model: Model, batch: np.ndarray) -> np.ndarray:
    """The model's output for a float32 batch shaped (batch, D, H, W, 1), as a float32 numpy array."""
    return np.asarray(model(batch), dtype=np.float32)


def predict_blocks(volume: np.ndarray, model: Model, *, block_shape: Sequence[int] | None = None,
                   overlap: float = 0.5, batch_size: int = 1) -> np.ndarray:
    """The model's voxel-wise output over ``volume`` (D, H, W), shaped (D, H, W, channels).

    ``block_shape`` None runs the whole volume at once. The model gets float32 batches shaped
    (batch, *block_shape, 1) and must return (batch, *block_shape, channels) or (batch, *block_shape).
    """
    if not 0 <= overlap < 1:
        raise BrainzooError(f"block overlap must be in [0, 1), not {overlap}")
    if batch_size < 1:
        raise BrainzooError(f"batch size must be at least 1, not {batch_size}")
    block = tuple(int(n) for n in (volume.shape if block_shape is None else block_shape))
    if len(block) != 3 or min(block) < 1:
        raise BrainzooError(f"block shape must be three positive integers, not {block_shape!r}")
    padding = [(max(0, b - n) // 2, max(0, b - n) - max(0, b - n) // 2) for n, b in zip(volume.shape, block)]
    padded = np.pad(np.asarray(volume, dtype=np.float32), padding)
    starts = list(itertools.product(*(block_starts(n, b, overlap) for n, b in zip(padded.shape, block))))
    weights = gaussian_weights(block)
    weight_sum = np.zeros(padded.shape, dtype=np.float64)
    output_sum = None
    for first in range(0, len(starts), batch_size):
        windows = [tuple(slice(s, s + b) for s, b in zip(start, block)) for start in starts[first:first + batch_size]]
        batch = np.stack([padded[window] for window in windows])[..., np.newaxis]
        predictions = _check_output(run_model(model, batch), batch.shape)
        if output_sum is None:
            output_sum = np.zeros(padded.shape + predictions.shape[-1:], dtype=np.float64)
        for window, prediction in zip(windows, predictions):
            output_sum[window] += prediction * weights[..., np.newaxis]
            weight_sum[window] += weights
    blended = output_sum / weight_sum[..., np.newaxis]
    inside = tuple(slice(before, before + n) for (before, _), n in zip(padding, volume.shape))
    return blended[inside].astype(np.float32)


def head_top_centre(volume: np.ndarray, spacing_mm: Sequence[float], below_mm: float) -> np.ndarray:
    """The voxel ``below_mm`` under the top of the head, left-right and front-back at the middle of the head's
    top 40 mm; the volume's last axis must point up (superior), as in every orientation a spec may name.

    Head voxels are those above a tenth of the volume's 99.5th percentile; the top is the highest slice with
    at least 1% of the fullest slice's head voxels, so stray bright voxels above the head do not count.
    """
    volume = np.asarray(volume)
    head = volume > HEAD_FRACTION * np.percentile(volume, 99.5)
    if not head.any():
        return (np.array(volume.shape) - 1) / 2
    counts = head.sum(axis=(0, 1))
    top = int(np.flatnonzero(counts >= 0.01 * counts.max())[-1])
    slab = max(1, int(round(TOP_SLAB_MM / spacing_mm[2])))
    across = np.argwhere(head[..., max(top - slab + 1, 0):top + 1])[:, :2].mean(axis=0)
    return np.array([*across, top - below_mm / spacing_mm[2]])


def predict_block_below_head_top(volume: np.ndarray, model: Model, *, block_shape: Sequence[int],
                                 spacing_mm: Sequence[float], below_mm: float) -> tuple[np.ndarray, tuple[int, ...]]:
    """The model's output from one block centred ``below_mm`` under the top of the head (0 elsewhere), and the
    block's start: one pass.

    The placement does not depend on the model's own output: a model trained on blocks around the brain
    (``training.data.sampling: brain``) that over-reaches into the neck would pull a block re-centred on what
    it found down onto more neck.
    """
    block = _check_block(volume, block_shape)
    volume = np.asarray(volume, dtype=np.float32)
    start = _block_start(head_top_centre(volume, spacing_mm, below_mm), block, volume.shape)
    return _in_volume(_run_block(volume, model, start, block), start, volume.shape), start


def _check_block(volume: np.ndarray, block_shape: Sequence[int]) -> np.ndarray:
    block = np.array([int(n) for n in block_shape])
    if block.shape != (3,) or block.min() < 1 or np.any(block > volume.shape):
        raise BrainzooError(f"a brain-centred block must be three positive sizes within the grid {volume.shape}, "
                            f"not {block_shape!r}")
    return block


def _block_start(centre: np.ndarray, block: np.ndarray, shape: Sequence[int]) -> tuple[int, ...]:
    """The start of the block centred on ``centre``, moved inside the volume."""
    return tuple(int(a) for a in np.clip(np.round(centre).astype(int) - block // 2, 0, np.array(shape) - block))


def _run_block(volume: np.ndarray, model: Model, start: tuple[int, ...], block: np.ndarray) -> np.ndarray:
    batch = volume[tuple(slice(a, a + b) for a, b in zip(start, block))][np.newaxis, ..., np.newaxis]
    return _check_output(run_model(model, batch), batch.shape)[0]


def _in_volume(prediction: np.ndarray, start: tuple[int, ...], shape: Sequence[int]) -> np.ndarray:
    output = np.zeros(tuple(shape) + prediction.shape[-1:], dtype=np.float32)
    output[tuple(slice(a, a + b) for a, b in zip(start, prediction.shape))] = prediction
    return output


def _check_output(output: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    if output.shape == input_shape[:-1]:
        return output[..., np.newaxis]
    if output.ndim != 5 or output.shape[:-1] != input_shape[:-1]:
        raise BrainzooError(f"the model returned shape {output.shape} for input {input_shape}; a voxel-wise model "
                            f"must return (batch, {', '.join(map(str, input_shape[1:4]))}, channels)")
    return output
