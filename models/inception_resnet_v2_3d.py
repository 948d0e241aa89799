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
BLOCKS_A, BLOCKS_B, BLOCKS_C = 5, 10, 5
# Every stride-2 stage pads by 1, so any size survives; 1 voxel is the floor.
MINIMUM_INPUT_SIZE = 1


def unit(x, filters: int, kernel_size, name: str, strides: int = 1):
    """Conv3d (bias) -> BatchNorm (eps 1e-3) -> ReLU; padding follows the kernel (k // 2 on each axis)."""
    kernel = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
    x = conv3d(x, filters, kernel, strides=strides, padding=tuple(k // 2 for k in kernel), name=f"{name}_conv")
    x = batch_norm(x, epsilon=UNIT_BN_EPSILON, name=f"{name}_bn")
    return layers.ReLU(name=f"{name}_relu")(x)


def chain(x, specs, name: str):
    """Units applied in sequence, named ``<name>_0``, ``<name>_1``, ... (a PyTorch ``nn.Sequential``)."""
    for index, (filters, kernel, strides) in enumerate(specs):
        x = unit(x, filters, kernel, f"{name}_{index}", strides=strides)
    return x


def pool(x, name: str):
    """MaxPool3d(3, stride 2, padding 1); every input of one is a ReLU output."""
    return max_pool_after_relu(x, 3, strides=2, padding=1, name=name)


def stem(x):
    x = chain(x, [(32, 3, 2), (32, 3, 1), (64, 3, 1)], "stem_features")
    x = layers.Concatenate(name="stem_concat_a")([unit(x, 96, 3, "stem_branch_a", strides=2),
                                                  pool(x, "stem_branch_b")])
    branch_0 = chain(x, [(64, 1, 1), (96, 3, 1)], "stem_branch_0")
    branch_1 = chain(x, [(64, 1, 1), (64, (1, 1, 7), 1), (64, (1, 7, 1), 1), (64, (7, 1, 1), 1), (96, 3, 1)],
                     "stem_branch_1")
    x = layers.Concatenate(name="stem_concat_0")([branch_0, branch_1])
    return layers.Concatenate(name="stem_concat_2")([unit(x, 192, 3, "stem_branch_2", strides=2),
                                                     pool(x, "stem_branch_3")])


def residual_block(x, branches, scale: float, activation: bool, name: str):
    """Concatenated ``branches`` -> Conv 1^3 (bias, no BN) back to the input width = r; ReLU(x + scale r)."""
    residual = layers.Concatenate(name=f"{name}_concat")(branches)
    residual = conv3d(residual, x.shape[-1], 1, name=f"{name}_conv")
    x = ScaledResidual(scale, name=f"{name}_scale_add")([x, residual])
    return layers.ReLU(name=f"{name}_relu")(x) if activation else x


def block_a(x, name: str):
    branches = [unit(x, 32, 1, f"{name}_branch_0"),
                chain(x, [(32, 1, 1), (32, 3, 1)], f"{name}_branch_1"),
                chain(x, [(32, 1, 1), (48, 3, 1), (64, 3, 1)], f"{name}_branch_2")]
    return residual_block(x, branches, RESIDUAL_SCALE, True, name)


def reduction_a(x, name: str = "reduction_a"):
    branches = [unit(x, 384, 3, f"{name}_branch_0", strides=2),
                chain(x, [(256, 1, 1), (256, 3, 1), (384, 3, 2)], f"{name}_branch_1"),
                pool(x, f"{name}_branch_2")]
    return layers.Concatenate(name=f"{name}_concat")(branches)


def block_b(x, name: str):
    branches = [unit(x, 192, 1, f"{name}_branch_0"),
                chain(x, [(128, 1, 1), (160, (1, 1, 7), 1), (160, (1, 7, 1), 1), (192, (7, 1, 1), 1)],
                      f"{name}_branch_1")]
    return residual_block(x, branches, RESIDUAL_SCALE, True, name)


def reduction_b(x, name: str = "reduction_b"):
    branches = [chain(x, [(256, 1, 1), (384, 3, 2)], f"{name}_branch_0"),
                chain(x, [(256, 1, 1), (288, 3, 2)], f"{name}_branch_1"),
                chain(x, [(256, 1, 1), (288, 3, 1), (320, 3, 2)], f"{name}_branch_2"),
                pool(x, f"{name}_branch_3")]
    return layers.Concatenate(name=f"{name}_concat")(branches)


def block_c(x, name: str, scale: float = RESIDUAL_SCALE, activation: bool = True):
    branches = [unit(x, 192, 1, f"{name}_branch_0"),
                chain(x, [(192, 1, 1), (224, (1, 1, 3), 1), (224, (1, 3, 1), 1), (256, (3, 1, 1), 1)],
                      f"{name}_branch_1")]
    return residual_block(x, branches, scale, activation, name)


def inception_resnet_v2_3d(input_shape=(118, 142, 118, 1), n_outputs: int = 1, dropout: float = 0.2,
                           weights=None, name: str = "inception_resnet_v2_3d") -> tf.keras.Model:
    """Inception-ResNet-v2-3D regression network: Linear(1536, n) then Linear(n, n), as the original
    ``lin_regression`` head. ``dropout`` acts before the head during training only."""
    input_shape = check_input_shape(input_shape, MINIMUM_INPUT_SIZE, "inception_resnet_v2_3d")
    inputs = tf.keras.Input(input_shape, name="volume")
    x = stem(inputs)
    for index in range(1, BLOCKS_A + 1):
        x = block_a(x, f"block_a{index}")
    x = reduction_a(x)
    for index in range(1, BLOCKS_B + 1):
        x = block_b(x, f"block_b{index}")
    x = reduction_b(x)
    for index in range(1, BLOCKS_C):
        x = block_c(x, f"block_c{index}")
    x = block_c(x, f"block_c{BLOCKS_C}", scale=1.0, activation=False)
    x = unit(x, 1536, 1, "head")
    x = layers.GlobalAveragePooling3D(name="head_pool")(x)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    x = layers.Dense(n_outputs, name="head_linear")(x)
    outputs = layers.Dense(n_outputs, name="output_linear")(x)
    return finish_model(inputs, outputs, name, weights)
