"""DenseNet169-3D as MONAI builds it (``densenet169(spatial_dims=3, in_channels=1, out_channels=1)``),
with the extra ``Linear(1, 1)`` the FLAIR brain-age project (Colman et al.) put after it."""

from __future__ import annotations

import tensorflow as tf

from brainzoo.models.layers import batch_norm, check_input_shape, conv3d, finish_model, max_pool_after_relu

layers = tf.keras.layers

BLOCK_LAYERS = (6, 12, 32, 32)
GROWTH_RATE = 32
BOTTLENECK_WIDTH = 4 * GROWTH_RATE  # MONAI bn_size 4
STEM_FEATURES = 64
# Stride-2 stem conv and pool, then three 2x average pools that need at least 2 voxels each.
MINIMUM_INPUT_SIZE = 29


def dense_layer(x, dropout: float, name: str):
    """BN-ReLU-Conv 1^3 (bottleneck) then BN-ReLU-Conv 3^3 (growth), concatenated to the input."""
    y = batch_norm(x, name=f"{name}_norm1")
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = conv3d(y, BOTTLENECK_WIDTH, 1, use_bias=False, name=f"{name}_conv1")
    y = batch_norm(y, name=f"{name}_norm2")
    y = layers.ReLU(name=f"{name}_relu2")(y)
    y = conv3d(y, GROWTH_RATE, 3, padding=1, use_bias=False, name=f"{name}_conv2")
    if dropout:
        y = layers.Dropout(dropout, name=f"{name}_dropout")(y)
    return layers.Concatenate(name=f"{name}_concat")([x, y])


def transition(x, name: str):
    """BN-ReLU-Conv 1^3 halving the channels, then 2x average pooling."""
    y = batch_norm(x, name=f"{name}_norm")
    y = layers.ReLU(name=f"{name}_relu")(y)
    y = conv3d(y, x.shape[-1] // 2, 1, use_bias=False, name=f"{name}_conv")
    return layers.AveragePooling3D(2, name=f"{name}_pool")(y)


def densenet169_3d(input_shape=(118, 142, 118, 1), n_outputs: int = 1, dropout: float = 0.0,
                   weights=None, name: str = "densenet169_3d") -> tf.keras.Model:
    """DenseNet169-3D regression network.

    ``dropout`` acts inside every dense layer during training only (the FLAIR project trained with 0.1).
    """
    input_shape = check_input_shape(input_shape, MINIMUM_INPUT_SIZE, "densenet169_3d")
    inputs = tf.keras.Input(input_shape, name="volume")
    x = conv3d(inputs, STEM_FEATURES, 7, strides=2, padding=3, use_bias=False, name="conv0")
    x = batch_norm(x, name="norm0")
    x = layers.ReLU(name="relu0")(x)
    x = max_pool_after_relu(x, 3, strides=2, padding=1, name="pool0")
    for block, n_layers in enumerate(BLOCK_LAYERS, start=1):
        for layer in range(1, n_layers + 1):
            x = dense_layer(x, dropout, name=f"denseblock{block}_denselayer{layer}")
        if block < len(BLOCK_LAYERS):
            x = transition(x, name=f"transition{block}")
    x = batch_norm(x, name="norm5")
    x = layers.ReLU(name="class_layers_relu")(x)
    x = layers.GlobalAveragePooling3D(name="class_layers_pool")(x)
    x = layers.Dense(n_outputs, name="class_layers_out")(x)
    outputs = layers.Dense(n_outputs, name="output_linear")(x)
    return finish_model(inputs, outputs, name, weights)
