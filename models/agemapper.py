"""AgeMapper (Roibu et al. 2023): a five-block 3-D CNN with a fully connected regression head, trained
per contrast on UK Biobank maps at 1 mm (160x192x160) or 2 mm (80x96x80, upsampled x2 first)."""

from __future__ import annotations

import tensorflow as tf

from brainzoo.errors import BrainzooError
from brainzoo.models.layers import TrilinearUpsampling3D, batch_norm, check_input_shape, conv3d, finish_model

layers = tf.keras.layers

PUBLISHED_INPUT_SHAPES = {"1mm": (160, 192, 160, 1), "2mm": (80, 96, 80, 1)}
# Five 2x max-pooling stages (after the x2 upsampling of the 2 mm variant).
MINIMUM_FEATURE_INPUT_SIZE = 32
HIDDEN_UNITS = (96, 32)


def agemapper(input_shape=None, resolution: str = "1mm", channels=(32, 64, 64, 64, 64),
              dropout_rates=(0.0, 0.0, 0.0), weights=None, name: str | None = None) -> tf.keras.Model:
    """AgeMapper regression network; ``input_shape`` defaults to the published one for ``resolution``.

    ``dropout_rates`` go before the three fully connected layers (the original's dropout_rate_1..3).
    The features are flattened in PyTorch's channel-first order (a ``Permute`` first), so the first
    dense layer takes the original weights with a plain transpose.
    """
    if resolution not in PUBLISHED_INPUT_SHAPES:
        raise BrainzooError(f"agemapper: resolution must be one of {', '.join(PUBLISHED_INPUT_SHAPES)}, "
                            f"got {resolution!r}")
    upsample = resolution == "2mm"
    input_shape = check_input_shape(input_shape or PUBLISHED_INPUT_SHAPES[resolution],
                                    MINIMUM_FEATURE_INPUT_SIZE // 2 if upsample else MINIMUM_FEATURE_INPUT_SIZE,
                                    "agemapper")
    if None in input_shape[:3]:
        raise BrainzooError(f"agemapper: input_shape {input_shape} needs fixed spatial sizes "
                            "(the dense head depends on them)")
    inputs = tf.keras.Input(input_shape, name="volume")
    x = TrilinearUpsampling3D(2, name="upsample")(inputs) if upsample else inputs
    for index, filters in enumerate(channels):
        block = f"conv_{index}"
        x = conv3d(x, filters, 3, padding=1, use_bias=False, name=f"{block}_conv")
        x = batch_norm(x, name=f"{block}_bn")
        x = layers.MaxPool3D(2, name=f"{block}_pool")(x)
        x = layers.ReLU(name=f"{block}_relu")(x)
    x = layers.Permute((4, 1, 2, 3), name="to_channels_first")(x)
    x = layers.Flatten(name="flatten")(x)

    # The original numbers its dense layers down to the output: FullyConnected_3, _2, _1.
    for number, units, rate in zip((3, 2, 1), (*HIDDEN_UNITS, 1), dropout_rates):
        if rate:
            x = layers.Dropout(rate, name=f"fc_{number}_dropout")(x)
        x = layers.Dense(units, name=f"fc_{number}")(x)
        if number > 1:
            x = layers.ReLU(name=f"fc_{number}_relu")(x)
    return finish_model(inputs, x, name or f"agemapper_{resolution}", weights)
