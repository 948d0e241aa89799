"""Distillation sets for a brain-extraction student: scans with a teacher's masks, on the student's grid.

A student U-Net (nobrainer's topology, cheap to run) learns brain extraction from whole-head scans whose
targets are the masks a teacher draws (``brainzoo distill`` passes the catalogue's brain-extraction model, the
exact port of deepbet, as a :class:`Teacher`: training code never loads predictors itself).
Scans that come with a mask of their own (synthetic heads built from label maps, say) keep it. Every scan
and its mask are conformed to the student's grid (orientation, spacing and shape, as in a spec's
``inference.input``), written as a NIfTI pair, and listed in ``distillation.csv`` (columns ``path``,
``label``, ``source``, ``mask_from``) that :func:`brainzoo.training.tfrecords.read_table` reads with
``kind="segmentation"``. The table is written last, so a folder with a table is complete.
:func:`write_student_set` adds synthetic contrasts of those heads (:mod:`.contrast_synthesis`) and the synthetic
heads of ``brainzoo synth-heads`` (:mod:`.head_synthesis`, which keep their own masks), and lists everything in one
table for ``brainzoo tfrecords``; ``brainzoo distill`` runs it.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import nibabel as nib
import numpy as np

from brainzoo.errors import BrainzooError
from brainzoo.fileio import save_nifti, write_csv
from brainzoo.predict.volumes import GriddedVolume, conform, load_mask, load_volume
from brainzoo.training.contrast_synthesis import write_contrast_set
from brainzoo.training.tfrecords import read_rows

TABLE = "distillation.csv"
STUDENT_TABLE = "student.csv"
# student.csv's kind column: a real scan with its teacher's (or given) mask, a synthetic contrast of one, and a
# synthetic head drawn from a label map (its mask follows the labels; source names the label map).
REAL, CONTRAST, SYNTHETIC_HEAD = "real", "synthetic-contrast", "synthetic-head"


@dataclass(frozen=True)
class Teacher:
    """What draws the masks of scans that come without one: its name (the table's ``mask_from``) and a function
    from a scan to its brain mask (boolean, on the scan's grid)."""

    name: str
    mask: Callable[[nib.Nifti1Image], np.ndarray]


def write_distillation_set(scans: Sequence[str | os.PathLike | tuple[str | os.PathLike, str | os.PathLike]],
                           out_dir: str | os.PathLike, *, grid: Mapping, teacher: Teacher | None = None,
                           force: bool = False) -> Path:
    """Conform each scan and its mask to ``grid`` and write them with a table; returns the table's path.

    ``scans``: paths, or ``(scan, mask)`` pairs for scans whose mask is given; the teacher draws the mask of every
    other scan. ``grid``: ``orientation``, ``spacing_mm``
    and ``shape``. Output names follow the input order (``scan-001_T1w.nii.gz``, ``scan-001_mask.nii.gz``).
    """
    if not scans:
        raise BrainzooError("no scans given for the distillation set")
    missing = {"orientation", "spacing_mm", "shape"} - set(grid)
    if missing:
        raise BrainzooError(f"the student grid lacks {', '.join(sorted(missing))}")
    out_dir = Path(out_dir)
    if (out_dir / TABLE).exists() and not force:
        raise BrainzooError(f"{out_dir / TABLE}: exists; pass force=True to rewrite the set")
    pairs = [tuple(scan) if isinstance(scan, (tuple, list)) else (scan, None) for scan in scans]
    if teacher is None and any(mask is None for _, mask in pairs):
        raise BrainzooError(f"{next(scan for scan, mask in pairs if mask is None)}: has no mask, and no teacher "
                            "was given to draw one")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (scan, mask) in enumerate(pairs, start=1):
        image = load_volume(scan)
        if mask is None:
            native_mask = teacher.mask(image)
        else:
            native_mask = load_mask(mask, image)
        conformed = conform(GriddedVolume.native(image), grid["orientation"], grid["spacing_mm"], grid["shape"])
        student_mask = conformed.from_native_grid(native_mask.astype(np.float32), order=0) > 0.5
        if not student_mask.any():
            raise BrainzooError(f"{scan}: its brain mask falls outside the student grid "
                                f"{'x'.join(map(str, grid['shape']))} at {grid['spacing_mm']} mm")
        name = f"scan-{index:03d}"
        for suffix, data, dtype in (("T1w", conformed.data, np.float32), ("mask", student_mask, np.uint8)):
            save_nifti(nib.Nifti1Image(data.astype(dtype), conformed.affine), out_dir / f"{name}_{suffix}.nii.gz", force)
        rows.append({"path": f"{name}_T1w.nii.gz", "label": f"{name}_mask.nii.gz", "source": os.fspath(scan),
                     "mask_from": teacher.name if mask is None else os.fspath(mask)})
    return write_csv(out_dir / TABLE, rows, ["path", "label", "source", "mask_from"], force)


def write_student_set(scans: Sequence[str | os.PathLike | tuple[str | os.PathLike, str | os.PathLike]],
                      out_dir: str | os.PathLike, *, grid: Mapping, teacher: Teacher | None = None,
                      heads: str | os.PathLike | None = None, contrasts: int = 0, real_copies: int = 1, seed: int = 0,
                      force: bool = False) -> Path:
    """A student's training table: the distillation set of ``scans`` in ``teacher/``, ``contrasts`` synthetic
    contrasts of each in ``contrasts/`` and the synthetic heads of the table ``heads`` (``brainzoo synth-heads``'
    heads.csv: ``path``, ``label`` and ``source``, the label map each head was drawn from) in ``heads/``, conformed
    to ``grid`` with their own masks; all listed in ``student.csv`` (``path``, ``label``, ``kind``: real,
    synthetic-contrast or synthetic-head, and ``source``: the scan, or the synthetic head's label map).

    Each real head is listed ``real_copies`` times, so that its synthetic copies do not swamp it; each synthetic head
    once (``brainzoo synth-heads --n`` says how many).
    """
    if contrasts < 0 or real_copies < 0 or (scans and not contrasts + real_copies):
        raise BrainzooError(f"need real copies or synthetic contrasts (non-negative), got {real_copies} and {contrasts}")
    if not scans and heads is None:
        raise BrainzooError("no scans and no synthetic heads given for the student set")
    out_dir = Path(out_dir)
    if (out_dir / STUDENT_TABLE).exists() and not force:
        raise BrainzooError(f"{out_dir / STUDENT_TABLE}: exists; pass force=True to rewrite the set")
    synthetic = synthetic_head_pairs(heads) if heads is not None else []  # a bad table fails before any work
    rows = []
    if scans:
        real = write_distillation_set(scans, out_dir / "teacher", grid=grid, teacher=teacher, force=force)
        rows += _rows_under(real, "teacher", REAL) * real_copies
        if contrasts:
            rows += _rows_under(write_contrast_set(real, out_dir / "contrasts", variants=contrasts, seed=seed,
                                                   force=force), "contrasts", CONTRAST)
    if synthetic:
        conformed = write_distillation_set([pair for pair, _ in synthetic], out_dir / "heads", grid=grid, force=force)
        head_rows = _rows_under(conformed, "heads", SYNTHETIC_HEAD)
        rows += [row | {"source": label_map} for row, (_, label_map) in zip(head_rows, synthetic)]
    return write_csv(out_dir / STUDENT_TABLE, rows, ["path", "label", "kind", "source"], force)


def synthetic_head_pairs(table: str | os.PathLike) -> list[tuple[tuple[Path, Path], str]]:
    """The ``(head, mask)`` pairs of a synthetic-heads table (paths relative to it), each with its label map."""
    table = Path(table)
    return [((table.parent / row["path"], table.parent / row["label"]), row["source"])
            for _, row in read_rows(table, ["path", "label", "source"])]


def scan_arguments(arguments: Sequence[str]) -> list[str]:
    """Scan paths from the command line: a CSV/TSV argument stands for the scans of its ``path`` column (relative to
    it; an evaluation table's split, say), any other for itself."""
    scans = []
    for argument in arguments:
        if Path(argument).suffix.lower() in (".csv", ".tsv"):
            scans += [os.fspath(Path(argument).parent / row["path"]) for _, row in read_rows(Path(argument), ["path"])]
        else:
            scans.append(argument)
    return scans


def _rows_under(table: Path, folder: str, kind: str) -> list[dict]:
    with table.open(newline="") as handle:
        return [{"path": f"{folder}/{row['path']}", "label": f"{folder}/{row['label']}", "kind": kind,
                 "source": row["source"]} for row in csv.DictReader(handle)]
