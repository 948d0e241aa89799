"""Overlap and distance between two brain masks: what brain-extraction cards and QC records report."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from brainzoo.errors import BrainzooError


def dice(first: np.ndarray, second: np.ndarray) -> float:
    """Dice overlap of two boolean arrays (1 for two empty masks)."""
    total = int(first.sum()) + int(second.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(first, second).sum()) / total


def hausdorff95(first: np.ndarray, second: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """The larger of the two directed 95th-percentile distances (mm) between the masks' surfaces.

    Surfaces are the mask voxels with a face-neighbour outside the mask; distances run between voxel centres,
    through the voxel spacing. Only the bounding box of both masks (and a one-voxel border) is computed on:
    every surface voxel lies inside it, so the distances are the same.
    """
    if not first.any() or not second.any():
        raise BrainzooError("Hausdorff distance: a mask is empty")
    box = ndimage.find_objects((first | second).astype(np.uint8))[0]
    first, second = (np.pad(m[box], 1) for m in (first, second))
    surfaces = [m & ~ndimage.binary_erosion(m) for m in (first, second)]
    directed = [np.percentile(ndimage.distance_transform_edt(~to, sampling=spacing_mm)[source], 95)
                for source, to in (surfaces, surfaces[::-1])]
    return float(max(directed))
