"""PyTorch implementations of the catalogue's architectures, written from docs/architectures.md and the seed fixtures.

They exist to check the Keras ports and the converter against something independent of both:
their module trees reproduce the original ``state_dict`` keys exactly, so an original checkpoint
loads with ``strict=True``, and ``REFERENCES`` takes the same options as ``brainzoo.models.BUILDERS``,
except Inception-ResNet-v2-3D's depth and width (``block_repeats``, ``width_multiplier``: training options;
its checkpoints convert at the published size only).
Import this module only where torch is installed (``brainzoo[torch]``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional


def _pooled_block(in_channels: int, out_channels: int, bias: bool) -> nn.Sequential:
    """Conv 3^3 (padding 1) -> BN -> MaxPool 2 -> ReLU: the block SFCN and AgeMapper share."""
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=bias), nn.BatchNorm3d(out_channels),
                         nn.MaxPool3d(2, stride=2), nn.ReLU())


class SFCN(nn.Module):
    """SFCN (Peng et al. 2021). The classifier's average pool is global, which is the original
    AvgPool3d([5, 6, 5]) at the published 160x192x160 input; the output is (N, n_bins) log-probabilities."""

    def __init__(self, channels: Sequence[int] = (32, 64, 128, 256, 256, 64), n_bins: int = 40, dropout: float = 0.5):
        super().__init__()
        self.feature_extractor = nn.Sequential()
        widths = (1, *channels)
        for index in range(len(channels) - 1):
            self.feature_extractor.add_module(f"conv_{index}",
                                              _pooled_block(widths[index], widths[index + 1], bias=True))
        self.feature_extractor.add_module(f"conv_{len(channels) - 1}", nn.Sequential(
            nn.Conv3d(channels[-2], channels[-1], 1), nn.BatchNorm3d(channels[-1]), nn.ReLU()))
        self.classifier = nn.Sequential()
        self.classifier.add_module("average_pool", nn.AdaptiveAvgPool3d(1))
        if dropout:
            self.classifier.add_module("dropout", nn.Dropout(dropout))
        self.classifier.add_module(f"conv_{len(channels)}", nn.Conv3d(channels[-1], n_bins, 1))

    def forward(self, x):
        return functional.log_softmax(self.classifier(self.feature_extractor(x)), dim=1).flatten(1)


class AgeMapper(nn.Module):
    """AgeMapper (Roibu et al. 2023); ``input_shape`` (depth, height, width, channels) fixes the first
    Linear's width, as the original's 5x6x5 feature map does."""

    def __init__(self, input_shape: Sequence[int] | None = None, resolution: str = "1mm",
                 channels: Sequence[int] = (32, 64, 64, 64, 64), dropout_rates: Sequence[float] = (0.0, 0.0, 0.0)):
        super().__init__()
        upsample = resolution == "2mm"
        input_shape = input_shape or ((80, 96, 80, 1) if upsample else (160, 192, 160, 1))
        self.Upsample = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True) if upsample else nn.Identity()
        self.Feature_Extractor = nn.Sequential()
        widths = (1, *channels)
        for index in range(len(channels)):
            self.Feature_Extractor.add_module(f"Convolution_{index}",
                                              _pooled_block(widths[index], widths[index + 1], bias=False))
        features = channels[-1]
        for size in input_shape[:3]:
            size *= 2 if upsample else 1
            for _ in channels:
                size //= 2
            features *= size
        self.FullyConnected = nn.Sequential()
        for number, (in_width, out_width), rate in zip((3, 2, 1), ((features, 96), (96, 32), (32, 1)), dropout_rates):
            if rate:
                self.FullyConnected.add_module(f"Dropout_FullyConnected_{number}", nn.Dropout(rate))
            self.FullyConnected.add_module(f"FullyConnected_{number}", nn.Linear(in_width, out_width))
            if number > 1:
                self.FullyConnected.add_module(f"ReluActivation_{number}", nn.ReLU())

    def forward(self, x):
        x = self.Feature_Extractor(self.Upsample(x))
        return self.FullyConnected(x.flatten(1))


class _DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth_rate: int, bottleneck_width: int, dropout: float):
        super().__init__()
        layers = OrderedDict(norm1=nn.BatchNorm3d(in_channels), relu1=nn.ReLU(),
                             conv1=nn.Conv3d(in_channels, bottleneck_width, 1, bias=False),
                             norm2=nn.BatchNorm3d(bottleneck_width), relu2=nn.ReLU(),
                             conv2=nn.Conv3d(bottleneck_width, growth_rate, 3, padding=1, bias=False))
        if dropout:
            layers["dropout"] = nn.Dropout(dropout)
        self.layers = nn.Sequential(layers)

    def forward(self, x):
        return torch.cat([x, self.layers(x)], dim=1)


class _DenseNet3d(nn.Module):
    """MONAI's DenseNet module tree (``features``, ``class_layers``) for 3-D single-channel input."""

    def __init__(self, block_layers: Sequence[int], n_outputs: int, dropout: float,
                 stem_features: int = 64, growth_rate: int = 32, bn_size: int = 4):
        super().__init__()
        features = OrderedDict(conv0=nn.Conv3d(1, stem_features, 7, stride=2, padding=3, bias=False),
                               norm0=nn.BatchNorm3d(stem_features), relu0=nn.ReLU(),
                               pool0=nn.MaxPool3d(3, stride=2, padding=1))
        channels = stem_features
        for block, n_layers in enumerate(block_layers, start=1):
            dense_block = nn.Sequential()
            for layer in range(1, n_layers + 1):
                dense_block.add_module(f"denselayer{layer}",
                                       _DenseLayer(channels, growth_rate, bn_size * growth_rate, dropout))
                channels += growth_rate
            features[f"denseblock{block}"] = dense_block
            if block < len(block_layers):
                features[f"transition{block}"] = nn.Sequential(OrderedDict(
                    norm=nn.BatchNorm3d(channels), relu=nn.ReLU(),
                    conv=nn.Conv3d(channels, channels // 2, 1, bias=False), pool=nn.AvgPool3d(2, stride=2)))
                channels //= 2
        features["norm5"] = nn.BatchNorm3d(channels)
        self.features = nn.Sequential(features)
        self.class_layers = nn.Sequential(OrderedDict(relu=nn.ReLU(), pool=nn.AdaptiveAvgPool3d(1),
                                                      flatten=nn.Flatten(1), out=nn.Linear(channels, n_outputs)))

    def forward(self, x):
        return self.class_layers(self.features(x))


def DenseNet169(n_outputs: int = 1, dropout: float = 0.0, block_layers: Sequence[int] = (6, 12, 32, 32),
                growth_rate: int = 32, stem_features: int = 64) -> nn.Sequential:
    """The FLAIR project's ``Sequential(monai densenet169(...), Linear(1, 1))``."""
    return nn.Sequential(_DenseNet3d(block_layers, n_outputs, dropout, stem_features, growth_rate),
                         nn.Linear(n_outputs, n_outputs))


class _Unit(nn.Module):
    """Conv3d (bias) -> BN (eps 1e-3) -> ReLU, padding k // 2 on every axis."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1):
        super().__init__()
        kernel = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=tuple(k // 2 for k in kernel))
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def _chain(in_channels: int, specs) -> nn.Sequential:
    """Units in sequence from (out_channels, kernel, stride) specs."""
    units = []
    for out_channels, kernel, stride in specs:
        units.append(_Unit(in_channels, out_channels, kernel, stride))
        in_channels = out_channels
    return nn.Sequential(*units)


def _pool() -> nn.MaxPool3d:
    return nn.MaxPool3d(3, stride=2, padding=1)


class _Concat(nn.Module):
    """Runs the ``branch_*`` children on one input and concatenates their outputs in name order."""

    def forward(self, x):
        return torch.cat([branch(x) for name, branch in self.named_children() if name.startswith("branch_")], dim=1)


class _Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = _chain(1, [(32, 3, 2), (32, 3, 1), (64, 3, 1)])
        self.branch_a = _Unit(64, 96, 3, stride=2)
        self.branch_b = _pool()
        self.branch_0 = _chain(160, [(64, 1, 1), (96, 3, 1)])
        self.branch_1 = _chain(160, [(64, 1, 1), (64, (1, 1, 7), 1), (64, (1, 7, 1), 1), (64, (7, 1, 1), 1),
                                     (96, 3, 1)])
        self.branch_2 = _Unit(192, 192, 3, stride=2)
        self.branch_3 = _pool()

    def forward(self, x):
        x = self.features(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = torch.cat([self.branch_0(x), self.branch_1(x)], dim=1)
        return torch.cat([self.branch_2(x), self.branch_3(x)], dim=1)


class _Residual(_Concat):
    """ReLU(x + scale * Conv1^3(concat(branches))), the final ReLU optional."""

    def __init__(self, channels: int, branches: Sequence[nn.Module], scale: float, activation: bool = True):
        super().__init__()
        for index, branch in enumerate(branches):
            self.add_module(f"branch_{index}", branch)
        self.conv = nn.Conv3d(sum(_width(b) for b in branches), channels, 1)
        self.scale, self.activation = scale, activation

    def forward(self, x):
        x = x + self.scale * self.conv(super().forward(x))
        return functional.relu(x) if self.activation else x


def _width(branch: nn.Module) -> int:
    return [m for m in branch.modules() if isinstance(m, nn.Conv3d)][-1].out_channels


def _block_a(channels: int = 384) -> _Residual:
    return _Residual(channels, [_Unit(channels, 32, 1), _chain(channels, [(32, 1, 1), (32, 3, 1)]),
                                _chain(channels, [(32, 1, 1), (48, 3, 1), (64, 3, 1)])], 0.2)


def _block_b(channels: int = 1152) -> _Residual:
    return _Residual(channels, [_Unit(channels, 192, 1), _chain(channels, [
        (128, 1, 1), (160, (1, 1, 7), 1), (160, (1, 7, 1), 1), (192, (7, 1, 1), 1)])], 0.2)


def _block_c(channels: int = 2144, scale: float = 0.2, activation: bool = True) -> _Residual:
    return _Residual(channels, [_Unit(channels, 192, 1), _chain(channels, [
        (192, 1, 1), (224, (1, 1, 3), 1), (224, (1, 3, 1), 1), (256, (3, 1, 1), 1)])], scale, activation)


def _reduction(branches: Sequence[nn.Module]) -> _Concat:
    reduction = _Concat()
    for index, branch in enumerate(branches):
        reduction.add_module(f"branch_{index}", branch)
    return reduction


class InceptionResNetV2(nn.Module):
    """The FLAIR project's 3-D Inception-ResNet-v2 with its Linear(1536, n) -> Linear(n, n) head."""

    def __init__(self, n_outputs: int = 1, dropout: float = 0.2):
        super().__init__()
        self.features = nn.Sequential(
            _Stem(),
            *(_block_a() for _ in range(5)),
            _reduction([_Unit(384, 384, 3, 2), _chain(384, [(256, 1, 1), (256, 3, 1), (384, 3, 2)]), _pool()]),
            *(_block_b() for _ in range(10)),
            _reduction([_chain(1152, [(256, 1, 1), (384, 3, 2)]), _chain(1152, [(256, 1, 1), (288, 3, 2)]),
                        _chain(1152, [(256, 1, 1), (288, 3, 1), (320, 3, 2)]), _pool()]),
            *(_block_c() for _ in range(4)),
            _block_c(scale=1.0, activation=False),
        )
        self.conv = _Unit(2144, 1536, 1)
        self.global_average_pooling = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Dropout(dropout))
        self.linear = nn.Sequential(nn.Linear(1536, n_outputs), nn.Linear(n_outputs, n_outputs))

    def forward(self, x):
        return self.linear(self.global_average_pooling(self.conv(self.features(x))).flatten(1))


class _S500MRIBlock(nn.Module):
    """[valid 3^3 conv -> BN -> ReLU -> Dropout3d -> valid 3^3 conv -> BN -> ReLU -> max pool 2], half width first."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        hidden = out_channels // 2
        self.s500mri = nn.Sequential(nn.Conv3d(in_channels, hidden, 3), nn.BatchNorm3d(hidden), nn.ReLU(),
                                     nn.Dropout3d(dropout), nn.Conv3d(hidden, out_channels, 3),
                                     nn.BatchNorm3d(out_channels), nn.ReLU(), nn.MaxPool3d(2))

    def forward(self, x):
        return self.s500mri(x)


def _with_sex(features: torch.Tensor, sex: torch.Tensor) -> torch.Tensor:
    """The image features with one more column, the sex (0 male, 1 female)."""
    return torch.cat([features, sex.reshape(-1, 1)], dim=1)


class S500MRIClassifier(nn.Module):
    """ml_MRI's ``S500MRI_clf``: age-group logits from a 128^3 scan and sex. In eval mode RReLU multiplies
    negative inputs by its mean slope."""

    def __init__(self, num_classes: int = 4, dropout: float = 0.3):
        super().__init__()
        widths = (1, 8, 16, 32, 64)
        self.features = nn.Sequential(*(_S500MRIBlock(widths[i], widths[i + 1], dropout) for i in range(4)))
        self.clf = nn.Module()
        self.clf.flatten = nn.Sequential(nn.Conv3d(64, 128, 4), nn.RReLU(), nn.Flatten())
        self.clf.clf = nn.Linear(129, num_classes)

    def forward(self, volume, sex):
        return self.clf.clf(_with_sex(self.clf.flatten(self.features(volume)), sex))


class VAECEncoder(nn.Module):
    """ml_MRI's VAE-C encoder (``VAE_age.encoder``) without its random sampling: the age-class and latent
    posterior means and log-variances, and the age-conditioned prior mean taken at the age mean."""

    def __init__(self, latent_dim: int = 16, num_classes: int = 2, dropout: float = 0.2):
        super().__init__()
        stages = []
        for in_channels, out_channels, kernel in ((1, 8, 5), (8, 16, 5), (16, 32, 5), (32, 64, 3)):
            stages += [nn.Conv3d(in_channels, out_channels, kernel, stride=2), nn.BatchNorm3d(out_channels),
                       nn.Dropout3d(dropout), nn.LeakyReLU()]
        self.down_sample = nn.Sequential(*stages)
        self.flatten = nn.Sequential(nn.Conv3d(64, 128, 6), nn.BatchNorm3d(128), nn.LeakyReLU(), nn.Flatten())
        self.age_mean = nn.Linear(129, num_classes)
        self.age_log_var = nn.Linear(129, num_classes)
        self.z_mean = nn.Linear(129, latent_dim)
        self.z_log_var = nn.Linear(129, latent_dim)
        self.z_cond_age_mean = nn.Linear(num_classes, latent_dim)

    def forward(self, volume, sex):
        x = _with_sex(self.flatten(self.down_sample(volume)), sex)
        age_mean = self.age_mean(x)
        return age_mean, self.age_log_var(x), self.z_mean(x), self.z_log_var(x), self.z_cond_age_mean(age_mean)


class VAECDecoder(nn.Module):
    """ml_MRI's VAE-C decoder (``VAE_age.decoder``): latent (N, latent_dim) -> (N, 1, 128, 128, 128)."""

    def __init__(self, latent_dim: int = 16, dropout: float = 0.2):
        super().__init__()
        stages = [nn.Unflatten(1, (latent_dim, 1, 1, 1))]
        widths = (latent_dim, 64, 32, 16, 8, 1)
        for index in range(5):
            stages += [nn.ConvTranspose3d(widths[index], widths[index + 1], 5, stride=1 if index == 0 else 2),
                       nn.BatchNorm3d(widths[index + 1])]
            stages += [nn.Dropout3d(dropout), nn.LeakyReLU()] if index < 4 else [nn.LeakyReLU()]
        self.decoder = nn.Sequential(*stages, nn.ConvTranspose3d(1, 1, 4))

    def forward(self, z):
        return self.decoder(z)


def _gan_stage(layer: nn.Module, channels: int, activation: nn.Module) -> list[nn.Module]:
    """A GAN stage as the originals list it: the (transposed) convolution, BN, the activation."""
    return [layer, nn.BatchNorm3d(channels), activation]


class GAN3DGenerator(nn.Module):
    """Generative-models-for-brain-aging's ``Generator3D_Adaptive``: z (N, latent_size) -> (N, 1, *output_shape) in
    (0, 1). ``main`` is one Sequential: Linear, unflatten, BN, ReLU, then [ConvTranspose, BN, ReLU] x 3, ConvTranspose,
    Sigmoid."""

    def __init__(self, latent_size: int = 100, n_features: int = 32, output_shape: Sequence[int] = (64, 64, 64)):
        super().__init__()
        initial = tuple(size // 16 for size in output_shape)
        channels = 8 * n_features
        stages = [nn.Linear(latent_size, channels * initial[0] * initial[1] * initial[2]),
                  nn.Unflatten(1, (channels, *initial)), nn.BatchNorm3d(channels), nn.ReLU()]
        for _ in range(3):
            stages += _gan_stage(nn.ConvTranspose3d(channels, channels // 2, 4, stride=2, padding=1, bias=False),
                                 channels // 2, nn.ReLU())
            channels //= 2
        self.main = nn.Sequential(*stages, nn.ConvTranspose3d(channels, 1, 4, stride=2, padding=1, bias=False),
                                  nn.Sigmoid())

    def forward(self, z):
        return self.main(z)


class GAN3DDiscriminator(nn.Module):
    """``Discriminator3D_Adaptive``: (N, 1, D, H, W) -> (N, 1) probabilities. ``main``: Conv, LeakyReLU(0.2), then
    [Conv, BN, LeakyReLU] x 3, Flatten, Linear, Sigmoid; every conv 4^3, stride 2, padding 1, no bias."""

    def __init__(self, input_shape: Sequence[int] = (64, 64, 64, 1), n_features: int = 32):
        super().__init__()
        stages = [nn.Conv3d(1, n_features, 4, stride=2, padding=1, bias=False), nn.LeakyReLU(0.2)]
        for index in range(1, 4):
            channels = n_features * 2**index
            stages += _gan_stage(nn.Conv3d(channels // 2, channels, 4, stride=2, padding=1, bias=False), channels,
                                 nn.LeakyReLU(0.2))
        final = 8 * n_features * (input_shape[0] // 16) * (input_shape[1] // 16) * (input_shape[2] // 16)
        self.main = nn.Sequential(*stages, nn.Flatten(), nn.Linear(final, 1), nn.Sigmoid())

    def forward(self, volume):
        return self.main(volume)


class _GenModelsResBlock(nn.Module):
    """The GenModels residual block as it runs: ``bn1`` is built, but its result (and the ReLU of the input) is
    discarded, so conv1 takes the input itself."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.bn1 = nn.BatchNorm3d(in_channels)
        self.bn2 = nn.BatchNorm3d(in_channels // 2)
        self.conv0 = nn.Conv3d(in_channels, out_channels, 1)
        self.conv1 = nn.Conv3d(in_channels, in_channels // 2, 3, padding=1)
        self.conv2 = nn.Conv3d(in_channels // 2, out_channels, 3, padding=1)

    def forward(self, x):
        return self.conv2(functional.relu(self.bn2(self.conv1(x)))) + self.conv0(x)


def _pooled_volume_size(input_shape: Sequence[int]) -> int:
    """Voxels left after three 2x max poolings."""
    return (input_shape[0] // 8) * (input_shape[1] // 8) * (input_shape[2] // 8)


class GAN3DEncoder(nn.Module):
    """GenModels ``Encoder``: (N, 1, D, H, W) -> (N, latent_size); conv1 (1^3) + ReLU, three residual blocks each
    followed by 2x max pooling, Linear."""

    def __init__(self, input_shape: Sequence[int] = (64, 64, 64, 1), latent_size: int = 100):
        super().__init__()
        self.conv1 = nn.Conv3d(1, 16, 1)
        self.resblock1 = _GenModelsResBlock(16, 32)
        self.resblock2 = _GenModelsResBlock(32, 64)
        self.resblock3 = _GenModelsResBlock(64, 128)
        self.fc = nn.Linear(128 * _pooled_volume_size(input_shape), latent_size)

    def forward(self, volume):
        x = functional.relu(self.conv1(volume))
        for block in (self.resblock1, self.resblock2, self.resblock3):
            x = functional.max_pool3d(block(x), 2)
        return self.fc(x.flatten(1))


class GAN3DClassifier(nn.Module):
    """GAN_experiment_part2's ``FC_Classifier(1, n_classes)``: (N, 1, D, H, W) -> (N, n_classes) logits. ``bn1`` and
    ``bn2`` are built but never called; conv1 has no activation; dropout is a no-op in eval mode."""

    def __init__(self, input_shape: Sequence[int] = (64, 64, 64, 1), n_classes: int = 1, dropout: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv3d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(16)
        self.conv2 = _GenModelsResBlock(16, 32)
        self.bn2 = nn.BatchNorm3d(32)
        self.conv3 = _GenModelsResBlock(32, 64)
        self.dropout = nn.Dropout(dropout)
        self.linear1 = nn.Linear(64 * _pooled_volume_size(input_shape), 200)
        self.bn3 = nn.BatchNorm1d(200)
        self.linear2 = nn.Linear(200, n_classes)

    def forward(self, volume):
        x = volume
        for layer in (self.conv1, self.conv2, self.conv3):
            x = functional.max_pool3d(layer(x), 2)
        return self.linear2(functional.relu(self.bn3(self.linear1(self.dropout(x.flatten(1))))))


class MRIAutoencoder(nn.Module):
    """Autoencoder_mri.ipynb's ``MyFirstAE``: (N, 1, D, H, W) -> its reconstruction through a ``bottleneck``-value
    code; the decoder's output paddings restore the sizes the encoder's stride-2 convolutions rounded down."""

    def __init__(self, input_shape: Sequence[int] = (58, 70, 58, 1), n_features: int = 16, bottleneck: int = 1000):
        super().__init__()
        sizes = [tuple(input_shape[:3])]
        for _ in range(4):
            sizes.append(tuple(size // 2 for size in sizes[-1]))
        self.feature_shape = (8 * n_features, *sizes[-1])
        features = 8 * n_features * sizes[-1][0] * sizes[-1][1] * sizes[-1][2]
        down = [nn.Conv3d(1, n_features, 4, stride=2, padding=1, bias=False), nn.LeakyReLU(0.2)]
        for index in range(1, 3):
            channels = n_features * 2**index
            down += _gan_stage(nn.Conv3d(channels // 2, channels, 4, stride=2, padding=1, bias=False), channels,
                               nn.LeakyReLU(0.2))
        self.encoder = nn.Module()
        self.encoder.main = nn.Sequential(*down, nn.Conv3d(4 * n_features, 8 * n_features, 4, stride=2, padding=1,
                                                           bias=False))
        self.encoder.main2 = nn.Sequential(nn.BatchNorm3d(8 * n_features), nn.LeakyReLU(0.2), nn.Flatten(),
                                           nn.Linear(features, bottleneck))
        self.fc = nn.Linear(bottleneck, features)
        up, channels = [], 8 * n_features
        for index in range(4):
            padding = tuple(size % 2 for size in sizes[3 - index])
            out = 1 if index == 3 else channels // 2
            up.append(nn.ConvTranspose3d(channels, out, 4, stride=2, padding=1, output_padding=padding, bias=False))
            if index < 3:
                up += [nn.BatchNorm3d(out), nn.ReLU()]
            channels = out
        self.decoder = nn.Module()
        self.decoder.main = nn.Sequential(*up)

    def forward(self, volume):
        code = self.encoder.main2(self.encoder.main(volume))
        return self.decoder.main(self.fc(code).reshape(-1, *self.feature_shape))


# Keyed like brainzoo.models.BUILDERS, taking the same options (those each architecture needs; see the module's doc).
REFERENCES = {
    "sfcn": SFCN,
    "agemapper": AgeMapper,
    "densenet169_3d": DenseNet169,
    "inception_resnet_v2_3d": InceptionResNetV2,
    "s500mri_classifier": S500MRIClassifier,
    "vae_c_encoder": VAECEncoder,
    "vae_c_decoder": VAECDecoder,
    "gan3d_generator": GAN3DGenerator,
    "gan3d_discriminator": GAN3DDiscriminator,
    "gan3d_encoder": GAN3DEncoder,
    "gan3d_classifier": GAN3DClassifier,
    "mri_autoencoder": MRIAutoencoder,
}
