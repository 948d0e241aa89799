"""3D U-Net for brain extraction: nobrainer's ``unet`` ("brainy") topology with readable layer names.

Only stock Keras layers are used, so a saved ``.h5`` needs no brainzoo code to load: ``nobrainer predict``
reads it as it is (brainzoo reads it through :func:`brainzoo.model_files.load_keras_model`).
``base_filters=16`` is exactly nobrainer's ``unet(n_classes, input_shape)`` (same layers in the same
order, so the same weights list); smaller values give the lighter variants we train on CPUs.
"""

from __future__ import annotations

import os

import tensorflow as tf
from tensorflow.keras import layers

from brainzoo.models.layers import load_weights_file


NORMS = ("batch", "instance", None)


def _conv(x, filters: int, name: str, norm: str | None, activation: str):
    x = layers.Conv3D(filters, 3, padding="same", name=f"{name}_conv")(x)
    if norm == "batch":
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
    elif norm == "instance":  # one group per channel: per-scan statistics, the same in training and inference
        x = layers.GroupNormalization(groups=-1, epsilon=1e-5, name=f"{name}_in")(x)
    return layers.Activation(activation, name=f"{name}_{activation}")(x)


def unet(input_shape=(128, 128, 128, 1), n_classes: int = 1, base_filters: int = 16, norm: str | None = None,
         activation: str = "relu", weights: str | os.PathLike | None = None, name: str = "unet") -> tf.keras.Model:
    """Three poolings, so each spatial size must be a multiple of 8.

    Encoder level i (i = 1..3) doubles filters inside the level (f, 2f); the bottleneck has 8f, 16f;
    each decoder level transposes up, concatenates the skip and applies two convolutions. ``norm`` follows
    each convolution: ``"batch"`` (nobrainer's ``batchnorm=True``), ``"instance"`` or ``None`` (nobrainer's default).
    """
    if norm not in NORMS:
        raise ValueError(f"unet: norm must be one of {NORMS}, not {norm!r}")
    if any(int(s) % 8 for s in input_shape[:3]):
        raise ValueError(f"unet: spatial input shape {tuple(input_shape[:3])} must be a multiple of 8")
    f = base_filters
    inputs = layers.Input(shape=input_shape, name="image")
    x, skips = inputs, []
    for level, (first, second) in enumerate([(f, 2 * f), (2 * f, 4 * f), (4 * f, 8 * f)], start=1):
        x = _conv(x, first, f"enc{level}_1", norm, activation)
        x = _conv(x, second, f"enc{level}_2", norm, activation)
        skips.append(x)
        x = layers.MaxPool3D(2, name=f"enc{level}_pool")(x)
    x = _conv(x, 8 * f, "bottom_1", norm, activation)
    x = _conv(x, 16 * f, "bottom_2", norm, activation)
    for level, (up, out) in zip((3, 2, 1), [(16 * f, 8 * f), (8 * f, 4 * f), (4 * f, 2 * f)]):
        x = layers.Conv3DTranspose(up, 2, strides=2, padding="same", name=f"dec{level}_up")(x)
        x = layers.Concatenate(axis=-1, name=f"dec{level}_concat")([skips[level - 1], x])
        x = _conv(x, out, f"dec{level}_1", norm, activation)
        x = _conv(x, out, f"dec{level}_2", norm, activation)
    x = layers.Conv3D(n_classes, 1, name="head_conv")(x)
    outputs = layers.Activation("sigmoid" if n_classes == 1 else "softmax", name="head_probability")(x)
    model = tf.keras.Model(inputs, outputs, name=name)
    if weights is not None:
        load_weights_file(model, weights)
    return model
