"""Turning a brain probability map into a clean binary mask.

A network's stray positives (eyes, neck fat) are small blobs apart from the brain, and its misses inside the
brain are enclosed holes; keeping the largest connected component and filling enclosed holes removes both
without touching the brain's outline.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from brainzoo.errors import BrainzooError


def binarize(probability: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Voxels whose probability is at least ``threshold``."""
    if not 0 < threshold < 1:
        raise BrainzooError(f"mask threshold must be between 0 and 1, not {threshold}")
    return np.asarray(probability) >= threshold


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of ``mask`` (an empty mask stays empty)."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not reach the array's border filled."""
    return ndimage.binary_fill_holes(mask)


def clean_mask(probability: np.ndarray, threshold: float = 0.5, *, keep_largest: bool = True,
               fill: bool = True) -> np.ndarray:
    """Threshold, then optionally keep the largest component and fill holes.

    Both run on the mask's bounding box grown by one voxel, which gives the same result (every voxel outside
    the box is background connected to the array's border) in a fraction of the time on a 1 mm head.
    """
    mask = binarize(probability, threshold)
    box = _bounding_box(mask, margin=1)
    if box is None:
        return mask
    inner = mask[box]
    if keep_largest:
        inner = largest_component(inner)
    if fill:
        inner = fill_holes(inner)
    mask[box] = inner
    return mask


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """The slices of the box around ``mask``'s voxels, ``margin`` wider on each side within the array."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(max(hits[0] - margin, 0), min(hits[-1] + margin + 1, mask.shape[axis])))
    return tuple(box)
