"""The array steps of a model's preprocessing, named as in ``spec.yaml`` (``{step: crop, shape: [160, 192, 160]}``).

The options of a step are the keyword arguments of its function here, so a spec with a misspelt or missing
option fails with a message instead of running with a default. Geometric steps also return the map from
their output voxel indices to their input ones, which keeps the way back to the native grid exact.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from brainzoo.errors import BrainzooError
from brainzoo.predict.volumes import GriddedVolume, resample_indices
from brainzoo.spec import three_sizes

if TYPE_CHECKING:
    from brainzoo.spec import Step


def _translation(offset: Sequence[float]) -> np.ndarray:
    new_to_old = np.eye(4)
    new_to_old[:3, 3] = offset
    return new_to_old


def centre_crop(data: np.ndarray, shape: Sequence[int],
                start: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Keep the central ``shape`` voxels; the start on each axis is ``(old - new) // 2`` (as SFCN's crop_center),
    or ``start`` where the upstream's window is not centred (AgeMapper keeps [10:170, 12:204, 0:160])."""
    shape = three_sizes(shape, "preprocessing step 'crop': shape")
    if any(new > old for new, old in zip(shape, data.shape)):
        raise BrainzooError(f"preprocessing step 'crop': cannot crop {_dims(data.shape)} to the larger {_dims(shape)}")
    if start is None:
        start = [(old - new) // 2 for old, new in zip(data.shape, shape)]
    elif (not isinstance(start, (list, tuple)) or len(start) != 3
          or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in start)):
        raise BrainzooError(f"preprocessing step 'crop': start must be three non-negative integers, not {start!r}")
    elif any(s + new > old for s, new, old in zip(start, shape, data.shape)):
        raise BrainzooError(f"preprocessing step 'crop': a {_dims(shape)} window from {list(start)} does not fit "
                            f"in {_dims(data.shape)}")
    start = list(start)
    window = tuple(slice(s, s + n) for s, n in zip(start, shape))
    return data[window], _translation(start)


def centre_pad(data: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad to ``shape``, the extra ``(new - old) // 2`` voxels before and the rest after."""
    shape = three_sizes(shape, "preprocessing step 'pad': shape")
    if any(new < old for new, old in zip(shape, data.shape)):
        raise BrainzooError(f"preprocessing step 'pad': cannot pad {_dims(data.shape)} to the smaller {_dims(shape)}")
    before = [(new - old) // 2 for old, new in zip(data.shape, shape)]
    widths = [(b, new - old - b) for b, old, new in zip(before, data.shape, shape)]
    return np.pad(data, widths), _translation([-b for b in before])


def resize(data: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear resize to ``shape`` with voxel centres aligned as torch's ``interpolate(align_corners=False)``.

    That is what MONAI's ``Resize`` (used by the FLAIR brain-age models) does: the output voxel ``i`` samples
    the input at ``(i + 0.5) * old / new - 0.5``, clamped to the edge voxels.
    """
    shape = three_sizes(shape, "preprocessing step 'resize': shape")
    scale = np.asarray(data.shape, dtype=float) / np.asarray(shape, dtype=float)
    new_to_old = _translation(0.5 * scale - 0.5)
    new_to_old[:3, :3] = np.diag(scale)
    return resample_indices(data, new_to_old, shape, mode="nearest"), new_to_old


def zscore(data: np.ndarray, nonzero: bool = False) -> np.ndarray:
    """Subtract the mean and divide by the standard deviation; with ``nonzero``, over (and only of) voxels != 0."""
    selected = data != 0 if nonzero else np.ones(data.shape, dtype=bool)
    values = data[selected].astype(np.float64)
    std = values.std() if values.size else 0.0
    if std == 0:
        raise BrainzooError("preprocessing step 'zscore': the volume is constant")
    return np.where(selected, (data - values.mean()) / std, 0).astype(np.float32)


def divide_by_mean(data: np.ndarray) -> np.ndarray:
    """Divide by the mean over the whole array, background included (SFCN, AgeMapper)."""
    mean = data.mean(dtype=np.float64)
    if mean == 0:
        raise BrainzooError("preprocessing step 'divide-by-mean': the volume's mean is 0")
    return (data / mean).astype(np.float32)


def minmax(data: np.ndarray) -> np.ndarray:
    """Scale linearly to [0, 1]."""
    low, high = float(data.min()), float(data.max())
    if low == high:
        raise BrainzooError("preprocessing step 'minmax': the volume is constant")
    return ((data - low) / (high - low)).astype(np.float32)


PERCENTILE_WINDOW = (0.5, 99.5)  # deepbet's window; training's ``normalization: percentile`` uses it too


def percentile_window(data: np.ndarray, low: float = PERCENTILE_WINDOW[0],
                      high: float = PERCENTILE_WINDOW[1]) -> np.ndarray:
    """Clip to the ``low`` and ``high`` percentiles (linear interpolation) and scale that window to [0, 1].

    Unlike a z-score, the result does not depend on how much background or neck the field of view holds, nor
    on a few bright voxels (fat, vessels): deepbet normalises this way with 0.5 and 99.5.
    """
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise BrainzooError(f"preprocessing step 'percentile': {name} must be a percentile in [0, 100], not {value!r}")
    if low >= high:
        raise BrainzooError(f"preprocessing step 'percentile': low ({low}) must be below high ({high})")
    floor, ceiling = np.percentile(data, [low, high])
    if floor == ceiling:
        raise BrainzooError(f"preprocessing step 'percentile': the {low} and {high} percentiles are equal ({floor:g})")
    return ((np.clip(data, floor, ceiling) - floor) / (ceiling - floor)).astype(np.float32)


def scale(data: np.ndarray, factor: float) -> np.ndarray:
    """Multiply by a fixed ``factor`` (a per-contrast scale, as in AgeMapper)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise BrainzooError(f"preprocessing step 'scale': factor must be a number, not {factor!r}")
    return (data * np.float32(factor)).astype(np.float32)


def bounds_crop(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop to the bounding box of the non-zero voxels (a skull-stripped brain's box), as ml_MRI's ``BoundsCrop``.

    The upstream drops every plane whose sum is 0, interior ones included; a brain has none inside its box, so
    the box is the same volume and keeps the step a plain crop whose index map stays exact.
    """
    nonzero = np.nonzero(data)
    if not nonzero[0].size:
        raise BrainzooError("preprocessing step 'bounds-crop': the volume is all zero (no brain to crop to)")
    start = [int(axis.min()) for axis in nonzero]
    window = tuple(slice(first, int(axis.max()) + 1) for first, axis in zip(start, nonzero))
    return data[window], _translation(start)


def _check_smallest_side(smallest_side: int) -> None:
    if isinstance(smallest_side, bool) or not isinstance(smallest_side, int) or smallest_side < 2:
        raise BrainzooError(f"preprocessing step 'zoom': smallest_side must be an integer of at least 2, "
                            f"not {smallest_side!r}")


def zoom(data: np.ndarray, smallest_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Zoom by one factor on all axes so that the smallest side becomes ``smallest_side`` voxels (ml_MRI).

    As the upstream's ``scipy.ndimage.zoom(img, smallest_side / min(img.shape))``: cubic spline, each axis
    ``round(n * factor)`` voxels, the first and last voxel centres kept in place, so output voxel ``i`` samples
    the input at ``i * (n_in - 1) / (n_out - 1)``.
    """
    _check_smallest_side(smallest_side)
    if min(data.shape) < 2:
        raise BrainzooError(f"preprocessing step 'zoom': cannot zoom a {_dims(data.shape)} volume")
    from scipy import ndimage

    zoomed = ndimage.zoom(data.astype(np.float32), smallest_side / min(data.shape), order=3)
    new_to_old = np.eye(4)
    new_to_old[:3, :3] = np.diag([(old - 1) / (new - 1) for old, new in zip(data.shape, zoomed.shape)])
    return zoomed, new_to_old


def _check_axes(axes: Sequence[int]) -> None:
    if not isinstance(axes, (list, tuple)) or sorted(axes) != [0, 1, 2]:
        raise BrainzooError(f"preprocessing step 'transpose': axes must be a permutation of 0, 1, 2, not {axes!r}")


def transpose(data: np.ndarray, axes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Permute the array axes: output axis ``i`` is input axis ``axes[i]`` (ml_MRI swaps the first two)."""
    _check_axes(axes)
    new_to_old = np.zeros((4, 4))
    new_to_old[list(axes), [0, 1, 2]] = 1
    new_to_old[3, 3] = 1
    return np.transpose(data, axes), new_to_old


def zscore_above_mean(data: np.ndarray) -> np.ndarray:
    """Z-score with the mean and SD (n - 1) of the voxels brighter than the volume's mean, applied to every voxel.

    torchio's ``ZNormalization(masking_method=ZNormalization.mean)``, which ml_MRI uses: the statistics are the
    head's (or brain's), not the background's.
    """
    values = data[data > data.mean(dtype=np.float64)].astype(np.float64)
    std = values.std(ddof=1) if values.size > 1 else 0.0
    if std == 0:
        raise BrainzooError("preprocessing step 'zscore-above-mean': the voxels above the mean are constant")
    return ((data - values.mean()) / std).astype(np.float32)


def _check_landmarks(percentiles: Sequence[float], landmarks: Sequence[float]) -> None:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in [*percentiles, *landmarks])
    if (not isinstance(percentiles, (list, tuple)) or not isinstance(landmarks, (list, tuple)) or not numbers
            or len(percentiles) < 2 or len(percentiles) != len(landmarks)):
        raise BrainzooError("preprocessing step 'histogram-standardisation': percentiles and landmarks must be two "
                            f"lists of numbers of one length (at least 2), not {percentiles!r} and {landmarks!r}")
    if not (0 <= percentiles[0] and percentiles[-1] <= 100 and np.all(np.diff(percentiles) > 0)):
        raise BrainzooError("preprocessing step 'histogram-standardisation': percentiles must increase within "
                            f"[0, 100], not {percentiles!r}")
    if not np.all(np.diff(landmarks) >= 0):
        raise BrainzooError(f"preprocessing step 'histogram-standardisation': landmarks must not decrease, "
                            f"not {landmarks!r}")


def histogram_standardisation(data: np.ndarray, percentiles: Sequence[float],
                              landmarks: Sequence[float]) -> np.ndarray:
    """Nyul and Udupa's piecewise-linear histogram standardisation, as torchio 0.13's ``HistogramStandardization``.

    The volume's intensities at ``percentiles`` (of every voxel) are mapped onto ``landmarks`` linearly between
    neighbouring percentiles and, beyond the first and last, along the end segments; a segment between two
    equal percentiles (background) gets slope 0. torchio uses the percentiles 1, 10, 20, ..., 90, 99.
    """
    _check_landmarks(percentiles, landmarks)
    flat = data.reshape(-1).astype(np.float32)
    values = np.percentile(flat, percentiles)
    spans = np.diff(values)
    spans[spans < 1e-5] = np.inf
    slopes = np.diff(np.asarray(landmarks, dtype=np.float64)) / spans
    intercepts = np.asarray(landmarks[:-1], dtype=np.float64) - slopes * values[:-1]
    segment = np.digitize(flat, values[1:-1])
    return (slopes[segment] * flat + intercepts[segment]).reshape(data.shape).astype(np.float32)


def histogram_landmarks(volumes: Sequence[np.ndarray], percentiles: Sequence[float]) -> list[float]:
    """Landmarks for :func:`histogram_standardisation` from training volumes, as torchio 0.13's ``train``.

    Each volume's intensities at ``percentiles`` are scaled so that its first and last percentiles map to 0 and
    100; the landmarks are their mean. Give each volume as the upstream masked it (ml_MRI: its non-zero box).
    """
    table = np.array([np.percentile(v.astype(np.float32), percentiles) for v in volumes], dtype=np.float64)
    slopes = 100 / (table[:, -1] - table[:, 0])
    return ((slopes @ table) / len(table) + np.mean(-slopes * table[:, 0])).tolist()


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(n) for n in shape)


GEOMETRIC_STEPS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "crop": centre_crop, "pad": centre_pad, "resize": resize, "bounds-crop": bounds_crop, "zoom": zoom,
    "transpose": transpose,
}
INTENSITY_STEPS: dict[str, Callable[..., np.ndarray]] = {
    "zscore": zscore, "divide-by-mean": divide_by_mean, "minmax": minmax, "percentile": percentile_window,
    "scale": scale, "zscore-above-mean": zscore_above_mean, "histogram-standardisation": histogram_standardisation,
}
# Steps whose option values can be checked without a volume (``brainzoo validate`` does, before any work).
OPTION_VALUE_CHECKS: dict[str, Callable[..., None]] = {
    "histogram-standardisation": _check_landmarks, "zoom": _check_smallest_side, "transpose": _check_axes,
}
ARRAY_STEPS = GEOMETRIC_STEPS.keys() | INTENSITY_STEPS.keys()


def check_options(what: str, function: Callable, options: dict, skip: int = 1) -> None:
    """Fail unless ``options`` are exactly the keyword arguments ``function`` takes after its first ``skip``;
    ``what`` names the entry in the message (``preprocessing step 'crop'``)."""
    parameters = list(inspect.signature(function).parameters.values())[skip:]
    known = {p.name for p in parameters}
    unknown = sorted(set(options) - known)
    missing = [p.name for p in parameters if p.default is inspect.Parameter.empty and p.name not in options]
    if unknown or missing:
        takes = ", ".join(sorted(known)) or "no options"
        problem = f"unknown option(s) {', '.join(unknown)}" if unknown else f"missing option(s) {', '.join(missing)}"
        raise BrainzooError(f"{what}: {problem} (it takes {takes})")


def check_step_options(step: Step) -> None:
    """An array step's options must be exactly the keyword arguments of its function (and sound, where that can
    be known without a volume)."""
    check_options(f"preprocessing step {step.name!r}", {**GEOMETRIC_STEPS, **INTENSITY_STEPS}[step.name], step.options)
    if step.name in OPTION_VALUE_CHECKS:
        OPTION_VALUE_CHECKS[step.name](**step.options)


def apply_array_step(volume: GriddedVolume, step: Step) -> GriddedVolume:
    """Run one array step."""
    check_step_options(step)
    if step.name in GEOMETRIC_STEPS:
        data, new_to_old = GEOMETRIC_STEPS[step.name](volume.data, **step.options)
        return volume.moved(data, new_to_old)
    return volume.moved(INTENSITY_STEPS[step.name](volume.data, **step.options))
