"""The networks of Generative-models-for-brain-aging (HCP): a 3-D DCGAN (generator and discriminator) at 64^3 with
a 100-dimensional latent, a ResNet-like encoder trained to invert the generator, a ResNet-like sex classifier, and
the autoencoder of 58x70x58 MRI volumes with a 1000-value bottleneck.

Quirks of the originals are kept, because converted weights only give the original's numbers with them:

- their residual block computes ``bn1(x)`` and ``relu(x)`` and throws both away, so ``conv1`` sees the block input
  directly; ``bn2`` and the ReLU do apply to ``conv1``'s output. The shortcut is a 1^3 convolution, always.
  ``bn1`` has weights in every checkpoint but no effect: these blocks do not build it (the converter drops it);
- the sex classifier builds ``bn1`` and ``bn2`` and never calls them, and its first convolution has no activation;
- both flatten channel-first feature maps, so a ``Permute`` precedes every ``Flatten`` (and the generator's
  ``Reshape`` to channels-first is followed by one) and the dense layers take the original weights transposed.

Block and layer names are the originals' module names where there is one (``resblock1_conv0`` is
``resblock1.conv0``), so the conversion table is a list of renamings.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from brainzoo.errors import BrainzooError
from brainzoo.models.layers import batch_norm, conv3d, finish_model

layers = tf.keras.layers

LATENT_SIZE = 100
VOLUME_SHAPE = (64, 64, 64, 1)
# Four stride-2 (transposed) convolutions separate the generator's first feature map and the image.
GAN_SCALE = 16
DISCRIMINATOR_SLOPE = 0.2
# The upstream's MRI volumes (tensors.npy): HCP's 0.7 mm MNI-space grid at about 1/4.5.
AUTOENCODER_INPUT_SHAPE = (58, 70, 58, 1)
# The encoder's and classifier's three 2x max poolings before their dense layers.
ENCODER_POOLS = 3


def _gan_initial_shape(volume_shape, architecture: str) -> tuple[int, int, int]:
    """The 1/16 grid of the GAN's first (generator) or last (discriminator) feature map."""
    spatial = tuple(volume_shape[:3])
    if any(size % GAN_SCALE for size in spatial):
        raise BrainzooError(f"{architecture}: every spatial size must be a multiple of {GAN_SCALE}, got {spatial}")
    return tuple(size // GAN_SCALE for size in spatial)


def _doubling_transposed_conv(x, filters: int, name: str, crop_name: str, output_padding=(0, 0, 0)):
    """PyTorch's ``ConvTranspose3d(kernel 4, stride 2, padding 1, output_padding, bias=False)``: the valid
    transposed convolution (2 n + 2 voxels an axis) less 1 voxel at the start and 1 - output_padding at the end."""
    x = layers.Conv3DTranspose(filters, 4, strides=2, padding="valid", use_bias=False, name=name)(x)
    return layers.Cropping3D(tuple((1, 1 - extra) for extra in output_padding), name=crop_name)(x)


def gan3d_generator(latent_size: int = LATENT_SIZE, n_features: int = 32, output_shape=VOLUME_SHAPE[:3],
                    weights=None, name: str = "gan3d_generator") -> tf.keras.Model:
    """``Generator3D_Adaptive``: a latent vector (drawn from U(0, 1)) -> a volume in (0, 1), channels-last.

    Linear to 8 ``n_features`` channels on the 1/16 grid -> BN -> ReLU, then three [transposed conv 4^3, stride 2,
    padding 1, no bias -> BN -> ReLU] halving the channels and doubling the grid, and a last one to one channel
    and the sigmoid.
    """
    initial = _gan_initial_shape(output_shape, "gan3d_generator")
    channels = 8 * n_features
    z = tf.keras.Input((latent_size,), name="z")
    x = layers.Dense(channels * int(np.prod(initial)), name="project")(z)
    x = layers.Reshape((channels, *initial), name="unflatten")(x)
    x = layers.Permute((2, 3, 4, 1), name="to_channels_last")(x)
    x = batch_norm(x, name="project_bn")
    x = layers.ReLU(name="project_relu")(x)
    for index in range(3):
        channels //= 2
        x = _doubling_transposed_conv(x, channels, f"up_{index}_conv", f"up_{index}_crop")
        x = batch_norm(x, name=f"up_{index}_bn")
        x = layers.ReLU(name=f"up_{index}_relu")(x)
    x = _doubling_transposed_conv(x, 1, "image_conv", "image_crop")
    image = layers.Activation("sigmoid", name="image")(x)
    return finish_model(z, image, name, weights)


def gan3d_discriminator(input_shape=VOLUME_SHAPE, n_features: int = 32, weights=None,
                        name: str = "gan3d_discriminator") -> tf.keras.Model:
    """``Discriminator3D_Adaptive``: a volume -> the probability that it is real.

    Four [conv 4^3, stride 2, padding 1, no bias -> BN (not the first) -> LeakyReLU 0.2] doubling the channels from
    ``n_features``, then Linear to one output and the sigmoid.
    """
    _gan_initial_shape(input_shape, "gan3d_discriminator")
    volume = tf.keras.Input(tuple(input_shape), name="volume")
    x = layers.Dense(1, name="logit")(_flattened_channels_first(_down_stages(volume, n_features)))
    probability = layers.Activation("sigmoid", name="probability")(x)
    return finish_model(volume, probability, name, weights)


def _down_stages(x, n_features: int):
    """Four [conv 4^3, stride 2, padding 1, no bias -> BN (not the first) -> LeakyReLU 0.2], doubling the channels
    from ``n_features`` and halving the grid (rounding down): the discriminator's, and the MRI autoencoder's."""
    for index in range(4):
        x = conv3d(x, n_features * 2**index, 4, strides=2, padding=1, use_bias=False, name=f"down_{index}_conv")
        if index:
            x = batch_norm(x, name=f"down_{index}_bn")
        x = layers.LeakyReLU(DISCRIMINATOR_SLOPE, name=f"down_{index}_relu")(x)
    return x


def mri_autoencoder(input_shape=AUTOENCODER_INPUT_SHAPE, n_features: int = 16, bottleneck: int = 1000, weights=None,
                    name: str = "mri_autoencoder") -> tf.keras.Model:
    """The MRI autoencoder (Autoencoder_mri.ipynb's ``MyFirstAE``): a volume -> its reconstruction, through a
    ``bottleneck``-value code (the Dense layer ``bottleneck``, which ``brainzoo encode`` reads).

    Encoder: the discriminator's four down stages from ``n_features``, flattened channel-first, Linear to the code.
    Decoder: Linear back, reshaped to the last feature map, three [transposed conv 4^3, stride 2, padding 1, no bias
    -> BN -> ReLU] and a last one to one channel, no activation. Each transposed conv's output padding (the
    original's (1, 0, 1), (0, 1, 0), (1, 1, 1), 0 at 58x70x58) restores the odd size its down stage rounded away.
    """
    input_shape = tuple(input_shape)
    sizes = [input_shape[:3]]
    for _ in range(4):
        sizes.append(tuple(size // 2 for size in sizes[-1]))
    if min(sizes[-1]) < 1:
        raise BrainzooError(f"mri_autoencoder: input_shape {input_shape} is too small for four halvings")
    volume = tf.keras.Input(input_shape, name="volume")
    features = _down_stages(volume, n_features)
    code = layers.Dense(bottleneck, name="bottleneck")(_flattened_channels_first(features))
    channels = features.shape[-1]
    x = layers.Dense(channels * int(np.prod(sizes[-1])), name="expand")(code)
    x = layers.Reshape((channels, *sizes[-1]), name="unflatten")(x)
    x = layers.Permute((2, 3, 4, 1), name="to_channels_last")(x)
    for index in range(4):
        last = index == 3
        channels = 1 if last else channels // 2
        x = _doubling_transposed_conv(x, channels, "reconstruction_conv" if last else f"up_{index}_conv",
                                      "reconstruction" if last else f"up_{index}_crop",
                                      output_padding=[size % 2 for size in sizes[3 - index]])
        if not last:
            x = batch_norm(x, name=f"up_{index}_bn")
            x = layers.ReLU(name=f"up_{index}_relu")(x)
    return finish_model(volume, x, name, weights)


def _res_block(x, out_channels: int, name: str):
    """The originals' ``ResBlock`` as it runs: conv0 (1^3) of the input + conv2(relu(bn2(conv1(input)))).

    conv1 halves the input channels; both 3^3 convolutions pad by 1. ``bn1`` is not built (see the module notes).
    """
    hidden = x.shape[-1] // 2
    shortcut = conv3d(x, out_channels, 1, name=f"{name}_conv0")
    y = conv3d(x, hidden, 3, padding=1, name=f"{name}_conv1")
    y = batch_norm(y, name=f"{name}_bn2")
    y = layers.ReLU(name=f"{name}_relu")(y)
    y = conv3d(y, out_channels, 3, padding=1, name=f"{name}_conv2")
    return layers.Add(name=f"{name}_add")([y, shortcut])


def _flattened_channels_first(x):
    """The feature map flattened in PyTorch's channel-first order, as the dense layer's weights expect."""
    x = layers.Permute((4, 1, 2, 3), name="to_channels_first")(x)
    return layers.Flatten(name="flatten")(x)


def _check_pooled_size(input_shape, architecture: str) -> tuple[int, ...]:
    input_shape = tuple(input_shape)
    if len(input_shape) != 4 or any(size is None or size < 2**ENCODER_POOLS for size in input_shape[:3]):
        raise BrainzooError(f"{architecture}: input_shape must be (depth, height, width, channels) with fixed sizes "
                            f"of at least {2**ENCODER_POOLS} (the dense layers depend on them), got {input_shape}")
    return input_shape


def gan3d_encoder(input_shape=VOLUME_SHAPE, latent_size: int = LATENT_SIZE, base_channels: int = 16, weights=None,
                  name: str = "gan3d_encoder") -> tf.keras.Model:
    """GenModels ``Encoder``: a volume -> the generator latent that made it.

    A 1^3 conv to ``base_channels`` (the original's 16) -> ReLU, three residual blocks each doubling the channels
    and followed by 2x max pooling, then Linear to ``latent_size`` (no activation: the latents are U(0, 1) draws).
    """
    volume = tf.keras.Input(_check_pooled_size(input_shape, "gan3d_encoder"), name="volume")
    x = conv3d(volume, base_channels, 1, name="conv1")
    x = layers.ReLU(name="conv1_relu")(x)
    for index in range(1, 4):
        x = _res_block(x, base_channels * 2**index, f"resblock{index}")
        x = layers.MaxPool3D(2, name=f"resblock{index}_pool")(x)
    x = _flattened_channels_first(x)
    latent = layers.Dense(latent_size, name="fc")(x)
    return finish_model(volume, latent, name, weights)


def gan3d_classifier(input_shape=VOLUME_SHAPE, n_classes: int = 1, dropout: float = 0.5, weights=None,
                     name: str = "gan3d_classifier") -> tf.keras.Model:
    """GAN_experiment_part2's ``FC_Classifier(1, n_classes)``: a volume -> logits (one: the sex, 1 for the
    upstream's label 1).

    A 3^3 conv to 16 channels (no activation) -> pool, two residual blocks (32, 64 channels) each -> pool, then
    Dropout -> Linear 200 -> BatchNorm1d -> ReLU -> Linear ``n_classes``. The original's ``Dropout3d`` acts on the
    flattened (N, features) matrix, where it zeroes single features: ordinary dropout.
    """
    volume = tf.keras.Input(_check_pooled_size(input_shape, "gan3d_classifier"), name="volume")
    x = conv3d(volume, 16, 3, padding=1, name="conv1")
    x = layers.MaxPool3D(2, name="conv1_pool")(x)
    x = _res_block(x, 32, "conv2")
    x = layers.MaxPool3D(2, name="conv2_pool")(x)
    x = _res_block(x, 64, "conv3")
    x = layers.MaxPool3D(2, name="conv3_pool")(x)
    x = _flattened_channels_first(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(200, name="linear1")(x)
    x = batch_norm(x, name="bn3")
    x = layers.ReLU(name="relu")(x)
    logits = layers.Dense(n_classes, name="linear2")(x)
    return finish_model(volume, logits, name, weights)
