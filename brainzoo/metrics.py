"""What cards and QC records report: overlap and distance between two brain masks (brain extraction), and how
predicted ages agree with chronological ones (brain age)."""

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


def _paired(predicted: Sequence[float], actual: Sequence[float], least: int) -> tuple[np.ndarray, np.ndarray]:
    predicted, actual = (np.asarray(values, dtype=np.float64) for values in (predicted, actual))
    if predicted.shape != actual.shape or predicted.ndim != 1:
        raise BrainzooError(f"needs two equally long lists of numbers, not {predicted.shape} and {actual.shape}")
    if predicted.size < least:
        raise BrainzooError(f"needs at least {least} value(s), got {predicted.size}")
    return predicted, actual


def mean_absolute_error(predicted: Sequence[float], actual: Sequence[float]) -> float:
    predicted, actual = _paired(predicted, actual, 1)
    return float(np.mean(np.abs(predicted - actual)))


def root_mean_squared_error(predicted: Sequence[float], actual: Sequence[float]) -> float:
    predicted, actual = _paired(predicted, actual, 1)
    return float(np.sqrt(np.mean((predicted - actual) ** 2)))


def pearson_r(predicted: Sequence[float], actual: Sequence[float]) -> float:
    """Pearson's correlation; undefined (an error) when either side is constant."""
    predicted, actual = _paired(predicted, actual, 2)
    deviations = predicted - predicted.mean(), actual - actual.mean()
    norms = [float(np.sqrt(d @ d)) for d in deviations]
    if min(norms) == 0:
        raise BrainzooError("Pearson r is undefined: the predictions or the ages are all the same")
    return float(deviations[0] @ deviations[1] / (norms[0] * norms[1]))


def age_bias(ages: Sequence[float], brain_ages: Sequence[float]) -> tuple[float, float]:
    """Slope and intercept of the least-squares line (brain age - age) = slope * age + intercept.

    The age bias of Beheshti et al. 2019 (NeuroImage: Clinical 24:102063): brain-age models regress towards
    their training mean, so the error falls with age (negative slope). Needs at least two different ages.
    """
    brain_ages, ages = _paired(brain_ages, ages, 2)
    centred_ages = ages - ages.mean()
    if not centred_ages.any():
        raise BrainzooError("the age bias is undefined: every age is the same")
    errors = brain_ages - ages
    slope = float(centred_ages @ (errors - errors.mean()) / (centred_ages @ centred_ages))
    return slope, float(errors.mean() - slope * ages.mean())
