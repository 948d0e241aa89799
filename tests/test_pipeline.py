"""tf.data pipelines: block grids that cover the volume, determinism, augmentation and crop/pad."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from brainzoo.errors import BrainzooError
from brainzoo.predict.steps import percentile_window
from brainzoo.training import pipeline
from brainzoo.training.pipeline import (Augmentation, augment, grid_corners, normalize, regression_volumes,
                                        segmentation_blocks)
from brainzoo.training.tfrecords import read_dataset, write_tfrecords

SHAPE = (20, 24, 28)
NO_CHANGE = Augmentation(flip_axes=(), rotation_degrees=0.0, scale=0.0, translation=0.0, intensity_scale=0.0,
                         intensity_shift=0.0, gamma=0.0, noise=0.0, bias_field=0.0, probability=1.0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three RAS volumes with spherical binary masks, as segmentation and as regression TFRecords."""
    folder = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(0)
    grid = np.indices(SHAPE)
    lines = ["path,label,age,sex"]
    for index in range(3):
        centre = np.array(SHAPE)[:, None, None, None] / 2 + rng.uniform(-3, 3, (3, 1, 1, 1))
        mask = (np.sqrt(((grid - centre) ** 2).sum(axis=0)) < 7).astype(np.uint8)
        volume = (100 * mask + rng.normal(50, 10, SHAPE)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / f"t1_{index}.nii.gz")
        nib.save(nib.Nifti1Image(mask, np.eye(4)), folder / f"mask_{index}.nii.gz")
        lines.append(f"t1_{index}.nii.gz,mask_{index}.nii.gz,{40 + 10 * index},{index % 2}")
    (folder / "table.csv").write_text("\n".join(lines) + "\n")
    write_tfrecords(folder / "table.csv", folder / "seg", kind="segmentation", shard_size=2, progress=False)
    write_tfrecords(folder / "table.csv", folder / "reg", kind="regression", shard_size=2, progress=False)
    return folder


def batches(dataset: tf.data.Dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for (x1, y1), (x2, y2) in zip(first, second):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("volume_shape, block_shape, overlap", [
    ((20, 24, 28), (8, 8, 8), 0),
    ((20, 24, 28), (8, 10, 12), (2, 3, 4)),
    ((16, 16, 16), (16, 16, 16), 0),
    ((17, 33, 9), (8, 8, 8), 5),
])
def test_grid_blocks_tile_the_whole_volume(volume_shape, block_shape, overlap):
    corners = grid_corners(volume_shape, block_shape, overlap).numpy()
    coverage = np.zeros(volume_shape, int)
    for corner in corners:
        assert np.all(corner >= 0) and np.all(corner + block_shape <= volume_shape)
        coverage[tuple(slice(c, c + b) for c, b in zip(corner, block_shape))] += 1
    assert coverage.min() >= 1
    overlap = np.broadcast_to(overlap, 3)
    for axis in range(3):
        starts = np.unique(corners[:, axis])
        assert np.all(np.diff(starts) <= block_shape[axis] - overlap[axis])  # neighbours share >= overlap voxels


def test_grid_blocks_are_the_volume_cut_in_order(shards):
    dataset = read_dataset(shards / "seg")
    blocks = segmentation_blocks(dataset, (8, 10, 12), sampling="grid", overlap=2, batch_size=1000,
                                 normalization=None)
    (x, y), = batches(blocks)
    corners = grid_corners(SHAPE, (8, 10, 12), 2).numpy()
    assert x.shape == (3 * len(corners), 8, 10, 12, 1) and y.shape == x.shape
    for index, element in enumerate(dataset.as_numpy_iterator()):
        rebuilt, label = np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32)
        for number, corner in enumerate(corners):
            where = tuple(slice(c, c + b) for c, b in zip(corner, (8, 10, 12)))
            rebuilt[where] = x[index * len(corners) + number, ..., 0]
            label[where] = y[index * len(corners) + number, ..., 0]
        np.testing.assert_array_equal(rebuilt, element["volume"])
        np.testing.assert_array_equal(label, element["label"])


def test_volumes_smaller_than_a_block_are_padded(shards):
    (x, y), = batches(segmentation_blocks(read_dataset(shards / "seg"), 32, sampling="grid", batch_size=3))
    assert x.shape == (3, 32, 32, 32, 1)
    first = next(read_dataset(shards / "seg").as_numpy_iterator())
    np.testing.assert_array_equal(y[0, 6:26, 4:28, 2:30, 0], first["label"])  # centred, zeros around
    assert y[0].sum() == first["label"].sum()
    assert np.all(x[0, :6] == x[0].min())  # the volume's minimum fills the padding


@pytest.mark.parametrize("augmentation", [None, Augmentation(probability=0.8)])
def test_random_blocks_are_deterministic_per_seed_and_vary_per_epoch(shards, augmentation):
    def build(seed):
        return segmentation_blocks(read_dataset(shards / "seg"), (8, 8, 8), blocks_per_volume=4, batch_size=5,
                                   augmentation=augmentation, shuffle_buffer=6, seed=seed)

    dataset = build(3)
    first_epoch = batches(dataset)
    assert [x.shape[0] for x, _ in first_epoch] == [5, 5, 2]
    assert_same_batches(first_epoch, batches(build(3)))
    assert not np.array_equal(first_epoch[0][0], batches(dataset)[0][0])  # the next epoch draws anew
    assert not np.array_equal(first_epoch[0][0], batches(build(4))[0][0])


def test_random_blocks_lie_inside_the_volume(shards):
    dataset = read_dataset(shards / "seg")
    volumes = [normalize(tf.constant(e["volume"]), "zscore").numpy() for e in dataset.as_numpy_iterator()]
    (x, _), = batches(segmentation_blocks(dataset, (8, 8, 8), blocks_per_volume=5, batch_size=15))
    for index, block in enumerate(x[..., 0]):
        windows = np.lib.stride_tricks.sliding_window_view(volumes[index // 5], (8, 8, 8))
        assert np.any(np.all(windows == block, axis=(3, 4, 5)))


def _volume_with_label(shape, label_box):
    """A dataset of one volume whose voxel values encode their position, with a box-shaped label."""
    volume = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    label = np.zeros(shape, np.float32)
    label[label_box] = 1
    return tf.data.Dataset.from_tensors({"volume": volume, "label": label}), volume


def _corner(volume, block):
    """Where a block of :func:`_volume_with_label`'s volume starts (its values give the position)."""
    return tuple(int(i) for i in np.unravel_index(int(block.flat[0]), volume.shape))


@pytest.mark.parametrize("label_box, corner", [
    ((slice(20, 31), slice(4, 15), slice(10, 21)), (17, 1, 7)),  # the label's centre (25, 9, 15) minus 8
    ((slice(0, 3), slice(37, 40), slice(0, 40)), (0, 24, 12)),  # clipped at the volume's edges
    ((slice(0, 0),) * 3, (12, 12, 12)),  # no label: the volume's middle, 19.5, rounds to 20 (as np.round)
])
def test_brain_sampling_centres_blocks_on_the_label(label_box, corner):
    dataset, volume = _volume_with_label((40, 40, 40), label_box)
    (x, _), = batches(segmentation_blocks(dataset, 16, sampling="brain", blocks_per_volume=3, batch_size=3,
                                          normalization=None))
    assert [_corner(volume, block) for block in x[..., 0]] == [corner] * 3


def test_brain_sampling_jitters_within_its_range():
    dataset, volume = _volume_with_label((40, 40, 40), (slice(15, 26),) * 3)  # centre 20: block corner 12
    (x, y), = batches(segmentation_blocks(dataset, 16, sampling="brain", jitter=3, blocks_per_volume=50,
                                          batch_size=50, normalization=None, seed=1))
    corners = np.array([_corner(volume, block) for block in x[..., 0]])
    assert corners.min() >= 9 and corners.max() <= 15
    assert len({tuple(c) for c in corners}) > 10  # jitter moves blocks, independently per axis
    for block, corner in zip(y[..., 0], corners):  # labels are cut with their volume: the box is 20 +- 5
        position = np.indices((16,) * 3) + corner[:, None, None, None]
        np.testing.assert_array_equal(block, (np.abs(position - 20) <= 5).all(axis=0))
    with pytest.raises(BrainzooError, match="jitter"):
        segmentation_blocks(dataset, 16, sampling="brain", jitter=-1)


def test_augment_keeps_shape_dtype_and_binary_masks(shards):
    element = next(read_dataset(shards / "seg").as_numpy_iterator())
    volume, label = tf.constant(element["volume"]), tf.constant(element["label"])
    changed = 0
    for seed in range(6):
        new_volume, new_label = augment(volume, label, seed=tf.constant([seed, 0]),
                                        config=Augmentation(rotation_degrees=20, probability=1.0))
        assert new_volume.shape == volume.shape and new_volume.dtype == tf.float32
        assert new_label.shape == label.shape and new_label.dtype == tf.float32
        assert set(np.unique(new_label.numpy())) <= {0.0, 1.0}
        assert 0.5 * label.numpy().sum() < new_label.numpy().sum() < 2 * label.numpy().sum()
        assert np.all(np.isfinite(new_volume.numpy()))
        changed += not np.array_equal(new_label.numpy(), label.numpy())
    assert changed == 6


def test_augment_with_zero_ranges_is_the_identity():
    volume = tf.random.stateless_normal((9, 10, 11), seed=[1, 2])
    label = tf.cast(volume > 0, tf.float32)
    new_volume, new_label = augment(volume, label, seed=tf.constant([5, 6]), config=NO_CHANGE)
    np.testing.assert_allclose(new_volume.numpy(), volume.numpy(), atol=1e-5)
    np.testing.assert_array_equal(new_label.numpy(), label.numpy())


def test_resolution_blurs_like_a_gaussian_filter_and_leaves_labels_alone():
    volume = tf.random.stateless_normal((16, 18, 20), seed=[3, 4])
    label = tf.cast(volume > 0, tf.float32)
    blur_only = dataclasses.replace(NO_CHANGE, resolution=2.0)
    sigmas = set()
    for seed in range(3):
        new_volume, new_label = augment(volume, label, seed=tf.constant([seed, 0]), config=blur_only)
        np.testing.assert_array_equal(new_label.numpy(), label.numpy())
        # Its sd per axis is drawn in [0, 2] voxels from the last of augment's seeds (after _maybe's gate draw);
        # with those, it is scipy's Gaussian filter with mirrored edges.
        resolution_seed = tf.random.experimental.stateless_split(tf.constant([seed, 0]), num=7)[6]
        blur_seed = tf.random.experimental.stateless_split(resolution_seed, num=2)[1]
        drawn = tf.maximum(tf.random.stateless_uniform([3], blur_seed, minval=0.0, maxval=2.0), 1e-3).numpy()
        expected = volume.numpy()
        for axis, sigma in enumerate(drawn):
            expected = ndimage.gaussian_filter1d(expected, sigma, axis, mode="reflect", truncate=6 / sigma)
        np.testing.assert_allclose(new_volume.numpy(), expected, atol=1e-4)
        assert new_volume.numpy().std() < volume.numpy().std()
        sigmas.add(tuple(np.round(drawn, 3)))
    assert len(sigmas) == 3
    # Blurring draws its own seed: the other transforms come out as without it.
    config = Augmentation(probability=1.0)
    with_blur = dataclasses.replace(config, resolution=1.0)
    _, plain = augment(volume, label, seed=tf.constant([7, 0]), config=config)
    _, blurred = augment(volume, label, seed=tf.constant([7, 0]), config=with_blur)
    np.testing.assert_array_equal(plain.numpy(), blurred.numpy())


def test_left_right_flip_reverses_axis_0():
    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    flips_only = dataclasses.replace(NO_CHANGE, flip_axes=(0,), probability=0.0)
    outcomes = set()
    for seed in range(8):
        result = augment(tf.constant(volume), seed=tf.constant([seed, 0]), config=flips_only)[0].numpy()
        outcomes.add("same" if np.array_equal(result, volume) else
                     "flipped" if np.array_equal(result, volume[::-1]) else "other")
    assert outcomes == {"same", "flipped"}


def test_linear_sampling_matches_scipy():
    volume = np.random.default_rng(0).normal(size=(7, 8, 9)).astype(np.float32)
    points = np.random.default_rng(1).uniform(-2, 10, size=(500, 3)).astype(np.float32)
    ours = pipeline._sample_linear(tf.constant(volume), tf.constant(points)).numpy()
    clamped = np.clip(points, 0, np.array(volume.shape) - 1)
    np.testing.assert_allclose(ours, ndimage.map_coordinates(volume, clamped.T, order=1), atol=1e-5)


def test_normalisations():
    volume = tf.constant(np.random.default_rng(0).gamma(2.0, 3.0, (6, 7, 8)), tf.float32)
    scored = normalize(volume, "zscore").numpy()
    assert abs(scored.mean()) < 1e-5 and abs(scored.std() - 1) < 1e-4
    assert abs(normalize(volume, "divide-by-mean").numpy().mean() - 1) < 1e-5
    assert normalize(volume, None) is volume


def test_percentile_window_in_training_equals_the_inference_step():
    """A student trained with ``normalization: percentile`` must see what ``{step: percentile}`` gives it."""
    volume = np.random.default_rng(1).gamma(2.0, 300.0, (9, 10, 11)).astype(np.float32)
    trained = normalize(tf.constant(volume), "percentile").numpy()
    np.testing.assert_allclose(trained, percentile_window(volume), atol=1e-6)
    assert trained.min() == 0 and trained.max() == 1


def test_regression_centre_crop_and_pad(shards):
    dataset = read_dataset(shards / "reg")
    (x, y), = batches(regression_volumes(dataset, (16, 30, 20), targets=("age", "sex"), batch_size=3))
    assert x.shape == (3, 16, 30, 20, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(y, [[40, 0], [50, 1], [60, 0]])
    scored = normalize(tf.constant(next(dataset.as_numpy_iterator())["volume"]), "zscore").numpy()
    np.testing.assert_array_equal(x[0, :, 3:27, :, 0], scored[2:18, :, 4:24])
    assert np.all(x[0, :, :3, :, 0] == scored.min())


def test_regression_random_crop_is_seeded(shards):
    def build(seed):
        return regression_volumes(read_dataset(shards / "reg"), (12, 12, 12), random_crop=True, batch_size=3,
                                  augmentation=Augmentation(), shuffle_buffer=3, seed=seed)

    first = batches(build(7))
    assert first[0][0].shape == (3, 12, 12, 12, 1) and first[0][1].shape == (3, 1)
    assert_same_batches(first, batches(build(7)))
    assert not np.array_equal(first[0][0], batches(build(8))[0][0])


def test_pipelines_name_what_is_missing(shards):
    with pytest.raises(BrainzooError, match=r"no 'weight' \(they hold affine, age, label, sex, volume\)"):
        regression_volumes(read_dataset(shards / "reg"), 16, targets=("weight",))
    with pytest.raises(BrainzooError, match="scalar labels; use regression_volumes"):
        segmentation_blocks(read_dataset(shards / "reg"), 8)
    with pytest.raises(BrainzooError, match="overlap smaller than the block"):
        segmentation_blocks(read_dataset(shards / "seg"), 8, sampling="grid", overlap=8)
