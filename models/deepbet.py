"""deepbet's two brain-extraction networks (Fisch et al. 2024, MIT licence) in tf.keras.

deepbet 1.0.2 ships two TorchScript networks with one architecture (fastMRI's LinkNet3d) and different
weights: a bounding-box network that finds the brain on a 128^3 copy of the scan, and a segmentation
network that labels brain on a 256^3 crop around it. Both end in a two-channel softmax whose channel
``BRAIN_CHANNEL`` is the brain probability; :mod:`brainzoo.predict.deepbet` runs them the way deepbet does.

Every layer is named after the TorchScript module it reproduces with dots turned into underscores
(``down1.block1.double_conv.0`` is ``down1_block1_double_conv_0``), so the converter in
:mod:`brainzoo.convert.deepbet` maps tensors by name, and checks each layer's kernel, stride,
padding, output padding and epsilon against the TorchScript graph it converts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import tensorflow as tf

from brainzoo.errors import BrainzooError
from brainzoo.models.layers import check_input_shape, conv3d, finish_model, max_pool_after_relu

layers = tf.keras.layers

BBOX_INPUT_SHAPE = (128, 128, 128, 1)
SEGMENTATION_INPUT_SHAPE = (256, 256, 256, 1)
ENCODER_WIDTHS = (16, 32, 64, 128)
HEAD_WIDTH = 8
CLASSES = 2
BRAIN_CHANNEL = 1
# The stem halves twice (stride-2 convolution, stride-2 pooling) and down1..down3 once each.
DOWNSAMPLING = 32
# torch.instance_norm's eps in both graphs; the norms have no affine parameters.
INSTANCE_NORM_EPSILON = 1e-5


@tf.keras.utils.register_keras_serializable(package="brainzoo")
class InstanceNormalization(layers.Layer):
    """PyTorch ``InstanceNorm3d(affine=False)``: each channel of each volume to zero mean and unit
    (biased) variance.

    The sums for the mean and variance must be near double precision: Keras' GroupNormalization sums in
    float32, and over a 64^3 volume that drifts by a few 1e-6 per norm; after the twenty norms of this network
    the softmax then differs from PyTorch by up to 1e-3. Casting whole feature maps to float64 is exact but
    doubles the network's time at 256^3, so the first spatial axis is summed in float32 (a few hundred terms,
    rounding error ~1e-7 of the sum) and those partial sums in float64.
    """

    def __init__(self, epsilon: float = INSTANCE_NORM_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, inputs):
        spatial_axes = list(range(1, inputs.shape.rank - 1))
        voxels = tf.cast(tf.reduce_prod(tf.shape(inputs)[1:-1]), tf.float64)

        def channel_mean(x):
            partial = tf.reduce_sum(x, axis=spatial_axes[0], keepdims=True)
            return tf.reduce_sum(tf.cast(partial, tf.float64), axis=spatial_axes, keepdims=True) / voxels

        centred = inputs - tf.cast(channel_mean(inputs), inputs.dtype)
        scale = tf.math.rsqrt(channel_mean(tf.square(centred)) + self.epsilon)
        return centred * tf.cast(scale, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def conv_transpose3d(x, filters: int, kernel_size: int, *, name: str, strides: int, padding: int,
                     output_padding: int, use_bias: bool):
    """PyTorch ``ConvTranspose3d(kernel_size, stride, padding, output_padding)`` on a channels-last tensor.

    Both frameworks spread input voxel i over output voxels ``stride * i + (0 .. kernel - 1)``; PyTorch
    then drops ``padding`` voxels at the start of each axis and ``padding - output_padding`` at the end.
    Keras ``"same"`` decides its own cropping (none at the start for stride 2), so the crop is explicit:
    a ``"valid"`` transposed convolution and a ``Cropping3D`` named ``<name>_crop``.
    """
    x = layers.Conv3DTranspose(filters, kernel_size, strides=strides, padding="valid", use_bias=use_bias,
                               name=name)(x)
    crop = (padding, padding - output_padding)
    if any(crop):
        x = layers.Cropping3D((crop, crop, crop), name=f"{name}_crop")(x)
    return x


def _norm_relu(x, sequential: str, slot: int, relu: bool = True):
    """The InstanceNorm3d (and ReLU) that follow a convolution in slots ``slot`` (and ``slot + 1``)."""
    x = InstanceNormalization(name=f"{sequential}_{slot}")(x)
    return layers.ReLU(name=f"{sequential}_{slot + 1}")(x) if relu else x


def _residual_block(x, filters: int, strides: int, name: str):
    """LinkNet3d ``Block``: conv-norm-ReLU-conv-norm plus a shortcut, then ReLU. The shortcut is a
    strided 1^3 convolution and a norm when the block changes size or width, else the input itself."""
    y = conv3d(x, filters, 3, strides=strides, padding=1, use_bias=False, name=f"{name}_double_conv_0")
    y = _norm_relu(y, f"{name}_double_conv", 1)
    y = conv3d(y, filters, 3, padding=1, use_bias=False, name=f"{name}_double_conv_3")
    y = _norm_relu(y, f"{name}_double_conv", 4, relu=False)
    if strides != 1 or x.shape[-1] != filters:
        x = conv3d(x, filters, 1, strides=strides, use_bias=False, name=f"{name}_downsample_0")
        x = _norm_relu(x, f"{name}_downsample", 1, relu=False)
    y = layers.Add(name=f"{name}_add")([y, x])
    return layers.ReLU(name=f"{name}_act")(y)


def _decoder(x, filters: int, strides: int, name: str):
    """LinkNet3d ``Up``: 1^3 conv to a quarter of the width, 3^3 transposed conv by ``strides``,
    1^3 conv to ``filters``; each followed by norm and ReLU."""
    narrow = x.shape[-1] // 4
    x = conv3d(x, narrow, 1, use_bias=False, name=f"{name}_conv1_0")
    x = _norm_relu(x, f"{name}_conv1", 1)
    x = conv_transpose3d(x, narrow, 3, strides=strides, padding=1, output_padding=strides - 1, use_bias=False,
                         name=f"{name}_tp_conv_0")
    x = _norm_relu(x, f"{name}_tp_conv", 1)
    x = conv3d(x, filters, 1, use_bias=False, name=f"{name}_conv2_0")
    return _norm_relu(x, f"{name}_conv2", 1)


def _linknet3d(input_shape: Sequence[int], name: str, weights: str | os.PathLike | None) -> tf.keras.Model:
    input_shape = check_input_shape(input_shape, DOWNSAMPLING, name)
    if any(size % DOWNSAMPLING for size in input_shape[:3]):
        raise BrainzooError(f"{name}: input_shape {input_shape} does not work; every spatial size must be a "
                            f"multiple of {DOWNSAMPLING} so that the decoder meets the encoder's sizes")
    inputs = layers.Input(input_shape, name="image")
    x = conv3d(inputs, ENCODER_WIDTHS[0], 7, strides=2, padding=3, use_bias=False, name="init_0")
    x = _norm_relu(x, "init", 1)
    x = max_pool_after_relu(x, 3, strides=2, padding=1, name="init_3")

    features = [x]
    for level, filters in enumerate(ENCODER_WIDTHS):
        strides = 1 if level == 0 else 2
        x = _residual_block(x, filters, strides, f"down{level}_block1")
        x = _residual_block(x, filters, 1, f"down{level}_block2")
        features.append(x)

    # up<i> mirrors down<3 - i> and adds the feature map that went into it.
    for level, skip in enumerate(reversed(features[:-1])):
        strides = 1 if level == len(ENCODER_WIDTHS) - 1 else 2
        x = _decoder(x, skip.shape[-1], strides, f"up{level}")
        x = layers.Add(name=f"up{level}_skip")([x, skip])

    x = conv_transpose3d(x, HEAD_WIDTH, 3, strides=2, padding=1, output_padding=1, use_bias=True, name="tp_conv1_0")
    x = _norm_relu(x, "tp_conv1", 1)
    x = conv3d(x, HEAD_WIDTH, 3, padding=1, use_bias=True, name="conv_0")
    x = _norm_relu(x, "conv", 1)
    x = conv_transpose3d(x, CLASSES, 2, strides=2, padding=0, output_padding=0, use_bias=True, name="tp_conv2")
    outputs = layers.Softmax(axis=-1, name="softmax")(x)
    return finish_model(inputs, outputs, name, weights)


def deepbet_bbox(input_shape: Sequence[int] = BBOX_INPUT_SHAPE,
                 weights: str | os.PathLike | None = None) -> tf.keras.Model:
    """deepbet's bounding-box network: brain probabilities (channel ``BRAIN_CHANNEL``) on a 128^3 copy
    of the scan, from which the pipeline takes the box that the segmentation network sees.

    ``weights``: a ``.h5`` file (a catalogue version's: ``verified_weights_path("deepbet/1.0.2", "bbox")``).
    """
    return _linknet3d(input_shape, "deepbet_bbox", weights)


def deepbet_segmentation(input_shape: Sequence[int] = SEGMENTATION_INPUT_SHAPE,
                         weights: str | os.PathLike | None = None) -> tf.keras.Model:
    """deepbet's segmentation network: brain probabilities (channel ``BRAIN_CHANNEL``) on the 256^3
    resampled bounding-box crop.

    ``weights``: a ``.h5`` file (a catalogue version's: ``verified_weights_path("deepbet/1.0.2", "segmentation")``).
    """
    return _linknet3d(input_shape, "deepbet_segmentation", weights)
