"""Losses, metrics and learning-rate schedules named in a spec's ``training`` section.

Losses are per-example (shape ``(batch,)``) so the engine can average them over the *global* batch
under any ``tf.distribute`` strategy.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from brainzoo.errors import BrainzooError
from brainzoo.models.sfcn import TARGET_EPSILON
from brainzoo.outputs import AgeBins

SMOOTH = 1e-6


def gaussian_soft_labels(ages: tf.Tensor, bins: AgeBins, sigma: float) -> tf.Tensor:
    """TensorFlow twin of :func:`brainzoo.models.sfcn.soft_labels` (CDF differences over each bin)."""
    ages = tf.reshape(tf.cast(ages, tf.float32), (-1, 1))
    centres = tf.constant(bins.centres, tf.float32)[None, :]

    def erf(edge):
        return tf.math.erf((edge - ages) / (sigma * np.sqrt(2.0)))

    # Rounding can make a far-tail difference slightly negative, and log() of it NaN: clip at zero.
    return tf.maximum(0.5 * (erf(centres + bins.step / 2) - erf(centres - bins.step / 2)), 0.0)


def metric_of(loss_name: str) -> str:
    """The metric a card reports, and validation measures, for a model trained with this loss (a spec can name the
    metric to monitor before any Objective exists: validate reads it)."""
    if loss_name == "bce-logits":
        return "accuracy"
    return "dice" if loss_name in ("dice", "jaccard") else "mae"


class Objective:
    """A loss plus the metric a card reports, for one kind of model output.

    ``config`` is the spec's ``training.loss``; ``bins`` its ``inference.output.bins``, the support of
    ``sfcn-kl``'s soft labels.
    """

    def __init__(self, config: dict, bins: AgeBins | None = None):
        self.name = config["name"]
        # Segmentation outputs: 1 channel is a sigmoid mask; 2 or more, softmax classes whose labels are the
        # label volume's values 0..classes-1 (one-hot here), background included.
        self.classes = int(config.get("classes", 1))
        if self.classes < 1 or (self.classes > 1 and self.name not in ("dice", "jaccard")):
            raise BrainzooError(f"training.loss.classes: {config.get('classes')!r} needs a positive count and a "
                                "dice or jaccard loss")
        if self.name == "sfcn-kl":
            if bins is None or "bins" in config:
                raise BrainzooError("training.loss: sfcn-kl's soft labels lie on the age bins of inference.output.bins,"
                                    " and only there")
            self.bins = bins
            self.sigma = float(config.get("sigma", 1.0))
        elif self.name not in ("mse", "mae", "dice", "jaccard", "bce-logits"):
            raise BrainzooError(f"training.loss.name: unknown loss {self.name!r} "
                                "(sfcn-kl, mse, mae, dice, jaccard, bce-logits)")

    @property
    def metric(self) -> str:
        return metric_of(self.name)

    def per_example_loss(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        y_pred = tf.cast(y_pred, tf.float32)
        if self.name == "sfcn-kl":
            target = gaussian_soft_labels(y_true, self.bins, self.sigma) + TARGET_EPSILON
            return tf.reduce_sum(target * (tf.math.log(target) - y_pred), axis=-1)
        if self.name == "bce-logits":  # binary labels (0 or 1) against one logit per label
            labels = tf.reshape(tf.cast(y_true, tf.float32), tf.shape(y_pred))
            return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=y_pred), axis=-1)
        if self.name in ("mse", "mae"):
            error = tf.reshape(y_pred, (tf.shape(y_pred)[0], -1)) - tf.reshape(tf.cast(y_true, tf.float32), (tf.shape(y_pred)[0], -1))
            return tf.reduce_mean(tf.square(error) if self.name == "mse" else tf.abs(error), axis=-1)
        overlap, total = self._overlap(self._targets(y_true), y_pred)
        if self.name == "dice":
            return 1.0 - tf.reduce_mean((2.0 * overlap + SMOOTH) / (total + SMOOTH), axis=-1)
        return 1.0 - tf.reduce_mean((overlap + SMOOTH) / (total - overlap + SMOOTH), axis=-1)

    def _targets(self, y_true: tf.Tensor) -> tf.Tensor:
        """The label volume as the output's channels: itself for a mask, one-hot over the classes otherwise."""
        if self.classes == 1:
            return tf.cast(y_true, tf.float32)
        return tf.one_hot(tf.cast(tf.round(y_true[..., 0]), tf.int32), self.classes)

    def _overlap(self, targets, y_pred):
        """Per example and class: the soft intersection and the summed sizes, shaped (batch, classes)."""
        batch = tf.shape(y_pred)[0]
        t = tf.reshape(targets, (batch, -1, self.classes))
        p = tf.reshape(y_pred, (batch, -1, self.classes))
        return tf.reduce_sum(t * p, axis=1), tf.reduce_sum(t, axis=1) + tf.reduce_sum(p, axis=1)

    def per_example_metric(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        """Absolute age error (years); hard Dice per example (of the mask at 0.5, or the mean over the foreground
        classes of the most probable class); or, for binary logits, whether the label is right."""
        y_pred = tf.cast(y_pred, tf.float32)
        if self.metric == "accuracy":
            labels = tf.reshape(tf.cast(y_true, tf.float32), tf.shape(y_pred)) > 0.5
            return tf.reduce_mean(tf.cast(tf.equal(y_pred > 0, labels), tf.float32), axis=-1)
        if self.metric == "dice":
            hard = (tf.cast(y_pred > 0.5, tf.float32) if self.classes == 1
                    else tf.one_hot(tf.argmax(y_pred, axis=-1), self.classes))
            overlap, total = self._overlap(self._targets(y_true), hard)
            dice = (2.0 * overlap + SMOOTH) / (total + SMOOTH)
            return tf.reduce_mean(dice if self.classes == 1 else dice[:, 1:], axis=-1)
        return tf.abs(self.predicted_age(y_pred) - tf.reshape(tf.cast(y_true, tf.float32), (-1,)))

    def predicted_age(self, y_pred: tf.Tensor) -> tf.Tensor:
        if self.name == "sfcn-kl":
            return tf.reduce_sum(tf.exp(y_pred) * tf.constant(self.bins.centres, tf.float32)[None, :], axis=-1)
        return tf.reshape(y_pred, (-1,))


@tf.keras.utils.register_keras_serializable(package="brainzoo")
class PolynomialDecayPerEpoch(tf.keras.optimizers.schedules.LearningRateSchedule):
    """lr * (1 - epoch / epochs) ** power, the FLAIR project's "poly" schedule, stepped per epoch."""

    def __init__(self, initial_learning_rate: float, epochs: int, steps_per_epoch: int, power: float = 0.9):
        self.initial_learning_rate, self.epochs = initial_learning_rate, epochs
        self.steps_per_epoch, self.power = steps_per_epoch, power

    def __call__(self, step):
        epoch = tf.cast(step // self.steps_per_epoch, tf.float32)
        return self.initial_learning_rate * tf.pow(tf.maximum(1.0 - epoch / self.epochs, 0.0), self.power)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "epochs": self.epochs,
                "steps_per_epoch": self.steps_per_epoch, "power": self.power}


def learning_rate(config: dict, epochs: int, steps_per_epoch: int):
    """A constant, ``poly`` or ``step`` schedule; ``plateau`` starts constant and the engine lowers it."""
    lr = float(config["learning_rate"])
    schedule = config.get("schedule", {"name": "constant"})
    if schedule["name"] in ("constant", "plateau"):
        return lr
    if schedule["name"] == "poly":
        return PolynomialDecayPerEpoch(lr, epochs, steps_per_epoch, schedule.get("power", 0.9))
    if schedule["name"] == "step":
        return tf.keras.optimizers.schedules.ExponentialDecay(
            lr, decay_steps=schedule["every_epochs"] * steps_per_epoch, decay_rate=schedule["factor"], staircase=True)
    raise BrainzooError(f"training.optimizer.schedule.name: unknown schedule {schedule['name']!r} (constant, poly, step, plateau)")


def optimizer(config: dict, epochs: int, steps_per_epoch: int) -> tf.keras.optimizers.Optimizer:
    """SGD or Adam; ``weight_decay`` is Keras's decoupled decay, while ``l2`` (torch.optim's ``weight_decay``, which
    the upstream recipes use) is added to the gradients by the engine."""
    lr = learning_rate(config, epochs, steps_per_epoch)
    decay = config.get("weight_decay")
    if config["name"] == "sgd":
        return tf.keras.optimizers.SGD(lr, momentum=config.get("momentum", 0.0), weight_decay=decay)
    if config["name"] == "adam":
        return tf.keras.optimizers.Adam(lr, beta_1=config.get("beta_1", 0.9), beta_2=config.get("beta_2", 0.999),
                                        weight_decay=decay)
    raise BrainzooError(f"training.optimizer.name: unknown optimizer {config['name']!r} (sgd, adam)")
