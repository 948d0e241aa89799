"""Keras U-Nets run by ONNX Runtime (brainzoo.predict.onnx_runtime) compute what Keras computes."""

import json
import subprocess
import sys

import h5py
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, SHARED_DATA, needs_shared_data
from brainzoo import catalogue, sources
from brainzoo.errors import BrainzooError
from brainzoo.inference import BrainMasker
from brainzoo.metrics import dice
from brainzoo.models.unet import unet
from brainzoo.predict.onnx_runtime import OnnxModel, UnsupportedModel
from brainzoo.predict.steps import percentile_window
from brainzoo.predict.volumes import GriddedVolume, conform, load_volume
from brainzoo.training.synthetic import synthetic_head

STUDENT = "neuronets/brainzoo-unet/0.5.0"


def _saved_unet(path, norm, seed=0):
    """A small U-Net with random weights, and batch-norm statistics that are not the identity, saved as .h5."""
    tf.keras.utils.set_random_seed(seed)
    model = unet((16, 16, 16, 1), base_filters=2, norm=norm)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([gamma + rng.normal(0, 0.2, gamma.shape), beta + rng.normal(0, 0.2, beta.shape),
                               rng.normal(0, 0.5, mean.shape), rng.uniform(0.5, 2, variance.shape)])
    model.save(path)
    return tf.keras.models.load_model(path, compile=False)


@pytest.mark.parametrize("norm", [None, "batch", "instance"])
def test_each_unet_variant_matches_keras_at_any_block_size(norm, tmp_path):
    saved = _saved_unet(tmp_path / "unet.h5", norm)
    other_size = unet((24, 16, 32, 1), base_filters=2, norm=norm)  # the same weights on another block size
    other_size.set_weights(saved.get_weights())
    onnx_model = OnnxModel(tmp_path / "unet.h5")
    rng = np.random.default_rng(1)
    for keras_model, shape in [(saved, (2, 16, 16, 16, 1)), (other_size, (1, 24, 16, 32, 1))]:
        batch = rng.normal(size=shape).astype(np.float32)
        np.testing.assert_allclose(onnx_model(batch), keras_model(batch).numpy(), atol=1e-5)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_nobrainers_own_unet_with_a_softmax_head_matches_keras(batchnorm, tmp_path):
    from nobrainer.models.unet import unet as nobrainer_unet

    tf.keras.utils.set_random_seed(4)
    nobrainer_unet(3, (16, 16, 16, 1), batchnorm=batchnorm).save(tmp_path / "brainy.h5")
    keras_model = tf.keras.models.load_model(tmp_path / "brainy.h5", compile=False)
    batch = np.random.default_rng(2).normal(size=(1, 16, 16, 16, 1)).astype(np.float32)
    output = OnnxModel(tmp_path / "brainy.h5")(batch)
    assert output.shape == (1, 16, 16, 16, 3)
    np.testing.assert_allclose(output, keras_model(batch).numpy(), atol=1e-5)


def test_a_layer_without_a_mapping_is_named(tmp_path):
    inputs = tf.keras.Input((8, 8, 8, 1), name="image")
    x = tf.keras.layers.Conv3D(2, 3, padding="same", name="conv")(inputs)
    outputs = tf.keras.layers.UpSampling3D(2, name="upsample")(x)
    tf.keras.Model(inputs, outputs).save(tmp_path / "other.h5")
    with pytest.raises(UnsupportedModel, match=r"other\.h5: layer 'upsample': UpSampling3D layers are not mapped"):
        OnnxModel(tmp_path / "other.h5")


def test_a_file_that_is_not_a_keras_model_is_named(tmp_path):
    (tmp_path / "notes.h5").write_text("not hdf5")
    with h5py.File(tmp_path / "empty.h5", "w") as file:
        file.create_dataset("x", data=np.zeros(3))
    for name in ("notes.h5", "empty.h5"):
        with pytest.raises(BrainzooError, match=rf"{name}: not a Keras \.h5 model file"):
            OnnxModel(tmp_path / name)


@pytest.fixture(scope="module")
def student_weights():
    failed = [r for r in sources.get(REPO, STUDENT) if r["status"] == "error"]
    assert not failed, failed
    return catalogue.resolve_weights(STUDENT, "model")


def _agreement(weights, head: np.ndarray) -> tuple[float, float]:
    """Mean absolute difference of the two runtimes' probabilities on a 96^3 block of a conformed head, and
    the fraction of voxels on which their masks (>= 0.5) differ."""
    block = np.ascontiguousarray(percentile_window(head)[16:112, 16:112, 16:112])[np.newaxis, ..., np.newaxis]
    ours = OnnxModel(weights)(block)
    theirs = tf.keras.models.load_model(weights, compile=False)(block).numpy()
    return float(np.abs(ours - theirs).mean()), float(np.mean((ours >= 0.5) != (theirs >= 0.5)))


def _conformed(image: nib.Nifti1Image) -> np.ndarray:
    return conform(GriddedVolume.native(image), "RAS", [2, 2, 2], [128, 128, 128]).data


def test_the_published_student_agrees_with_keras_on_a_synthetic_head(student_weights):
    head = synthetic_head(40.0, shape=(96, 112, 96), seed=3)
    difference, flipped = _agreement(student_weights, _conformed(nib.Nifti1Image(head.volume, head.affine)))
    assert difference < 1e-4 and flipped < 1e-4, (difference, flipped)


@needs_shared_data
def test_the_published_student_agrees_with_keras_on_a_real_head(student_weights):
    image = load_volume(SHARED_DATA / "ixi" / "raw" / "IXI533-Guys-1066-T1.nii.gz")
    difference, flipped = _agreement(student_weights, _conformed(image))
    assert difference < 1e-4 and flipped < 1e-4, (difference, flipped)


def test_the_runtime_is_chosen_recorded_and_checked(student_weights, tmp_path):
    head = synthetic_head(40.0, shape=(96, 112, 96), seed=5)
    scan = nib.Nifti1Image(head.volume, head.affine)
    masks = {}
    for runtime, expected in (("auto", "onnxruntime "), ("onnxruntime", "onnxruntime "), ("keras", "tensorflow ")):
        masker = BrainMasker.load(STUDENT, runtime=runtime)
        masks[runtime] = np.asarray(masker.run(scan)[0].dataobj) > 0
        assert masker.provenance()["runtime"].startswith(expected)
    assert np.mean(masks["auto"] != masks["keras"]) < 1e-4
    with pytest.raises(BrainzooError, match="runtime must be one of auto, onnxruntime, keras, not 'torch'"):
        BrainMasker.load(STUDENT, runtime="torch")
    with pytest.raises(BrainzooError, match="the deepbet port runs in Keras only"):
        BrainMasker.load("neuronets/deepbet/1.0.2", runtime="onnxruntime")


def test_a_brain_mask_process_never_imports_tensorflow(student_weights, tmp_path):
    head = synthetic_head(40.0, shape=(96, 112, 96), seed=6)
    nib.save(nib.Nifti1Image(head.volume, head.affine), tmp_path / "head_T1w.nii.gz")
    code = ("import sys; from brainzoo.cli import main; code = main(sys.argv[1:]); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'; sys.exit(code)")
    argv = [sys.executable, "-c", code, "predict", "brain-mask", str(tmp_path / "head_T1w.nii.gz"),
            str(tmp_path / "mask.nii.gz"), "--model", STUDENT, "--record", str(tmp_path / "mask.json")]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "mask.json").read_text())
    assert record["model"]["runtime"].startswith("onnxruntime ")
    assert record["prediction"]["brain_block_passes"] in (1, 2)
    assert dice(np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj) > 0, head.mask > 0) > 0.8
