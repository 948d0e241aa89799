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
    """Threshold, then optionally keep the largest component and fill holes."""
    mask = binarize(probability, threshold)
    if keep_largest:
        mask = largest_component(mask)
    if fill:
        mask = fill_holes(mask)
    return mask
