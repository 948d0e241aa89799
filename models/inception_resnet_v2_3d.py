"""3-D Inception-ResNet-v2 exactly as the FLAIR brain-age project (Colman et al.) built it for regression.

Layer names follow the original module tree (``features.1.branch_2.0`` becomes ``block_a1_branch_2_0``)
so that the PyTorch -> Keras mapping is a readable table.
"""

from __future__ import annotations

import tensorflow as tf

from brainzoo.models.layers import (ScaledResidual, batch_norm, check_input_shape, conv3d, finish_model,
                                    max_pool_after_relu)

layers = tf.keras.layers

UNIT_BN_EPSILON = 1e-3
RESIDUAL_SCALE = 0.2
# Every stride-2 stage pads by 1, so any size survives; 1 voxel is the floor.
MINIMUM_INPUT_SIZE = 1


def unit(x, filters: int, kernel_size, name: str, width_multiplier: float, strides: int = 1):
    """Conv3d (bias) -> BatchNorm (eps 1e-3) -> ReLU with ``filters`` x ``width_multiplier`` channels (at least
    one); padding follows the kernel (k // 2 on each axis)."""
    kernel = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
    filters = max(1, round(filters * width_multiplier))
    x = conv3d(x, filters, kernel, strides=strides, padding=tuple(k // 2 for k in kernel), name=f"{name}_conv")
    x = batch_norm(x, epsilon=UNIT_BN_EPSILON, name=f"{name}_bn")
    return layers.ReLU(name=f"{name}_relu")(x)


def chain(x, specs, name: str, width_multiplier: float):
    """Units applied in sequence, named ``<name>_0``, ``<name>_1``, ... (a PyTorch ``nn.Sequential``)."""
    for index, (filters, kernel, strides) in enumerate(specs):
        x = unit(x, filters, kernel, f"{name}_{index}", width_multiplier, strides=strides)
    return x


def pool(x, name: str):
    """MaxPool3d(3, stride 2, padding 1); every input of one is a ReLU output."""
    return max_pool_after_relu(x, 3, strides=2, padding=1, name=name)


def stem(x, width_multiplier: float):
    x = chain(x, [(32, 3, 2), (32, 3, 1), (64, 3, 1)], "stem_features", width_multiplier)
    x = layers.Concatenate(name="stem_concat_a")([unit(x, 96, 3, "stem_branch_a", width_multiplier, strides=2),
                                                  pool(x, "stem_branch_b")])
    branch_0 = chain(x, [(64, 1, 1), (96, 3, 1)], "stem_branch_0", width_multiplier)
    branch_1 = chain(x, [(64, 1, 1), (64, (1, 1, 7), 1), (64, (1, 7, 1), 1), (64, (7, 1, 1), 1), (96, 3, 1)],
                     "stem_branch_1", width_multiplier)
    x = layers.Concatenate(name="stem_concat_0")([branch_0, branch_1])
    return layers.Concatenate(name="stem_concat_2")([unit(x, 192, 3, "stem_branch_2", width_multiplier, strides=2),
                                                     pool(x, "stem_branch_3")])


def residual_block(x, branches, scale: float, activation: bool, name: str):
    """Concatenated ``branches`` -> Conv 1^3 (bias, no BN) back to the input width = r; ReLU(x + scale r)."""
    residual = layers.Concatenate(name=f"{name}_concat")(branches)
    residual = conv3d(residual, x.shape[-1], 1, name=f"{name}_conv")
    x = ScaledResidual(scale, name=f"{name}_scale_add")([x, residual])
    return layers.ReLU(name=f"{name}_relu")(x) if activation else x


def block_a(x, name: str, width_multiplier: float):
    branches = [unit(x, 32, 1, f"{name}_branch_0", width_multiplier),
                chain(x, [(32, 1, 1), (32, 3, 1)], f"{name}_branch_1", width_multiplier),
                chain(x, [(32, 1, 1), (48, 3, 1), (64, 3, 1)], f"{name}_branch_2", width_multiplier)]
    return residual_block(x, branches, RESIDUAL_SCALE, True, name)


def reduction_a(x, width_multiplier: float, name: str = "reduction_a"):
    branches = [unit(x, 384, 3, f"{name}_branch_0", width_multiplier, strides=2),
                chain(x, [(256, 1, 1), (256, 3, 1), (384, 3, 2)], f"{name}_branch_1", width_multiplier),
                pool(x, f"{name}_branch_2")]
    return layers.Concatenate(name=f"{name}_concat")(branches)


def block_b(x, name: str, width_multiplier: float):
    branches = [unit(x, 192, 1, f"{name}_branch_0", width_multiplier),
                chain(x, [(128, 1, 1), (160, (1, 1, 7), 1), (160, (1, 7, 1), 1), (192, (7, 1, 1), 1)],
                      f"{name}_branch_1", width_multiplier)]
    return residual_block(x, branches, RESIDUAL_SCALE, True, name)


def reduction_b(x, width_multiplier: float, name: str = "reduction_b"):
    branches = [chain(x, [(256, 1, 1), (384, 3, 2)], f"{name}_branch_0", width_multiplier),
                chain(x, [(256, 1, 1), (288, 3, 2)], f"{name}_branch_1", width_multiplier),
                chain(x, [(256, 1, 1), (288, 3, 1), (320, 3, 2)], f"{name}_branch_2", width_multiplier),
                pool(x, f"{name}_branch_3")]
    return layers.Concatenate(name=f"{name}_concat")(branches)


def block_c(x, name: str, width_multiplier: float, scale: float = RESIDUAL_SCALE, activation: bool = True):
    branches = [unit(x, 192, 1, f"{name}_branch_0", width_multiplier),
                chain(x, [(192, 1, 1), (224, (1, 1, 3), 1), (224, (1, 3, 1), 1), (256, (3, 1, 1), 1)],
                      f"{name}_branch_1", width_multiplier)]
    return residual_block(x, branches, scale, activation, name)


def inception_resnet_v2_3d(input_shape=(118, 142, 118, 1), n_outputs: int = 1, dropout: float = 0.2,
                           block_repeats=(5, 10, 5), width_multiplier: float = 1.0,
                           weights=None, name: str = "inception_resnet_v2_3d") -> tf.keras.Model:
    """Inception-ResNet-v2-3D regression network: Linear(1536, n) then Linear(n, n), as the original
    ``lin_regression`` head. ``dropout`` acts before the head during training only.

    ``block_repeats`` (how many A, B and C blocks; the last C block has scale 1 and no ReLU) and
    ``width_multiplier`` (every unit's channels) default to the published network; smaller ones give the same
    layer pattern and names at a size that trains in seconds.
    """
    input_shape = check_input_shape(input_shape, MINIMUM_INPUT_SIZE, "inception_resnet_v2_3d")
    blocks_a, blocks_b, blocks_c = block_repeats
    inputs = tf.keras.Input(input_shape, name="volume")
    x = stem(inputs, width_multiplier)
    for index in range(1, blocks_a + 1):
        x = block_a(x, f"block_a{index}", width_multiplier)
    x = reduction_a(x, width_multiplier)
    for index in range(1, blocks_b + 1):
        x = block_b(x, f"block_b{index}", width_multiplier)
    x = reduction_b(x, width_multiplier)
    for index in range(1, blocks_c):
        x = block_c(x, f"block_c{index}", width_multiplier)
    x = block_c(x, f"block_c{blocks_c}", width_multiplier, scale=1.0, activation=False)
    x = unit(x, 1536, 1, "head", width_multiplier)
    x = layers.GlobalAveragePooling3D(name="head_pool")(x)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    x = layers.Dense(n_outputs, name="head_linear")(x)
    outputs = layers.Dense(n_outputs, name="output_linear")(x)
    return finish_model(inputs, outputs, name, weights)
