"""deepbet's brain extraction (Fisch et al. 2024) around the networks of :mod:`brainzoo.models.deepbet`, run by
ONNX Runtime or Keras: the runner of specs whose ``inference.method`` is ``deepbet``.

The steps and their arithmetic are those of deepbet 1.0.2's ``BrainExtraction.run``, so that the masks
agree voxel for voxel. The numbers are the spec's ``inference.deepbet`` values (:class:`DeepbetSettings`, which
``brainzoo validate`` checks); deepbet 1.0.2's are given in brackets:

1. closest-canonical (RAS) orientation; the first volume of a 4-D image; NaN and infinities replaced;
2. a nearest-exact resize to ``bbox_grid`` (128^3), whose ``window_quantiles`` (0.005, 0.995) set the
   intensity window;
3. windowing to [0, 1], standardising, and rescaling to ``standardised_mean`` and ``standardised_sd`` (0.449,
   0.226: ImageNet's statistics);
4. the bounding-box network, > ``bbox_threshold`` (0.5), largest 26-connected component; the box spans the
   slices whose mean is above ``bbox_slice_fraction`` (0.02), scaled to the scan's grid and grown by
   ``bbox_margin`` (10 %) of its size on each side;
5. the box cropped and resized nearest-exact to ``segmentation_grid`` (256^3), windowed like step 3, the
   segmentation network;
6. its probabilities resized nearest-exact back onto the box (zero outside); > threshold; inside the
   box the largest component is kept and its holes are filled; optional dilation or erosion;
7. back to the scan's own orientation, on its own grid and affine.

deepbet computes in float32 with PyTorch; the index, percentile and box arithmetic below is float32 on
purpose, because float64 would move some resampled voxels and box edges by one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import nibabel as nib
import numpy as np
from scipy import ndimage

from brainzoo.errors import BrainzooError

CATALOGUE_VERSION = "deepbet/1.0.2"
# The brain channel of both networks' two-channel softmax: brainzoo.models.deepbet.BRAIN_CHANNEL, which imports
# TensorFlow (tests/test_onnx_runtime.py holds the two equal).
BRAIN_CHANNEL = 1


@dataclass(frozen=True)
class DeepbetSettings:
    """The numbers of deepbet's pipeline, as a spec's ``inference.deepbet`` gives them (see the module's steps)."""

    bbox_grid: tuple[int, int, int]
    segmentation_grid: tuple[int, int, int]
    window_quantiles: tuple[float, float]
    standardised_mean: float
    standardised_sd: float
    bbox_threshold: float
    bbox_slice_fraction: float
    bbox_margin: float

    @classmethod
    def from_spec(cls, values: dict | None, where: str = "inference.deepbet") -> DeepbetSettings:
        """The settings of a spec's ``inference.deepbet``; an error naming the value that is wrong or missing."""
        if not isinstance(values, dict):
            raise BrainzooError(f"{where}: a deepbet spec needs this block ({', '.join(f.name for f in fields(cls))})")
        names = [f.name for f in fields(cls)]
        if set(values) != set(names):
            raise BrainzooError(f"{where}: needs exactly {', '.join(names)}; got {', '.join(sorted(map(str, values)))}")
        v = values
        rules = [(all(_is_grid(v[name]) for name in ("bbox_grid", "segmentation_grid")),
                  "bbox_grid and segmentation_grid are three whole numbers of at least 8"),
                 (_is_sequence(v["window_quantiles"], 2) and all(map(_is_number, v["window_quantiles"]))
                  and 0 <= v["window_quantiles"][0] < v["window_quantiles"][1] <= 1,
                  "window_quantiles are two quantiles, low < high, in [0, 1]"),
                 (_is_number(v["standardised_mean"]), "standardised_mean is a number"),
                 (_is_number(v["standardised_sd"]) and v["standardised_sd"] > 0, "standardised_sd is positive"),
                 (_is_number(v["bbox_threshold"]) and 0 < v["bbox_threshold"] < 1, "bbox_threshold is in (0, 1)"),
                 (_is_number(v["bbox_slice_fraction"]) and 0 <= v["bbox_slice_fraction"] < 1,
                  "bbox_slice_fraction is in [0, 1)"),
                 (_is_number(v["bbox_margin"]) and 0 <= v["bbox_margin"] < 1, "bbox_margin is in [0, 1)")]
        wrong = [rule for holds, rule in rules if not holds]
        if wrong:
            raise BrainzooError(f"{where}: {'; '.join(wrong)} (got {values})")
        return cls(**{name: tuple(v[name]) if isinstance(v[name], list) else v[name] for name in names})


# Neighbourhoods: components are 26-connected (cc3d's default); holes and dilation are 6-connected.
FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
FACE_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)


def nearest_exact_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output voxel in PyTorch's ``nearest-exact`` resizing on the CPU.

    Mathematically ``floor((i + 0.5) * size_in / size_out)``. ATen computes the float32 scale, the
    pixel-area source position ``(i + 0.5) * scale - 0.5`` rounded to float32 and clamped at 0, and then
    ``floorf(position + 0.5)``, which rounds to float32 once more before the floor. Those roundings put
    products just below an integer on the integer; exact arithmetic would pick the voxel before.
    """
    scale = np.float64(np.float32(size_in) / np.float32(size_out))
    position = np.maximum(((np.arange(size_out) + 0.5) * scale - 0.5).astype(np.float32), 0)
    index = np.floor((position.astype(np.float64) + 0.5).astype(np.float32)).astype(np.int64)
    return np.minimum(index, size_in - 1)


def resize_nearest_exact(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``F.interpolate(volume, shape, mode="nearest-exact")`` for one 3-D volume."""
    indices = [nearest_exact_indices(size_in, size_out) for size_in, size_out in zip(volume.shape, shape)]
    return volume[np.ix_(*indices)]


def quantile(volume: np.ndarray, q: float) -> np.float32:
    """``torch.quantile(volume, q)`` of a float32 volume: linear interpolation between order statistics,
    with PyTorch's float32 rank and ``lerp`` arithmetic."""
    values = volume.ravel()
    rank = np.float32(q) * np.float32(values.size - 1)
    below = int(rank)
    above = min(int(np.ceil(rank)), values.size - 1)
    ordered = np.partition(values, [below, above])
    low, high, weight = ordered[below], ordered[above], rank - np.float32(below)
    if weight < 0.5:
        return np.float32(low + weight * (high - low))
    return np.float32(high - (high - low) * (np.float32(1) - weight))


def normalize(volume: np.ndarray, low: np.float32, high: np.float32, mean_sd: tuple[float, float]) -> np.ndarray:
    """deepbet's network input: window ``[low, high]`` to [0, 1], standardise (sample sd), then move to
    the mean and sd ``mean_sd``.

    The arithmetic is float32 in place; the mean and the sum of squared deviations accumulate in float64,
    one slab at a time, so that no 256^3 float64 copy is made (a third of a second per scan).
    """
    x = volume - low
    x /= high - low
    np.clip(x, 0, 1, out=x)
    mean = np.add.reduce(x, axis=None, dtype=np.float64) / x.size
    squares = sum(np.dot(d, d) for d in (slab.ravel().astype(np.float64) - mean for slab in x))
    x -= np.float32(mean)
    x /= np.float32(np.sqrt(squares / (x.size - 1)))
    x *= np.float32(mean_sd[1])
    x += np.float32(mean_sd[0])
    return x


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a binary mask (the first in label order on a tie)."""
    labels, count = ndimage.label(mask, structure=FULL_CONNECTIVITY)
    if count == 0:
        raise ValueError("the mask is empty")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def _run_starts(face: np.ndarray) -> np.ndarray:
    """Background voxels of a 2-D face that start a background run when the face is read in Fortran
    order (first axis fastest), a run carrying on from the end of one row into the next."""
    flat = face.ravel(order="F")
    starts = ~flat
    starts[1:] &= flat[:-1]
    return starts.reshape(face.shape, order="F")


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the background that is not reached from the array's faces, exactly as ``fill_voids.fill``.

    fill_voids floods 6-connected background from seeds on the six faces, but seeds only the first
    voxel of each background run in its scan of a face, and a run does not end at the end of a row.
    A background pocket on a face whose voxels all follow background in that scan is never seeded and
    gets filled, although it touches the border. The seeds here are the same, so the masks are too.
    """
    seeds = np.zeros(mask.shape, dtype=bool)
    for axis in range(3):
        for end in (0, -1):
            face = tuple(end if a == axis else slice(None) for a in range(3))
            seeds[face] |= _run_starts(mask[face])
    background, _ = ndimage.label(~mask, structure=FACE_CONNECTIVITY)
    outside = np.isin(background, background[seeds])
    return ~outside


def dilate(mask: np.ndarray, layers: int) -> np.ndarray:
    """Grow (``layers`` > 0) or shrink (< 0) a mask by that many 6-connected voxel layers. Shrinking
    treats outside the array as foreground, so the array's border is not eroded, as in deepbet."""
    if layers > 0:
        return ndimage.binary_dilation(mask, FACE_CONNECTIVITY, iterations=layers)
    if layers < 0:
        return ndimage.binary_erosion(mask, FACE_CONNECTIVITY, iterations=-layers, border_value=1)
    return mask


def bounding_box(bbox_mask: np.ndarray, shape: tuple[int, ...], margin: float,
                 slice_fraction: float) -> tuple[slice, slice, slice]:
    """deepbet's box on the scan grid ``shape`` from the bounding-box network's mask.

    On each axis the box spans the slices whose mean is above ``slice_fraction``; its centre and size are scaled
    to ``shape``, the size grown by ``2 * margin``, both rounded half to even, and the ends truncated
    toward zero and clipped to the grid, all in float32.
    """
    grow = np.float32(1) + np.float32(2) * np.float32(margin)
    box = []
    for axis, (size_small, size_full) in enumerate(zip(bbox_mask.shape, shape)):
        others = tuple(a for a in range(3) if a != axis)
        fraction = bbox_mask.sum(axis=others).astype(np.float32) / np.float32(bbox_mask.size // size_small)
        selected = np.flatnonzero(fraction > np.float32(slice_fraction))
        if selected.size == 0:
            raise ValueError("not enough foreground to place a bounding box")
        first, end = selected.min(), selected.max() + 1
        scale = np.float32(size_full) / np.float32(size_small)
        centre = np.round(np.float32((end + first) / 2) * scale)
        extent = np.round(grow * (np.float32(end - first) * scale))
        half = extent / np.float32(2)
        box.append(slice(max(0, int(centre - half)), min(size_full, int(centre + half)), 1))
    return tuple(box)


@dataclass(frozen=True)
class BrainExtraction:
    """What :meth:`DeepbetExtractor.extract` returns; both images are on the input's grid and affine."""

    probability: nib.Nifti1Image  # float32 brain probability, zero outside the box
    mask: nib.Nifti1Image  # uint8 brain mask after thresholding and post-processing
    tiv_cm3: float  # mask volume in cm^3 (deepbet's total intracranial volume)
    box: tuple[slice, slice, slice]  # the segmentation network's box, on the RAS-reoriented grid


Image = nib.spatialimages.SpatialImage


def _load_image(image: str | os.PathLike | Image) -> tuple[Image, str]:
    if isinstance(image, Image):
        return image, image.get_filename() or "the input image"
    try:
        return nib.load(os.fspath(image)), os.fspath(image)
    except (FileNotFoundError, nib.filebasedimages.ImageFileError, OSError) as err:
        raise BrainzooError(f"{image}: cannot read as a NIfTI image: {err}") from None


def _native(array: np.ndarray, image: Image, dtype) -> nib.Nifti1Image:
    """A canonical-orientation array put back into the input's own voxel order, grid and header."""
    to_native = nib.orientations.ornt_transform([[0, 1], [1, 1], [2, 1]], nib.io_orientation(image.affine))
    array = nib.apply_orientation(array, to_native).astype(dtype)
    result = nib.Nifti1Image(array, image.affine, image.header if isinstance(image.header, nib.Nifti1Header) else None)
    result.header.set_data_dtype(dtype)
    return result


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_sequence(value, length: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == length


def _is_grid(value) -> bool:
    return _is_sequence(value, 3) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 8 for n in value)


def catalogue_settings(ref: str = CATALOGUE_VERSION) -> DeepbetSettings:
    """The settings a catalogue version's spec gives (deepbet 1.0.2's by default)."""
    from brainzoo import catalogue

    version = catalogue.find_version(ref)
    if version.inference.deepbet is None:
        raise BrainzooError(f"{version.id}: inference.deepbet: its inference.method is {version.inference.method}, "
                            "not deepbet")
    return version.inference.deepbet


class DeepbetExtractor:
    """deepbet's brain extraction with both networks loaded once, for many scans. A network is anything called on a
    float32 batch (1, D, H, W, 1) that returns the softmax (1, D, H, W, 2): an :class:`OnnxModel` or a Keras model."""

    def __init__(self, bbox_model, segmentation_model, settings: DeepbetSettings):
        self.bbox_model = bbox_model
        self.segmentation_model = segmentation_model
        self.settings = settings

    @classmethod
    def from_weights(cls, bbox: str | os.PathLike = CATALOGUE_VERSION,
                     segmentation: str | os.PathLike = CATALOGUE_VERSION,
                     runtime: str = "onnxruntime") -> DeepbetExtractor:
        """Networks from whole-model ``.h5`` files or a catalogue version (default ``deepbet/1.0.2``), run by
        ONNX Runtime (no TensorFlow import) or, with ``runtime="keras"``, as Keras models; the settings of
        ``deepbet/1.0.2``'s spec."""
        from brainzoo.model_files import load_keras_model, open_model_file, verified_weights_path

        paths = [verified_weights_path(bbox, "bbox"), verified_weights_path(segmentation, "segmentation")]
        settings = catalogue_settings()
        if runtime == "keras":
            return cls(*map(load_keras_model, paths), settings)
        if runtime != "onnxruntime":
            raise BrainzooError(f"runtime must be onnxruntime or keras, not {runtime!r}")
        from brainzoo.predict.onnx_runtime import OnnxModel

        for path in paths:
            open_model_file(path).close()  # the same allow-list of layers as a Keras load
        return cls(*map(OnnxModel, paths), settings)

    @staticmethod
    def _brain_probability(model, volume: np.ndarray) -> np.ndarray:
        return np.asarray(model(volume[None, ..., None].astype(np.float32)))[0, ..., BRAIN_CHANNEL]

    def probability(self, volume: np.ndarray, source: str = "the input volume") -> tuple[np.ndarray, tuple[slice, ...]]:
        """Brain probability on a RAS-oriented float32 volume's own grid (zero outside the box), and the box."""
        settings = self.settings
        volume = np.nan_to_num(volume.astype(np.float32, copy=False))
        small = resize_nearest_exact(volume, settings.bbox_grid)
        low, high = (quantile(small, q) for q in settings.window_quantiles)
        mean_sd = (settings.standardised_mean, settings.standardised_sd)
        bbox_probability = self._brain_probability(self.bbox_model, normalize(small, low, high, mean_sd))
        try:
            box = bounding_box(largest_component(bbox_probability > settings.bbox_threshold), volume.shape,
                               settings.bbox_margin, settings.bbox_slice_fraction)
        except ValueError as err:
            raise BrainzooError(f"{source}: deepbet's bounding-box network found no head ({err})") from None
        crop = resize_nearest_exact(volume[box], settings.segmentation_grid)
        crop_probability = self._brain_probability(self.segmentation_model, normalize(crop, low, high, mean_sd))
        probability = np.zeros_like(volume)
        probability[box] = resize_nearest_exact(crop_probability, probability[box].shape)
        return probability, box

    def extract(self, image: str | os.PathLike | Image, threshold: float = 0.5,
                n_dilate: int = 0) -> BrainExtraction:
        """Brain probability and mask of a 3-D image (or a 4-D image's first volume) on its own grid."""
        image, source = _load_image(image)
        if len(image.shape) not in (3, 4):
            raise BrainzooError(f"{source}: expected a 3-D or 4-D image, got shape {image.shape}")
        volume = nib.as_closest_canonical(image).get_fdata(dtype=np.float32)
        volume = volume[..., 0] if volume.ndim == 4 else volume
        probability, box = self.probability(volume, source)
        mask = probability > threshold
        try:
            mask[box] = fill_holes(largest_component(mask[box]))
        except ValueError:
            raise BrainzooError(f"{source}: no voxel has a brain probability above {threshold}") from None
        mask = dilate(mask, n_dilate)
        tiv_cm3 = 1e-3 * mask.sum() * float(np.prod(image.header.get_zooms()[:3]))
        if len(image.shape) == 4:
            probability, mask = probability[..., None], mask[..., None]
        return BrainExtraction(_native(probability, image, np.float32), _native(mask, image, np.uint8),
                               float(tiv_cm3), box)
