"""tf.data input pipelines from :func:`brainzoo.training.tfrecords.read_dataset` dicts to Keras ``(x, y)`` batches.

Segmentation trains on blocks cut from whole volumes (random corners for training, an overlapping grid that
covers every voxel for evaluation); brain age trains on whole volumes cropped or padded to the model's input.
Intensity normalisation speaks the inference steps' vocabulary (``{step: zscore, nonzero: true}``,
``minmax``...; :data:`NORMALIZATION_STEPS`), each a TensorFlow twin of the numpy step that ``predict`` runs.
Augmentation is either :class:`Augmentation` (families of random transforms with one probability) or an ordered
list of named transforms (:data:`TRANSFORMS`), each with its own probability and range, as MONAI's ``Compose``
of the upstream brain-age recipes.
Everything random is drawn with stateless TensorFlow ops from per-element seeds that a seeded
``tf.data.Dataset.random`` stream hands out, so the maps run in parallel yet the same ``seed`` gives identical
batches, and each pass over the data (epoch) still draws new ones.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import tensorflow as tf

from brainzoo.errors import BrainzooError
from brainzoo.predict import steps
from brainzoo.predict.steps import PERCENTILE_WINDOW, check_options, check_step_options
from brainzoo.spec import Step

SAMPLINGS = ("random", "grid", "brain")
_EPSILON = 1e-6


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random transforms; each family but flips is applied with ``probability``.

    ``flip_axes`` defaults to axis 0, left-right in the RAS volumes that the TFRecords hold: the only flip that
    yields a plausible brain. Intensity ranges are in units of the volume's standard deviation.
    """

    flip_axes: tuple[int, ...] = (0,)
    rotation_degrees: float = 10.0
    scale: float = 0.1  # zoom factors in [1 - scale, 1 + scale] per axis
    translation: float = 3.0  # voxels
    intensity_scale: float = 0.1  # factor in [1 - s, 1 + s]
    intensity_shift: float = 0.1
    gamma: float = 0.3  # log(gamma) in [-g, g]
    noise: float = 0.05  # Gaussian noise standard deviation up to this
    bias_field: float = 0.3  # log of a smooth multiplicative field, up to this in magnitude
    resolution: float = 0.0  # Gaussian blur sd per axis up to this many voxels: thicker slices, lower resolution
    probability: float = 0.5


def _zscore(volume: tf.Tensor, nonzero: bool = False) -> tf.Tensor:
    if not nonzero:
        return (volume - tf.reduce_mean(volume)) / tf.maximum(tf.math.reduce_std(volume), _EPSILON)
    selected = tf.not_equal(volume, 0)
    values = tf.boolean_mask(volume, selected)
    scored = (volume - tf.reduce_mean(values)) / tf.maximum(tf.math.reduce_std(values), _EPSILON)
    return tf.where(selected, scored, tf.zeros_like(volume))


def _divide_by_mean(volume: tf.Tensor) -> tf.Tensor:
    return volume / tf.maximum(tf.reduce_mean(volume), _EPSILON)


def _minmax(volume: tf.Tensor) -> tf.Tensor:
    low = tf.reduce_min(volume)
    return (volume - low) / tf.maximum(tf.reduce_max(volume) - low, _EPSILON)


def _percentile_window(volume: tf.Tensor, low: float = PERCENTILE_WINDOW[0],
                       high: float = PERCENTILE_WINDOW[1]) -> tf.Tensor:
    floor, ceiling = _percentile(volume, low), _percentile(volume, high)
    return (tf.clip_by_value(volume, floor, ceiling) - floor) / tf.maximum(ceiling - floor, _EPSILON)


# The TensorFlow twin of each inference intensity step a training pipeline can run, with the same options.
_TWINS = {steps.zscore: _zscore, steps.divide_by_mean: _divide_by_mean, steps.minmax: _minmax,
          steps.percentile_window: _percentile_window}
# Named by the inference steps' vocabulary (brainzoo.predict.steps.INTENSITY_STEPS), the one place names are written.
NORMALIZATION_STEPS: dict[str, Callable[..., tf.Tensor]] = {
    name: _TWINS[step] for name, step in steps.INTENSITY_STEPS.items() if step in _TWINS}


def normalization_steps(normalization: str | Sequence[dict] | None, where: str = "normalization") -> list[Step]:
    """A spec's ``normalization`` as a list of steps: ``null`` (none), a step name, or steps with options.

    ``where`` names the spec's field in errors (``brainzoo validate`` checks specs with this).
    """
    if normalization is None:
        return []
    named = isinstance(normalization, str)
    listed = ([Step(normalization)] if named else
              [Step.from_spec(step, f"{where}[{i}]") for i, step in enumerate(normalization)])
    for i, step in enumerate(listed):
        at = where if named else f"{where}[{i}]"
        if step.name not in NORMALIZATION_STEPS:
            raise BrainzooError(f"{at}: {step.name!r} is not one of {', '.join(NORMALIZATION_STEPS)} "
                                "(the inference intensity steps a training pipeline runs)")
        try:
            check_step_options(step)
        except BrainzooError as err:
            raise BrainzooError(f"{at}: {err}") from None
    return listed


def normalize(volume: tf.Tensor, normalization: str | Sequence[dict] | None) -> tf.Tensor:
    """Per-volume intensity normalisation by the inference steps of that name, in order: ``zscore`` (optionally
    over non-zero voxels), ``divide-by-mean``, ``minmax`` (to [0, 1]), ``percentile`` (a window to [0, 1])."""
    for step in normalization_steps(normalization):
        volume = NORMALIZATION_STEPS[step.name](volume, **step.options)
    return volume


def _percentile(volume: tf.Tensor, q: float) -> tf.Tensor:
    """The ``q``-th percentile with linear interpolation between order statistics, as numpy's default."""
    values = tf.sort(tf.reshape(volume, [-1]))
    position = q / 100.0 * tf.cast(tf.size(values) - 1, tf.float64)
    below = tf.cast(tf.floor(position), tf.int32)
    above = tf.minimum(below + 1, tf.size(values) - 1)
    weight = tf.cast(position - tf.floor(position), values.dtype)
    return values[below] + weight * (values[above] - values[below])


def grid_corners(volume_shape: tf.Tensor | Sequence[int], block_shape: Sequence[int],
                 overlap: int | Sequence[int] = 0) -> tf.Tensor:
    """Corners ``[n, 3]`` of blocks that cover a volume; neighbours share ``overlap`` voxels (at least).

    The last block on each axis ends at the volume's edge, so every voxel is covered even when the block
    size does not divide the volume. The volume must be at least the block's size.
    """
    overlap = _per_axis(overlap)
    starts = []
    for axis in range(3):
        dim = tf.cast(volume_shape[axis], tf.int32)
        stride = block_shape[axis] - overlap[axis]
        count = (dim - block_shape[axis] + stride - 1) // stride + 1
        starts.append(tf.minimum(tf.range(count) * stride, dim - block_shape[axis]))
    grid = tf.meshgrid(*starts, indexing="ij")
    return tf.reshape(tf.stack(grid, axis=-1), [-1, 3])


def augment(volume: tf.Tensor, label: tf.Tensor | None = None, *, seed: tf.Tensor,
            config: Augmentation = Augmentation()) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Randomly flip, affine-resample, blur, bias, gamma-correct, rescale and add noise to a 3D volume.

    ``label`` (same shape, optional) follows the spatial transforms with nearest-neighbour sampling, so it
    keeps its values (a mask stays binary). ``seed`` is a shape-[2] integer tensor; equal seeds, equal output.
    """
    flip_seed, affine_seed, *intensity_seeds, resolution_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=7))
    spatial = (volume,) if label is None else (volume, label)
    flips = tf.random.stateless_uniform([len(config.flip_axes)], flip_seed) < 0.5
    for index, axis in enumerate(config.flip_axes):
        spatial = tf.cond(flips[index], lambda: tuple(tf.reverse(x, [axis]) for x in spatial), lambda: spatial)
    spatial = _maybe(affine_seed, config.probability, lambda s: _random_affine(spatial, s, config), spatial)
    volume = spatial[0]
    if config.resolution > 0:
        volume = _maybe(resolution_seed, config.probability, lambda s: _random_blur(volume, s, config), volume)
    for transform, transform_seed in zip((_random_bias_field, _random_gamma, _random_scale_shift, _random_noise),
                                         intensity_seeds):
        volume = _maybe(transform_seed, config.probability,
                        lambda s, transform=transform: transform(volume, s, config), volume)
    return volume, (None if label is None else spatial[1])


def _scale_intensity(volume: tf.Tensor, seed: tf.Tensor, factor: float) -> tf.Tensor:
    """``v * (1 + f)``, ``f`` uniform in [-factor, factor] (MONAI ``RandScaleIntensity(factors)``)."""
    return volume * (1 + _uniform(seed, [], -factor, factor))


def _shift_intensity(volume: tf.Tensor, seed: tf.Tensor, offset: float) -> tf.Tensor:
    """``v + o``, ``o`` uniform in [-offset, offset], in the volume's units (MONAI ``RandShiftIntensity``)."""
    return volume + _uniform(seed, [], -offset, offset)


def _flip(volume: tf.Tensor, seed: tf.Tensor, axis: int) -> tf.Tensor:
    """Reverse one array axis (MONAI ``RandFlip(spatial_axis)``); the draw decides only whether."""
    return tf.reverse(volume, [axis])


def _gamma_curve(volume: tf.Tensor, gamma: tf.Tensor, epsilon: float) -> tf.Tensor:
    """A gamma curve on the volume's own range: its minimum and maximum stay put."""
    low = tf.reduce_min(volume)
    span = tf.reduce_max(volume) - low
    return low + span * ((volume - low) / (span + epsilon)) ** gamma


def _adjust_contrast(volume: tf.Tensor, seed: tf.Tensor, gamma: Sequence[float]) -> tf.Tensor:
    """Gamma drawn uniformly in ``gamma`` = [low, high] (MONAI ``RandAdjustContrast``, default [0.5, 4.5])."""
    return _gamma_curve(volume, _uniform(seed, [], *gamma), 1e-7)


def _gaussian_smooth(volume: tf.Tensor, seed: tf.Tensor, sigma: Sequence[float]) -> tf.Tensor:
    """Separable Gaussian blur, its sd drawn per axis uniformly in ``sigma`` = [low, high] voxels, as MONAI's
    ``RandGaussianSmooth``: the "erf" kernel (each tap the Gaussian's mass over its voxel), cut at 4 sd, edges
    padded with zeros."""
    radius = int(max(sigma[1] * 4.0, 0.5) + 0.5)
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    sigmas = _uniform(seed, [3], *sigma)
    blurred = volume[None, ..., None]
    for axis in range(3):
        tail = tf.floor(tf.maximum(sigmas[axis] * 4.0, 0.5) + 0.5)
        scale = 1.0 / (math.sqrt(2.0) * sigmas[axis])
        kernel = tf.maximum(0.5 * (tf.math.erf(scale * (offsets + 0.5)) - tf.math.erf(scale * (offsets - 0.5))), 0.0)
        kernel = tf.where(tf.abs(offsets) <= tail, kernel, 0.0)
        shape = [1, 1, 1, 1, 1]
        shape[axis] = 2 * radius + 1
        padding = [[0, 0]] * 5
        padding[axis + 1] = [radius, radius]
        blurred = tf.nn.conv3d(tf.pad(blurred, padding), tf.reshape(kernel, shape), [1] * 5, "VALID")
    return blurred[0, ..., 0]


def _histogram_shift(volume: tf.Tensor, seed: tf.Tensor, control_points: int) -> tf.Tensor:
    """A random monotone piecewise-linear map of the intensities (MONAI ``RandHistogramShift``).

    ``control_points`` points split the volume's range evenly; each inner one moves to a uniform draw between
    its left neighbour's new place and its right neighbour's old one, so the map never decreases and the ends
    stay put: the order of intensities is kept.
    """
    if control_points < 3:
        raise BrainzooError(f"histogram-shift: control_points must be at least 3, got {control_points}")
    reference = [i / (control_points - 1) for i in range(control_points)]
    draws = tf.unstack(_uniform(seed, [control_points - 2], 0.0, 1.0))
    moved = [tf.constant(0.0)]
    for index in range(1, control_points - 1):
        moved.append(moved[-1] + draws[index - 1] * (reference[index + 1] - moved[-1]))
    moved = tf.stack(moved + [tf.constant(1.0)])
    low = tf.reduce_min(volume)
    span = tf.maximum(tf.reduce_max(volume) - low, _EPSILON)
    position = (volume - low) / span * (control_points - 1)
    segment = tf.clip_by_value(tf.floor(position), 0, control_points - 2)
    left = tf.gather(moved, tf.cast(segment, tf.int32))
    right = tf.gather(moved, tf.cast(segment, tf.int32) + 1)
    return low + span * (left + (position - segment) * (right - left))


def _gaussian_noise(volume: tf.Tensor, seed: tf.Tensor, std: float) -> tf.Tensor:
    """Add N(0, s) noise, ``s`` drawn uniformly in [0, std], in the volume's units (MONAI ``RandGaussianNoise``)."""
    level_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    return volume + _uniform(level_seed, [], 0.0, std) * tf.random.stateless_normal(tf.shape(volume), noise_seed)


# The named random transforms of a spec's ``augmentation`` list; each entry's options besides ``transform``
# and ``probability`` are the keyword arguments of its function.
TRANSFORMS: dict[str, Callable[..., tf.Tensor]] = {
    "scale-intensity": _scale_intensity, "shift-intensity": _shift_intensity, "flip": _flip,
    "adjust-contrast": _adjust_contrast, "gaussian-smooth": _gaussian_smooth, "histogram-shift": _histogram_shift,
    "gaussian-noise": _gaussian_noise,
}


@dataclass(frozen=True)
class RandomTransforms:
    """An ordered list of named transforms, each applied with its own ``probability`` (MONAI's ``Compose`` of
    ``Rand*`` transforms): ``[{transform: flip, axis: 0, probability: 0.5}, ...]``."""

    transforms: tuple[dict, ...]

    def __post_init__(self):
        for entry in self.transforms:
            name = entry.get("transform")
            if name not in TRANSFORMS:
                raise BrainzooError(f"augmentation: unknown transform {name!r} (known: {', '.join(TRANSFORMS)})")
            probability = entry.get("probability")
            if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
                raise BrainzooError(f"augmentation: {name} needs a probability in [0, 1], not {probability!r}")
            options = {k: v for k, v in entry.items() if k not in ("transform", "probability")}
            check_options(f"augmentation transform {name!r}", TRANSFORMS[name], options, skip=2)

    def __call__(self, volume: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        seeds = tf.unstack(tf.random.experimental.stateless_split(seed, num=max(len(self.transforms), 1)))
        for entry, transform_seed in zip(self.transforms, seeds):
            function = TRANSFORMS[entry["transform"]]
            options = {k: v for k, v in entry.items() if k not in ("transform", "probability")}
            volume = _maybe(transform_seed, entry["probability"],
                            lambda s, function=function, options=options: function(volume, s, **options), volume)
        return volume


def augmentation_from_spec(augmentation: dict | Sequence[dict] | None) -> Augmentation | RandomTransforms | None:
    """A spec's ``augmentation``: a mapping of :class:`Augmentation` ranges, or a list of named transforms."""
    if not augmentation:
        return None
    if isinstance(augmentation, dict):
        return Augmentation(**augmentation)
    return RandomTransforms(tuple(dict(entry) for entry in augmentation))


def segmentation_blocks(
    dataset: tf.data.Dataset,
    block_shape: Sequence[int],
    *,
    sampling: str = "random",
    blocks_per_volume: int = 8,
    overlap: int | Sequence[int] = 0,
    jitter: float = 0.0,
    batch_size: int = 8,
    normalization: str | Sequence[dict] | None = "zscore",
    augmentation: Augmentation | None = None,
    orientation: str = "RAS",
    shuffle_buffer: int = 0,
    cache: bool | str = False,
    seed: int = 0,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Batches ``(x, y)`` of blocks ``[batch, *block_shape, 1]`` from volumes with label volumes.

    ``sampling="random"`` cuts ``blocks_per_volume`` blocks at random corners (training); ``"grid"`` cuts the
    :func:`grid_corners` blocks in order (evaluation); ``"brain"`` centres each block on the label's centre of
    mass moved by up to ``jitter`` voxels per axis (clipped to the volume), around where a model run in one
    block on the brain sees it at inference. Volumes are normalised whole before cutting and padded
    (with their minimum; labels with 0) when smaller than a block. ``shuffle_buffer`` shuffles blocks, which
    also mixes volumes; ``cache`` keeps decoded volumes in memory (``True``) or in a file (a path).
    """
    block_shape = _per_axis(block_shape)
    overlap = _per_axis(overlap)
    if sampling not in SAMPLINGS:
        raise BrainzooError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    if any(size < 1 for size in block_shape) or any(not 0 <= o < size for o, size in zip(overlap, block_shape)):
        raise BrainzooError(f"block shape {block_shape} with overlap {overlap}: blocks need a positive size "
                            "and an overlap smaller than the block")
    if blocks_per_volume < 1:
        raise BrainzooError(f"blocks_per_volume must be at least 1, got {blocks_per_volume}")
    if jitter < 0:
        raise BrainzooError(f"jitter must be a non-negative number of voxels, got {jitter}")
    _check_keys(dataset, ["volume", "label"])
    if dataset.element_spec["label"].shape.rank != 3:
        raise BrainzooError("these records hold scalar labels; use regression_volumes for them")
    normalization_steps(normalization)
    if isinstance(augmentation, RandomTransforms):
        raise BrainzooError("segmentation augmentation takes the Augmentation ranges (a mapping): a listed "
                            "transform such as flip would not move the label with the volume")

    def cut(element, seed_pair):
        volume = normalize(element["volume"], normalization)
        volume = _pad_to_at_least(volume, block_shape, tf.reduce_min(volume))
        label = _pad_to_at_least(element["label"], block_shape, 0.0)
        if sampling == "grid":
            corners = grid_corners(tf.shape(volume), block_shape, overlap)
        elif sampling == "brain":
            offsets = tf.random.stateless_uniform([blocks_per_volume, 3], seed_pair, -jitter, jitter)
            centre = tf.round(_label_centre(label) + offsets)
            corners = tf.clip_by_value(tf.cast(centre, tf.int32) - [size // 2 for size in block_shape], 0,
                                       tf.shape(volume) - block_shape)
        else:
            room = tf.cast(tf.shape(volume) - block_shape + 1, tf.float32)
            draws = tf.random.stateless_uniform([blocks_per_volume, 3], seed_pair)
            corners = tf.cast(tf.floor(draws * room), tf.int32)
        return tf.map_fn(lambda corner: (tf.slice(volume, corner, block_shape), tf.slice(label, corner, block_shape)),
                         corners, fn_output_signature=(tf.TensorSpec(block_shape, tf.float32),) * 2)

    axes = _flips_from_ras(orientation)
    dataset = _prepared(dataset.map(lambda e: {"volume": _flipped(e["volume"], axes),
                                               "label": _flipped(e["label"], axes)}), cache, 0, seed)
    dataset = _seeded(dataset, seed).map(cut, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if augmentation is not None:
        dataset = _seeded(dataset, seed + 1).map(
            lambda pair, seed_pair: augment(pair[0], pair[1], seed=seed_pair, config=augmentation),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.map(lambda x, y: (x[..., None], y[..., None])).prefetch(tf.data.AUTOTUNE)


def regression_volumes(
    dataset: tf.data.Dataset,
    input_shape: Sequence[int],
    *,
    targets: Sequence[str] = ("label",),
    random_crop: bool = False,
    random_crop_within: Sequence[int] | None = None,
    batch_size: int = 4,
    normalization: str | Sequence[dict] | None = "zscore",
    augmentation: Augmentation | RandomTransforms | None = None,
    orientation: str = "RAS",
    shuffle_buffer: int = 0,
    cache: bool | str = False,
    seed: int = 0,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Batches ``(x, y)``: whole volumes ``[batch, *input_shape, 1]`` and targets ``[batch, len(targets)]``.

    Volumes are normalised whole, then padded (with their minimum) and cropped to ``input_shape``: about the
    centre (``(size - shape) // 2``, as the inference ``crop`` step), or at a random place with ``random_crop``
    (training), within the centred window ``random_crop_within`` if given (MONAI's ``CenterSpatialCrop``, which
    starts at ``size // 2 - window // 2``). :class:`RandomTransforms` run before the crop, in the upstream
    recipes' order; :class:`Augmentation` after it. ``targets`` are keys of the records, e.g. ``label``
    (nobrainer's scalar) or our stored scalars such as ``age`` and ``sex``. The records' RAS volumes are first
    flipped to ``orientation``, the network's, so that a record of ``brainzoo preprocess --training`` is the
    array ``predict`` builds.
    """
    input_shape = _per_axis(input_shape)
    _check_keys(dataset, ["volume", *targets])
    normalization_steps(normalization)
    window = None if random_crop_within is None else _per_axis(random_crop_within)
    if window is not None and any(w < s for w, s in zip(window, input_shape)):
        raise BrainzooError(f"random_crop_within {window} is smaller than the input shape {input_shape}")

    def prepare(element, seed_pair):
        crop_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(seed_pair, num=2))
        volume = normalize(element["volume"], normalization)
        if isinstance(augmentation, RandomTransforms):
            volume = augmentation(volume, augment_seed)
        if random_crop and window is not None:
            volume = _pad_to_at_least(volume, window, tf.reduce_min(volume))
            volume = tf.slice(volume, tf.shape(volume) // 2 - [size // 2 for size in window], window)
        volume = _pad_to_at_least(volume, input_shape, tf.reduce_min(volume))
        room = tf.shape(volume) - input_shape
        if random_crop:
            start = tf.cast(tf.floor(tf.random.stateless_uniform([3], crop_seed) * tf.cast(room + 1, tf.float32)),
                            tf.int32)
        else:
            start = room // 2
        volume = tf.ensure_shape(tf.slice(volume, start, input_shape), input_shape)
        if isinstance(augmentation, Augmentation):
            volume, _ = augment(volume, seed=augment_seed, config=augmentation)
        target = tf.stack([tf.cast(element[name], tf.float32) for name in targets])
        return volume[..., None], target

    axes = _flips_from_ras(orientation)
    dataset = dataset.map(lambda e: {"volume": _flipped(e["volume"], axes), **{key: e[key] for key in targets}})
    dataset = _prepared(dataset, cache, shuffle_buffer, seed)
    dataset = _seeded(dataset, seed).map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def _flips_from_ras(orientation: str) -> list[int]:
    """The axes to reverse to take a RAS volume (as brainzoo tfrecords stores them) to ``orientation``, the
    network's (inference.input.orientation: RAS, LAS or LPS, the same axes in other directions)."""
    opposite = {"R": "L", "A": "P", "S": "I"}
    if len(orientation) != 3 or any(code not in (ras, opposite[ras]) for code, ras in zip(orientation, "RAS")):
        raise BrainzooError(f"orientation {orientation!r}: the records' RAS axes can be flipped to RAS, LAS, LPS... "
                            "but not permuted")
    return [axis for axis, (code, ras) in enumerate(zip(orientation, "RAS")) if code != ras]


def _flipped(volume: tf.Tensor, axes: list[int]) -> tf.Tensor:
    return tf.reverse(volume, axes) if axes else volume


def _label_centre(label: tf.Tensor) -> tf.Tensor:
    """The centre of mass of a label volume's non-zero voxels (its middle if it has none), in voxels."""
    voxels = tf.cast(tf.where(label > 0), tf.float32)
    middle = tf.cast(tf.shape(label) - 1, tf.float32) / 2
    return tf.cond(tf.shape(voxels)[0] > 0, lambda: tf.reduce_mean(voxels, axis=0), lambda: middle)


def _per_axis(value: int | Sequence[int]) -> list[int]:
    values = [int(value)] * 3 if isinstance(value, int) else [int(v) for v in value]
    if len(values) != 3:
        raise BrainzooError(f"expected one number or three (one per axis), got {value!r}")
    return values


def _check_keys(dataset: tf.data.Dataset, keys: Sequence[str]) -> None:
    available = dataset.element_spec
    missing = [key for key in keys if key not in available]
    if missing:
        raise BrainzooError(f"the records have no {', '.join(map(repr, missing))} "
                            f"(they hold {', '.join(sorted(available))})")


def _prepared(dataset: tf.data.Dataset, cache: bool | str, shuffle_buffer: int, seed: int) -> tf.data.Dataset:
    """Cache decoded records (before anything random), then shuffle them."""
    if cache:
        dataset = dataset.cache("" if cache is True else cache)
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return dataset


def _seeded(dataset: tf.data.Dataset, seed: int) -> tf.data.Dataset:
    """Pair each element with its own stateless seed ``[2]``; a new stream of seeds on every pass."""
    stream = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    stream = stream.map(lambda value: tf.stack([value, tf.constant(seed, tf.int64)]))
    return tf.data.Dataset.zip((dataset, stream))


def _pad_to_at_least(volume: tf.Tensor, shape: Sequence[int], fill: tf.Tensor | float) -> tf.Tensor:
    """Pad each axis symmetrically up to ``shape``; axes already as large are left alone (and not copied)."""
    missing = tf.maximum(tf.constant(shape) - tf.shape(volume), 0)
    before = missing // 2
    return tf.cond(tf.reduce_any(missing > 0),
                   lambda: tf.pad(volume, tf.stack([before, missing - before], axis=1), constant_values=fill),
                   lambda: volume)


def _maybe(seed: tf.Tensor, probability: float, transform: Callable, tensors):
    """Apply ``transform(seed)`` with the given probability, else pass ``tensors`` through."""
    gate_seed, transform_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    apply = tf.random.stateless_uniform([], gate_seed) < probability
    return tf.cond(apply, lambda: transform(transform_seed), lambda: tensors)


def _uniform(seed: tf.Tensor, shape: Sequence[int], low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high)


def _random_affine(tensors: tuple[tf.Tensor, ...], seed: tf.Tensor, config: Augmentation) -> tuple[tf.Tensor, ...]:
    """Rotate, zoom and shift about the centre: trilinear for the volume, nearest for the label."""
    angle_seed, scale_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
    radians = math.radians(config.rotation_degrees)
    rotation = _rotation_matrix(_uniform(angle_seed, [3], -radians, radians))
    zoom = _uniform(scale_seed, [3], 1 - config.scale, 1 + config.scale)
    matrix = rotation @ tf.linalg.diag(1.0 / zoom)
    shift = _uniform(shift_seed, [3], -config.translation, config.translation)
    shape = tf.shape(tensors[0])
    grid = tf.meshgrid(*(tf.range(shape[axis]) for axis in range(3)), indexing="ij")
    points = tf.cast(tf.reshape(tf.stack(grid, axis=-1), [-1, 3]), tf.float32)
    centre = (tf.cast(shape, tf.float32) - 1.0) / 2.0
    sources = (points - centre) @ tf.transpose(matrix) + centre + shift
    volume = tf.reshape(_sample_linear(tensors[0], sources), shape)
    return (volume, *(tf.reshape(_sample_nearest(label, sources), shape) for label in tensors[1:]))


def _rotation_matrix(angles: tf.Tensor) -> tf.Tensor:
    """Rotations about the three axes, composed."""
    cos, sin = tf.unstack(tf.cos(angles)), tf.unstack(tf.sin(angles))
    one, zero = tf.ones([]), tf.zeros([])
    about_0 = tf.stack([[one, zero, zero], [zero, cos[0], -sin[0]], [zero, sin[0], cos[0]]])
    about_1 = tf.stack([[cos[1], zero, sin[1]], [zero, one, zero], [-sin[1], zero, cos[1]]])
    about_2 = tf.stack([[cos[2], -sin[2], zero], [sin[2], cos[2], zero], [zero, zero, one]])
    return about_0 @ about_1 @ about_2


def _clamped(volume: tf.Tensor, points: tf.Tensor) -> tf.Tensor:
    """Points outside the volume take the nearest edge voxel's value (background, in a head image)."""
    return tf.clip_by_value(points, 0.0, tf.cast(tf.shape(volume) - 1, tf.float32))


def _sample_nearest(volume: tf.Tensor, points: tf.Tensor) -> tf.Tensor:
    nearest = tf.unstack(tf.cast(tf.round(_clamped(volume, points)), tf.int32), axis=1)
    return tf.gather(tf.reshape(volume, [-1]), sum(_strided(volume, nearest)))


def _sample_linear(volume: tf.Tensor, points: tf.Tensor) -> tf.Tensor:
    """Trilinear interpolation as 8 gathers from the flat volume, with per-axis vectors throughout.

    (Gathering with ``[N, 3]`` indices or reducing over a last axis of 3 is several times slower.)
    """
    points = tf.unstack(_clamped(volume, points), axis=1)
    lows = [tf.floor(p) for p in points]
    fractions = [p - low for p, low in zip(points, lows)]
    lows = [tf.cast(low, tf.int32) for low in lows]
    highs = [tf.minimum(low + 1, size - 1) for low, size in zip(lows, tf.unstack(tf.shape(volume)))]
    lows, highs = _strided(volume, lows), _strided(volume, highs)
    flat = tf.reshape(volume, [-1])
    result = tf.zeros_like(points[0])
    for corner in itertools.product((0, 1), repeat=3):
        weight = 1.0
        for axis, up in enumerate(corner):
            weight *= fractions[axis] if up else 1.0 - fractions[axis]
        index = sum((highs if up else lows)[axis] for axis, up in enumerate(corner))
        result += weight * tf.gather(flat, index)
    return result


def _strided(volume: tf.Tensor, indices: list[tf.Tensor]) -> list[tf.Tensor]:
    """Per-axis voxel indices scaled by the axis' stride in the flattened (C-order) volume."""
    shape = tf.shape(volume)
    return [indices[0] * shape[1] * shape[2], indices[1] * shape[2], indices[2]]


def _random_blur(volume: tf.Tensor, seed: tf.Tensor, config: Augmentation) -> tf.Tensor:
    """Separable Gaussian blur, its sd drawn per axis in [0, ``resolution``] voxels: a scan of lower or
    anisotropic resolution. Edges are mirrored, so the background does not bleed in from outside."""
    radius = math.ceil(3 * config.resolution)
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    sigmas = tf.maximum(_uniform(seed, [3], 0.0, config.resolution), 1e-3)
    blurred = volume[None, ..., None]
    for axis in range(3):
        kernel = tf.exp(-0.5 * (offsets / sigmas[axis]) ** 2)
        shape = [1, 1, 1, 1, 1]
        shape[axis] = 2 * radius + 1
        padding = [[0, 0]] * 5
        padding[axis + 1] = [radius, radius]
        blurred = tf.nn.conv3d(tf.pad(blurred, padding, mode="SYMMETRIC"),
                               tf.reshape(kernel / tf.reduce_sum(kernel), shape), [1] * 5, "VALID")
    return blurred[0, ..., 0]


def _random_bias_field(volume: tf.Tensor, seed: tf.Tensor, config: Augmentation) -> tf.Tensor:
    """Multiply by ``exp`` of a random cubic polynomial in x, y, z (a smooth field), scaled to ``bias_field``.

    Intensities are taken above the volume's minimum, so normalised (negative) backgrounds stay background.
    """
    coefficient_seed, strength_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    degree = 3
    powers = tf.range(degree + 1, dtype=tf.float32)
    bases = []
    for axis in range(3):
        position = tf.linspace(-1.0, 1.0, tf.shape(volume)[axis])
        bases.append(position[None, :] ** powers[:, None])  # [degree + 1, n]
    total = powers[:, None, None] + powers[None, :, None] + powers[None, None, :]
    terms = tf.cast((total >= 1) & (total <= degree), tf.float32)  # no constant: the field is about 1
    coefficients = _uniform(coefficient_seed, [degree + 1] * 3, -1.0, 1.0) * terms
    log_field = tf.einsum("ijk,ix,jy,kz->xyz", coefficients, *bases)
    log_field *= _uniform(strength_seed, [], 0.0, config.bias_field) / tf.maximum(
        tf.reduce_max(tf.abs(log_field)), _EPSILON)
    low = tf.reduce_min(volume)
    return low + (volume - low) * tf.exp(log_field)


def _random_gamma(volume: tf.Tensor, seed: tf.Tensor, config: Augmentation) -> tf.Tensor:
    """Gamma curve on the volume's own range, so its minimum and maximum stay put."""
    return _gamma_curve(volume, tf.exp(_uniform(seed, [], -config.gamma, config.gamma)), _EPSILON)


def _random_scale_shift(volume: tf.Tensor, seed: tf.Tensor, config: Augmentation) -> tf.Tensor:
    scale_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    scale = _uniform(scale_seed, [], 1 - config.intensity_scale, 1 + config.intensity_scale)
    shift = _uniform(shift_seed, [], -config.intensity_shift, config.intensity_shift) * tf.math.reduce_std(volume)
    return volume * scale + shift


def _random_noise(volume: tf.Tensor, seed: tf.Tensor, config: Augmentation) -> tf.Tensor:
    level_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    sigma = _uniform(level_seed, [], 0.0, config.noise) * tf.math.reduce_std(volume)
    return volume + sigma * tf.random.stateless_normal(tf.shape(volume), noise_seed)
