"""The upstream brain-age recipes' random transforms (MONAI's Rand* defaults) and the normalisations training
shares with inference: each tested for what it does to a volume."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from brainzoo.errors import BrainzooError
from brainzoo.predict import steps
from brainzoo.training.pipeline import RandomTransforms, normalize, regression_volumes
from brainzoo.training.tfrecords import read_dataset, write_tfrecords

SHAPE = (12, 14, 16)


def head(seed: int = 0) -> np.ndarray:
    """A bright ellipsoid with texture on a zero background, in [0, 1] as the FLAIR recipes' inputs are."""
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE) - (np.array(SHAPE)[:, None, None, None] - 1) / 2
    inside = ((grid / (np.array(SHAPE)[:, None, None, None] / 2.5)) ** 2).sum(axis=0) < 1
    return np.where(inside, rng.uniform(0.2, 1.0, SHAPE), 0.0).astype(np.float32)


def transformed(volume: np.ndarray, seed: int, **entry) -> np.ndarray:
    """``volume`` through one listed transform that always applies."""
    return RandomTransforms(({"probability": 1.0, **entry},))(tf.constant(volume), tf.constant([seed, 0])).numpy()


def test_histogram_shift_keeps_the_order_and_the_ends():
    volume = head()
    for seed in range(5):
        shifted = transformed(volume, seed, transform="histogram-shift", control_points=10)
        order = np.argsort(volume, axis=None, kind="stable")
        assert np.all(np.diff(shifted.ravel()[order]) >= -1e-6)  # a monotone map: brighter stays brighter
        assert np.isclose(shifted.min(), volume.min()) and np.isclose(shifted.max(), volume.max())
        assert np.abs(shifted - volume).max() > 1e-3


def test_smoothing_reduces_high_frequency_power_and_keeps_the_mass():
    noise = np.random.default_rng(1).normal(size=(24, 24, 24)).astype(np.float32)
    power = np.abs(np.fft.fftn(noise)) ** 2
    frequencies = np.sqrt(sum(f ** 2 for f in np.meshgrid(*[np.fft.fftfreq(24)] * 3, indexing="ij")))
    high = frequencies > 0.3
    for seed in range(3):
        smoothed = transformed(noise, seed, transform="gaussian-smooth", sigma=[0.25, 1.5])
        smoothed_power = np.abs(np.fft.fftn(smoothed)) ** 2
        assert smoothed_power[high].sum() < 0.5 * power[high].sum()
    # The "erf" kernel holds the whole Gaussian mass: away from the zero-padded edges a constant stays constant.
    flat = transformed(np.ones((24, 24, 24), np.float32), 0, transform="gaussian-smooth", sigma=[1.0, 1.0])
    np.testing.assert_allclose(flat[8:-8, 8:-8, 8:-8], 1.0, atol=1e-4)
    assert flat[0, 12, 12] < 0.75  # zeros beyond the edge, as MONAI pads


def test_contrast_is_a_gamma_curve_on_the_volume_range():
    volume = head()
    adjusted = transformed(volume, 0, transform="adjust-contrast", gamma=[2.0, 2.0])
    top = volume.max()
    np.testing.assert_allclose(adjusted, top * (volume / top) ** 2, atol=1e-5)  # minimum 0: x -> top (x / top)^2
    for seed in range(3):
        drawn = transformed(volume, seed, transform="adjust-contrast", gamma=[0.5, 4.5])
        assert np.isclose(drawn.min(), volume.min()) and np.isclose(drawn.max(), volume.max(), atol=1e-5)


def test_scale_shift_noise_and_flip_stay_in_their_ranges():
    volume = head()
    inside = volume > 0
    for seed in range(10):
        factor = transformed(volume, seed, transform="scale-intensity", factor=0.2)[inside] / volume[inside]
        assert np.ptp(factor) < 1e-5 and 0.8 <= factor[0] <= 1.2
        offset = transformed(volume, seed, transform="shift-intensity", offset=0.2) - volume
        assert np.ptp(offset) < 1e-5 and -0.2 <= offset.flat[0] <= 0.2
        residual = transformed(volume, seed, transform="gaussian-noise", std=0.1) - volume
        assert residual.std() <= 0.1 * 1.2 and abs(residual.mean()) < 0.02
    np.testing.assert_array_equal(transformed(volume, 0, transform="flip", axis=0), volume[::-1])


def test_each_transform_applies_with_its_probability():
    volume = head()
    transforms = RandomTransforms(({"transform": "shift-intensity", "offset": 0.2, "probability": 0.25},))
    applied = [not np.array_equal(transforms(tf.constant(volume), tf.constant([seed, 3])).numpy(), volume)
               for seed in range(400)]
    assert 0.18 < np.mean(applied) < 0.32


def test_listed_transforms_are_checked_before_any_work():
    with pytest.raises(BrainzooError, match="unknown transform 'elastic'"):
        RandomTransforms(({"transform": "elastic", "probability": 0.1},))
    with pytest.raises(BrainzooError, match="augmentation transform 'gaussian-noise': unknown option.*sd"):
        RandomTransforms(({"transform": "gaussian-noise", "sd": 0.1, "probability": 0.1},))
    with pytest.raises(BrainzooError, match="flip needs a probability"):
        RandomTransforms(({"transform": "flip", "axis": 0},))


@pytest.mark.parametrize("step", [{"step": "zscore"}, {"step": "zscore", "nonzero": True}, {"step": "minmax"},
                                  {"step": "divide-by-mean"}, {"step": "percentile", "low": 1, "high": 99}])
def test_training_normalisation_is_the_inference_step(step):
    volume = head(2) * 300
    options = {k: v for k, v in step.items() if k != "step"}
    np.testing.assert_allclose(normalize(tf.constant(volume), [step]).numpy(),
                               steps.INTENSITY_STEPS[step["step"]](volume, **options), atol=2e-5)


def test_normalisation_names_an_unknown_step():
    with pytest.raises(BrainzooError, match="'resize' is not one of zscore, divide-by-mean, minmax, percentile"):
        normalize(tf.zeros(SHAPE), [{"step": "resize", "shape": [2, 2, 2]}])
    with pytest.raises(BrainzooError, match="preprocessing step 'zscore': unknown option"):
        normalize(tf.zeros(SHAPE), [{"step": "zscore", "non_zero": True}])


def test_random_crop_within_a_centred_window(tmp_path):
    """MONAI's CenterSpatialCrop(window) then RandSpatialCrop(shape): the crop starts in [size//2 - window//2,
    + window - shape], here [7 - 4, 3 + 1] on every axis; without random_crop, the inference step's centre crop."""
    volume = np.arange(14 ** 3, dtype=np.float32).reshape(14, 14, 14)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    (tmp_path / "table.csv").write_text("path,age,sex\nv.nii.gz,50,0\n")
    write_tfrecords(tmp_path / "table.csv", tmp_path / "records", kind="regression", progress=False)
    (x, _), = regression_volumes(read_dataset(tmp_path / "records").repeat(40), 8, targets=("age",),
                                 random_crop=True, random_crop_within=9, normalization=None, batch_size=40)
    starts = np.array([np.unravel_index(int(crop.flat[0]), volume.shape) for crop in x.numpy()])
    assert set(starts.ravel()) == {3, 4}
    (x, _), = regression_volumes(read_dataset(tmp_path / "records"), 8, targets=("age",), normalization=None,
                                 batch_size=1)
    np.testing.assert_array_equal(x.numpy()[0, ..., 0], steps.centre_crop(volume, [8, 8, 8])[0])
