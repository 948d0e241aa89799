"""PyTorch -> Keras conversion, checked against outputs of the ORIGINAL PyTorch code.

Each fixture in fixtures/conversion/ gives the original state_dict keys and shapes, a rule that fills
them with values, a rule that makes an input, and what the original code returned for both; both
rules are implemented here. A converter that flips kernels, mixes up axes or misses a layer cannot
reproduce those numbers.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from brainzoo.convert import convert, record_path, record_problems
from brainzoo.convert.names import ARCHITECTURES
from brainzoo.convert.state_dict import convert_state_dict, read_checkpoint
from brainzoo.errors import BrainzooError
from brainzoo.models import pytorch_parameter_count
from conftest import load_fixture, seeded_state_dict

# The shared folder beside the repository, where the original checkpoint files are (not needed otherwise).
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "conversion"
ARCHITECTURE_OF_FIXTURE = {
    "sfcn_peng2021": "sfcn",
    "agemapper_1mm": "agemapper-1mm",
    "agemapper_2mm": "agemapper-2mm",
    "densenet169_flair": "densenet169",
    "inception_resnet_v2_flair": "inception-resnet-v2",
}
SHARED_CHECKPOINTS = {"sfcn_peng2021.legacy.p": "sfcn_peng2021", "agemapper_1mm.pth": "agemapper_1mm"}


def fixture_input(shape_ncdhw) -> np.ndarray:
    """The fixtures' ``input_rule``: a smooth pattern (flipped in depth for odd samples) plus seeded noise."""
    n, _, d, h, w = shape_ncdhw
    z = np.linspace(0, 1, d)[:, None, None]
    y = np.linspace(0, 1, h)[None, :, None]
    x = np.linspace(0, 1, w)[None, None, :]
    base = (np.sin(2 * np.pi * 3 * z) * np.cos(2 * np.pi * 2 * y) + 0.5 * np.sin(2 * np.pi * 5 * x + 1)
            + 2 * z - y + 0.3 * x * y)
    noise = np.random.default_rng(12345).standard_normal((n, 1, d, h, w)) * 0.1
    samples = [(base if i % 2 == 0 else base[::-1, :, :]) + noise[i, 0] for i in range(n)]
    return np.stack(samples)[:, None].astype(np.float32)


def expected_output(fixture: dict) -> np.ndarray:
    return np.array(fixture["expected_output"], np.float32).reshape(fixture["expected_output_shape"])


def assert_reproduces(output: np.ndarray, expected: np.ndarray) -> None:
    """The fixtures' ``suggested_tolerance``: max abs diff <= 1e-4 * max(1, max |expected|)."""
    assert output.shape == expected.shape
    tolerance = 1e-4 * max(1.0, float(np.abs(expected).max()))
    assert np.abs(output - expected).max() <= tolerance


def keras_predict(model: tf.keras.Model, volume_ncdhw: np.ndarray) -> np.ndarray:
    """One sample at a time, to keep full-size activations of two samples out of memory together."""
    volume = volume_ncdhw.transpose(0, 2, 3, 4, 1)
    return np.concatenate([model(volume[i:i + 1], training=False).numpy() for i in range(len(volume))])


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="PyTorch is not installed")


def save_checkpoint(torch, state: dict, path: Path) -> Path:
    torch.save({key: torch.from_numpy(np.asarray(value)) for key, value in state.items()}, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("fixture_name", ARCHITECTURE_OF_FIXTURE)
def test_converted_model_reproduces_the_original_pytorch_output(fixture_name):
    fixture = load_fixture(fixture_name)
    model = convert_state_dict(ARCHITECTURE_OF_FIXTURE[fixture_name], seeded_state_dict(fixture["state_dict"]))
    assert pytorch_parameter_count(model) == fixture["parameters"]
    assert_reproduces(keras_predict(model, fixture_input(fixture["input_shape_ncdhw"])), expected_output(fixture))


@pytest.mark.slow
@pytest.mark.parametrize("fixture_name", ARCHITECTURE_OF_FIXTURE)
def test_pytorch_reference_reproduces_the_original_output(torch, fixture_name):
    from brainzoo.models.torch_reference import REFERENCES

    fixture = load_fixture(fixture_name)
    spec = ARCHITECTURES[ARCHITECTURE_OF_FIXTURE[fixture_name]]
    reference = REFERENCES[spec.builder](**spec.fixed_options).eval()
    reference.load_state_dict({key: torch.from_numpy(value)
                               for key, value in seeded_state_dict(fixture["state_dict"]).items()}, strict=True)
    assert sum(p.numel() for p in reference.parameters()) == fixture["parameters"]
    with torch.no_grad():
        output = reference(torch.from_numpy(fixture_input(fixture["input_shape_ncdhw"]))).numpy()
    assert_reproduces(output, expected_output(fixture))


def test_a_shallow_narrow_densenet_computes_what_the_reference_with_those_options_does(torch):
    """The depth and width options mean what MONAI's block_config, growth_rate and init_features mean."""
    from brainzoo.convert.state_dict import self_check
    from brainzoo.models.torch_reference import DenseNet169

    options = {"block_layers": (2, 1, 3, 1), "growth_rate": 4, "stem_features": 8}
    shapes = {key: list(tensor.shape) for key, tensor in DenseNet169(**options).state_dict().items()}
    state = seeded_state_dict(shapes)
    model = convert_state_dict("densenet169", state, {**options, "input_shape": (29, 33, 31, 1)})
    assert self_check("densenet169", model, state, options)["status"] == "passed"


@pytest.fixture(scope="module")
def agemapper_state():
    return seeded_state_dict(load_fixture("agemapper_1mm")["state_dict"])


def without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


BAD_STATES = {
    "missing key": (lambda state: without(state, "FullyConnected.FullyConnected_1.bias"),
                    "1 missing key: FullyConnected.FullyConnected_1.bias"),
    "extra key": (lambda state: {**state, "FullyConnected.FullyConnected_0.weight": np.zeros((1, 1), np.float32)},
                  "1 unexpected key: FullyConnected.FullyConnected_0.weight"),
    "wrong shape": (lambda state: {**state, "Feature_Extractor.Convolution_1.0.weight": np.zeros((64, 32, 3, 3, 1))},
                    r"Feature_Extractor.Convolution_1.0.weight has shape \(64, 32, 3, 3, 1\), "
                    r"agemapper-1mm needs \(64, 32, 3, 3, 3\)"),
    "wrong architecture": (lambda state: seeded_state_dict(load_fixture("sfcn_peng2021")["state_dict"]),
                           "does not match the agemapper-1mm architecture: "
                           "31 missing keys: Feature_Extractor.Convolution_0.0.weight"
                           ".*44 unexpected keys: classifier.conv_6.bias"),
}


@pytest.mark.parametrize("damage", BAD_STATES)
def test_a_bad_state_dict_is_refused_naming_its_keys(agemapper_state, damage):
    change, message = BAD_STATES[damage]
    with pytest.raises(BrainzooError, match=message):
        convert_state_dict("agemapper-1mm", change(agemapper_state), source="weights.pth")


def test_data_parallel_prefix_and_missing_batch_counters_are_accepted(agemapper_state):
    legacy = {f"module.{key}": value for key, value in agemapper_state.items()
              if not key.endswith("num_batches_tracked")}
    model = convert_state_dict("agemapper-1mm", legacy)
    np.testing.assert_array_equal(model.get_layer("conv_0_bn").get_weights()[3],
                                  agemapper_state["Feature_Extractor.Convolution_0.1.running_var"])


@pytest.mark.parametrize("arch, options, message", [
    ("resnet50", None, "resnet50: unknown architecture"),
    ("sfcn", {"bins": 40}, "sfcn: unknown options bins"),
    ("sfcn", {"weights": "x.h5"}, "sfcn: unknown options weights"),
    ("agemapper-2mm", {"resolution": "1mm"}, "contradict the architecture name"),
])
def test_bad_architecture_or_options_are_refused(arch, options, message):
    with pytest.raises(BrainzooError, match=message):
        convert_state_dict(arch, {}, options)


@pytest.mark.parametrize("damage", [*BAD_STATES, "truncated", "not a checkpoint"])
def test_a_bad_checkpoint_file_writes_nothing(torch, tmp_path, agemapper_state, damage):
    source = save_checkpoint(torch, BAD_STATES[damage][0](agemapper_state) if damage in BAD_STATES else agemapper_state,
                             tmp_path / "weights.pth")
    if damage == "truncated":
        source.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    if damage == "not a checkpoint":
        source.write_text("hello")
    message = BAD_STATES[damage][1] if damage in BAD_STATES else "not a readable PyTorch checkpoint"
    with pytest.raises(BrainzooError, match=f"weights.pth: .*{message}"):
        convert("agemapper-1mm", source, tmp_path / "agemapper.h5")
    assert [p.name for p in tmp_path.iterdir()] == ["weights.pth"]


@pytest.mark.parametrize("container", ["state_dict", "model"])
def test_a_state_dict_inside_a_training_checkpoint_is_found(torch, tmp_path, container):
    state = {"layer.weight": torch.ones(2, 3)}
    torch.save({"epoch": 7, container: state, "optimizer": {"lr": 0.1}}, tmp_path / "checkpoint.pth")
    assert list(read_checkpoint(tmp_path / "checkpoint.pth")) == ["layer.weight"]


def test_a_checkpoint_without_tensors_is_refused(torch, tmp_path):
    torch.save({"epoch": 7, "optimizer": {"lr": 0.1}}, tmp_path / "checkpoint.pth")
    with pytest.raises(BrainzooError, match="checkpoint.pth: holds no state_dict of tensors .*epoch, optimizer"):
        read_checkpoint(tmp_path / "checkpoint.pth")


def test_an_existing_output_is_kept_without_force(tmp_path):
    (tmp_path / "model.h5").write_text("keep me")
    with pytest.raises(BrainzooError, match="model.h5: already exists"):
        convert("sfcn", tmp_path / "weights.p", tmp_path / "model.h5")
    assert (tmp_path / "model.h5").read_text() == "keep me"
    assert not record_path(tmp_path / "model.h5").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
@pytest.mark.parametrize("checkpoint", SHARED_CHECKPOINTS)
def test_original_checkpoint_files_convert(torch, tmp_path, checkpoint):
    source = SHARED_FIXTURES / checkpoint
    if not source.is_file():
        pytest.skip(f"{source} is not there (the shared fixtures folder beside the repository)")
    fixture_name = SHARED_CHECKPOINTS[checkpoint]
    arch = ARCHITECTURE_OF_FIXTURE[fixture_name]
    destination = tmp_path / f"{fixture_name}.h5"

    record = convert(arch, source, destination)

    assert json.loads(record_path(destination).read_text()) == json.loads(json.dumps(record))
    assert record_problems(record) == []
    assert record["converter"] == arch
    assert record["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert record["keras_model"]["sha256"] == hashlib.sha256(destination.read_bytes()).hexdigest()
    # Recorded so the size of the head (an SFCN's age bins) can be checked against a spec that installs the file.
    fixture = load_fixture(fixture_name)
    assert list(record["keras_model"]["output_shapes"].values()) == [fixture["expected_output_shape"][1:]]
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["tensorflow"] == tf.__version__
    assert record["self_check"]["status"] == "passed"
    assert record["self_check"]["max_abs_difference"] <= record["self_check"]["tolerance"]
    # The files hold the fixture's seeded tensors, so the saved model gives the original's output.
    loaded = tf.keras.models.load_model(destination, compile=False)
    first_sample = fixture_input(fixture["input_shape_ncdhw"])[:1]
    assert_reproduces(keras_predict(loaded, first_sample), expected_output(fixture)[:1])
