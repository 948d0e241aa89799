"""The name tables of the state-dict converters: each Keras layer name -> the PyTorch module path it came from.

Plain data and regular expressions, importable without TensorFlow (the converter registry and ``brainzoo
validate`` read them); :mod:`brainzoo.convert.state_dict` does the conversion.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from brainzoo.errors import BrainzooError

Rule = tuple[str, str | Callable[[re.Match], str]]


def _irv2_block(name: str) -> str:
    """Inception-ResNet-v2 block name -> its index in the original ``features`` Sequential."""
    kind, number = re.fullmatch(r"(stem|block_a|reduction_a|block_b|reduction_b|block_c)(\d*)", name).groups()
    first_index = {"stem": 0, "block_a": 0, "reduction_a": 6, "block_b": 6, "reduction_b": 17, "block_c": 17}[kind]
    return f"features.{first_index + int(number or 0)}"


# Keras layer name (full match) -> PyTorch module path, per architecture. Group references keep the table short.
SFCN_RULES: tuple[Rule, ...] = (
    (r"conv_(\d+)_conv", r"feature_extractor.conv_\1.0"),
    (r"conv_(\d+)_bn", r"feature_extractor.conv_\1.1"),
    (r"classifier_conv_(\d+)", r"classifier.conv_\1"),
)
AGEMAPPER_RULES: tuple[Rule, ...] = (
    (r"conv_(\d+)_conv", r"Feature_Extractor.Convolution_\1.0"),
    (r"conv_(\d+)_bn", r"Feature_Extractor.Convolution_\1.1"),
    (r"fc_(\d)", r"FullyConnected.FullyConnected_\1"),
)
DENSENET169_RULES: tuple[Rule, ...] = (
    (r"(conv0|norm0|norm5)", r"0.features.\1"),
    (r"denseblock(\d)_denselayer(\d+)_(norm1|conv1|norm2|conv2)", r"0.features.denseblock\1.denselayer\2.layers.\3"),
    (r"transition(\d)_(norm|conv)", r"0.features.transition\1.\2"),
    (r"class_layers_out", "0.class_layers.out"),
    (r"output_linear", "1"),
)
INCEPTION_RESNET_V2_RULES: tuple[Rule, ...] = (
    (r"stem_features_(\d)_(conv|bn)", r"features.0.features.\1.\2"),
    (r"stem_branch_(a|2)_(conv|bn)", r"features.0.branch_\1.\2"),
    (r"stem_branch_(\d)_(\d)_(conv|bn)", r"features.0.branch_\1.\2.\3"),
    (r"(block_\w\d+|reduction_\w)_branch_(\d)_(conv|bn)", lambda m: f"{_irv2_block(m[1])}.branch_{m[2]}.{m[3]}"),
    (r"(block_\w\d+|reduction_\w)_branch_(\d)_(\d)_(conv|bn)",
     lambda m: f"{_irv2_block(m[1])}.branch_{m[2]}.{m[3]}.{m[4]}"),
    (r"(block_\w\d+)_conv", lambda m: f"{_irv2_block(m[1])}.conv"),
    (r"head_(conv|bn)", r"conv.\1"),
    (r"head_linear", "linear.0"),
    (r"output_linear", "linear.1"),
)
S500MRI_RULES: tuple[Rule, ...] = (
    (r"block_(\d)_conv_1", r"features.\1.s500mri.0"),
    (r"block_(\d)_bn_1", r"features.\1.s500mri.1"),
    (r"block_(\d)_conv_2", r"features.\1.s500mri.4"),
    (r"block_(\d)_bn_2", r"features.\1.s500mri.5"),
    (r"head_conv", "clf.flatten.0"),
    (r"logits", "clf.clf"),
)
# VAE-C stages are [conv, BN, Dropout3d, LeakyReLU] in one Sequential, so stage i's conv is index 4 i (the decoder's
# is 4 i + 1, after its Unflatten).
VAE_C_ENCODER_RULES: tuple[Rule, ...] = (
    (r"down_(\d)_(conv|bn)", lambda m: f"down_sample.{4 * int(m[1]) + (m[2] == 'bn')}"),
    (r"features_conv", "flatten.0"),
    (r"features_bn", "flatten.1"),
    (r"(age_mean|age_log_var|z_mean|z_log_var)", r"\1"),
    (r"z_prior_mean", "z_cond_age_mean"),
)
VAE_C_DECODER_RULES: tuple[Rule, ...] = (
    (r"up_(\d)_(conv|bn)", lambda m: f"decoder.{4 * int(m[1]) + 1 + (m[2] == 'bn')}"),
    (r"reconstruction", "decoder.20"),
)
# Generative-models-for-brain-aging: the Keras names are the originals' module names (see brainzoo.models.gan3d).
# The GAN's Sequential-like ModuleLists interleave activations: the generator's [Linear, Reshape, BN, ReLU] then
# [ConvTranspose, BN, ReLU] x 4; the discriminator's [Conv, LeakyReLU] then [Conv, BN, LeakyReLU] x 3, Flatten, Linear.
GAN3D_GENERATOR_RULES: tuple[Rule, ...] = (
    (r"project", "main.0"),
    (r"project_bn", "main.2"),
    (r"up_(\d)_(conv|bn)", lambda m: f"main.{4 + 3 * int(m[1]) + (m[2] == 'bn')}"),
    (r"image_conv", "main.13"),
)
GAN3D_DISCRIMINATOR_RULES: tuple[Rule, ...] = (
    (r"down_0_conv", "main.0"),
    (r"down_(\d)_(conv|bn)", lambda m: f"main.{3 * int(m[1]) - (m[2] == 'conv')}"),
    (r"logit", "main.12"),
)
GAN3D_RESNET_RULES: tuple[Rule, ...] = (
    (r"((?:resblock|conv)\d)_(conv\d|bn2)", r"\1.\2"),
    (r"(conv1|fc|linear1|bn3|linear2)", r"\1"),
)
# Autoencoder_mri.ipynb's MyFirstAE: encoder.main [Conv, LeakyReLU, then (Conv, BN, LeakyReLU) x 2, Conv],
# encoder.main2 [BN, LeakyReLU, Flatten, Linear], fc, decoder.main [(ConvTranspose, BN, ReLU) x 3, ConvTranspose].
MRI_AUTOENCODER_RULES: tuple[Rule, ...] = (
    (r"down_3_bn", "encoder.main2.0"),
    (r"down_(\d)_(conv|bn)", lambda m: f"encoder.main.{max(3 * int(m[1]) - (m[2] == 'conv'), 0)}"),
    (r"bottleneck", "encoder.main2.3"),
    (r"expand", "fc"),
    (r"up_(\d)_(conv|bn)", lambda m: f"decoder.main.{3 * int(m[1]) + (m[2] == 'bn')}"),
    (r"reconstruction_conv", "decoder.main.9"),
)
# Modules the originals build but never call: ResBlock.bn1 (its result is overwritten), FC_Classifier's bn1 and bn2.
GAN3D_RESBLOCK_UNUSED = r"(resblock\d|conv\d)\.bn1\.\w+"
GAN3D_CLASSIFIER_UNUSED = rf"{GAN3D_RESBLOCK_UNUSED}|bn[12]\.\w+"
# The children of ml_MRI's whole VAE_age, which its checkpoints hold: the encoder and decoder converters each take one.
VAE_AGE_PARTS = ("encoder", "decoder")


@dataclass(frozen=True)
class Architecture:
    """A convertible architecture: its Keras builder, the options its name implies, its name table.

    ``part``: the child of a larger upstream model (one of ``whole_model``'s children) that this network is; the
    rules name its own state_dict keys, and a checkpoint of the whole model gives the tensors under ``part.``.
    ``unused``: a regular expression of state_dict keys of modules the original builds but never calls; they are
    accepted and dropped.
    """

    builder: str
    rules: tuple[Rule, ...]
    fixed_options: dict = field(default_factory=dict)
    part: str = ""
    whole_model: tuple[str, ...] = ()
    unused: str = ""


ARCHITECTURES = {
    "sfcn": Architecture("sfcn", SFCN_RULES),
    "densenet169": Architecture("densenet169_3d", DENSENET169_RULES),
    "inception-resnet-v2": Architecture("inception_resnet_v2_3d", INCEPTION_RESNET_V2_RULES),
    "agemapper-1mm": Architecture("agemapper", AGEMAPPER_RULES, {"resolution": "1mm"}),
    "agemapper-2mm": Architecture("agemapper", AGEMAPPER_RULES, {"resolution": "2mm"}),
    "s500mri": Architecture("s500mri_classifier", S500MRI_RULES),
    "vae-c-encoder": Architecture("vae_c_encoder", VAE_C_ENCODER_RULES, part="encoder", whole_model=VAE_AGE_PARTS),
    "vae-c-decoder": Architecture("vae_c_decoder", VAE_C_DECODER_RULES, part="decoder", whole_model=VAE_AGE_PARTS),
    "gan3d-generator": Architecture("gan3d_generator", GAN3D_GENERATOR_RULES),
    "gan3d-discriminator": Architecture("gan3d_discriminator", GAN3D_DISCRIMINATOR_RULES),
    "gan3d-encoder": Architecture("gan3d_encoder", GAN3D_RESNET_RULES, unused=GAN3D_RESBLOCK_UNUSED),
    "gan3d-classifier": Architecture("gan3d_classifier", GAN3D_RESNET_RULES, unused=GAN3D_CLASSIFIER_UNUSED),
    "mri-autoencoder": Architecture("mri_autoencoder", MRI_AUTOENCODER_RULES),
}


def architecture(arch: str) -> Architecture:
    if arch not in ARCHITECTURES:
        raise BrainzooError(f"{arch}: unknown architecture (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[arch]


def torch_module_path(arch: str, keras_layer: str) -> str:
    """The PyTorch module path that a Keras layer with weights translates to."""
    for pattern, replacement in architecture(arch).rules:
        match = re.fullmatch(pattern, keras_layer)
        if match:
            return match.expand(replacement) if isinstance(replacement, str) else replacement(match)
    raise LookupError(f"{arch}: Keras layer {keras_layer} has no PyTorch counterpart in the name table")


