"""Synthetic whole heads drawn from label maps (SynthSeg-style), each with a brain mask that follows it exactly.

A student distilled from a few young T1 scans of one site fails on older, atrophied, low-resolution heads from
other scanners. SynthSeg (Billot et al., Medical Image Analysis 2023) trains on images drawn from label maps
with everything but the anatomy randomised; here each head is drawn from a label map (the IXI DLMUSE labels
inside the brain, intensity classes of the real scan outside it: :func:`head_label_map`) in this order:

1. atrophy: ventricle and sulcal-CSF labels grow into the brain tissue next to them, by a random fraction of
   ``ventricle_mm`` and ``sulcal_mm`` (the brain mask keeps its voxels: CSF inside the mask stays inside it);
2. a smooth random deformation (rotation, scaling, shift and a smooth warp), the same nearest-voxel lookup for
   the labels and the mask, so the mask follows exactly;
3. per-label random intensities, a Gaussian mixture (:func:`.contrast_synthesis.random_contrast`);
4. a bias field;
5. a random resolution: 1-3 mm in-plane and, on a random slice axis, 1-6 mm thick slices (Gaussian blur of
   that width, sampling at that spacing, linear interpolation back to the working grid);
6. Rician noise, rescaling to [0, 1];
7. sometimes a cropped field of view: image, mask and labels are emptied outside a random box.

Every head is determined by ``(seed, index)``. :func:`write_synthetic_heads` draws N heads from a table of label
maps, choosing each head's label map with weights that favour older subjects, and writes a table that
``brainzoo tfrecords --kind segmentation`` reads; ``brainzoo synth-heads`` runs it. A head's brain mask is its
source's labels > 0, a mask given with the source, or a teacher's mask of the source's scan (a student distilled
from that teacher then learns one boundary, the teacher's, on real and synthetic heads alike).

For evaluation at other resolutions, :func:`coarser_scan` makes a real scan what a scanner with coarser voxels or
thicker slices would have recorded, on that coarser grid; ``brainzoo lower-resolution`` runs it on a table of scans,
keeping their reference label maps.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from brainzoo.errors import BrainzooError
from brainzoo.fileio import all_or_nothing, output_folder, save_nifti, write_csv
from brainzoo.training.contrast_synthesis import random_contrast, tissue_label_map
from brainzoo.training.distill import Teacher
from brainzoo.training.synthetic import smooth_field
from brainzoo.training.tfrecords import read_rows

TABLE = "heads.csv"
HEAD_LABEL_OFFSET = 1000  # head_label_map: intensity class k outside the brain becomes label 1000 + k
OUTSIDE_FOV = -1  # the label of voxels a cropped field of view left out
# DLMUSE (MUSE / Neuromorphometrics numbering): 4 and 11 the 3rd and 4th ventricles, 49-52 the inferior and
# lateral ventricles. Label 1 is not in DLMUSE's ROI table (the shared IXI_dlmuse.csv lists 4 and up); measured
# on IXI012 at 2 mm it is the darkest label in T1 (mean 540; lateral ventricles 640-680, brain 1108) and half of
# its voxels lie within 2 voxels of the brain mask's surface: the CSF between the gyri.
DLMUSE_VENTRICLES = (4, 11, 49, 50, 51, 52)
DLMUSE_SULCAL_CSF = (1,)
VENTRICLE_GROWTH_MM = 8.0  # largest ventricle growth (atrophy 1)
SULCAL_GROWTH_MM = 3.0  # largest cortical thinning next to sulcal CSF (atrophy 1)
AGE_DOUBLING_YEARS = 10.0  # write_synthetic_heads: a subject 10 years older is drawn twice as often


@dataclass(frozen=True)
class SynthesisRanges:
    """The ranges each head's random draws come from (defaults as in the module's description)."""

    atrophy: tuple[float, float] = (0.0, 1.0)
    rotation_degrees: float = 10.0
    scaling: tuple[float, float] = (0.9, 1.1)
    shift_mm: float = 6.0
    warp_mm: float = 4.0
    texture: float = 0.1  # per-label intensity sd, as a fraction of its mean (Gaussian mixture)
    bias: float = 0.4  # largest log-amplitude of the bias field
    in_plane_mm: tuple[float, float] = (1.0, 3.0)
    slice_mm: tuple[float, float] = (1.0, 6.0)
    noise: tuple[float, float] = (0.0, 0.05)  # Rician noise sd, as a fraction of the brightest voxel
    crop_probability: float = 0.3
    crop_fraction: tuple[float, float] = (0.7, 1.0)  # the kept length of each axis


@dataclass(frozen=True)
class SynthesizedHead:
    """One head on the label map's grid: ``image`` (float32, 0-1), ``mask`` (uint8), ``labels`` (int32, the
    atrophied and deformed label map; ``OUTSIDE_FOV`` where cropped) and the random ``draws`` (for the table)."""

    image: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    draws: dict


def head_label_map(brain_labels: np.ndarray, scan: np.ndarray, *, head_classes: int = 6) -> np.ndarray:
    """A whole-head label map: ``brain_labels`` where they are > 0, ``HEAD_LABEL_OFFSET`` + the scan's intensity
    class (1D k-means, 0 darkest) outside them, so that scalp, skull, fat and air get labels too (int32)."""
    if brain_labels.shape != scan.shape:
        raise BrainzooError(f"label map {brain_labels.shape} and scan {scan.shape} differ in shape")
    brain = brain_labels > 0
    classes = tissue_label_map(scan, brain, brain_classes=1, head_classes=head_classes).astype(np.int32)
    return np.where(brain, brain_labels.astype(np.int32), HEAD_LABEL_OFFSET - 1 + classes)


def grow_csf(labels: np.ndarray, brain: np.ndarray, csf_labels: Sequence[int], distance_mm: float,
             spacing_mm: Sequence[float]) -> np.ndarray:
    """Brain tissue (in ``brain``, not CSF) within ``distance_mm`` of a ``csf_labels`` voxel takes that voxel's
    label: the CSF spaces enlarge as the tissue around them shrinks. Returns a new label map."""
    csf = np.isin(labels, csf_labels)
    if distance_mm <= 0 or not csf.any():
        return labels.copy()
    distance, nearest = ndimage.distance_transform_edt(~csf, sampling=spacing_mm, return_indices=True)
    grown = brain & ~csf & (distance <= distance_mm)
    result = labels.copy()
    result[grown] = labels[tuple(axis[grown] for axis in nearest)]
    return result


def lower_resolution(image: np.ndarray, spacing_mm: Sequence[float], target_mm: Sequence[float]) -> np.ndarray:
    """``image`` as a scanner with voxels of ``target_mm`` (slice thickness = spacing) would see it, back on its own
    grid: a Gaussian blur of full width at half maximum ``target_mm``, sampling at that spacing, linear
    interpolation back. Axes whose target is not coarser than the grid are left alone (float32)."""
    ratio = np.asarray(target_mm, float) / np.asarray(spacing_mm, float)
    if np.all(ratio <= 1.0):
        return image.astype(np.float32)
    blurred = _scanner_blur(image, ratio)
    low_shape = [max(2, round(size / max(r, 1.0))) for size, r in zip(image.shape, ratio)]
    down = [np.linspace(0, size - 1, low) for size, low in zip(image.shape, low_shape)]
    low = ndimage.map_coordinates(blurred, np.meshgrid(*down, indexing="ij"), order=1, mode="nearest")
    up = [np.linspace(0, low_size - 1, size) for size, low_size in zip(image.shape, low_shape)]
    return ndimage.map_coordinates(low, np.meshgrid(*up, indexing="ij"), order=1, mode="nearest").astype(np.float32)


def _scanner_blur(image: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """The Gaussian blur that takes voxels to ``ratio`` times their size (full width at half maximum; axes whose
    ratio is 1 or less are left alone), float32."""
    sigma = np.where(ratio > 1.0, np.sqrt(np.maximum(ratio ** 2 - 1.0, 0.0)) / 2.355, 0.0)
    return ndimage.gaussian_filter(image.astype(np.float32), sigma, mode="nearest")


def coarser_scan(image: nib.Nifti1Image, target_mm: Sequence[float]) -> nib.Nifti1Image:
    """A scan as a scanner with voxels of ``target_mm`` (per voxel axis; slice thickness = spacing) would have
    recorded it, on a grid of that spacing: :func:`lower_resolution`'s blur, then linear sampling at the centres of
    the coarser voxels, which tile the same field of view. Axes whose target is not coarser keep their voxels."""
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim != 3:
        raise BrainzooError(f"a scan to make coarser must be 3D, got shape {data.shape}")
    spacing = np.asarray(image.header.get_zooms()[:3], float)
    ratio = np.maximum(np.asarray(target_mm, float) / spacing, 1.0)
    shape = [max(1, round(size / r)) for size, r in zip(data.shape, ratio)]
    starts = (ratio - 1.0) / 2.0  # coarse voxel j covers fine voxels j*r - 1/2 to (j+1)*r - 1/2
    centres = np.meshgrid(*[start + r * np.arange(n) for start, r, n in zip(starts, ratio, shape)], indexing="ij")
    coarse = ndimage.map_coordinates(_scanner_blur(data, ratio), centres, order=1, mode="nearest")
    scale = np.eye(4)
    scale[:3, :3] = np.diag(ratio)
    scale[:3, 3] = starts
    result = nib.Nifti1Image(coarse.astype(np.float32), image.affine @ scale)
    result.set_qform(image.affine @ scale, code=1)
    return result


def write_coarser_scans(table: str | os.PathLike, out_dir: str | os.PathLike,
                        spacings: Sequence[Sequence[float]], *, force: bool = False) -> Path:
    """Every scan of a table (``path`` column, ``id`` optional) at each of ``spacings`` by :func:`coarser_scan`, as
    ``<id>_<X>x<Y>x<Z>mm.nii.gz`` and, last, ``scans.csv``: one row per scan and spacing, in the input's columns,
    ``id`` and ``path`` the new scan's, every other cell naming a NIfTI file (a reference label map, say) rewritten
    relative to the new table, and ``source_id`` and ``spacing_mm`` added. A reference stays on its own grid:
    ``brainzoo evaluate`` brings it onto each scan's. A spacing no coarser than a scan's copies it (as float32)."""
    from brainzoo.predict.runners import study_scans  # the evaluation tables' reader: ids, paths relative to them

    table, out_dir = Path(table), Path(out_dir)
    if not spacings or any(len(spacing) != 3 or min(spacing) <= 0 for spacing in spacings):
        raise BrainzooError(f"each target spacing needs three sizes above 0 mm, got {[list(s) for s in spacings]}")
    if (out_dir / "scans.csv").exists() and not force:
        raise BrainzooError(f"{out_dir / 'scans.csv'}: exists; pass force=True to rewrite the set")
    rows = study_scans(table)
    columns = [*rows[0], "source_id", "spacing_mm"]
    tags = ["x".join(f"{size:g}" for size in spacing) + "mm" for spacing in spacings]
    jobs = [(row, spacing, f"{row['id']}_{tag}") for row in rows for spacing, tag in zip(spacings, tags)]
    outputs = [out_dir / f"{name}.nii.gz" for _, _, name in jobs]
    with output_folder(out_dir), all_or_nothing([*outputs, out_dir / "scans.csv"]):
        written = []
        for (row, spacing, name), output in zip(jobs, outputs):
            save_nifti(coarser_scan(_load(Path(row["path"]), "scan"), spacing), output, force)
            cells = {column: (os.path.relpath(table.parent / text, out_dir)
                              if column not in ("id", "path") and text.endswith((".nii", ".nii.gz")) else text)
                     for column, text in row.items()}
            written.append(cells | {"id": name, "path": output.name, "source_id": row["id"],
                                    "spacing_mm": " ".join(f"{size:g}" for size in spacing)})
        return write_csv(out_dir / "scans.csv", written, columns, force)


def synthesize_head(labels: np.ndarray, brain: np.ndarray, *, seed: int, index: int,
                    spacing_mm: Sequence[float] = (2.0, 2.0, 2.0),
                    ventricle_labels: Sequence[int] = DLMUSE_VENTRICLES,
                    sulcal_labels: Sequence[int] = DLMUSE_SULCAL_CSF,
                    ranges: SynthesisRanges = SynthesisRanges(), atrophy: float | None = None) -> SynthesizedHead:
    """One synthetic head of a label map and its brain mask (same shape), determined by ``(seed, index)``.

    ``atrophy`` (0: none, 1: ventricles grow by ``VENTRICLE_GROWTH_MM`` and sulci by ``SULCAL_GROWTH_MM``)
    overrides the random draw from ``ranges.atrophy``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.shape != np.shape(brain):
        raise BrainzooError(f"label map {labels.shape} and brain mask {np.shape(brain)} must be one 3D shape")
    brain = np.asarray(brain) > 0
    labels = labels.astype(np.int32)
    spacing = np.asarray(spacing_mm, dtype=float)
    rng = np.random.default_rng([seed, index])
    level = float(rng.uniform(*ranges.atrophy)) if atrophy is None else float(atrophy)
    labels = grow_csf(labels, brain, ventricle_labels, level * VENTRICLE_GROWTH_MM, spacing)
    labels = grow_csf(labels, brain, sulcal_labels, level * SULCAL_GROWTH_MM, spacing)

    nearest = _deformed_indices(labels.shape, spacing, rng, ranges)
    labels, brain = labels[nearest], brain[nearest]

    values, compact = np.unique(labels, return_inverse=True)
    image = random_contrast(compact.reshape(labels.shape), rng, texture=ranges.texture, blur_voxels=0.0)
    image = image * np.exp(smooth_field(rng, labels.shape, terms=3, amplitude=rng.uniform(0.0, ranges.bias)))
    target = rng.uniform(*ranges.in_plane_mm, size=3)
    slice_axis = int(rng.integers(3))
    target[slice_axis] = rng.uniform(*ranges.slice_mm)
    image = lower_resolution(image, spacing, target)
    sigma = rng.uniform(*ranges.noise) * max(float(image.max()), 1e-6)
    image = np.hypot(image + rng.normal(0.0, sigma, image.shape), rng.normal(0.0, sigma, image.shape))
    image = image / max(float(image.max()), 1e-6)

    box = [(0, size) for size in labels.shape]
    if rng.uniform() < ranges.crop_probability:
        kept = [max(1, round(size * rng.uniform(*ranges.crop_fraction))) for size in labels.shape]
        box = [(int(start), int(start) + length) for start, length in
               ((rng.integers(size - length + 1), length) for size, length in zip(labels.shape, kept))]
        inside = np.zeros(labels.shape, bool)
        inside[tuple(slice(*edge) for edge in box)] = True
        image, brain = np.where(inside, image, 0.0), brain & inside
        labels = np.where(inside, labels, OUTSIDE_FOV)
    draws = {"atrophy": round(level, 4), "resolution_mm": " ".join(f"{t:.2f}" for t in target),
             "slice_axis": slice_axis, "noise": round(sigma, 5),
             "crop": " ".join(f"{a}:{b}" for a, b in box)}
    return SynthesizedHead(image.astype(np.float32), brain.astype(np.uint8), labels.astype(np.int32), draws)


def _deformed_indices(shape: Sequence[int], spacing: np.ndarray, rng: np.random.Generator,
                      ranges: SynthesisRanges) -> tuple[np.ndarray, ...]:
    """For each output voxel, the source voxel it copies (nearest): a random rotation, per-axis scaling and shift
    about the centre, plus a smooth warp. One lookup serves labels and mask alike."""
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1) * spacing[:, None]
    centre = (np.array(shape, float)[:, None] - 1) / 2 * spacing[:, None]
    rotation = np.eye(3)
    for axis, angle in enumerate(np.radians(rng.uniform(-ranges.rotation_degrees, ranges.rotation_degrees, 3))):
        plane = [a for a in range(3) if a != axis]
        turn = np.eye(3)
        turn[np.ix_(plane, plane)] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
        rotation = rotation @ turn
    scale = rng.uniform(*ranges.scaling, size=(3, 1))
    shift = rng.uniform(-ranges.shift_mm, ranges.shift_mm, size=(3, 1))
    points_mm = rotation @ ((grid - centre) / scale) + centre + shift
    for axis in range(3):
        points_mm[axis] += smooth_field(rng, shape, terms=4, amplitude=ranges.warp_mm).ravel()
    points = np.rint(points_mm / spacing[:, None]).astype(np.intp)
    upper = np.array(shape)[:, None] - 1
    return tuple(np.clip(points, 0, upper).reshape(3, *shape))


@dataclass(frozen=True)
class HeadSource:
    """A label map to draw heads from: its ``labels`` path, the ``scan`` whose classes label the head outside the
    brain (None: the map labels the head itself), a ``mask`` (None: the map's labels > 0) and the ``age``."""

    where: str
    labels: Path
    scan: Path | None = None
    mask: Path | None = None
    age: float | None = None


def read_sources(table: str | os.PathLike, *, labels_column: str = "labels", scan_column: str | None = "path",
                 mask_column: str | None = None, age_column: str | None = "age") -> list[HeadSource]:
    """The label maps listed in a CSV/TSV (paths relative to it); the scan, mask and age columns are optional
    (pass None to ignore one, an empty cell leaves it out for that row)."""
    table = Path(table)
    present = _columns(table)
    wanted = [labels_column] + [column for column in (scan_column, mask_column, age_column)
                                if column and column in present]
    sources = []
    for where, row in read_rows(table, wanted):
        if not row[labels_column]:
            raise BrainzooError(f"{where}: column {labels_column!r} is empty")
        age = None
        if row.get(age_column or ""):
            try:
                age = float(row[age_column])
            except ValueError:
                raise BrainzooError(f"{where}: age {row[age_column]!r} is not a number") from None
        path = {column: table.parent / row[column] if row.get(column or "") else None
                for column in (scan_column, mask_column)}
        sources.append(HeadSource(where, table.parent / row[labels_column], path[scan_column], path[mask_column], age))
    return sources


def _columns(table: Path) -> list[str]:
    """The header of a CSV/TSV (empty if it cannot be read: :func:`read_rows` then says why)."""
    try:
        with open(table, newline="") as handle:
            return next(csv.reader(handle, delimiter="\t" if table.suffix.lower() == ".tsv" else ","), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def age_weights(ages: Sequence[float | None], doubling_years: float = AGE_DOUBLING_YEARS) -> np.ndarray:
    """Sampling probabilities that double every ``doubling_years`` of age (all equal where an age is missing)."""
    if any(age is None for age in ages) or doubling_years <= 0:
        return np.full(len(ages), 1.0 / len(ages))
    weights = 2.0 ** ((np.asarray(ages, float) - max(ages)) / doubling_years)
    return weights / weights.sum()


def load_source(source: HeadSource, *, head_classes: int = 6,
                teacher: Teacher | None = None) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    """A source's whole-head label map, brain mask and label-map image, checked: 3D, integer labels, one shape.

    The brain mask is the source's ``mask``; without one, ``teacher``'s mask of the source's scan; without a
    teacher, the labels > 0."""
    image = _load(source.labels, "label map")
    data = np.asarray(image.dataobj)
    if data.ndim != 3:
        raise BrainzooError(f"{source.labels}: a label map must be 3D, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise BrainzooError(f"{source.labels}: a label map must hold integer labels, found {data.dtype} "
                                "values with fractions (a probability map or an image?)")
    labels = data.astype(np.int32)
    if labels.min() < 0 or not (labels > 0).any():
        raise BrainzooError(f"{source.labels}: a label map needs labels > 0 (brain) and none negative")
    brain = labels > 0
    if source.mask is not None:
        brain = _same_grid(source.mask, "mask", source.labels, labels.shape) > 0
    elif teacher is not None:
        if source.scan is None:
            raise BrainzooError(f"{source.where}: no scan (path column) for the teacher {teacher.name} to mask")
        scan = _load(source.scan, "scan")
        _same_grid(source.scan, "scan", source.labels, labels.shape, image=scan, affine=image.affine)
        brain = np.asarray(teacher.mask(scan)) > 0
        if not brain.any():
            raise BrainzooError(f"{source.scan}: the teacher {teacher.name} found no brain in it")
    if source.scan is not None:
        labels = head_label_map(labels, _same_grid(source.scan, "scan", source.labels, labels.shape).astype(np.float32),
                                head_classes=head_classes)
    return labels, brain, image


def _load(path: Path, role: str) -> nib.Nifti1Image:
    try:
        return nib.load(path)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as error:
        raise BrainzooError(f"{path}: cannot read the {role}: {error}") from None


def _same_grid(path: Path, role: str, labels: Path, shape: tuple[int, ...], *, image: nib.Nifti1Image | None = None,
               affine: np.ndarray | None = None) -> np.ndarray:
    """The voxels of ``path`` (``image`` if already loaded), checked to have its label map's shape (and, given
    ``affine``, its placement: a teacher's mask must lie where the labels do)."""
    image = _load(path, role) if image is None else image
    data = np.squeeze(np.asarray(image.dataobj))
    if data.shape != shape:
        raise BrainzooError(f"{path}: the {role} has shape {data.shape}, its label map {labels} {shape}")
    if affine is not None and not np.allclose(image.affine, affine, atol=1e-3):
        raise BrainzooError(f"{path}: the {role} is not on its label map {labels}'s grid (the affines differ)")
    return data


def write_synthetic_heads(sources: Sequence[HeadSource], out_dir: str | os.PathLike, n: int, *, seed: int = 0,
                          head_classes: int = 6, doubling_years: float = AGE_DOUBLING_YEARS,
                          ventricle_labels: Sequence[int] = DLMUSE_VENTRICLES,
                          sulcal_labels: Sequence[int] = DLMUSE_SULCAL_CSF,
                          ranges: SynthesisRanges = SynthesisRanges(), teacher: Teacher | None = None,
                          force: bool = False) -> Path:
    """``n`` synthetic heads as ``head-NNNN_T1w.nii.gz`` and ``head-NNNN_mask.nii.gz`` and, last, ``heads.csv``
    (``path``, ``label``, ``source``, ``mask_from``, ``age``, ``weight``, ``seed`` and the draws); returns the
    table's path.

    Each head's label map is drawn with :func:`age_weights` (older subjects more often). Its mask follows the
    source's (:func:`load_source`: a given mask, ``teacher``'s mask of the source's scan, or the labels > 0).
    Every source is read and masked before anything is written; if a head fails, the heads already written are
    removed again.
    """
    if n < 1:
        raise BrainzooError(f"n must be at least 1, got {n}")
    if not sources:
        raise BrainzooError("no label maps to draw heads from")
    out_dir = Path(out_dir)
    if (out_dir / TABLE).exists() and not force:
        raise BrainzooError(f"{out_dir / TABLE}: exists; pass force=True to rewrite the set")
    loaded = [load_source(source, head_classes=head_classes, teacher=teacher) for source in sources]
    weights = age_weights([source.age for source in sources], doubling_years)
    choices = np.random.default_rng([seed, 0]).choice(len(sources), size=n, p=weights)
    names = [f"head-{index:04d}" for index in range(1, n + 1)]
    outputs = [out_dir / f"{name}_{suffix}.nii.gz" for name in names for suffix in ("T1w", "mask")]
    columns = ["path", "label", "source", "mask_from", "age", "weight", "seed", "atrophy", "resolution_mm",
               "slice_axis", "noise", "crop"]
    with output_folder(out_dir), all_or_nothing([*outputs, out_dir / TABLE]):
        rows = []
        for index, (name, choice) in enumerate(zip(names, choices), start=1):
            labels, brain, image = loaded[choice]
            head = synthesize_head(labels, brain, seed=seed, index=index, spacing_mm=image.header.get_zooms()[:3],
                                   ventricle_labels=ventricle_labels, sulcal_labels=sulcal_labels, ranges=ranges)
            save_nifti(nib.Nifti1Image(head.image, image.affine), out_dir / f"{name}_T1w.nii.gz", force)
            save_nifti(nib.Nifti1Image(head.mask, image.affine), out_dir / f"{name}_mask.nii.gz", force)
            source = sources[choice]
            rows.append({"path": f"{name}_T1w.nii.gz", "label": f"{name}_mask.nii.gz",
                         "source": os.fspath(source.labels), "mask_from": _mask_origin(source, teacher),
                         "age": "" if source.age is None else source.age,
                         "weight": round(float(weights[choice]), 6), "seed": f"{seed} {index}", **head.draws})
        return write_csv(out_dir / TABLE, rows, columns, force)


def _mask_origin(source: HeadSource, teacher: Teacher | None) -> str:
    """Where a source's brain mask came from, for heads.csv's ``mask_from``."""
    if source.mask is not None:
        return os.fspath(source.mask)
    return teacher.name if teacher is not None else "labels > 0"
