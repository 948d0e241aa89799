"""A spec's output decoding, parsed once: the age bins are one fact that the network's head, the decoding of its
predictions and the training's soft-label targets all read."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from brainzoo import catalogue
from brainzoo.errors import BrainzooError
from brainzoo.models import BUILDERS, sfcn
from brainzoo.outputs import AgeBins, OutputDecoding, builder_options
from brainzoo.predict import runners
from brainzoo.predict.brain_age import decode_output
from brainzoo.training.engine import TrainingPlan
from conftest import REPO, write_index, write_version

BINNED_SPECS = ["neuronets/sfcn-ukbiobank/1.0.0", "neuronets/flair-brainage-sfcn/1.0.0/t1",
                "neuronets/flair-brainage-sfcn/1.0.0/flair"]


def test_bin_centres_of_the_ukbiobank_and_flair_bins():
    np.testing.assert_allclose(AgeBins(42, 82, 1).centres, np.arange(42.5, 82, 1.0))
    flair = AgeBins.from_spec({"start": 15, "stop": 95, "step": 2})
    assert flair.count == 40 and flair.centres[0] == 16 and flair.centres[-1] == 94


@pytest.mark.parametrize("bins, problem", [
    ({"start": 42, "stop": 82, "step": 3}, "whole number of steps"),
    ({"start": 42, "stop": 82, "step": 0}, "whole number of steps"),
    ({"start": 82, "stop": 42, "step": 1}, "whole number of steps"),
    ({"start": 42, "stop": 82}, "needs exactly start, stop, step"),
    ({"start": 42, "stop": None, "step": 1}, "must be numbers"),
    ({"start": True, "stop": 82, "step": 1}, "must be numbers"),
])
def test_bad_bins_are_named(bins, problem):
    with pytest.raises(BrainzooError, match=f"inference.output.bins: .*{problem}"):
        AgeBins.from_spec(bins)


def test_only_a_binned_output_has_bins():
    with pytest.raises(BrainzooError, match="inference.output.bins"):
        OutputDecoding.from_spec({"type": "age-log-probabilities"})
    with pytest.raises(BrainzooError, match="inference.output.bins"):
        OutputDecoding.from_spec({"type": "age", "bins": {"start": 42, "stop": 82, "step": 1}})
    classifier = OutputDecoding.from_spec({"type": "age-group-logits", "classes": [{"label": "young"}, {"label": "old"}]})
    assert classifier.labels == ("young", "old") and classifier.builder_options() == {}


def test_the_builder_options_may_not_repeat_the_bins():
    spec = catalogue.read_yaml(REPO / BINNED_SPECS[0] / catalogue.SPEC_FILE)
    spec["architecture"]["options"]["n_bins"] = 40
    with pytest.raises(BrainzooError, match="architecture.options: n_bins"):
        builder_options(spec)


@pytest.mark.parametrize("version", BINNED_SPECS)
def test_head_decoding_and_training_targets_read_the_same_bins(version):
    """Change the spec's one bins entry and all three follow it."""
    spec = catalogue.read_yaml(REPO / version / catalogue.SPEC_FILE)
    spec["inference"]["output"]["bins"] = {"start": 20, "stop": 90, "step": 5}
    bins = OutputDecoding.from_spec(spec["inference"]["output"]).bins
    assert bins.count == 14
    model = BUILDERS[spec["architecture"]["builder"]](input_shape=(32, 32, 32, 1), **builder_options(spec))
    assert model.output_shape == (None, bins.count)
    decoded = decode_output(np.log(np.full(bins.count, 1 / bins.count)), OutputDecoding.from_spec(spec["inference"]["output"]))
    assert decoded["age"] == pytest.approx(55.0)
    objective = TrainingPlan.from_spec(spec).objective
    targets = objective.per_example_loss(tf.constant([47.5]), tf.math.log(tf.fill((1, bins.count), 1 / bins.count)))
    assert targets.shape == (1,) and np.isfinite(targets.numpy()).all()
    assert objective.per_example_metric(tf.constant([55.0]), np.log(np.full((1, bins.count), 1 / bins.count))).numpy() == \
        pytest.approx([0.0], abs=1e-4)
    with pytest.raises(BrainzooError, match="14 bins"):
        decode_output(np.zeros(40), OutputDecoding.from_spec(spec["inference"]["output"]))


@pytest.mark.parametrize("runtime", ["onnxruntime", "keras"])
def test_a_network_made_for_other_bins_is_refused_by_file(runtime, tmp_path, monkeypatch):
    """`brainzoo convert --arch sfcn` knows no spec: without --option n_bins it sizes the head at the builder's
    default, 40 bins. A version whose bins are 14 refuses that file before it predicts, naming it."""
    sfcn(input_shape=(32, 32, 32, 1), channels=(2,) * 6, n_bins=40).save(tmp_path / "model.h5", save_format="h5")
    spec = catalogue.read_yaml(REPO / BINNED_SPECS[0] / catalogue.SPEC_FILE) | {"id": "neuronets/other-bins/1.0.0",
                                                                                 "model": "other-bins"}
    spec["inference"]["output"]["bins"] = {"start": 20, "stop": 90, "step": 5}
    spec["weights"] = [{"name": "model", "path": "weights/model.h5", "format": "keras-h5",
                        "sources": [{"type": "inrepo-store"}]}]
    write_version(tmp_path / "root", spec, catalogue.read_yaml(REPO / BINNED_SPECS[0] / "model_card.yaml"),
                  weights={"weights/model.h5": (tmp_path / "model.h5").read_bytes()})
    write_index(tmp_path / "root")
    monkeypatch.setenv("BRAINZOO_ROOT", str(tmp_path / "root"))
    with pytest.raises(BrainzooError, match=r"other-bins/1\.0\.0/weights/model\.h5: the network gives 40 values, "
                                            r"but inference\.output\.bins has 14; .* --option n_bins=14"):
        runners.load_networks(catalogue.find_version("neuronets/other-bins/1.0.0"), runtime)
