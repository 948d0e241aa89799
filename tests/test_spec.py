"""The typed spec: each catalogue version's inference section parses, and a bad value is named with its key."""

from __future__ import annotations

import copy

import pytest
import yaml

from brainzoo import catalogue
from brainzoo.errors import BrainzooError
from brainzoo.spec import ADVERSARIAL_LOSS, Inference, ModelInput, Step, Training
from conftest import REPO

SFCN = "neuronets/sfcn-ukbiobank/1.0.0"
INFERENCE = {
    "method": "blocks",
    "input": {"contrast": ["T1w"], "orientation": "RAS", "spacing_mm": [1, 1, 1], "shape": [64, 64, 64],
              "block_shape": [32, 32, 32]},
    "preprocessing": [{"step": "volume", "index": 1}, {"step": "conform"}, {"step": "crop", "shape": [64, 64, 64]},
                      {"step": "zscore"}],
    "output": {"type": "probability-mask", "threshold": 0.3},
}


def test_a_version_carries_its_parsed_inference_section():
    version = catalogue.find_version(SFCN, REPO)
    inference = version.inference
    assert inference.method == "whole-volume" and inference.input.contrast == ("T1w",)
    assert inference.input.shape == tuple(version.spec["inference"]["input"]["shape"])
    assert [step.as_spec() for step in inference.preprocessing] == version.spec["inference"]["preprocessing"]
    assert inference.output.bins.count == 40 and inference.deepbet is None


def test_the_sections_values_are_typed():
    inference = Inference.from_spec(INFERENCE)
    assert inference.input == ModelInput("RAS", (1, 1, 1), (64, 64, 64), ("T1w",), block_shape=(32, 32, 32))
    assert inference.preprocessing[2] == Step("crop", {"shape": [64, 64, 64]})
    assert inference.series_volume == 1 and inference.has_step("conform") and not inference.has_step("n4")
    assert inference.output.threshold == 0.3 and inference.entry_point is None


def changed(change) -> dict:
    section = copy.deepcopy(INFERENCE)
    change(section)
    return section


@pytest.mark.parametrize("change, message", [
    (lambda s: s["preprocessing"].insert(1, "conform"),
     "inference.preprocessing[1]: a step is a mapping {step: NAME, ...options}, not 'conform'"),
    (lambda s: s["preprocessing"].append({"step": 3}), "inference.preprocessing[4].step: a step is named by a string"),
    (lambda s: s["preprocessing"].append({"step": "warp-drive"}),
     "inference.preprocessing: preprocessing step 'warp-drive' is not supported"),
    (lambda s: s["preprocessing"].append({"step": "crop", "size": [8, 8, 8]}),
     "inference.preprocessing: preprocessing step 'crop': unknown option(s) size"),
    (lambda s: s.update(preprocessing={"step": "conform"}), "inference.preprocessing: must be a list of steps"),
    (lambda s: s["input"].update(spacing_mm=[1, 0, 1]),
     "inference.input.spacing_mm: must be three positive numbers, not [1, 0, 1]"),
    (lambda s: s["input"].update(spacing_mm=[1, 1]), "inference.input.spacing_mm: must be three positive numbers"),
    (lambda s: s["input"].update(spacing_mm=["1", 1, 1]), "inference.input.spacing_mm: must be three positive numbers"),
    (lambda s: s["input"].update(shape=[64, 64.0, 64]), "inference.input.shape: must be three positive integers"),
    (lambda s: s["input"].update(block_shape=[32, 32, 0]), "inference.input.block_shape: must be three positive"),
    (lambda s: s["input"].pop("orientation"), "inference.input: missing orientation"),
    (lambda s: s["input"].update(voxels=3), "inference.input: unknown key(s) voxels"),
    (lambda s: s["input"].update(block_placement="brain"), "inference.input.block_placement: 'brain' is neither"),
    (lambda s: s["input"].update(covariates=[{"name": "sex", "coding": {"M": 0}}]),
     "inference.input.covariates[0]: needs a name and a coding of at least two values"),
    (lambda s: s.pop("output"), "inference: missing output"),
    (lambda s: s.update(deepbet={"bbox_margin": 0.1}), "inference.deepbet: only a spec whose inference.method is"),
])
def test_a_bad_value_is_named_with_its_key(change, message):
    with pytest.raises(BrainzooError) as caught:
        Inference.from_spec(changed(change))
    assert message in str(caught.value)


def test_loading_a_version_names_its_spec_file_and_the_key(toy_dataset):
    """The catalogue parses with validate's checks: an unusable spec's error names the file and the key."""
    spec_file = toy_dataset / "neuronets/toy/0.1.0/spec.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    spec["inference"]["input"]["block_shape"] = [32, 32, 32]
    spec["inference"]["input"]["block_placement"] = "below-head-top"  # without its distance
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(BrainzooError, match="neuronets/toy/0.1.0/spec.yaml: inference.input: block_placement "
                                            "below-head-top and block_centre_below_head_top_mm go together"):
        catalogue.find_version("neuronets/toy/0.1.0", toy_dataset)


def test_a_versions_training_data_is_typed_with_the_pipelines_defaults():
    unet = catalogue.find_version("neuronets/brainzoo-unet/0.5.0", REPO).training
    assert unet.data.block_shape == (96, 96, 96) and unet.data.network_input_shape == (96, 96, 96, 1)
    assert unet.data.validation_normalization == unet.data.normalization == "percentile"
    generator = catalogue.find_version("neuronets/brain-aging-gan3d/1.0.0/generator", REPO).training
    assert generator.adversarial and generator.discriminator
    assert Training.from_spec({"data": {"kind": "regression"}}).data.normalization == "zscore"
    assert Training.from_spec({"loss": {"name": ADVERSARIAL_LOSS}, "data": {"kind": "regression"}}).data.normalization \
        == "minmax"
    assert Training.from_spec({"stages": []}).data is None and Training.from_spec(None) is None


@pytest.mark.parametrize("section, message", [
    ({"data": {"kind": "regression", "input_shape": [32, 32]}}, "training.data.input_shape: must be three positive"),
    ({"data": {"kind": "regression", "input_shpe": [32, 32, 32]}}, "training.data: unknown key(s) input_shpe"),
    ({"data": {"input_shape": [32, 32, 32]}}, "training.data.kind: must name what the records hold"),
    ({"data": ["regression"]}, "training.data: must be a mapping, not ['regression']"),
    ({"loss": "mse", "data": {"kind": "regression"}}, "training.loss: must be a mapping, not 'mse'"),
])
def test_a_bad_training_value_is_named_with_its_key(section, message):
    with pytest.raises(BrainzooError) as caught:
        Training.from_spec(section)
    assert message in str(caught.value)


def test_a_data_section_without_a_grid_is_refused_when_its_network_is_built():
    with pytest.raises(BrainzooError, match="needs block_shape"):
        Training.from_spec({"data": {"kind": "regression"}}).data.network_input_shape
