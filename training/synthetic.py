"""Small synthetic whole-head T1-weighted volumes, with brain masks and an age-dependent atrophy signal.

These volumes exist to prove that training learns: that on data small enough for CI a brain-age model's loss
falls and its predictions follow age, and that a brain-extraction model finds the mask. They are not a model
of brain ageing, and nothing trained on them is a brain-age or brain-extraction model.

Each head is built from nilearn's MNI152 templates (shipped with nilearn, no download): the skull-stripped T1
template and its tissue maps are resampled to a small grid and wrapped in a CSF, skull and scalp shell. Age
thins the cortex and enlarges the ventricles: at 2 mm, tissue within an age-scaled distance of the sulcal or
ventricular CSF turns into CSF, and the resampled result keeps that loss as partial volume. A random smooth
deformation, head size and position, tissue contrast, bias field and Rician noise make every subject
different. The templates are prepared once per process (seconds); each head then takes a fraction of a second.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from brainzoo.errors import BrainzooError
from brainzoo.fileio import save_nifti, write_csv

_TEMPLATE_MM = 2.0
_PAD = 16  # template voxels of room for the shell around the brain
_MARGIN_MM = 24.0  # field of view beyond the brain's bounding box
_YOUNG, _OLD = 20.0, 90.0  # atrophy grows linearly between these ages and stays flat outside them
_CORTICAL_THINNING_MM = 3.0  # tissue lost next to sulcal CSF at _OLD
_VENTRICLE_GROWTH_MM = 8.0  # tissue lost around the ventricles at _OLD
_ATROPHY_LEVELS = 5  # atrophied templates from _YOUNG to _OLD; ages in between interpolate
_SEX_CODES = ("F", "M")


@dataclass(frozen=True)
class SyntheticHead:
    """One subject: T1-like ``volume`` (float32), binary brain ``mask`` (uint8), RAS ``affine`` (mm)."""

    volume: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True)
class _Maps:
    """Template maps resampled to one grid, ready to be deformed per subject.

    ``stack`` holds, along its last axis: the skull-stripped T1 template (white matter about 1) at each of
    ``_ATROPHY_LEVELS`` ages from ``_YOUNG`` to ``_OLD``, the brain-mask probability, and the signed distance
    (mm) from the inner surface of the skull (negative inside).
    """

    stack: np.ndarray
    csf_level: float  # template intensity of CSF, on the same scale
    affine: np.ndarray
    voxel_mm: float


def synthetic_head(age: float, *, sex: int = 0, shape: Sequence[int] = (48, 48, 48), seed: int = 0) -> SyntheticHead:
    """One synthetic head of the given age (years, 20-90) and sex (0 female, 1 male: a 4% larger head).

    The same ``seed`` gives the same anatomy, deformation and noise, so heads that differ only in ``age``
    differ only by atrophy.
    """
    maps = _template_maps(tuple(int(size) for size in shape))
    shape = maps.stack.shape[:3]
    rng = np.random.default_rng(seed)
    warped = np.moveaxis(_trilinear(maps.stack, _subject_points(maps, rng, 1.0 + 0.04 * sex)), -1, 0)
    *t1_levels, brain, head_distance = warped.reshape(-1, *shape)
    level = np.clip((age - _YOUNG) / (_OLD - _YOUNG), 0.0, 1.0) * (_ATROPHY_LEVELS - 1)
    below = min(int(level), _ATROPHY_LEVELS - 2)
    t1 = t1_levels[below] + (level - below) * (t1_levels[below + 1] - t1_levels[below])

    contrast = rng.uniform(0.9, 1.1)
    ramp_mm = 0.5 * maps.voxel_mm
    skull_mm, scalp_mm = rng.uniform(4.0, 7.0, size=2)
    inside_skull, inside_bone, inside_scalp = (np.clip((edge - head_distance) / ramp_mm + 0.5, 0.0, 1.0)
                                               for edge in (0.0, skull_mm, skull_mm + scalp_mm))
    shell = (maps.csf_level * inside_skull + rng.uniform(0.03, 0.1) * (inside_bone - inside_skull)
             + rng.uniform(0.5, 0.9) * (inside_scalp - inside_bone))
    volume = (brain * t1 + (1 - brain) * shell) ** contrast
    volume *= rng.uniform(0.8, 1.2) * np.exp(smooth_field(rng, shape, terms=3, amplitude=0.15))
    sigma = rng.uniform(0.01, 0.04)
    volume = np.hypot(volume + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))
    return SyntheticHead(volume.astype(np.float32), (brain > 0.5).astype(np.uint8), maps.affine.copy())


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    n_subjects: int,
    *,
    shape: Sequence[int] = (48, 48, 48),
    seed: int = 0,
    age_range: tuple[float, float] = (_YOUNG, _OLD),
    force: bool = False,
) -> Path:
    """Write ``sub-NNN_T1w.nii.gz`` and ``sub-NNN_mask.nii.gz`` for ``n_subjects`` and ``subjects.csv``.

    The CSV (columns ``path``, ``mask``, ``age``, ``sex`` as F/M; paths relative to the CSV) is written last,
    so a folder with a CSV is complete; it is what :func:`brainzoo.training.tfrecords.read_table` reads.
    Ages are uniform in ``age_range``; subject ``i`` is the same whatever ``n_subjects`` is.
    """
    if n_subjects < 1:
        raise BrainzooError(f"n_subjects must be at least 1, got {n_subjects}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(n_subjects):
        rng = np.random.default_rng([seed, index])
        age = round(float(rng.uniform(*age_range)), 1)
        sex = int(rng.integers(2))
        head = synthetic_head(age, sex=sex, shape=shape, seed=int(rng.integers(2**31)))
        name = f"sub-{index + 1:03d}"
        for suffix, data in (("T1w", head.volume), ("mask", head.mask)):
            save_nifti(nib.Nifti1Image(data, head.affine), out_dir / f"{name}_{suffix}.nii.gz", force)
        rows.append({"path": f"{name}_T1w.nii.gz", "mask": f"{name}_mask.nii.gz", "age": age, "sex": _SEX_CODES[sex]})
    return write_csv(out_dir / "subjects.csv", rows, ["path", "mask", "age", "sex"], force)


def smooth_field(rng: np.random.Generator, shape: Sequence[int], *, terms: int, amplitude: float) -> np.ndarray:
    """A random field smooth on the scale of the grid, largest magnitude ``amplitude``.

    A sum of products of low-frequency cosines (``terms`` per axis) with random weights: separable, so it
    costs a few tensor products instead of a 3D spline interpolation.
    """
    bases = [np.cos(np.pi * np.outer(np.arange(terms), np.linspace(0.0, 1.0, size))) for size in shape]
    field = np.einsum("abc,ax,by,cz->xyz", rng.uniform(-1.0, 1.0, size=(terms,) * 3), *bases, optimize=True)
    return (amplitude / np.abs(field).max() * field).astype(np.float32)


def _trilinear(stack: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Sample every channel of ``stack`` ``[X, Y, Z, C]`` at ``points`` ``[3, N]`` (clamped to the grid)."""
    upper = np.array(stack.shape[:3])[:, None] - 1
    points = np.clip(points, 0, upper)
    low = np.minimum(np.floor(points).astype(np.intp), upper - 1)
    fraction = (points - low)[..., None]
    result = 0.0
    for corner in np.ndindex(2, 2, 2):
        offset = np.array(corner)[:, None]
        weight = np.prod(np.where(offset[..., None] == 1, fraction, 1.0 - fraction), axis=0)
        result = result + weight * stack[tuple(low + offset)]
    return result


def _subject_points(maps: _Maps, rng: np.random.Generator, head_scale: float) -> np.ndarray:
    """Where each output voxel samples the template maps: a random similarity transform plus a smooth warp."""
    shape = maps.stack.shape[:3]
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    centre = (np.array(shape, dtype=np.float32)[:, None] - 1) / 2
    angles = np.radians(rng.uniform(-5, 5, size=3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        plane = [a for a in range(3) if a != axis]
        turn = np.eye(3)
        turn[np.ix_(plane, plane)] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
        rotation = rotation @ turn
    scale = head_scale * rng.uniform(0.97, 1.03)
    shift = rng.uniform(-1.5, 1.5, size=(3, 1))
    points = rotation @ (grid - centre) / scale + centre + shift
    warp_voxels = 3.0 / maps.voxel_mm  # about 3 mm of smooth deformation
    for axis in range(3):
        points[axis] += smooth_field(rng, shape, terms=4, amplitude=warp_voxels).ravel()
    return points


@dataclass(frozen=True)
class _Template:
    """The channels of :class:`_Maps` at 2 mm, padded with room for the shell, before resampling."""

    maps: tuple[np.ndarray, ...]
    csf_level: float
    affine: np.ndarray  # of the unpadded template
    brain_box: tuple[np.ndarray, np.ndarray]  # first and last padded voxel of the brain


@functools.lru_cache(maxsize=1)
def _template() -> _Template:
    """Load the MNI152 templates and atrophy them at every level (seconds, once per process)."""
    from nilearn import datasets  # nilearn is slow to import and only needed here

    template = datasets.load_mni152_template(resolution=2)
    loaded = [image.get_fdata(dtype=np.float32) for image in (
        template, datasets.load_mni152_brain_mask(resolution=2), datasets.load_mni152_gm_template(resolution=2),
        datasets.load_mni152_wm_template(resolution=2))]
    t1, brain, grey, white = (np.pad(image, _PAD) for image in loaded)
    brain = brain > 0.5
    white_level = float(np.median(t1[white > 0.9]))
    t1 = t1 * brain / white_level
    csf = brain & (grey + white < 0.5)
    csf_level = float(np.median(t1[csf]))
    tissue_depth = ndimage.distance_transform_edt(brain & ~csf) * _TEMPLATE_MM
    ventricles = _large_components(csf & (ndimage.distance_transform_edt(brain) * _TEMPLATE_MM > 20.0))
    ventricle_distance = ndimage.distance_transform_edt(~ventricles) * _TEMPLATE_MM
    levels = []
    for atrophy in np.linspace(0.0, 1.0, _ATROPHY_LEVELS):
        # the fraction of each tissue voxel within reach, ramped over one voxel so that loss grows smoothly
        reach = np.maximum(atrophy * _CORTICAL_THINNING_MM - tissue_depth,
                           atrophy * _VENTRICLE_GROWTH_MM - ventricle_distance)
        lost = np.clip(reach / _TEMPLATE_MM + 0.5, 0.0, 1.0) * (brain & ~csf)
        levels.append(t1 * (1 - lost) + csf_level * lost)
    hull = ndimage.gaussian_filter(brain.astype(np.float32), 8.0 / _TEMPLATE_MM) > 0.2
    head_distance = (ndimage.distance_transform_edt(~hull) - ndimage.distance_transform_edt(hull)) * _TEMPLATE_MM
    occupied = np.argwhere(brain)
    return _Template(maps=tuple(image.astype(np.float32) for image in (*levels, brain, head_distance)),
                     csf_level=csf_level, affine=template.affine,
                     brain_box=(occupied.min(axis=0), occupied.max(axis=0)))


@functools.lru_cache(maxsize=4)
def _template_maps(shape: tuple[int, int, int]) -> _Maps:
    """The template maps resampled (anti-aliased) to an isotropic ``shape`` grid that frames the head."""
    if len(shape) != 3 or min(shape) < 8:
        raise BrainzooError(f"shape must be three sizes of at least 8, got {shape}")
    template = _template()
    low, high = template.brain_box
    extent_mm = (high - low + 1) * _TEMPLATE_MM + 2 * _MARGIN_MM
    voxel_mm = float(np.max(extent_mm / np.array(shape)))
    step = voxel_mm / _TEMPLATE_MM
    axes = [(low[axis] + high[axis]) / 2 + (np.arange(size) - (size - 1) / 2) * step
            for axis, size in enumerate(shape)]
    points = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)

    def resample(image: np.ndarray) -> np.ndarray:
        smooth = ndimage.gaussian_filter(image, 0.4 * step)
        return ndimage.map_coordinates(smooth, points, order=1, mode="nearest").reshape(shape)

    to_template = np.eye(4)
    to_template[:3, :3] *= step
    to_template[:3, 3] = [axis[0] - _PAD for axis in axes]
    return _Maps(stack=np.stack([resample(image) for image in template.maps], axis=-1),
                 csf_level=template.csf_level, affine=template.affine @ to_template, voxel_mm=voxel_mm)


def _large_components(mask: np.ndarray) -> np.ndarray:
    """Connected parts of ``mask`` at least a tenth the size of the largest (the lateral ventricles)."""
    labels, count = ndimage.label(mask)
    sizes = ndimage.sum_labels(mask, labels, np.arange(1, count + 1))
    return np.isin(labels, 1 + np.flatnonzero(sizes >= 0.1 * sizes.max()))
