"""Building blocks shared by the brain-age architectures: PyTorch-exact convolution, pooling and
normalisation helpers, the custom layers Keras lacks, and the weights loading every builder offers.

The helpers reproduce PyTorch semantics in channels-last Keras so that converted weights give the
same numbers: symmetric padding is explicit wherever Keras ``"same"`` would pad differently, and
BatchNorm takes PyTorch's momentum and epsilon.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from brainzoo.errors import BrainzooError

layers = tf.keras.layers

# PyTorch BatchNorm momentum 0.1 (weight of the new batch) is Keras momentum 0.9 (weight of the old value).
TORCH_BN_MOMENTUM = 0.9
TORCH_BN_EPSILON = 1e-5


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    return (value,) * 3 if isinstance(value, int) else tuple(value)


def conv3d(x, filters: int, kernel_size, *, name: str, strides=1, padding=0, use_bias: bool = True):
    """PyTorch ``Conv3d(kernel_size, stride, padding)`` on a channels-last tensor.

    Stride-1 convolutions whose padding is (k - 1) / 2 on every axis use Keras ``"same"``, which pads
    the same way. Anything else, stride 2 in particular (where ``"same"`` pads only at the end on even
    sizes), gets an explicit symmetric ``ZeroPadding3D`` named ``<name>_pad`` before a ``"valid"`` one.
    """
    kernel, strides, padding = _triple(kernel_size), _triple(strides), _triple(padding)
    if strides == (1, 1, 1) and all(2 * p == k - 1 for p, k in zip(padding, kernel)):
        mode = "same"
    else:
        if any(padding):
            x = layers.ZeroPadding3D(padding, name=f"{name}_pad")(x)
        mode = "valid"
    return layers.Conv3D(filters, kernel, strides=strides, padding=mode, use_bias=use_bias, name=name)(x)


def batch_norm(x, *, name: str, epsilon: float = TORCH_BN_EPSILON):
    """PyTorch ``BatchNorm3d`` (momentum 0.1) over the channel axis."""
    return layers.BatchNormalization(axis=-1, momentum=TORCH_BN_MOMENTUM, epsilon=epsilon, name=name)(x)


def max_pool_after_relu(x, pool_size: int, *, name: str, strides: int, padding: int = 0):
    """PyTorch ``MaxPool3d(pool_size, stride, padding)`` for a non-negative input.

    PyTorch pads max pooling with -inf; zero padding gives the same maxima only because every input
    here comes out of a ReLU, so the caller must guarantee that.
    """
    if padding:
        x = layers.ZeroPadding3D(padding, name=f"{name}_pad")(x)
    return layers.MaxPool3D(pool_size, strides=strides, padding="valid", name=name)(x)


@tf.keras.utils.register_keras_serializable(package="brainzoo")
class TrilinearUpsampling3D(layers.Layer):
    """Trilinear upsampling by an integer factor with ``align_corners=True``, as PyTorch's
    ``nn.Upsample(scale_factor, mode="trilinear", align_corners=True)``.

    Keras only upsamples 3-D volumes by repetition. With aligned corners, output voxel i on an axis
    samples the input at i * (n_in - 1) / (n_out - 1), so the first and last voxels are copied exactly.
    """

    def __init__(self, scale: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.scale = int(scale)

    def _interpolate_axis(self, x, axis: int):
        size_in = tf.shape(x)[axis]
        size_out = size_in * self.scale
        step = tf.cast(size_in - 1, x.dtype) / tf.cast(tf.maximum(size_out - 1, 1), x.dtype)
        position = step * tf.cast(tf.range(size_out), x.dtype)
        lower = tf.cast(tf.floor(position), tf.int32)
        upper = tf.minimum(lower + 1, size_in - 1)
        weight_shape = [1, 1, 1, 1, 1]
        weight_shape[axis] = -1
        upper_weight = tf.reshape(position - tf.cast(lower, x.dtype), weight_shape)
        return (tf.gather(x, lower, axis=axis) * (1 - upper_weight)
                + tf.gather(x, upper, axis=axis) * upper_weight)

    def call(self, inputs):
        x = inputs
        for axis in (1, 2, 3):
            x = self._interpolate_axis(x, axis)
        return x

    def compute_output_shape(self, input_shape):
        batch, *spatial, channels = tf.TensorShape(input_shape).as_list()
        return tf.TensorShape([batch, *(None if s is None else s * self.scale for s in spatial), channels])

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


@tf.keras.utils.register_keras_serializable(package="brainzoo")
class ScaledResidual(layers.Layer):
    """``shortcut + scale * residual``: the Inception-ResNet shortcut.

    A registered layer rather than a ``Lambda`` so that saved models load without executing code.
    """

    def __init__(self, scale: float, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, inputs):
        shortcut, residual = inputs
        return shortcut + self.scale * residual

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


def check_input_shape(input_shape: Sequence[int], minimum: int, architecture: str) -> tuple[int, ...]:
    """A (depth, height, width, channels) shape whose spatial sizes survive the architecture's downsampling."""
    input_shape = tuple(input_shape)
    if len(input_shape) != 4:
        raise BrainzooError(f"{architecture}: input_shape must be (depth, height, width, channels), got {input_shape}")
    too_small = [size for size in input_shape[:3] if size is not None and size < minimum]
    if too_small:
        raise BrainzooError(f"{architecture}: input_shape {input_shape} is too small; "
                            f"every spatial size must be at least {minimum}")
    return input_shape


def finish_model(inputs, outputs, name: str, weights: str | os.PathLike | None) -> tf.keras.Model:
    """The functional model, with the ``weights`` file loaded when given."""
    model = tf.keras.Model(inputs, outputs, name=name)
    if weights is not None:
        load_weights_file(model, weights)
    return model


def load_weights_file(model: tf.keras.Model, weights: str | os.PathLike) -> None:
    """Load a weights file into a built model. Builders take files, never catalogue ids: a version's
    checked file is :func:`brainzoo.model_files.verified_weights_path` of its id."""
    path = Path(weights)
    if not path.is_file():
        raise BrainzooError(f"{path}: no such weights file (a catalogue version's weights: "
                            "brainzoo.model_files.verified_weights_path(VERSION_ID))")
    try:
        model.load_weights(path)
    except (ValueError, OSError) as err:
        raise BrainzooError(f"{path}: cannot load these weights into {model.name}: {err}") from None


def pytorch_parameter_count(model: tf.keras.Model) -> int:
    """Parameters as PyTorch counts them.

    BatchNorm running mean and variance are non-trainable weights in Keras but buffers, not
    parameters, in PyTorch; every other weight (trainable or not) counts in both.
    """
    running_statistics = sum(
        int(np.prod(w.shape))
        for layer in model.submodules if isinstance(layer, layers.BatchNormalization)
        for w in (layer.moving_mean, layer.moving_variance)
    )
    return model.count_params() - running_statistics
