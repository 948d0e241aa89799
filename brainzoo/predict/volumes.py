"""Reading input scans safely, and moving voxel arrays between a scan's native grid and a model's grid.

Every geometric step records the map from its output voxel indices to its input voxel indices; composing
them gives one map from the model grid to the native grid. Going back is one resampling through the inverse
of that map, so flips, axis swaps and whole-voxel shifts come back exactly, and the output keeps the input's
affine and header.
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import nibabel as nib
import numpy as np
from nibabel import orientations
from nibabel.affines import voxel_sizes
from scipy import ndimage

from brainzoo.errors import BrainzooError

ImageSource = Union[str, os.PathLike, nib.Nifti1Image]

# 512^3 voxels is 512 MiB as float32; prediction holds several arrays that size (the blending sums in float64).
DEFAULT_MAX_VOXELS = 512**3
VOXEL_SIZE_LIMITS_MM = (0.1, 10.0)
# Relative difference below which a voxel size equals a model's spacing (a drift of 0.1 voxel per 1000).
SAME_SPACING_TOLERANCE = 1e-4
GZIP_MAGIC = b"\x1f\x8b"
GZIP_CHUNK_BYTES = 1 << 20
# What nibabel and numpy raise on a malformed header or voxel stream; each becomes a BrainzooError naming the file.
NIFTI_ERRORS = (nib.spatialimages.HeaderDataError, OSError, EOFError, ValueError, zlib.error, OverflowError,
                struct.error)


def source_name(source: ImageSource) -> str:
    """The name to put in messages: the path, or the file an in-memory image was read from."""
    if isinstance(source, nib.spatialimages.SpatialImage):
        return source.get_filename() or "<in-memory image>"
    return str(source)


def load_volume(source: ImageSource, *, max_voxels: int = DEFAULT_MAX_VOXELS,
                volume: int | None = None) -> nib.Nifti1Image:
    """Read a NIfTI scan and return it as a float32 3D image with the input's affine and header.

    Refuses (with a BrainzooError naming the file) anything a model cannot sensibly be run on: other formats,
    unreadable, damaged or truncated files (a gzip stream is read to its end, so its CRC and length are checked),
    malformed headers, 2D images, volumes larger than ``max_voxels``, no usable orientation, absurd voxel sizes,
    NaN or infinite voxels, and constant volumes. A 4D series gives its first volume, with a warning; or, given
    ``volume`` (a model's ``volume`` step: a component of a series), that volume, and a series too short for it or
    a single 3D volume (unless ``volume`` is 0) is refused.
    """
    name = source_name(source)
    from_file = not isinstance(source, nib.spatialimages.SpatialImage)
    try:
        img = _open_image(name) if from_file else source
        if not isinstance(img, nib.Nifti1Image):
            raise BrainzooError(f"{name}: not a NIfTI image (read as {type(img).__name__}); "
                                "convert it to .nii or .nii.gz")
        data, stored = _read_volume(img, name, max_voxels, volume)
        if from_file:  # an in-memory image's header may have been fixed since it was read
            _check_orientation(_stored_header(img, name, stored), name)
        _check_geometry(img.affine, name)
        _check_values(data, name)
        return type(img)(data, img.affine, img.header)
    except NIFTI_ERRORS as exc:
        raise BrainzooError(f"{name}: not a readable NIfTI image ({type(exc).__name__}: {exc})") from exc


def _open_image(name: str) -> nib.spatialimages.SpatialImage:
    path = Path(name)
    if path.is_dir():
        raise BrainzooError(f"{name}: is a directory, not a NIfTI file")
    if not path.exists():
        raise BrainzooError(f"{name}: no such file")
    if not path.is_file():
        raise BrainzooError(f"{name}: is not a regular file (a device, pipe or socket); give a .nii or .nii.gz file")
    try:
        return nib.load(name)
    except nib.filebasedimages.ImageFileError as exc:
        raise BrainzooError(f"{name}: not a NIfTI image ({exc})") from exc
    except NIFTI_ERRORS as exc:
        raise BrainzooError(f"{name}: cannot read the header ({type(exc).__name__}: {exc})") from exc


def _stored_header(img: nib.Nifti1Image, name: str, stored: bytes | None) -> nib.Nifti1Header:
    """The header as the file stores it, before nibabel's fixes (which make pixdim 0 or -1 into 1): from the
    decompressed bytes when the voxels came from a gzip stream, else from the file."""
    if stored is not None:
        return type(img.header).from_fileobj(io.BytesIO(stored), check=False)
    with open(name, "rb") as stream:
        return type(img.header).from_fileobj(stream, check=False)


def _is_gzip(name: str) -> bool:
    with open(name, "rb") as stream:
        return stream.read(2) == GZIP_MAGIC


def _read_gzip_checked(name: str, needed: int) -> bytes:
    """The first ``needed`` bytes of a gzip file's content, after reading the whole stream once, so that the
    CRC and length gzip stores at the end of each member are checked (only what is kept is held in memory)."""
    kept = bytearray()
    try:
        with gzip.open(name, "rb") as stream:
            while chunk := stream.read(GZIP_CHUNK_BYTES):
                kept += chunk[:max(needed - len(kept), 0)]
    except (OSError, EOFError, zlib.error) as exc:
        raise BrainzooError(f"{name}: the compressed data is damaged or truncated ({exc}); "
                            "its voxels cannot be trusted") from exc
    if len(kept) < needed:
        raise BrainzooError(f"{name}: the voxel data ends after {len(kept)} of {needed} bytes; the file is truncated")
    return bytes(kept)


def _read_volume(img: nib.Nifti1Image, name: str, max_voxels: int,
                 index: int | None) -> tuple[np.ndarray, bytes | None]:
    """Volume ``index`` (None: the first, with a warning for a series) as float32, and (for a gzip file) the
    decompressed bytes up to that volume's end, from the one pass that checked the whole stream."""
    shape = img.shape
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise BrainzooError(f"{name}: a 2D image (shape {shape}); a 3D volume is needed")
    if len(shape) > 4:
        raise BrainzooError(f"{name}: has {len(shape)} dimensions (shape {shape}); a 3D volume is needed")
    n_voxels = int(np.prod(shape[:3], dtype=np.int64))
    if n_voxels > max_voxels:
        raise BrainzooError(f"{name}: {'x'.join(map(str, shape[:3]))} is {n_voxels} voxels, more than the limit of "
                            f"{max_voxels}; down-sample it or raise the voxel limit")
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise BrainzooError(f"{name}: voxel type {dtype} is not a scalar intensity")
    count = shape[3] if len(shape) == 4 else 1
    if index is None:
        if count > 1:
            warnings.warn(f"{name}: a 4D series of {count} volumes; using the first", stacklevel=3)
        index = 0
    elif not 0 <= index < count:
        held = f"a 4D series of {count} volumes" if len(shape) == 4 else "a single 3D volume"
        raise BrainzooError(f"{name}: is {held}; this model takes volume {index} (counted from 0) of a 4D series")
    voxels, stored = img.dataobj, None
    if nib.is_proxy(voxels) and img.get_filename() is not None and _is_gzip(img.get_filename()):
        # The same voxels nibabel would read, from the one pass over the whole stream.
        stored = _read_gzip_checked(name, voxels.offset + (index + 1) * n_voxels * voxels.dtype.itemsize)
        voxels = nib.arrayproxy.ArrayProxy(io.BytesIO(stored), (voxels.shape, voxels.dtype, voxels.offset,
                                                                 voxels.slope, voxels.inter))
    try:
        data = voxels[..., index] if len(shape) == 4 else voxels[...]
        return np.asarray(data, dtype=np.float32), stored
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise BrainzooError(f"{name}: cannot read the voxel data ({exc}); the file may be truncated") from exc


def _check_orientation(header: nib.Nifti1Header, name: str) -> None:
    """Without an sform, the voxel sizes come from pixdim (scaling the qform, or alone when the qform code is 0
    too); pixdim 0 or negative there leaves no orientation, which nibabel would quietly replace with 1 mm."""
    if int(header["sform_code"]) > 0:
        return
    pixdim = np.asarray(header["pixdim"][1:4], dtype=float)
    if np.all(np.isfinite(pixdim)) and np.all(pixdim > 0):
        return
    where = "the qform scales by it" if int(header["qform_code"]) > 0 else "the sform and qform codes are 0"
    raise BrainzooError(f"{name}: no usable orientation: pixdim {_format_mm(pixdim)} is not a voxel size and "
                        f"{where}; set a qform/sform, or fix pixdim")


def _check_geometry(affine: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise BrainzooError(f"{name}: the header's voxel-to-world affine is not invertible")
    sizes = voxel_sizes(affine)
    low, high = VOXEL_SIZE_LIMITS_MM
    if sizes.min() < low or sizes.max() > high:
        raise BrainzooError(f"{name}: voxel size {_format_mm(sizes)} mm is outside {low}-{high} mm; "
                            "check the header's pixdim and units")


def _check_values(data: np.ndarray, name: str) -> None:
    n_bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if n_bad:
        raise BrainzooError(f"{name}: {n_bad} voxels are NaN or infinite")
    low, high = data.min(), data.max()
    if low == high:
        raise BrainzooError(f"{name}: an empty (constant) volume: every voxel is {low:g}")


def check_field_of_view(img: nib.Nifti1Image, name: str, minimum_mm: float) -> None:
    """A scan narrower than ``minimum_mm`` along an axis (a slab, a crop, a wrong voxel size) cannot hold what the
    model was made for; its output would look like an answer and be none."""
    extent = np.asarray(img.shape[:3]) * voxel_sizes(img.affine)
    if extent.min() < minimum_mm:
        raise BrainzooError(f"{name}: the field of view is {_format_mm(extent)} mm, less than {minimum_mm:g} mm along "
                            "an axis: too small to hold a head (a slab, a crop or a wrong voxel size?); "
                            "pass --force to run it anyway")


def check_intensity_profile(img: nib.Nifti1Image, name: str) -> None:
    """Air is dark in every MRI contrast, so the edges of a head scan's field of view are darker than its centre; the
    other way round, the intensities are inverted (or not an MRI), and a model's output would be meaningless. A cheap
    check for scans whose contrast nobody declared; medians, so a bright scalp at a tight crop's edge does not count."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    shape = np.asarray(data.shape)
    margin = np.maximum(shape // 20, 1)
    edges = np.ones(data.shape, dtype=bool)
    edges[tuple(slice(m, n - m) for m, n in zip(margin, shape))] = False
    centre = data[tuple(slice(int(0.35 * n), max(int(0.65 * n), int(0.35 * n) + 1)) for n in shape)]
    edge_median, centre_median = float(np.median(data[edges])), float(np.median(centre))
    if edge_median > centre_median:
        raise BrainzooError(f"{name}: the edges of the field of view (median {edge_median:g}) are brighter than its "
                            f"centre (median {centre_median:g}), where air should be dark in any MRI contrast: the "
                            "intensities look inverted; if the scan is right, declare its contrast (--contrast) or "
                            "pass --force")


def _format_mm(sizes: Sequence[float]) -> str:
    return "x".join(f"{s:.3g}" for s in sizes)


def load_mask(source: ImageSource, reference: nib.Nifti1Image, *,
              max_voxels: int = DEFAULT_MAX_VOXELS) -> np.ndarray:
    """A brain mask (voxels > 0) as a boolean array on the grid of ``reference``.

    A mask on another grid (a different orientation, say) is brought onto the reference grid through the two
    affines with nearest-neighbour sampling.
    """
    mask_img = load_volume(source, max_voxels=max_voxels)
    mask = np.asarray(mask_img.dataobj) > 0
    if not mask.any():
        raise BrainzooError(f"{source_name(source)}: the brain mask has no voxel above 0")
    if mask.shape == reference.shape[:3] and np.allclose(mask_img.affine, reference.affine, atol=1e-3):
        return mask
    resampled = resample_world(mask.astype(np.float32), mask_img.affine, reference.shape[:3], reference.affine,
                               order=0)
    if not resampled.any():
        raise BrainzooError(f"{source_name(source)}: the brain mask does not overlap the image in world space")
    return resampled > 0


def resample_world(data: np.ndarray, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray,
                   *, order: int = 1) -> np.ndarray:
    """``data`` (with voxel-to-world ``affine``) sampled on the grid ``shape``/``target_affine``; 0 outside."""
    return resample_indices(data, np.linalg.inv(affine) @ target_affine, shape, order=order)


def resample_indices(data: np.ndarray, out_to_in: np.ndarray, shape: Sequence[int], *, order: int = 1,
                     mode: str = "constant") -> np.ndarray:
    """Sample ``data`` at ``out_to_in @ index`` for every index of an output of ``shape`` (float32).

    ``order`` 1 is trilinear (images, probabilities), 0 nearest (labels). A diagonal map takes scipy's faster
    separable path. At whole-voxel positions trilinear sampling returns the voxel values exactly.
    """
    data = np.asarray(data, dtype=np.float32)
    if data.flags.f_contiguous and not data.flags.c_contiguous:
        # scipy walks arrays in C order, ~5x slower over a nibabel (Fortran-order) array: sample its transpose,
        # which is C-ordered, with the axes of the map reversed, and transpose the result back (the same values
        # to float32 rounding: each sample sums its neighbours in another order).
        reverse = np.eye(4)[[2, 1, 0, 3]]
        return resample_indices(data.T, reverse @ out_to_in @ reverse, tuple(shape)[::-1], order=order, mode=mode).T
    linear = out_to_in[:3, :3]
    if np.count_nonzero(linear - np.diag(np.diagonal(linear))) == 0:
        linear = np.diagonal(linear)
    return ndimage.affine_transform(np.ascontiguousarray(data), linear, offset=out_to_in[:3, 3],
                                    output_shape=tuple(int(n) for n in shape), output=np.float32, order=order,
                                    mode=mode, cval=0.0, prefilter=False)


@dataclass(frozen=True)
class GriddedVolume:
    """A voxel array on some grid, with the map from that grid's voxel indices to the native scan's.

    ``to_native`` is a 4x4 matrix acting on homogeneous voxel indices; the world affine of the current grid
    is ``native_affine @ to_native``.
    """

    data: np.ndarray
    to_native: np.ndarray
    native_affine: np.ndarray
    native_shape: tuple[int, int, int]

    @classmethod
    def native(cls, img: nib.Nifti1Image) -> GriddedVolume:
        """The scan on its own grid."""
        return cls(np.asarray(img.dataobj, dtype=np.float32), np.eye(4), img.affine, tuple(img.shape[:3]))

    @property
    def affine(self) -> np.ndarray:
        return self.native_affine @ self.to_native

    @property
    def voxel_sizes(self) -> np.ndarray:
        return voxel_sizes(self.affine)

    def moved(self, data: np.ndarray, new_to_old: np.ndarray | None = None) -> GriddedVolume:
        """The same scan after a step that produced ``data``; ``new_to_old`` maps its indices to the current."""
        to_native = self.to_native if new_to_old is None else self.to_native @ new_to_old
        return GriddedVolume(np.asarray(data, dtype=np.float32), to_native, self.native_affine, self.native_shape)

    def to_native_grid(self, array: np.ndarray, *, order: int = 1) -> np.ndarray:
        """An array on this grid resampled onto the native grid (0 where the native grid reaches outside it).

        Only the native voxels that can see a non-zero value are sampled (a brain-centred block's output is 0
        elsewhere): the same result as sampling all of them (to float32 rounding), for a fraction of the time.
        """
        array = np.asarray(array, dtype=np.float32)
        out = np.zeros(self.native_shape, dtype=np.float32)
        nonzero = [np.flatnonzero(array.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        if any(len(indices) == 0 for indices in nonzero):
            return out
        # Interpolation reaches one voxel beyond the non-zero box; its corners bound the native voxels to sample.
        box = [(indices[0] - 1, indices[-1] + 1) for indices in nonzero]
        corners = np.array([[*corner, 1] for corner in itertools.product(*box)], dtype=float).T
        native = (self.to_native @ corners)[:3]
        low = np.clip(np.floor(native.min(axis=1)).astype(int), 0, self.native_shape)
        high = np.clip(np.ceil(native.max(axis=1)).astype(int) + 1, 0, self.native_shape)
        if np.any(high <= low):
            return out
        shift = np.eye(4)
        shift[:3, 3] = low
        window = tuple(slice(a, b) for a, b in zip(low, high))
        out[window] = resample_indices(array, np.linalg.inv(self.to_native) @ shift, high - low, order=order)
        return out

    def from_native_grid(self, array: np.ndarray, *, order: int = 0) -> np.ndarray:
        """An array on the native grid (a brain mask, say) resampled onto this grid."""
        return resample_indices(array, self.to_native, self.data.shape, order=order)


def reorient(volume: GriddedVolume, axcodes: str) -> GriddedVolume:
    """Flip and permute axes (no interpolation) so that the voxel axes point along ``axcodes`` ("RAS")."""
    current = orientations.io_orientation(volume.affine)
    transform = orientations.ornt_transform(current, orientations.axcodes2ornt(tuple(axcodes)))
    data = orientations.apply_orientation(volume.data, transform)
    return volume.moved(data, orientations.inv_ornt_aff(transform, volume.data.shape))


def resample(volume: GriddedVolume, spacing_mm: Sequence[float], shape: Sequence[int]) -> GriddedVolume:
    """Trilinear resampling to voxels of ``spacing_mm`` on a grid of ``shape`` centred on the field of view.

    The centre is rounded to a whole input voxel, so when the spacing already matches this is a pure crop
    or zero-pad and the values are unchanged. Voxel sizes within ``SAME_SPACING_TOLERANCE`` of the target
    count as matching: headers store them in float32, and 1.2000022 mm is meant to be 1.2 mm.
    """
    scale = np.asarray(spacing_mm, dtype=float) / volume.voxel_sizes
    scale[np.abs(scale - 1) < SAME_SPACING_TOLERANCE] = 1.0
    old_shape = np.asarray(volume.data.shape, dtype=float)
    new_shape = np.asarray(shape, dtype=float)
    offset = np.floor((old_shape - 1) / 2 - scale * (new_shape - 1) / 2 + 0.5)
    new_to_old = np.eye(4)
    new_to_old[:3, :3] = np.diag(scale)
    new_to_old[:3, 3] = offset
    return volume.moved(resample_indices(volume.data, new_to_old, shape), new_to_old)


def conform(volume: GriddedVolume, orientation: str, spacing_mm: Sequence[float],
            shape: Sequence[int]) -> GriddedVolume:
    """A model's input grid: axes along ``orientation``, voxels of ``spacing_mm``, array of ``shape``."""
    return resample(reorient(volume, orientation), spacing_mm, shape)


def native_like(reference: nib.Nifti1Image, data: np.ndarray, dtype: type) -> nib.Nifti1Image:
    """An output on the input's grid: the input's affine, qform/sform codes and header, voxel type ``dtype``."""
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(None, None)
    header["cal_min"] = 0
    header["cal_max"] = 0
    # Fortran order, as NIfTI stores voxels: writing a C-order array costs a transposing copy.
    return type(reference)(np.asarray(data).astype(dtype, order="F"), reference.affine, header)
