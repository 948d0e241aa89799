"""The age-group networks of ml_MRI_age_prediction (Skoltech 2020, HCP young adults): the 3-D CNN classifier
``S500MRI_clf`` and the VAE-C (``VAE_age``) encoder and decoder.

Both take a 128^3 skull-stripped T1 and the subject's sex (0 male, 1 female) as a second input, concatenated to
the image features before the last linear layers. Every convolution is unpadded ("valid"), so the feature map
before the head is exactly one voxel at 128^3 and the architecture admits no other input size.
"""

from __future__ import annotations

import tensorflow as tf

from brainzoo.errors import BrainzooError
from brainzoo.models.layers import batch_norm, conv3d, finish_model

layers = tf.keras.layers

INPUT_SHAPE = (128, 128, 128, 1)
# RReLU(lower=1/8, upper=1/3) in eval mode multiplies negative inputs by the mean slope (lower + upper) / 2.
RRELU_EVAL_SLOPE = (1 / 8 + 1 / 3) / 2
# PyTorch LeakyReLU's default negative slope, used throughout VAE-C.
LEAKY_RELU_SLOPE = 0.01
CLASSIFIER_CHANNELS = (8, 16, 32, 64)
ENCODER_BLOCKS = ((8, 5), (16, 5), (32, 5), (64, 3))  # (channels, kernel), each with stride 2
DECODER_BLOCKS = ((64, 5, 1), (32, 5, 2), (16, 5, 2), (8, 5, 2), (1, 5, 2))  # (channels, kernel, stride)


def _image_and_sex_inputs(input_shape) -> tuple[tf.Tensor, tf.Tensor]:
    """The two inputs of the originals' ``forward(img, gender)``: a channels-last volume and one number per scan."""
    return tf.keras.Input(tuple(input_shape), name="volume"), tf.keras.Input((1,), name="sex")


def _features_with_sex(x, sex, architecture: str):
    """Flatten the one-voxel feature map and append sex, as the originals' ``cat([features, gender.view(-1, 1)])``."""
    if tuple(x.shape[1:4]) != (1, 1, 1):
        raise BrainzooError(f"{architecture}: the input must be {'x'.join(map(str, INPUT_SHAPE[:3]))} (the "
                            f"features before the head are {'x'.join(map(str, x.shape[1:4]))}, not one voxel)")
    x = layers.Flatten(name="flatten")(x)
    return layers.Concatenate(name="features_and_sex")([x, sex])


def s500mri_classifier(input_shape=INPUT_SHAPE, num_classes: int = 4, dropout: float = 0.3, weights=None,
                       name: str = "s500mri_classifier") -> tf.keras.Model:
    """``S500MRI_clf``: age-group logits from a 128^3 scan and sex.

    Four blocks [valid 3^3 conv -> BN -> ReLU -> Dropout3d -> valid 3^3 conv -> BN -> ReLU -> max pool 2] with
    8/16/32/64 channels (the first conv of each has half), a valid 4^3 conv to 128 channels and RReLU, then
    Linear(129, num_classes) on the features and sex. RReLU draws its negative slope at random only in
    training; this port keeps the eval-mode slope (the mean of 1/8 and 1/3), so fine-tuning it trains with
    that fixed slope.
    """
    volume, sex = _image_and_sex_inputs(input_shape)
    x = volume
    for index, channels in enumerate(CLASSIFIER_CHANNELS):
        block = f"block_{index}"
        x = conv3d(x, channels // 2, 3, name=f"{block}_conv_1")
        x = batch_norm(x, name=f"{block}_bn_1")
        x = layers.ReLU(name=f"{block}_relu_1")(x)
        x = layers.SpatialDropout3D(dropout, name=f"{block}_dropout")(x)
        x = conv3d(x, channels, 3, name=f"{block}_conv_2")
        x = batch_norm(x, name=f"{block}_bn_2")
        x = layers.ReLU(name=f"{block}_relu_2")(x)
        x = layers.MaxPool3D(2, name=f"{block}_pool")(x)
    x = conv3d(x, 2 * CLASSIFIER_CHANNELS[-1], 4, name="head_conv")
    x = layers.LeakyReLU(RRELU_EVAL_SLOPE, name="head_rrelu")(x)
    x = _features_with_sex(x, sex, "s500mri_classifier")
    logits = layers.Dense(num_classes, name="logits")(x)
    return finish_model([volume, sex], logits, name, weights)


def vae_c_encoder(input_shape=INPUT_SHAPE, latent_dim: int = 16, num_classes: int = 2, dropout: float = 0.2,
                  weights=None, name: str = "vae_c_encoder") -> tf.keras.Model:
    """The VAE-C encoder (``VAE_age.encoder``) with its deterministic outputs, in this order: ``age_mean`` and
    ``age_log_var`` (the age-class posterior), ``z_mean`` and ``z_log_var`` (the latent posterior), and
    ``z_prior_mean``, the age-conditioned prior mean ``z_cond_age_mean(age_mean)``.

    Four stride-2 valid convs [conv -> BN -> Dropout3d -> LeakyReLU] (8, 16, 32 channels with 5^3 kernels,
    64 with 3^3), a valid 6^3 conv to 128 -> BN -> LeakyReLU, then four Linear(129, .) heads on the features
    and sex. The original draws the age and latent samples at random and applies ``z_cond_age_mean`` to the
    age sample; at its mean (zero noise) that is ``z_prior_mean`` here.
    """
    volume, sex = _image_and_sex_inputs(input_shape)
    x = volume
    for index, (channels, kernel) in enumerate(ENCODER_BLOCKS):
        block = f"down_{index}"
        x = conv3d(x, channels, kernel, strides=2, name=f"{block}_conv")
        x = batch_norm(x, name=f"{block}_bn")
        x = layers.SpatialDropout3D(dropout, name=f"{block}_dropout")(x)
        x = layers.LeakyReLU(LEAKY_RELU_SLOPE, name=f"{block}_relu")(x)
    x = conv3d(x, 128, 6, name="features_conv")
    x = batch_norm(x, name="features_bn")
    x = layers.LeakyReLU(LEAKY_RELU_SLOPE, name="features_relu")(x)
    x = _features_with_sex(x, sex, "vae_c_encoder")
    age_mean = layers.Dense(num_classes, name="age_mean")(x)
    age_log_var = layers.Dense(num_classes, name="age_log_var")(x)
    z_mean = layers.Dense(latent_dim, name="z_mean")(x)
    z_log_var = layers.Dense(latent_dim, name="z_log_var")(x)
    z_prior_mean = layers.Dense(latent_dim, name="z_prior_mean")(age_mean)
    return finish_model([volume, sex], [age_mean, age_log_var, z_mean, z_log_var, z_prior_mean], name, weights)


def vae_c_decoder(latent_dim: int = 16, dropout: float = 0.2, weights=None,
                  name: str = "vae_c_decoder") -> tf.keras.Model:
    """The VAE-C decoder (``VAE_age.decoder``): a latent vector -> a 128^3 reconstruction (channels-last).

    The latent becomes a 1^3 volume, then transposed convs [-> BN -> Dropout3d -> LeakyReLU] grow it
    1 -> 5 -> 13 -> 29 -> 61 -> 125 (the last without dropout), and a 4^3 transposed conv makes it 128.
    Unpadded transposed convs give the same sizes and sums in Keras and PyTorch, so no padding is added.
    """
    z = tf.keras.Input((latent_dim,), name="z")
    x = layers.Reshape((1, 1, 1, latent_dim), name="unflatten")(z)
    for index, (channels, kernel, stride) in enumerate(DECODER_BLOCKS):
        block = f"up_{index}"
        x = layers.Conv3DTranspose(channels, kernel, strides=stride, padding="valid", name=f"{block}_conv")(x)
        x = batch_norm(x, name=f"{block}_bn")
        if index < len(DECODER_BLOCKS) - 1:
            x = layers.SpatialDropout3D(dropout, name=f"{block}_dropout")(x)
        x = layers.LeakyReLU(LEAKY_RELU_SLOPE, name=f"{block}_relu")(x)
    reconstruction = layers.Conv3DTranspose(1, 4, padding="valid", name="reconstruction")(x)
    return finish_model(z, reconstruction, name, weights)
