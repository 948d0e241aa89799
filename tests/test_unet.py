"""The brain-extraction U-Net is nobrainer's topology and its saved files run in `nobrainer predict`."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from nobrainer.models import unet as nobrainer_unet

from brainzoo.models.unet import unet


def test_same_layers_and_outputs_as_nobrainer_unet():
    ours = unet((32, 32, 32, 1))
    theirs = nobrainer_unet(n_classes=1, input_shape=(32, 32, 32, 1))
    assert ours.count_params() == theirs.count_params() == 4_768_289
    assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights]
    ours.set_weights(theirs.get_weights())
    x = np.random.default_rng(0).standard_normal((1, 32, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), atol=1e-6)


def test_batchnorm_and_light_variants_build_at_small_sizes():
    light = unet((16, 24, 32, 1), base_filters=4, norm="batch")
    assert light.output_shape == (None, 16, 24, 32, 1)
    assert any(isinstance(layer, tf.keras.layers.BatchNormalization) for layer in light.layers)
    with pytest.raises(ValueError, match="multiple of 8"):
        unet((20, 24, 32, 1))
    with pytest.raises(ValueError, match="norm must be one of"):
        unet((16, 16, 16, 1), norm="layer")


def test_instance_norm_variant_loads_bare_and_ignores_intensity_scale(tmp_path):
    """Per-scan statistics after the first convolution: scaling a scan's intensities changes nothing inside it
    (zero padding at the borders still sees the scale), and the ``.h5`` needs no custom objects."""
    model = unet((16, 16, 16, 1), base_filters=2, norm="instance")
    assert any(isinstance(layer, tf.keras.layers.GroupNormalization) for layer in model.layers)
    model.save(tmp_path / "model.h5")
    loaded = tf.keras.models.load_model(tmp_path / "model.h5", compile=False)
    x = np.random.default_rng(2).random((1, 16, 16, 16, 1)).astype("float32")
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-6)
    inner = (slice(None), slice(6, 10), slice(6, 10), slice(6, 10))
    np.testing.assert_allclose(model(x * 7.0).numpy()[inner], model(x).numpy()[inner], atol=1e-4)


def test_saved_model_runs_in_nobrainer_predict(tmp_path):
    model = unet((16, 16, 16, 1), base_filters=2)
    model.save(tmp_path / "model.h5")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    volume = np.random.default_rng(1).random((24, 20, 16)).astype("float32")
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "in.nii.gz")
    nobrainer = [sys.executable, "-c", "from nobrainer.cli.main import cli; cli()"]
    proc = subprocess.run(nobrainer + ["predict", "-m", str(tmp_path / "model.h5"), "-b", "16", "16", "16",
                                       "-r", "32", "32", "32", str(tmp_path / "in.nii.gz"), str(tmp_path / "out.nii.gz")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = nib.load(tmp_path / "out.nii.gz")
    assert out.shape == volume.shape  # nobrainer resizes its prediction back to the input grid
    np.testing.assert_allclose(out.affine, affine)
