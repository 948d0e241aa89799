"""ml_MRI_age_prediction's networks (the S500MRI age-group classifier, the VAE-C encoder and decoder) converted
from PyTorch, checked against outputs of the ORIGINAL code.

The fixtures in fixtures/seeds/ are copied from the shared seed fixtures: the original state_dict keys and shapes,
what the original returned for the seeded tensors and the rule-made inputs (a 128^3 volume and sex, or a latent
vector), as every value or every ``stride``-th value of the C-order (N, C, D, H, W) output, with its sum and
absolute sum. The classifier's upstream checkpoints are whole pickled nn.Modules; the shared folder holds two
such files, read here through ``brainzoo convert`` when it is present.
"""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from brainzoo.convert import convert, record_path
from brainzoo.convert.state_dict import convert_state_dict
from brainzoo.models import pytorch_parameter_count
from conftest import FIXTURES, REPO, SHARED, brainzoo, seeded_state_dict
from test_convert import fixture_input

SHARED_SEEDS = SHARED / "fixtures" / "seeds"
# fixture -> (architecture, builder options, the fixture's output names in the Keras model's output order)
CONVERSIONS = {
    "s500mri_clf_2class": ("s500mri", {"num_classes": 2}, ["logits"]),
    "s500mri_clf_4class": ("s500mri", {"num_classes": 4}, ["logits"]),
    "vae_c_2class": ("vae-c-encoder", {}, ["age_mean", "age_log_var", "z_mean", "z_log_var"]),
    "vae_c_2class_decoder": ("vae-c-decoder", {}, ["reconstruction"]),
}
UPSTREAM_FORMAT_FILES = {"s500mri_clf_2class.full.pt": "s500mri_clf_2class",
                         "s500mri_clf_4class.full.pt": "s500mri_clf_4class"}
CATALOGUE_VERSIONS = {"neuronets/ml-mri-age-group-cnn/1.0.0/2class": "s500mri_clf_2class",
                      "neuronets/ml-mri-age-group-cnn/1.0.0/4class": "s500mri_clf_4class"}
RELATIVE_TOLERANCE = 1e-4
SEX = np.array([0, 1], np.float32)  # the fixtures' sex input: 0 male, 1 female, alternating


def load_seed_fixture(name: str) -> dict:
    return json.loads((FIXTURES / "seeds" / f"{name}.json").read_text())


def fixture_inputs(fixture: dict) -> list[np.ndarray]:
    """The fixture's inputs in the Keras model's order, channels-last: volume and sex, or the latent vector."""
    if "image" in fixture["inputs"]:
        volume = fixture_input(fixture["inputs"]["image"]["shape_ncdhw"])
        return [volume.transpose(0, 2, 3, 4, 1), SEX[:len(volume), None]]
    return [np.random.default_rng(99).standard_normal((2, 16)).astype(np.float32)]


def keras_outputs(model: tf.keras.Model, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Every output for every sample, channels-first like the original's; one sample at a time to save memory."""
    per_sample = []
    for i in range(len(inputs[0])):
        outputs = model([x[i:i + 1] for x in inputs] if len(inputs) > 1 else inputs[0][i:i + 1], training=False)
        per_sample.append([t.numpy() for t in (outputs if isinstance(outputs, list) else [outputs])])
    outputs = [np.concatenate(samples) for samples in zip(*per_sample)]
    return [t.transpose(0, 4, 1, 2, 3) if t.ndim == 5 else t for t in outputs]


def largest_difference(output: np.ndarray, expected: dict) -> float:
    """Max abs difference from the fixture's (strided) values, relative to the tolerance: <= 1 reproduces it.

    The tolerance is the fixtures' 1e-4 * max(1, max |expected|); the sum and absolute sum of every value must
    agree within 1e-4 of the absolute sum.
    """
    assert list(output.shape) == expected["shape"]
    values = np.array(expected["values"], np.float32)
    difference = np.abs(output.ravel()[::expected["stride"]] - values).max()
    sums_apart = max(abs(output.sum(dtype=np.float64) - expected["sum"]),
                     abs(np.abs(output).sum(dtype=np.float64) - expected["abs_sum"]))
    return max(difference / (RELATIVE_TOLERANCE * max(1.0, float(np.abs(values).max()))),
               sums_apart / (RELATIVE_TOLERANCE * expected["abs_sum"]))


def converted(fixture_name: str, state: dict | None = None) -> tf.keras.Model:
    arch, options, _ = CONVERSIONS[fixture_name]
    fixture = load_seed_fixture(fixture_name)
    return convert_state_dict(arch, state or seeded_state_dict(fixture["state_dict"]), options)


@pytest.mark.parametrize("fixture_name", CONVERSIONS)
def test_converted_model_reproduces_the_original_pytorch_output(fixture_name):
    fixture = load_seed_fixture(fixture_name)
    outputs = keras_outputs(converted(fixture_name), fixture_inputs(fixture))
    for name, output in zip(CONVERSIONS[fixture_name][2], outputs):
        assert largest_difference(output, fixture["expected_outputs"][name]) <= 1, name


def test_the_keras_networks_have_the_original_parameter_counts():
    """VAE-C's fixture counts the whole VAE_age: its encoder and decoder together."""
    count = {name: pytorch_parameter_count(converted(name)) for name in CONVERSIONS}
    assert count["s500mri_clf_2class"] == load_seed_fixture("s500mri_clf_2class")["parameters"] == 635_052
    assert count["s500mri_clf_4class"] == load_seed_fixture("s500mri_clf_4class")["parameters"] == 635_312
    assert count["vae_c_2class_decoder"] == load_seed_fixture("vae_c_2class_decoder")["parameters"] == 465_428
    assert (count["vae_c_2class"] + count["vae_c_2class_decoder"] == load_seed_fixture("vae_c_2class")["parameters"]
            == 2_376_668)


@pytest.mark.parametrize("fixture_name", ["s500mri_clf_2class", "vae_c_2class_decoder"])
def test_spatially_flipped_kernels_fail_the_comparison(fixture_name):
    """The fixtures' discrimination check: the comparison above can fail, and by about as much as the fixture says."""
    fixture = load_seed_fixture(fixture_name)
    flipped = spatially_flipped_kernels(seeded_state_dict(fixture["state_dict"]))
    output = keras_outputs(converted(fixture_name, flipped), fixture_inputs(fixture))[0]
    assert_fails_by_the_published_change(output, fixture, CONVERSIONS[fixture_name][2][0])


def spatially_flipped_kernels(state: dict) -> dict:
    """Every convolution kernel reversed along its three spatial axes: the fixtures' discrimination check."""
    return {key: value[:, :, ::-1, ::-1, ::-1].copy() if value.ndim == 5 else value for key, value in state.items()}


def assert_fails_by_the_published_change(output: np.ndarray, fixture: dict, output_name: str) -> None:
    """The output is far outside the tolerance, and as far from the original's as the fixture says flipping moves
    it (at least half of that, at most 1% more)."""
    expected = fixture["expected_outputs"][output_name]
    change = np.abs(output.ravel()[::expected["stride"]] - np.array(expected["values"])).max()
    published = float(re.search(r"changes the outputs by ([\d.]+)", fixture["discrimination_check"])[1])
    assert largest_difference(output, expected) > 100
    assert published / 2 < change <= published * 1.01


def test_a_whole_vae_checkpoint_gives_each_converter_its_part():
    """VAE_age keeps its networks as ``encoder`` and ``decoder``; its checkpoint holds both."""
    whole = seeded_state_dict(load_seed_fixture("vae_c_2class")["state_dict"])
    decoder = convert_state_dict("vae-c-decoder", whole)
    np.testing.assert_array_equal(decoder.get_layer("up_0_conv").kernel.numpy(),
                                  whole["decoder.decoder.1.weight"].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(decoder.get_layer("reconstruction").bias.numpy(), whole["decoder.decoder.20.bias"])
    encoder = convert_state_dict("vae-c-encoder", whole)
    np.testing.assert_array_equal(encoder.get_layer("z_prior_mean").kernel.numpy(),
                                  whole["encoder.z_cond_age_mean.weight"].T)


@pytest.mark.parametrize("arch", ["vae-c-encoder", "vae-c-decoder"])
@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_a_whole_vae_checkpoint_converts_with_a_passing_self_check(tmp_path, arch):
    """The self-check feeds every input (volume and sex, or the latent) and compares every output."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    whole = seeded_state_dict(load_seed_fixture("vae_c_2class")["state_dict"])
    torch.save({key: torch.from_numpy(value) for key, value in whole.items()}, tmp_path / "vae.pt")
    record = convert(arch, tmp_path / "vae.pt", tmp_path / f"{arch}.h5")
    assert record["self_check"]["status"] == "passed"
    assert record["self_check"]["reference"].endswith({"vae-c-encoder": "VAECEncoder",
                                                       "vae-c-decoder": "VAECDecoder"}[arch])
    assert record["self_check"]["input_shapes_torch"] == (
        {"volume": [1, 1, 128, 128, 128], "sex": [1, 1]} if arch == "vae-c-encoder" else {"z": [1, 16]})


@pytest.mark.parametrize("fixture_name", CONVERSIONS)
def test_pytorch_reference_reproduces_the_original_output(fixture_name):
    """The self-check's reference implementations, against the original's outputs (the encoder's own keys are the
    whole VAE_age's under ``encoder.``)."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    from brainzoo.convert.names import ARCHITECTURES
    from brainzoo.convert.state_dict import network_state
    from brainzoo.models.torch_reference import REFERENCES

    arch, options, names = CONVERSIONS[fixture_name]
    fixture = load_seed_fixture(fixture_name)
    reference = REFERENCES[ARCHITECTURES[arch].builder](**options).eval()
    state = network_state(arch, seeded_state_dict(fixture["state_dict"]))
    reference.load_state_dict({key: torch.from_numpy(value) for key, value in state.items()}, strict=True)
    inputs = [x.transpose(0, 4, 1, 2, 3) if x.ndim == 5 else x for x in fixture_inputs(fixture)]
    with torch.no_grad():
        outputs = reference(*(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    for name, output in zip(names, outputs):
        assert largest_difference(output.numpy(), fixture["expected_outputs"][name]) <= 1, name


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
@pytest.mark.parametrize("checkpoint", UPSTREAM_FORMAT_FILES)
def test_upstream_format_whole_module_pickles_convert_through_the_cli(tmp_path, checkpoint):
    """Files laid out as the upstream clf_2__.pt and clf_4_s_200_wtr.pt (a whole S500MRI_clf, legacy torch.save)."""
    source = SHARED_SEEDS / checkpoint
    if not source.is_file():
        pytest.skip(f"{source} is not there (the shared fixtures folder beside the repository)")
    fixture_name = UPSTREAM_FORMAT_FILES[checkpoint]
    _, options, _ = CONVERSIONS[fixture_name]
    shutil.copy(source, tmp_path / checkpoint)

    result = brainzoo("convert", "--json", "--arch", "s500mri", "--option", f"num_classes={options['num_classes']}",
                      checkpoint, "model.h5", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    record = json.loads(record_path(tmp_path / "model.h5").read_text())
    assert record["self_check"]["status"] == ("passed" if importlib.util.find_spec("torch") else "skipped")
    assert record["keras_model"]["parameters"] == load_seed_fixture(fixture_name)["parameters"]
    fixture = load_seed_fixture(fixture_name)
    loaded = tf.keras.models.load_model(tmp_path / "model.h5", compile=False)
    (logits,) = keras_outputs(loaded, fixture_inputs(fixture))
    assert largest_difference(logits, fixture["expected_outputs"]["logits"]) <= 1


@pytest.mark.parametrize("version_id", CATALOGUE_VERSIONS)
def test_catalogue_versions_convert_with_the_options_and_classes_their_specs_give(version_id):
    """The recipe's --arch and --option, the spec's builder options, parameters and class labels agree."""
    spec = yaml.safe_load((REPO / version_id / "spec.yaml").read_text())
    argv = spec["weights"][0]["recipe"]["argv"]
    options = dict(argv[i + 1].split("=") for i, word in enumerate(argv) if word == "--option")
    assert {key: yaml.safe_load(value) for key, value in options.items()} == spec["architecture"]["options"]
    fixture = load_seed_fixture(CATALOGUE_VERSIONS[version_id])
    model = convert_state_dict(argv[argv.index("--arch") + 1], seeded_state_dict(fixture["state_dict"]),
                               spec["architecture"]["options"])
    assert pytorch_parameter_count(model) == spec["architecture"]["parameters"] == fixture["parameters"]
    assert model.output_shape == (None, len(spec["inference"]["output"]["classes"]))
    covariates = [covariate["name"] for covariate in spec["inference"]["input"]["covariates"]]
    assert model.input_names == ["volume", *covariates]
