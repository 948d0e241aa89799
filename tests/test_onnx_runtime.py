"""Keras networks run by ONNX Runtime (brainzoo.predict.onnx_runtime) compute what Keras computes, and prediction
processes run them without importing TensorFlow.

Tolerances. Both runtimes compute in float32 (unit roundoff 6e-8) but add in different orders (convolutions as
blocked matrix products, batch norms folded into convolutions), so an output may differ by the rounding of some
hundred additions of terms of its own size, or of order 1 for a small output that is a sum of such terms: 1e-5 of
the output's largest magnitude, or of 1 if that is smaller. The deepbet port's twenty instance norms each divide by a
feature map's standard deviation, which amplifies those differences: its probabilities get 1e-4 (3e-5 seen on the
seeded network below).
"""

import json
import os
import subprocess
import sys

import h5py
import nibabel as nib
import numpy as np
import onnx
import pytest
import tensorflow as tf

from conftest import REPO, SHARED_DATA, needs_shared_data, write_index, write_version
from brainzoo import catalogue, sources
from brainzoo.predict import deepbet as deepbet_runner
from brainzoo.predict import runners
from brainzoo.errors import BrainzooError
from brainzoo.predict.runners import BrainMasker
from brainzoo.metrics import dice
from brainzoo.models import (agemapper, densenet169_3d, gan3d_classifier, gan3d_discriminator, gan3d_encoder,
                             gan3d_generator, inception_resnet_v2_3d, mri_autoencoder, s500mri_classifier, sfcn,
                             vae_c_encoder)
from brainzoo.models.deepbet import BRAIN_CHANNEL, deepbet_bbox
from brainzoo.models.unet import unet
from brainzoo.predict.onnx_runtime import LAYERS, OnnxModel, UnsupportedModel, keras_h5_to_onnx
from brainzoo.predict.generative import read_latents
from brainzoo.predict.registration import FSL_MNI152_AFFINE, mni152_brain
from brainzoo.predict.steps import percentile_window
from brainzoo.predict.volumes import GriddedVolume, conform, load_volume
from brainzoo.training.synthetic import synthetic_head

STUDENT = "neuronets/brainzoo-unet/0.5.0"
DEEPBET = "neuronets/deepbet/1.0.2"
UKBIOBANK_SFCN = "neuronets/sfcn-ukbiobank/1.0.0"
AGE_GROUPS = "neuronets/ml-mri-age-group-cnn/1.0.0/2class"
RELATIVE_TOLERANCE = 1e-5
DEEPBET_TOLERANCE = 1e-4

# Every architecture of brainzoo.models at a size its architecture allows, small enough to build and run in seconds:
# builder call, batch size, absolute tolerance (None: RELATIVE_TOLERANCE of the output's largest magnitude, at least 1).
ARCHITECTURES = {
    "sfcn": (lambda: sfcn((32, 40, 32, 1), channels=(4, 4, 4, 4, 4, 4)), 2, None),
    "densenet169_3d": (lambda: densenet169_3d((32, 32, 32, 1)), 2, None),
    "inception_resnet_v2_3d": (lambda: inception_resnet_v2_3d((9, 9, 9, 1)), 2, None),
    "agemapper_2mm": (lambda: agemapper((16, 20, 16, 1), resolution="2mm", channels=(2, 2, 2, 2, 2)), 2, None),
    "deepbet": (lambda: deepbet_bbox((32, 32, 64, 1)), 2, DEEPBET_TOLERANCE),
    "s500mri_classifier": (lambda: s500mri_classifier(num_classes=4), 1, None),  # 128^3 only
    "vae_c_encoder": (lambda: vae_c_encoder(), 1, None),  # 128^3 only; five outputs
    "gan3d_generator": (lambda: gan3d_generator(latent_size=4, n_features=2, output_shape=(16, 16, 16)), 2, None),
    "gan3d_discriminator": (lambda: gan3d_discriminator((16, 16, 16, 1), n_features=2), 2, None),
    "gan3d_encoder": (lambda: gan3d_encoder((16, 16, 16, 1), latent_size=4, base_channels=2), 2, None),
    "gan3d_classifier": (lambda: gan3d_classifier((16, 16, 16, 1)), 2, None),
    "mri_autoencoder": (lambda: mri_autoencoder((17, 20, 18, 1), n_features=2, bottleneck=4), 2, None),
}


def _randomise_batch_norms(model, rng):
    """Batch-norm parameters and statistics that are not the identity, so that their mapping counts."""
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([gamma + rng.normal(0, 0.2, gamma.shape), beta + rng.normal(0, 0.2, beta.shape),
                               rng.normal(0, 0.5, mean.shape), rng.uniform(0.5, 2, variance.shape)])


def _saved_unet(path, norm, seed=0):
    """A small U-Net with random weights and batch norms, saved as .h5."""
    tf.keras.utils.set_random_seed(seed)
    model = unet((16, 16, 16, 1), base_filters=2, norm=norm)
    _randomise_batch_norms(model, np.random.default_rng(seed))
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


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_matches_keras(architecture, tmp_path):
    build, batch_size, tolerance = ARCHITECTURES[architecture]
    tf.keras.utils.set_random_seed(3)
    model = build()
    _randomise_batch_norms(model, np.random.default_rng(3))
    model.save(tmp_path / "model.h5")
    rng = np.random.default_rng(4)
    inputs = [rng.normal(size=(batch_size, *x.shape[1:])).astype(np.float32) for x in model.inputs]
    graph = keras_h5_to_onnx(tmp_path / "model.h5")
    onnx.checker.check_model(graph)
    ours = OnnxModel(graph)(inputs if len(inputs) > 1 else inputs[0])
    theirs = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    ours, theirs = (ours, theirs) if isinstance(theirs, list) else ([ours], [theirs])
    assert len(ours) == len(theirs) == len(model.outputs)
    for mine, keras in zip(ours, map(np.asarray, theirs)):
        assert mine.shape == keras.shape
        np.testing.assert_allclose(mine, keras, rtol=0,
                                   atol=tolerance or RELATIVE_TOLERANCE * max(1.0, float(np.abs(keras).max())))


def test_an_inner_layer_is_taken_as_the_output_when_asked_and_a_missing_one_is_named(tmp_path):
    """An autoencoder's code: the ONNX graph ends at the named layer, as a Keras model cut there does."""
    tf.keras.utils.set_random_seed(5)
    model = mri_autoencoder((17, 20, 18, 1), n_features=2, bottleneck=4)
    model.save(tmp_path / "autoencoder.h5")
    batch = np.random.default_rng(5).normal(size=(2, 17, 20, 18, 1)).astype(np.float32)
    code = tf.keras.Model(model.input, model.get_layer("bottleneck").output)(batch).numpy()
    np.testing.assert_allclose(OnnxModel(tmp_path / "autoencoder.h5", ["bottleneck"])(batch), code, atol=1e-5)
    with pytest.raises(BrainzooError, match=f"{tmp_path / 'autoencoder.h5'}: has no layer 'code' to take an output"):
        OnnxModel(tmp_path / "autoencoder.h5", ["code"])


def test_the_pipeline_reads_the_brain_channel_the_networks_write():
    assert deepbet_runner.BRAIN_CHANNEL == BRAIN_CHANNEL


def _unmapped(kind: str, marker):
    """A tiny network with one layer or option that has no exact ONNX mapping, called ``kind``."""
    layers = tf.keras.layers
    inputs = tf.keras.Input((8, 8, 8, 1), name="image")
    x = layers.Conv3D(2, 3, padding="same", name="conv")(inputs)
    x = {"UpSampling3D": layers.UpSampling3D(2, name=kind),
         "Lambda": layers.Lambda(lambda t: t + len(open(str(marker), "w").name) * 0, name=kind),
         "strided_same": layers.Conv3D(2, 3, strides=2, padding="same", name=kind),
         "relu6": layers.ReLU(6.0, name=kind),
         "softmax_axis_1": layers.Softmax(axis=1, name=kind),
         "same_average_pool": layers.AveragePooling3D(2, padding="same", name=kind)}[kind](x)
    return tf.keras.Model(inputs, x)


@pytest.mark.parametrize("kind, problem", [
    ("UpSampling3D", "UpSampling3D layers are not mapped"), ("Lambda", "Lambda layers are not mapped"),
    ("strided_same", "'same' padding with an even kernel or a stride"), ("relu6", "a ReLU with a ceiling"),
    ("softmax_axis_1", "a softmax over axis 1"), ("same_average_pool", "pooling with padding 'same'")])
def test_a_layer_without_an_exact_mapping_is_named_and_never_run(kind, problem, tmp_path):
    marker = tmp_path / "lambda-ran"
    _unmapped(kind, str(marker)).save(tmp_path / "other.h5")
    marker.unlink(missing_ok=True)  # building the Lambda ran it once, here
    with pytest.raises(UnsupportedModel, match=rf"other\.h5: layer '{kind}': {problem}"):
        OnnxModel(tmp_path / "other.h5")
    assert not marker.exists()
    assert "Lambda" not in LAYERS


def test_auto_falls_back_to_keras_only_for_a_network_that_does_not_map(tmp_path, monkeypatch):
    _unmapped("UpSampling3D", None).save(tmp_path / "model.h5")
    spec = json.loads(json.dumps(catalogue.find_version(STUDENT, REPO).spec)) | {"id": "neuronets/unmapped/1.0.0"}
    spec["weights"] = [{"name": "model", "path": "weights/model.h5", "format": "keras-h5",
                        "sources": [{"type": "inrepo-store"}]}]
    write_version(tmp_path / "root", spec, catalogue.find_version(STUDENT, REPO).card,
                  weights={"weights/model.h5": (tmp_path / "model.h5").read_bytes()})
    write_index(tmp_path / "root")
    monkeypatch.setenv("BRAINZOO_ROOT", str(tmp_path / "root"))
    version = catalogue.find_version("neuronets/unmapped/1.0.0")
    assert runners.load_networks(version).runtime.startswith("tensorflow ")
    with pytest.raises(UnsupportedModel, match="layer 'UpSampling3D'"):
        runners.load_networks(version, "onnxruntime")


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


# Run by a fresh interpreter: each command of the JSON list in argv[1] ([folder, *args]) through the CLI from that
# folder, with any import of TensorFlow or Keras made to fail.
WITHOUT_TENSORFLOW = """
import json, os, sys

class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("tensorflow", "keras"):
            raise ImportError(f"{name} was imported by a prediction process")

sys.meta_path.insert(0, NoTensorFlow())
from brainzoo.cli import main
for folder, *args in json.loads(sys.argv[1]):
    os.chdir(folder)
    if main(args) != 0:
        sys.exit(f"failed: brainzoo {' '.join(args)}")
"""


def _seeded_catalogue(root, seed=0):
    """A dataset holding the UK Biobank SFCN's and the two-class age-group CNN's specs with seeded networks as their
    weights (the real ones are converted by each user): an SFCN of a few channels, the classifier as published; the
    inputs and the steps are the published ones."""
    tf.keras.utils.set_random_seed(seed)
    for version_id, network in ((UKBIOBANK_SFCN, sfcn(channels=(2, 2, 2, 2, 2, 2))),
                                (AGE_GROUPS, s500mri_classifier(num_classes=2))):
        _randomise_batch_norms(network, np.random.default_rng(seed))
        network.save(root.parent / "seeded.h5")
        version = catalogue.find_version(version_id, REPO)
        spec = json.loads(json.dumps(version.spec))
        spec["weights"] = [{"name": "model", "path": "weights/model.h5", "format": "keras-h5",
                            "sources": [{"type": "inrepo-store"}]}]
        write_version(root, spec, version.card, weights={"weights/model.h5": (root.parent / "seeded.h5").read_bytes()})
    write_index(root)


def _seeded_gan(folder) -> tuple[tf.keras.Model, tf.keras.Model]:
    """A small generator and encoder of the GAN's architectures, seeded, their batch norms randomised, saved as
    generator.h5 and encoder.h5 in ``folder``."""
    tf.keras.utils.set_random_seed(4)
    networks = (gan3d_generator(latent_size=4, n_features=2, output_shape=(16, 16, 16)),
                gan3d_encoder((16, 16, 16, 1), latent_size=4, base_channels=2))
    for name, network in zip(("generator", "encoder"), networks):
        _randomise_batch_norms(network, np.random.default_rng(4))
        network.save(folder / f"{name}.h5")
    return networks


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_prediction_processes_never_import_tensorflow(student_weights, deepbet_weights, tmp_path):
    head = synthetic_head(40.0, shape=(96, 112, 96), seed=6)
    nib.save(nib.Nifti1Image(head.volume, head.affine), tmp_path / "head_T1w.nii.gz")
    # A brain for brain age: the template's at 2 mm (registered in half the time of 1 mm), its mask given as --mask.
    brain, brain_mask = (volume[::2, ::2, ::2] for volume in mni152_brain())
    affine = FSL_MNI152_AFFINE @ np.diag([2, 2, 2, 1])
    nib.save(nib.Nifti1Image(np.round(brain * 1000).astype(np.int16), affine), tmp_path / "brain_T1w.nii.gz")
    nib.save(nib.Nifti1Image(brain_mask.astype(np.uint8), affine), tmp_path / "brain_mask.nii.gz")
    _seeded_catalogue(tmp_path / "root")
    commands = [[str(REPO), "predict", "brain-mask", str(tmp_path / "head_T1w.nii.gz"),
                 str(tmp_path / f"{name}.nii.gz"), "--model", model, "--record", str(tmp_path / f"{name}.json")]
                for name, model in (("student", STUDENT), ("deepbet", DEEPBET))]
    commands.append([str(tmp_path / "root"), "predict", "brain-age", str(tmp_path / "brain_T1w.nii.gz"), "--model",
                     UKBIOBANK_SFCN, "--mask", str(tmp_path / "brain_mask.nii.gz"), "--age", "60",
                     "--out", str(tmp_path / "age.json")])
    commands.append([str(tmp_path / "root"), "predict", "classify", str(tmp_path / "brain_T1w.nii.gz"), "--model",
                     AGE_GROUPS, "--mask", str(tmp_path / "brain_mask.nii.gz"), "--sex", "F",
                     "--out", str(tmp_path / "group.json")])
    generator, encoder = _seeded_gan(tmp_path)
    samples = [str(tmp_path / "samples" / f"sample-{i:03d}.nii.gz") for i in range(2)]
    commands += [[str(tmp_path), "generate", str(tmp_path / "generator.h5"), str(tmp_path / "samples"), "--n", "2"],
                 [str(tmp_path), "encode", str(tmp_path / "encoder.h5"), *samples, "--preprocessed", "--out",
                  str(tmp_path / "latents.csv")]]
    environment = {key: value for key, value in os.environ.items() if key != "BRAINZOO_ROOT"}
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW, json.dumps(commands)], capture_output=True,
                          text=True, env=environment, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "samples" / "generate.json").read_text())["runtime"].startswith("onnxruntime ")
    volumes = np.stack([np.asarray(nib.load(sample).dataobj) for sample in samples])[..., None]
    np.testing.assert_allclose(volumes, generator(read_latents(tmp_path / "samples" / "latents.csv")).numpy(),
                               atol=RELATIVE_TOLERANCE)
    np.testing.assert_allclose(read_latents(tmp_path / "latents.csv"), encoder(volumes).numpy(),
                               atol=RELATIVE_TOLERANCE)
    records = {name: json.loads((tmp_path / f"{name}.json").read_text())
               for name in ("student", "deepbet", "age", "group")}
    assert all(record["model"]["runtime"].startswith("onnxruntime ") for record in records.values()), records
    assert len(records["student"]["prediction"]["brain_block_start"]) == 3
    for name in ("student", "deepbet"):
        assert dice(np.asarray(nib.load(tmp_path / f"{name}.nii.gz").dataobj) > 0, head.mask > 0) > 0.8, name
    assert 42 < records["age"]["result"]["brain_age"] < 82
    assert np.isclose(sum(records["group"]["result"]["probabilities"].values()), 1)
