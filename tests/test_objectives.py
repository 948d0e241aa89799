"""Losses, metrics and schedules of the training section, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from brainzoo.errors import BrainzooError
from brainzoo.models.sfcn import kl_divergence_loss, soft_labels
from brainzoo.outputs import AgeBins
from brainzoo.training.objectives import Objective, learning_rate, optimizer

BINS = AgeBins(42, 82, 1)


def test_sfcn_kl_inside_tf_function_matches_the_original_loss():
    """Graph mode must not turn far-tail soft labels into NaN, and must equal the numpy reference."""
    objective = Objective({"name": "sfcn-kl", "sigma": 1.0}, BINS)
    ages = np.array([42.3, 60.0, 81.9], dtype="float32")
    log_probabilities = tf.nn.log_softmax(tf.random.stateless_normal((3, 40), seed=(1, 2)))
    graph_loss = tf.function(objective.per_example_loss)(tf.constant(ages), log_probabilities).numpy()
    reference = kl_divergence_loss(soft_labels(ages, BINS), log_probabilities).numpy() * 3
    assert np.isfinite(graph_loss).all()
    np.testing.assert_allclose(graph_loss.sum(), reference, rtol=1e-5)


def test_sfcn_kl_takes_its_bins_from_the_output_alone():
    """The soft labels lie on inference.output.bins: a loss without them, or with bins of its own, is refused."""
    for config, bins in (({"name": "sfcn-kl"}, None), ({"name": "sfcn-kl", "bins": {"start": 42, "stop": 82, "step": 1}}, BINS)):
        with pytest.raises(BrainzooError, match="inference.output.bins"):
            Objective(config, bins)


def test_mae_metric_decodes_the_expected_age():
    objective = Objective({"name": "sfcn-kl"}, BINS)
    one_hot_50 = np.full((1, 40), -1e9, dtype="float32")
    one_hot_50[0, 8] = 0.0  # bin [50, 51), centre 50.5
    assert objective.per_example_metric(tf.constant([48.5]), one_hot_50).numpy() == pytest.approx([2.0])


def test_dice_and_jaccard():
    truth = np.zeros((1, 4, 4, 4, 1), "float32")
    truth[0, :2] = 1
    pred = np.zeros_like(truth)
    pred[0, 1:3] = 1  # half overlap: Dice 0.5, Jaccard 1/3
    dice, jaccard = Objective({"name": "dice"}), Objective({"name": "jaccard"})
    assert dice.per_example_loss(truth, pred).numpy() == pytest.approx([0.5], abs=1e-5)
    assert jaccard.per_example_loss(truth, pred).numpy() == pytest.approx([2 / 3], abs=1e-5)
    assert dice.per_example_metric(truth, pred * 0.9).numpy() == pytest.approx([0.5], abs=1e-5)


def test_dice_over_classes_one_hot_encodes_the_label_volume():
    """Two classes (background, lesion): the loss averages both classes' soft Dice, the metric the lesion's."""
    labels = np.zeros((1, 4, 4, 4, 1), "float32")
    labels[0, :2] = 1
    lesion = np.zeros((1, 4, 4, 4), "float32")
    lesion[0, 1:3] = 1  # half of the lesion found, as many false positives
    softmax = np.stack([1 - lesion, lesion], axis=-1)
    objective = Objective({"name": "dice", "classes": 2})
    assert objective.per_example_loss(labels, softmax).numpy() == pytest.approx([0.5], abs=1e-5)
    assert objective.per_example_metric(labels, softmax * 0.8 + 0.1).numpy() == pytest.approx([0.5], abs=1e-5)
    with pytest.raises(BrainzooError, match="classes: 2 needs a positive count and a dice or jaccard loss"):
        Objective({"name": "mse", "classes": 2})


def test_schedules():
    poly = learning_rate({"learning_rate": 1e-4, "schedule": {"name": "poly", "power": 0.9}}, epochs=200, steps_per_epoch=10)
    assert float(poly(0)) == pytest.approx(1e-4)
    assert float(poly(1000)) == pytest.approx(1e-4 * 0.5 ** 0.9)
    step = learning_rate({"learning_rate": 0.01, "schedule": {"name": "step", "every_epochs": 30, "factor": 0.3}},
                         epochs=130, steps_per_epoch=2)
    assert float(step(59)) == pytest.approx(0.01) and float(step(60)) == pytest.approx(0.003)
    assert isinstance(optimizer({"name": "sgd", "learning_rate": 0.1, "momentum": 0.9}, 1, 1), tf.keras.optimizers.SGD)
    with pytest.raises(BrainzooError, match="unknown optimizer 'rmsprop'"):
        optimizer({"name": "rmsprop", "learning_rate": 0.1}, 1, 1)
    with pytest.raises(BrainzooError, match="unknown loss 'hinge'"):
        Objective({"name": "hinge"})
