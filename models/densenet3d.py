"""DenseNet169-3D as MONAI builds it (``densenet169(spatial_dims=3, in_channels=1, out_channels=1)``),
with the extra ``Linear(1, 1)`` the FLAIR brain-age project (Colman et al.) put after it."""

from __future__ import annotations

import tensorflow as tf

from brainzoo.models.layers import batch_norm, check_input_shape, conv3d, finish_model, max_pool_after_relu

layers = tf.keras.layers

BOTTLENECK_SIZE = 4  # MONAI bn_size: a dense layer's bottleneck has 4 x growth_rate channels


def minimum_input_size(n_blocks: int) -> int:
    """The stride-2 stem conv and pool quarter the input, then each of the n_blocks - 1 transitions halves it;
    the last of those pools needs 2 voxels (29 for DenseNet-169's 4 blocks)."""
    return 2 ** (n_blocks + 1) - 3


def dense_layer(x, growth_rate: int, dropout: float, name: str):
    """BN-ReLU-Conv 1^3 (bottleneck) then BN-ReLU-Conv 3^3 (growth), concatenated to the input."""
    y = batch_norm(x, name=f"{name}_norm1")
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = conv3d(y, BOTTLENECK_SIZE * growth_rate, 1, use_bias=False, name=f"{name}_conv1")
    y = batch_norm(y, name=f"{name}_norm2")
    y = layers.ReLU(name=f"{name}_relu2")(y)
    y = conv3d(y, growth_rate, 3, padding=1, use_bias=False, name=f"{name}_conv2")
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
                   block_layers=(6, 12, 32, 32), growth_rate: int = 32, stem_features: int = 64,
                   weights=None, name: str = "densenet169_3d") -> tf.keras.Model:
    """DenseNet169-3D regression network.

    ``dropout`` acts inside every dense layer during training only (the FLAIR project trained with 0.1).
    ``block_layers``, ``growth_rate`` and ``stem_features`` (MONAI's block_config, growth_rate and init_features)
    default to DenseNet-169's; smaller ones give the same layer pattern and names at a size that trains in seconds.
    """
    input_shape = check_input_shape(input_shape, minimum_input_size(len(block_layers)), "densenet169_3d")
    inputs = tf.keras.Input(input_shape, name="volume")
    x = conv3d(inputs, stem_features, 7, strides=2, padding=3, use_bias=False, name="conv0")
    x = batch_norm(x, name="norm0")
    x = layers.ReLU(name="relu0")(x)
    x = max_pool_after_relu(x, 3, strides=2, padding=1, name="pool0")
    for block, n_layers in enumerate(block_layers, start=1):
        for layer in range(1, n_layers + 1):
            x = dense_layer(x, growth_rate, dropout, name=f"denseblock{block}_denselayer{layer}")
        if block < len(block_layers):
            x = transition(x, name=f"transition{block}")
    x = batch_norm(x, name="norm5")
    x = layers.ReLU(name="class_layers_relu")(x)
    x = layers.GlobalAveragePooling3D(name="class_layers_pool")(x)
    x = layers.Dense(n_outputs, name="class_layers_out")(x)
    outputs = layers.Dense(n_outputs, name="output_linear")(x)
    return finish_model(inputs, outputs, name, weights)
