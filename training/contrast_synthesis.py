"""Synthetic contrasts of real heads: label maps from a scan's intensities, redrawn with random tissue intensities.

A brain-extraction student distilled from a few T1 scans of one site learns their intensities, and fails on
other scanners, T2 and FLAIR. SynthStrip (Hoopes et al., NeuroImage 2022) showed that a network trained on
images synthesised from label maps, each label drawn with a random intensity, learns the brain's shape
instead. Here the label maps come from the real training heads themselves: intensity classes (1D k-means)
inside the brain mask and, separately, outside it (air, scalp, fat, skull, muscle, eyes fall into different
classes), so that a synthetic image keeps the subject's anatomy and the teacher's mask stays its target.
Bias field, gamma, noise, resolution and affine changes are left to the training pipeline's augmentation.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from brainzoo.errors import BrainzooError
from brainzoo.fileio import save_nifti, write_csv
from brainzoo.training.tfrecords import read_table

TABLE = "contrasts.csv"
_KMEANS_ITERATIONS = 30


def intensity_classes(values: np.ndarray, classes: int) -> np.ndarray:
    """Class index (0 = darkest) of each value, by 1D k-means started from evenly spaced centres."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise BrainzooError("no voxels to cluster")
    low, high = np.percentile(values, [1, 99])
    centres = np.linspace(low, high, classes)
    for _ in range(_KMEANS_ITERATIONS):
        assignment = np.searchsorted((centres[1:] + centres[:-1]) / 2, values)
        counts = np.bincount(assignment, minlength=classes)
        sums = np.bincount(assignment, weights=values, minlength=classes)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        updated.sort()
        if np.allclose(updated, centres):
            break
        centres = updated
    return np.searchsorted((centres[1:] + centres[:-1]) / 2, values)


def tissue_label_map(volume: np.ndarray, brain_mask: np.ndarray, *, brain_classes: int = 4,
                     head_classes: int = 6, smoothing_voxels: float = 1.0) -> np.ndarray:
    """Labels ``0 .. brain_classes - 1`` inside the mask and ``brain_classes ..`` outside it (uint8).

    The volume is smoothed first (Gaussian sd ``smoothing_voxels``) so that noise does not speckle the classes.
    """
    if volume.shape != brain_mask.shape:
        raise BrainzooError(f"volume {volume.shape} and brain mask {brain_mask.shape} differ in shape")
    if brain_classes < 1 or head_classes < 1 or brain_classes + head_classes > 255:
        raise BrainzooError(f"need 1 to 255 classes in all, got {brain_classes} + {head_classes}")
    inside = np.asarray(brain_mask) > 0
    if inside.all() or not inside.any():
        raise BrainzooError("the brain mask must hold some voxels of the volume, not none or all")
    smoothed = ndimage.gaussian_filter(np.asarray(volume, dtype=np.float32), smoothing_voxels)
    labels = np.empty(volume.shape, dtype=np.uint8)
    labels[inside] = intensity_classes(smoothed[inside], brain_classes)
    labels[~inside] = brain_classes + intensity_classes(smoothed[~inside], head_classes)
    return labels


def random_contrast(labels: np.ndarray, rng: np.random.Generator, *, texture: float = 0.1,
                    blur_voxels: float = 1.0) -> np.ndarray:
    """An image of the label map: each label a uniform random mean in [0, 1] with Gaussian texture (sd up to
    ``texture`` times that mean), then blurred by a random sd of up to ``blur_voxels`` per axis (float32)."""
    count = int(labels.max()) + 1
    means = rng.uniform(0.0, 1.0, count)
    spreads = rng.uniform(0.0, texture, count) * means
    image = means[labels] + spreads[labels] * rng.standard_normal(labels.shape)
    return ndimage.gaussian_filter(image, rng.uniform(0.0, blur_voxels, 3)).astype(np.float32)


def write_contrast_set(table: str | os.PathLike, out_dir: str | os.PathLike, *, variants: int, seed: int = 0,
                       brain_classes: int = 4, head_classes: int = 6, force: bool = False) -> Path:
    """``variants`` synthetic contrasts of every scan in a segmentation table, each with the scan's mask.

    ``table``: a CSV that :func:`brainzoo.training.tfrecords.read_table` reads with ``kind="segmentation"`` (a
    distillation set's ``distillation.csv``, say). Writes ``scan-NNN_mask.nii.gz`` once per scan,
    ``scan-NNN_contrast-MM.nii.gz`` per variant and, last, ``contrasts.csv`` (``path``, ``label``, ``source``,
    ``seed``); returns the table's path. The same ``seed`` gives the same images.
    """
    if variants < 1:
        raise BrainzooError(f"variants must be at least 1, got {variants}")
    out_dir = Path(out_dir)
    if (out_dir / TABLE).exists() and not force:
        raise BrainzooError(f"{out_dir / TABLE}: exists; pass force=True to rewrite the set")
    examples = read_table(table, kind="segmentation")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, example in enumerate(examples, start=1):
        scan, mask = nib.load(example.volume), nib.load(example.label)
        if scan.shape != mask.shape:
            raise BrainzooError(f"{example.where}: {example.volume} {scan.shape} and its mask {mask.shape} differ in shape")
        mask_data = np.asarray(mask.dataobj) > 0
        try:
            labels = tissue_label_map(np.asarray(scan.dataobj, dtype=np.float32), mask_data,
                                      brain_classes=brain_classes, head_classes=head_classes)
        except BrainzooError as error:
            raise BrainzooError(f"{example.where}: {error}") from None
        name = f"scan-{index:03d}"
        save_nifti(nib.Nifti1Image(mask_data.astype(np.uint8), scan.affine), out_dir / f"{name}_mask.nii.gz", force)
        for variant in range(1, variants + 1):
            rng = np.random.default_rng([seed, index, variant])
            path = f"{name}_contrast-{variant:02d}.nii.gz"
            save_nifti(nib.Nifti1Image(random_contrast(labels, rng), scan.affine), out_dir / path, force)
            rows.append({"path": path, "label": f"{name}_mask.nii.gz", "source": os.fspath(example.volume),
                         "seed": f"{seed} {index} {variant}"})
    return write_csv(out_dir / TABLE, rows, ["path", "label", "source", "seed"], force)
