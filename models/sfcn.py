"""SFCN, the Simple Fully Convolutional Network of Peng et al. 2021 ("Accurate brain age prediction
with lightweight deep neural networks"), and its soft-label age-bin helpers.

The network predicts a distribution over age bins (log-probabilities); it is trained against Gaussian
soft labels with a KL-divergence loss, and the age is the expected value over the bin centres.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from scipy.special import ndtr

from brainzoo.errors import BrainzooError
from brainzoo.models.layers import batch_norm, check_input_shape, conv3d, finish_model
from brainzoo.outputs import AgeBins

layers = tf.keras.layers

# Five 2x max-pooling stages: a smaller volume has nothing left to pool.
MINIMUM_INPUT_SIZE = 32
# Added to the soft-label target before taking its log, as the original loss does.
TARGET_EPSILON = 1e-16


def sfcn(input_shape=(160, 192, 160, 1), channels=(32, 64, 128, 256, 256, 64), n_bins: int = 40,
         dropout: float = 0.5, weights=None, name: str = "sfcn") -> tf.keras.Model:
    """SFCN with a log-softmax head over ``n_bins`` age bins.

    ``channels`` are the output channels of the 3^3 conv blocks (each followed by 2x max pooling)
    and, last, of the 1^3 conv block. The original classifier averages over a fixed [5, 6, 5] window,
    which is the whole feature map at the published 160x192x160 input; a global average is that same
    operation there and keeps the network usable at other sizes.
    """
    input_shape = check_input_shape(input_shape, MINIMUM_INPUT_SIZE, "sfcn")
    inputs = tf.keras.Input(input_shape, name="volume")
    x = inputs
    *pooled_channels, last_channels = channels
    for index, filters in enumerate(pooled_channels):
        block = f"conv_{index}"
        x = conv3d(x, filters, 3, padding=1, name=f"{block}_conv")
        x = batch_norm(x, name=f"{block}_bn")
        x = layers.MaxPool3D(2, name=f"{block}_pool")(x)
        x = layers.ReLU(name=f"{block}_relu")(x)
    block = f"conv_{len(pooled_channels)}"
    x = conv3d(x, last_channels, 1, name=f"{block}_conv")
    x = batch_norm(x, name=f"{block}_bn")
    x = layers.ReLU(name=f"{block}_relu")(x)

    x = layers.GlobalAveragePooling3D(keepdims=True, name="classifier_pool")(x)
    if dropout:
        x = layers.Dropout(dropout, name="classifier_dropout")(x)
    x = conv3d(x, n_bins, 1, name=f"classifier_conv_{len(channels)}")
    x = layers.Flatten(name="classifier_flatten")(x)
    outputs = layers.Activation("log_softmax", name="log_probabilities")(x)
    return finish_model(inputs, outputs, name, weights)


def soft_labels(ages, bins: AgeBins, sigma: float = 1.0) -> np.ndarray:
    """Gaussian soft labels: the probability mass of N(age, sigma^2) inside each bin (CDF differences).

    Returns one row of ``bins.count`` values per age; mass outside [start, stop] is dropped, as in the original.
    """
    if sigma <= 0:
        raise BrainzooError(f"age bins: sigma must be positive, got {sigma}")
    centres = bins.centres
    ages = np.atleast_1d(np.asarray(ages, dtype=np.float64))[:, None]
    upper = ndtr((centres + bins.step / 2 - ages) / sigma)
    lower = ndtr((centres - bins.step / 2 - ages) / sigma)
    return (upper - lower).astype(np.float32)


def kl_divergence_loss(y_true, y_pred):
    """The original SFCN loss: KL(target || predicted), summed over bins and averaged over the batch.

    ``y_true`` are soft labels (probabilities), ``y_pred`` the network's log-probabilities; 1e-16 is
    added to the target so that empty bins do not take log(0). The result is already a scalar, so
    Keras' batch-mean reduction leaves it unchanged when this is passed to ``compile(loss=...)``.
    """
    y_pred = tf.convert_to_tensor(y_pred)
    target = tf.cast(y_true, y_pred.dtype) + TARGET_EPSILON
    batch_size = tf.cast(tf.shape(y_pred)[0], y_pred.dtype)
    return tf.reduce_sum(target * (tf.math.log(target) - y_pred)) / batch_size

