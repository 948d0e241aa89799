"""The Keras architectures at small sizes, their custom layers, and SFCN's age-bin helpers.

Published parameter counts and agreement with the original PyTorch code at full size are checked in
test_convert.py, where the models are built at the published input shapes anyway.
"""

import math
import re
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf

from brainzoo.convert.names import torch_module_path
from brainzoo.errors import BrainzooError
from brainzoo.models import (BUILDERS, ScaledResidual, TrilinearUpsampling3D, agemapper, densenet169_3d,
                             inception_resnet_v2_3d, kl_divergence_loss, pytorch_parameter_count, sfcn, soft_labels)
from brainzoo.outputs import AgeBins

# Standard normal mass within 0.5 of the mean, and between 0.5 and 1.5 on one side.
MASS_CENTRE_BIN = 0.3829249225480262
MASS_NEXT_BIN = 0.2417303374571288
UKBIOBANK_BINS = AgeBins(42, 82, 1)
SAVING_HDF5 = pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")


@pytest.mark.parametrize("builder, input_shape, options, output_shape", [
    (sfcn, (32, 40, 36, 1), {}, (2, 40)),
    (sfcn, (32, 32, 32, 1), {"channels": (8, 8, 8, 8, 8, 4), "n_bins": 10}, (2, 10)),
    (agemapper, (32, 40, 36, 1), {}, (2, 1)),
    (agemapper, (16, 20, 18, 1), {"resolution": "2mm", "dropout_rates": (0.1, 0.1, 0.1)}, (2, 1)),
    (densenet169_3d, (29, 36, 32, 1), {"dropout": 0.1}, (2, 1)),
    (inception_resnet_v2_3d, (8, 12, 10, 1), {"n_outputs": 2}, (2, 2)),
], ids=["sfcn", "sfcn-narrow", "agemapper-1mm", "agemapper-2mm", "densenet169", "inception-resnet-v2"])
def test_builds_and_runs_at_a_small_size(builder, input_shape, options, output_shape):
    model = builder(input_shape=input_shape, **options)
    output = model(np.random.default_rng(0).standard_normal((2, *input_shape)).astype(np.float32)).numpy()
    assert output.shape == output_shape
    assert np.isfinite(output).all()


def blocks_of(model: tf.keras.Model, pattern: str) -> Counter:
    """The model's distinct layer-name prefixes that match ``pattern``, counted by its first group."""
    prefixes = {match[0]: match[1] for layer in model.layers if (match := re.match(pattern, layer.name))}
    return Counter(prefixes.values())


def test_a_shallow_narrow_densenet_keeps_the_published_layer_pattern():
    """The depth and width options shrink DenseNet169-3D without renaming a layer, so a reduced network (the one
    test_training_inputs trains) runs the builder code of the published one and converts with its name table."""
    model = densenet169_3d(input_shape=(29, 29, 29, 1), block_layers=(2, 1, 3, 1), growth_rate=4, stem_features=8)
    assert blocks_of(model, r"denseblock(\d)_denselayer\d+_") == {"1": 2, "2": 1, "3": 3, "4": 1}
    assert model.get_layer("conv0").filters == 8
    assert model.get_layer("denseblock3_denselayer3_conv1").filters == 16  # the bottleneck: 4 x growth
    assert model.get_layer("denseblock3_denselayer3_conv2").filters == 4
    # 8 + 2 * 4 = 16 -> 8, + 4 = 12 -> 6, + 3 * 4 = 18 -> 9, + 4 = 13 channels into the head.
    assert model.get_layer("class_layers_out").kernel.shape == (13, 1)
    assert all(torch_module_path("densenet169", layer.name) for layer in model.layers if layer.weights)


def test_a_shallow_narrow_inception_resnet_keeps_the_published_layer_pattern():
    model = inception_resnet_v2_3d(input_shape=(8, 8, 8, 1), block_repeats=(2, 1, 3), width_multiplier=1 / 8)
    assert blocks_of(model, r"(block_[abc])\d+_") == {"block_a": 2, "block_b": 1, "block_c": 3}
    assert model.get_layer("stem_features_0_conv").filters == 4 and model.get_layer("head_conv").filters == 192
    assert model.get_layer("block_a2_scale_add").scale == 0.2 and model.get_layer("block_c3_scale_add").scale == 1.0
    assert "block_c2_relu" in [layer.name for layer in model.layers]
    assert "block_c3_relu" not in [layer.name for layer in model.layers]  # the last block C has no ReLU
    assert all(torch_module_path("inception-resnet-v2", layer.name) for layer in model.layers if layer.weights)


def test_sfcn_outputs_log_probabilities():
    model = sfcn(input_shape=(32, 32, 32, 1))
    log_probabilities = model(np.ones((3, 32, 32, 32, 1), np.float32)).numpy()
    np.testing.assert_allclose(np.exp(log_probabilities).sum(axis=1), 1.0, rtol=1e-5)


def test_parameter_count_leaves_out_batchnorm_running_statistics():
    model = agemapper(input_shape=(32, 32, 32, 1), channels=(4, 4, 4, 4, 4))
    # Five conv (27 * in * 4, no bias) + BN (4 gamma + 4 beta), then dense 4->96->32->1 with biases.
    convs = 27 * (1 * 4 + 4 * 4 * 4) + 5 * 8
    dense = (4 * 96 + 96) + (96 * 32 + 32) + (32 + 1)
    assert pytorch_parameter_count(model) == convs + dense
    assert model.count_params() == convs + dense + 5 * 8  # Keras also counts the running mean and variance


def test_builders_registry_holds_the_brain_age_builders():
    brain_age = {"sfcn": sfcn, "agemapper": agemapper, "densenet169_3d": densenet169_3d,
                 "inception_resnet_v2_3d": inception_resnet_v2_3d}
    assert {name: BUILDERS.get(name) for name in brain_age} == brain_age


@pytest.mark.parametrize("call, message", [
    (lambda: sfcn(input_shape=(16, 32, 32, 1)), "at least 32"),
    (lambda: sfcn(input_shape=(32, 32, 32)), "(depth, height, width, channels)"),
    (lambda: agemapper(resolution="3mm"), "resolution"),
    (lambda: agemapper(input_shape=(None, None, None, 1)), "fixed spatial sizes"),
    (lambda: densenet169_3d(input_shape=(28, 64, 64, 1)), "at least 29"),
])
def test_unusable_configurations_are_refused(call, message):
    with pytest.raises(BrainzooError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_trilinear_upsampling_aligns_corners():
    # Along depth, [0, 1, 3] -> 6 samples at 0, 0.4, 0.8, 1.2, 1.6, 2 (i * 2 / 5) of the input index.
    volume = np.array([0.0, 1.0, 3.0], np.float32).reshape(1, 3, 1, 1, 1)
    upsampled = TrilinearUpsampling3D(2)(volume).numpy()
    assert upsampled.shape == (1, 6, 2, 2, 1)
    np.testing.assert_allclose(upsampled[0, :, 1, 0, 0], [0.0, 0.4, 0.8, 1.4, 2.2, 3.0], rtol=1e-6)
    np.testing.assert_array_equal(upsampled[0, :, 0], upsampled[0, :, 1])  # constant input axes stay constant


def test_trilinear_upsampling_matches_pytorch():
    torch = pytest.importorskip("torch")
    volume = np.random.default_rng(1).standard_normal((2, 5, 7, 4, 3)).astype(np.float32)
    expected = torch.nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True)(
        torch.from_numpy(volume.transpose(0, 4, 1, 2, 3))).numpy().transpose(0, 2, 3, 4, 1)
    np.testing.assert_allclose(TrilinearUpsampling3D(2)(volume).numpy(), expected, atol=1e-6)


@SAVING_HDF5
def test_models_with_custom_layers_save_and_load(tmp_path):
    inputs = tf.keras.Input((4, 4, 4, 2))
    upsampled = TrilinearUpsampling3D(2)(inputs)
    outputs = ScaledResidual(0.2)([upsampled, tf.keras.layers.Conv3D(2, 1)(upsampled)])
    model = tf.keras.Model(inputs, outputs)
    volume = np.random.default_rng(2).standard_normal((1, 4, 4, 4, 2)).astype(np.float32)
    model.save(tmp_path / "model.h5", save_format="h5")
    loaded = tf.keras.models.load_model(tmp_path / "model.h5", compile=False)
    np.testing.assert_allclose(loaded(volume).numpy(), model(volume).numpy(), atol=1e-6)
    assert loaded.layers[1].get_config()["scale"] == 2 and loaded.layers[-1].get_config()["scale"] == 0.2


@SAVING_HDF5
def test_builders_load_weights_from_a_file(tmp_path):
    source = agemapper(input_shape=(32, 32, 32, 1))
    source.save(tmp_path / "agemapper.h5", save_format="h5")
    loaded = agemapper(input_shape=(32, 32, 32, 1), weights=tmp_path / "agemapper.h5")
    for expected, actual in zip(source.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(actual, expected)
    with pytest.raises(BrainzooError, match="agemapper.h5: cannot load"):
        agemapper(input_shape=(32, 32, 32, 1), channels=(8, 8, 8, 8, 8), weights=tmp_path / "agemapper.h5")


def test_soft_labels_integrate_a_gaussian_over_each_bin():
    labels = soft_labels([60.5, 42.0], UKBIOBANK_BINS, sigma=1)
    assert labels.shape == (2, 40)
    centre = 18  # the bin [60, 61) of 60.5
    np.testing.assert_allclose(labels[0, centre - 1:centre + 2], [MASS_NEXT_BIN, MASS_CENTRE_BIN, MASS_NEXT_BIN],
                               rtol=1e-6)
    np.testing.assert_allclose(labels[0].sum(), 1.0, rtol=1e-6)
    # An age on the lower edge keeps only the half of its mass that falls inside the range.
    np.testing.assert_allclose(labels[1].sum(), 0.5, rtol=1e-6)
    np.testing.assert_allclose(labels[1, 0], 0.5 - (1 - 0.8413447460685429), rtol=1e-6)  # Phi(1) - Phi(0)
    wide = soft_labels(60.5, UKBIOBANK_BINS, sigma=2)
    assert wide[0, centre] < MASS_CENTRE_BIN


def test_kl_divergence_loss_matches_hand_computation():
    targets = np.array([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25]], np.float32)
    predicted = np.log(np.array([[0.25, 0.5, 0.25], [0.25, 0.5, 0.25]], np.float32))
    # Row 1: 0.5 ln(0.5 / 0.25) + 0.5 ln(0.5 / 0.5) + 1e-16 (ln 1e-16 - ln 0.25); row 2 matches exactly.
    # Summed over bins, averaged over the batch of 2.
    expected = (0.5 * math.log(2) + 1e-16 * (math.log(1e-16) - math.log(0.25))) / 2
    assert float(kl_divergence_loss(targets, predicted)) == pytest.approx(expected, rel=1e-6)


def test_kl_divergence_loss_matches_the_original_pytorch_loss():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    targets = soft_labels(rng.uniform(45, 80, 4), UKBIOBANK_BINS)
    predicted = np.log(rng.dirichlet(np.ones(40), 4)).astype(np.float32)
    expected = torch.nn.KLDivLoss(reduction="sum")(torch.from_numpy(predicted), torch.from_numpy(targets) + 1e-16) / 4
    assert float(kl_divergence_loss(targets, predicted)) == pytest.approx(float(expected), rel=1e-5)

