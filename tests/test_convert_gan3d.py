"""Generative-models-for-brain-aging's networks (the 3-D DCGAN's generator and discriminator, the encoder that
inverts the generator, the sex classifier) converted from PyTorch, checked against outputs of the ORIGINAL code.

The fixtures in fixtures/seeds/gan3d_*.json are copied from the shared seed fixtures: the original state_dict keys
and shapes, and what the original returned in eval mode for the seeded tensors and the rule-made inputs (64^3
volumes, or latents drawn from the GAN's U(0, 1) prior). The catalogue's generator and encoder go the whole way in
a user's clone: upstream-format checkpoints through `brainzoo get --upstream`, then `brainzoo generate` and
`brainzoo encode` through the CLI, their outputs compared with the original's.
"""

import json
import re

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
import yaml

from brainzoo.convert import convert
from brainzoo.convert.names import ARCHITECTURES
from brainzoo.convert.state_dict import convert_state_dict
from brainzoo.errors import BrainzooError
from brainzoo.models import pytorch_parameter_count
from brainzoo.predict.generative import LATENTS_NAME, read_latents
from conftest import REPO, brainzoo, clone_main, seeded_state_dict, sh
from test_convert import fixture_input
from test_convert_ml_mri import (assert_fails_by_the_published_change, keras_outputs, largest_difference,
                                 load_seed_fixture, spatially_flipped_kernels)

# fixture -> (converter, the fixture's output name)
CONVERSIONS = {
    "gan3d_generator": ("gan3d-generator", "image"),
    "gan3d_discriminator": ("gan3d-discriminator", "probability"),
    "gan3d_encoder": ("gan3d-encoder", "latent"),
    "gan3d_fc_classifier": ("gan3d-classifier", "logit"),
}


def fixture_input_array(fixture: dict) -> np.ndarray:
    """The fixture's input, channels-last: the rule-made volumes, or latents from the generator's prior."""
    if "image" in fixture["inputs"]:
        return fixture_input(fixture["inputs"]["image"]["shape_ncdhw"]).transpose(0, 2, 3, 4, 1)
    return np.random.default_rng(777).uniform(0, 1, (2, 100)).astype(np.float32)


def converted(fixture_name: str, state: dict | None = None) -> tf.keras.Model:
    fixture = load_seed_fixture(fixture_name)
    return convert_state_dict(CONVERSIONS[fixture_name][0], state or seeded_state_dict(fixture["state_dict"]))


@pytest.mark.parametrize("fixture_name", CONVERSIONS)
def test_converted_model_reproduces_the_original_pytorch_output(fixture_name):
    """Within 1e-4 of the output's magnitude, with the original's parameter count (the dropped bn1/bn2 modules of
    the encoder and classifier included: PyTorch counts them though they never act)."""
    fixture = load_seed_fixture(fixture_name)
    model = converted(fixture_name)
    (output,) = keras_outputs(model, [fixture_input_array(fixture)])
    assert largest_difference(output, fixture["expected_outputs"][CONVERSIONS[fixture_name][1]]) <= 1
    unused = ARCHITECTURES[CONVERSIONS[fixture_name][0]].unused
    unused_parameters = sum(int(np.prod(shape)) for key, shape in fixture["state_dict"].items()
                            if unused and re.fullmatch(unused, key) and key.endswith(("weight", "bias")))
    assert pytorch_parameter_count(model) + unused_parameters == fixture["parameters"]


@pytest.mark.parametrize("fixture_name", ["gan3d_discriminator", "gan3d_fc_classifier"])
def test_spatially_flipped_kernels_fail_the_comparison(fixture_name):
    """The fixtures' discrimination check: the comparison above can fail, and by about as much as the fixture says."""
    fixture = load_seed_fixture(fixture_name)
    flipped = spatially_flipped_kernels(seeded_state_dict(fixture["state_dict"]))
    (output,) = keras_outputs(converted(fixture_name, flipped), [fixture_input_array(fixture)])
    assert_fails_by_the_published_change(output, fixture, CONVERSIONS[fixture_name][1])


def test_only_the_modules_the_original_never_calls_are_dropped():
    """The encoder's checkpoint holds each block's unused bn1; any other key the network lacks is still refused."""
    state = seeded_state_dict(load_seed_fixture("gan3d_encoder")["state_dict"])
    state["resblock1.bn3.weight"] = np.ones(16, np.float32)
    with pytest.raises(BrainzooError, match=r"unexpected key: resblock1\.bn3\.weight$"):
        convert_state_dict("gan3d-encoder", state)


@pytest.mark.parametrize("fixture_name", CONVERSIONS)
def test_pytorch_reference_reproduces_the_original_output(fixture_name):
    """The self-check's reference implementations load the original keys strictly and give the original's output."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    from brainzoo.models.torch_reference import REFERENCES

    fixture = load_seed_fixture(fixture_name)
    arch, output_name = CONVERSIONS[fixture_name]
    reference = REFERENCES[ARCHITECTURES[arch].builder]().eval()
    reference.load_state_dict({key: torch.from_numpy(value)
                               for key, value in seeded_state_dict(fixture["state_dict"]).items()}, strict=True)
    x = fixture_input_array(fixture)
    with torch.no_grad():
        output = reference(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3) if x.ndim == 5 else x)))
    assert largest_difference(output.numpy(), fixture["expected_outputs"][output_name]) <= 1


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_a_discriminator_checkpoint_converts_with_a_passing_self_check(tmp_path):
    """``convert --arch gan3d-discriminator``: the registry's converter, the written record, the self-check."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    fixture = load_seed_fixture("gan3d_discriminator")
    state = seeded_state_dict(fixture["state_dict"])
    torch.save({key: torch.from_numpy(value) for key, value in state.items()}, tmp_path / "discriminator.pth")

    record = convert("gan3d-discriminator", tmp_path / "discriminator.pth", tmp_path / "d.h5")

    assert json.loads((tmp_path / "d.json").read_text()) == record
    assert record["self_check"]["status"] == "passed"
    assert record["self_check"]["reference"].endswith("GAN3DDiscriminator")
    assert record["keras_model"]["parameters"] == fixture["parameters"]


CATALOGUE_VERSIONS = {"neuronets/brain-aging-gan3d/1.0.0/generator": "gan3d_generator",
                      "neuronets/brain-aging-gan3d/1.0.0/encoder": "gan3d_encoder",
                      "neuronets/brain-aging-gan3d/1.0.0/sex-classifier": "gan3d_fc_classifier"}


@pytest.mark.parametrize("version_id", CATALOGUE_VERSIONS)
def test_catalogue_versions_convert_with_the_options_and_grid_their_specs_give(version_id):
    """The recipe's --arch and --option agree with the spec's builder options, parameters and input grid (the
    generator's: the grid of what it makes)."""
    spec = yaml.safe_load((REPO / version_id / "spec.yaml").read_text())
    argv = spec["weights"][0]["recipe"]["argv"]
    options = {key: yaml.safe_load(value)
               for key, value in (argv[i + 1].split("=", 1) for i, word in enumerate(argv) if word == "--option")}
    arch = argv[argv.index("--arch") + 1]
    assert options.items() <= spec["architecture"]["options"].items()
    model = convert_state_dict(arch, seeded_state_dict(load_seed_fixture(CATALOGUE_VERSIONS[version_id])["state_dict"]),
                               spec["architecture"]["options"])
    assert pytorch_parameter_count(model) == spec["architecture"]["parameters"]
    grid = model.output_shape if arch == "gan3d-generator" else model.input_shape
    assert list(grid[1:]) == [*spec["inference"]["input"]["shape"], 1]


@pytest.mark.parametrize("input_shape", [(58, 70, 58, 1), (17, 20, 18, 1)])
def test_the_mri_autoencoder_is_pytorchs_with_its_output_paddings(input_shape):
    """At the published 58x70x58 (output paddings (1, 0, 1), (0, 1, 0), (1, 1, 1), 0) and at other odd sizes, the
    Keras autoencoder holding the reference's tensors gives what PyTorch's ConvTranspose3d gives; flipped kernels
    do not. (No output of the original's own code is published for it.)"""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    from brainzoo.models.torch_reference import MRIAutoencoder

    options = {"input_shape": input_shape, "n_features": 2, "bottleneck": 8}
    reference = MRIAutoencoder(**options).eval()
    state = seeded_state_dict({key: list(value.shape) for key, value in reference.state_dict().items()})
    reference.load_state_dict({key: torch.from_numpy(value) for key, value in state.items()})
    volume = np.random.default_rng(0).standard_normal((1, 1, *input_shape[:3])).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(volume)).numpy()
    (output,) = keras_outputs(convert_state_dict("mri-autoencoder", state, options), [volume.transpose(0, 2, 3, 4, 1)])
    (flipped,) = keras_outputs(convert_state_dict("mri-autoencoder", spatially_flipped_kernels(state), options),
                               [volume.transpose(0, 2, 3, 4, 1)])
    tolerance = 1e-4 * max(1.0, float(np.abs(expected).max()))
    assert output.shape == expected.shape == (1, 1, *input_shape[:3])
    assert np.abs(output - expected).max() <= tolerance < np.abs(flipped - expected).max() / 100


GENERATOR, ENCODER = "neuronets/brain-aging-gan3d/1.0.0/generator", "neuronets/brain-aging-gan3d/1.0.0/encoder"


@pytest.fixture(scope="module")
def converted_gan(tmp_path_factory):
    """A user's clone of main with the generator and encoder converted by ``get --upstream`` from checkpoints in
    the upstream's format (plain state_dicts under the upstream's file names) holding the fixtures' seeded tensors."""
    torch = pytest.importorskip("torch", reason="writing upstream-format checkpoints needs torch")
    root = tmp_path_factory.mktemp("gan-user")
    clone = clone_main(REPO, root / "brainzoo")
    for version_id, fixture_name in ((GENERATOR, "gan3d_generator"), (ENCODER, "gan3d_encoder")):
        spec = yaml.safe_load((clone / version_id / "spec.yaml").read_text())
        checkpoint = root / spec["weights"][0]["upstream"]["file"].rsplit("/", 1)[1]
        state = seeded_state_dict(load_seed_fixture(fixture_name)["state_dict"])
        torch.save({key: torch.from_numpy(value) for key, value in state.items()}, checkpoint)
        proc = brainzoo("get", version_id, "--upstream", str(checkpoint), "--allow-unverified", "--json", cwd=clone)
        assert proc.returncode == 0, proc.stderr
        [record] = [r for r in map(json.loads, proc.stdout.splitlines()) if r["action"] == "get"]
        assert record["status"] == "ok" and record["upstream_verified"] is False
        entry = yaml.safe_load((clone / version_id / "spec.yaml").read_text())["weights"][0]
        assert entry["conversion"]["self_check"]["status"] == "passed"
    assert sh("git", "status", "--porcelain", cwd=clone).stdout == ""  # saved with DataLad
    return clone


def test_generate_on_the_converted_generator_makes_the_original_codes_volumes(converted_gan, tmp_path):
    """``brainzoo generate --n 2 --seed 777`` draws the fixture's latents (U(0, 1) from numpy's generator seeded with
    777): the samples written are the original PyTorch generator's output for them, on the spec's 3.4 mm grid."""
    proc = brainzoo("generate", GENERATOR, str(tmp_path / "samples"), "--n", "2", "--seed", "777", cwd=converted_gan)
    assert proc.returncode == 0, proc.stderr
    fixture = load_seed_fixture("gan3d_generator")
    np.testing.assert_array_equal(read_latents(tmp_path / "samples" / LATENTS_NAME), fixture_input_array(fixture))
    samples = [nib.load(tmp_path / "samples" / f"sample-{i:03d}.nii.gz") for i in range(2)]
    assert all(np.allclose(nib.affines.voxel_sizes(s.affine), 3.4) for s in samples)
    images = np.stack([np.asarray(s.dataobj) for s in samples])[:, None]
    assert largest_difference(images, fixture["expected_outputs"]["image"]) <= 1


def test_encode_on_the_converted_encoder_gives_the_original_codes_latents(converted_gan, tmp_path):
    """``brainzoo encode --preprocessed`` on the fixture's two volumes (as 64^3 NIfTI files) writes what the original
    PyTorch encoder returned for them; on volumes ``generate`` made, what the PyTorch reference returns."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    from brainzoo.models.torch_reference import REFERENCES

    fixture = load_seed_fixture("gan3d_encoder")
    volumes = fixture_input_array(fixture)[..., 0]
    scans = [tmp_path / f"volume-{i}.nii.gz" for i in range(len(volumes))]
    for volume, scan in zip(volumes, scans):
        nib.Nifti1Image(volume, np.diag([3.4, 3.4, 3.4, 1.0])).to_filename(scan)
    proc = brainzoo("encode", ENCODER, *map(str, scans), "--preprocessed", "--out", str(tmp_path / "z.csv"),
                    cwd=converted_gan)
    assert proc.returncode == 0, proc.stderr
    assert largest_difference(read_latents(tmp_path / "z.csv"), fixture["expected_outputs"]["latent"]) <= 1

    proc = brainzoo("generate", GENERATOR, str(tmp_path / "samples"), "--n", "3", "--seed", "4", cwd=converted_gan)
    assert proc.returncode == 0, proc.stderr
    samples = sorted((tmp_path / "samples").glob("sample-*.nii.gz"))
    proc = brainzoo("encode", ENCODER, *map(str, samples), "--preprocessed", "--out", str(tmp_path / "g.csv"),
                    cwd=converted_gan)
    assert proc.returncode == 0, proc.stderr
    reference = REFERENCES[ARCHITECTURES["gan3d-encoder"].builder]().eval()
    reference.load_state_dict({key: torch.from_numpy(value)
                               for key, value in seeded_state_dict(fixture["state_dict"]).items()}, strict=True)
    images = np.stack([np.asarray(nib.load(sample).dataobj, dtype=np.float32) for sample in samples])[:, None]
    with torch.no_grad():
        expected = reference(torch.from_numpy(images)).numpy()
    latents = read_latents(tmp_path / "g.csv")
    assert latents.shape == (3, 100)
    assert np.abs(latents - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))
