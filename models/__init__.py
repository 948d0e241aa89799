"""Keras reimplementations of published 3-D brain-MRI architectures.

Every builder takes ``input_shape`` (depth, height, width, channels; the VAE-C decoder and the GAN generator,
which start from a latent vector, its size and, for the generator, its ``output_shape``), its architecture's
options, ``weights`` (a file path: builders know no catalogue; :func:`brainzoo.model_files.verified_weights_path`
turns a version id into its checked file) and ``name``, and returns a ``tf.keras.Model``. Importing this package
registers the custom layers; a saved model is read back through :func:`brainzoo.model_files.load_keras_model`,
which refuses anything not allow-listed first.
"""

import inspect

from brainzoo.models.agemapper import agemapper
from brainzoo.models.densenet3d import densenet169_3d
from brainzoo.models.gan3d import (gan3d_classifier, gan3d_discriminator, gan3d_encoder, gan3d_generator,
                                   mri_autoencoder)
from brainzoo.models.inception_resnet_v2_3d import inception_resnet_v2_3d
from brainzoo.models.layers import ScaledResidual, TrilinearUpsampling3D, pytorch_parameter_count
from brainzoo.models.ml_mri import s500mri_classifier, vae_c_decoder, vae_c_encoder
from brainzoo.models.unet import unet
from brainzoo.models.sfcn import kl_divergence_loss, sfcn, soft_labels

BUILDERS = {
    "sfcn": sfcn,
    "agemapper": agemapper,
    "densenet169_3d": densenet169_3d,
    "inception_resnet_v2_3d": inception_resnet_v2_3d,
    "unet": unet,
    "s500mri_classifier": s500mri_classifier,
    "vae_c_encoder": vae_c_encoder,
    "vae_c_decoder": vae_c_decoder,
    "gan3d_generator": gan3d_generator,
    "gan3d_discriminator": gan3d_discriminator,
    "gan3d_encoder": gan3d_encoder,
    "gan3d_classifier": gan3d_classifier,
    "mri_autoencoder": mri_autoencoder,
}


def option_names(builder: str) -> set[str]:
    """The architecture options a registered builder takes: its keywords but the weights file and the model name."""
    return set(inspect.signature(BUILDERS[builder]).parameters) - {"weights", "name"}


__all__ = [
    "BUILDERS",
    "ScaledResidual",
    "TrilinearUpsampling3D",
    "agemapper",
    "densenet169_3d",
    "gan3d_classifier",
    "gan3d_discriminator",
    "gan3d_encoder",
    "gan3d_generator",
    "inception_resnet_v2_3d",
    "kl_divergence_loss",
    "mri_autoencoder",
    "option_names",
    "pytorch_parameter_count",
    "s500mri_classifier",
    "sfcn",
    "soft_labels",
    "unet",
    "vae_c_decoder",
    "vae_c_encoder",
]
