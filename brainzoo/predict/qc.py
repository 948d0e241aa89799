"""Quality-control pictures: three orthogonal slices with a mask or a saliency map drawn over them.

A picture is a convenience, never a reason to lose a prediction: any failure to draw or write it becomes a
warning and the run goes on. Figures are drawn with matplotlib's Agg canvas directly (no pyplot state), so
this works on headless cluster nodes.
"""

from __future__ import annotations

import os
import warnings

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from brainzoo.fileio import atomic_output


def save_mask_qc(path: str | os.PathLike, image: nib.Nifti1Image, mask: nib.Nifti1Image, *,
                 force: bool = False) -> bool:
    """A PNG of ``image`` with the brain ``mask`` (same grid) filled in red, through the mask's centre."""
    return _save(path, image, mask, title="brain mask", style="fill", force=force)


def save_registration_qc(path: str | os.PathLike, brain: nib.Nifti1Image, template_mask: nib.Nifti1Image, *,
                         force: bool = False) -> bool:
    """A PNG of a registered ``brain`` with the template's brain outline over it, to judge the alignment."""
    return _save(path, brain, template_mask, title="registered brain, template outline", style="outline", force=force)


def save_saliency_qc(path: str | os.PathLike, image: nib.Nifti1Image, saliency: nib.Nifti1Image, *,
                     force: bool = False) -> bool:
    """A PNG of ``image`` with a saliency map in [0, 1] (same grid) as a heat map, through the map's peak."""
    return _save(path, image, saliency, title="Grad-CAM", style="heat", force=force)


def _save(path, background: nib.Nifti1Image, overlay: nib.Nifti1Image, *, title: str, style: str,
          force: bool) -> bool:
    """Draw and write the picture; on any failure warn and return False."""
    try:
        figure = _three_planes(nib.as_closest_canonical(background), nib.as_closest_canonical(overlay),
                               title=title, style=style)
        with atomic_output(path, force) as tmp:
            figure.savefig(tmp, format="png", dpi=100, facecolor="black")
        return True
    except Exception as exc:  # noqa: BLE001 - a QC picture must never stop a prediction
        warnings.warn(f"{path}: QC picture not written ({type(exc).__name__}: {exc})", stacklevel=3)
        return False


def _three_planes(background: nib.Nifti1Image, overlay: nib.Nifti1Image, *, title: str, style: str) -> Figure:
    """Sagittal, coronal and axial slices of two RAS-oriented images on the same grid; the overlay is a mask
    filled (``fill``) or outlined (``outline``), or values in [0, 1] as a heat map (``heat``)."""
    data = np.asarray(background.dataobj, dtype=np.float32)
    values = np.asarray(overlay.dataobj, dtype=np.float32)
    mask = values > 0
    if data.shape != mask.shape:
        raise ValueError(f"image {data.shape} and overlay {mask.shape} are not on the same grid")
    zooms = np.asarray(background.header.get_zooms()[:3], dtype=float)
    if style == "heat":
        centre = np.array(np.unravel_index(np.argmax(values), values.shape))
    else:
        centre = np.round(np.argwhere(mask).mean(axis=0)).astype(int) if mask.any() else np.array(data.shape) // 2
    foreground = data[data > 0] if np.any(data > 0) else data.ravel()
    low, high = np.percentile(foreground, [1, 99.5])
    figure = Figure(figsize=(9, 3.4), facecolor="black")
    FigureCanvasAgg(figure)
    # Each view: the slice, and the voxel sizes along its (rows, columns) once transposed for display.
    views = {
        "sagittal": (np.s_[centre[0], :, :], zooms[[2, 1]]),
        "coronal": (np.s_[:, centre[1], :], zooms[[2, 0]]),
        "axial": (np.s_[:, :, centre[2]], zooms[[1, 0]]),
    }
    for axes, (name, (index, (row_mm, column_mm))) in zip(figure.subplots(1, 3), views.items()):
        axes.imshow(data[index].T, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=row_mm / column_mm)
        if style == "heat":
            axes.imshow(np.ma.masked_where(~mask[index].T, values[index].T), cmap="jet", vmin=0, vmax=1, alpha=0.5,
                        origin="lower", aspect=row_mm / column_mm)
        elif style == "outline" and mask[index].any():
            axes.contour(mask[index].T.astype(float), levels=[0.5], colors="red", linewidths=0.8)
        elif style == "fill":
            axes.imshow(np.ma.masked_where(~mask[index].T, mask[index].T), cmap="autumn", alpha=0.4,
                        origin="lower", aspect=row_mm / column_mm)
        axes.set_title(name, color="white", fontsize=9)
        axes.axis("off")
    figure.subplots_adjust(top=0.84)  # room for the title above the view names
    figure.suptitle(title, color="white", fontsize=10)
    return figure
