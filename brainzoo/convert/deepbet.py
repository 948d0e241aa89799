"""deepbet's TorchScript networks -> the Keras models of :mod:`brainzoo.models.deepbet`.

The two ``.pt`` files are read straight from the installed deepbet package. Before any tensor is copied the
TorchScript graph of every convolution, norm and pooling module is compared with the Keras layer of the same name,
so a deepbet release with another architecture fails loudly instead of converting into a model that computes
something else. Tensors are then mapped by name; a tensor without a Keras home or a Keras weight without a tensor
is an error that lists the names. Run through the registry: ``brainzoo convert --arch deepbet-bbox DST.h5``.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from brainzoo.errors import BrainzooError
from brainzoo.fileio import sha256_of
from brainzoo.models.deepbet import (BBOX_INPUT_SHAPE, SEGMENTATION_INPUT_SHAPE, InstanceNormalization,
                                     deepbet_bbox, deepbet_segmentation)

layers = tf.keras.layers

DEEPBET_VERSION = "1.0.2"
SELF_CHECK_SEED = 0
# Softmax outputs of the two runtimes on the self-check phantom agree to float32 rounding over some 40 layers.
SELF_CHECK_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Network:
    """One of deepbet's networks: its file inside the package (with the release's sha256: loading TorchScript
    deserialises code, so only those exact bytes are read) and the Keras builder that reproduces it."""

    name: str
    torchscript_file: str
    sha256: str
    builder: Callable[..., tf.keras.Model]
    input_shape: tuple[int, int, int, int]


NETWORKS = {
    "bbox": Network("bbox", "bbox_model.pt", "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa",
                    deepbet_bbox, BBOX_INPUT_SHAPE),
    "segmentation": Network("segmentation", "model.pt",
                            "de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd",
                            deepbet_segmentation, SEGMENTATION_INPUT_SHAPE),
}


def _import_torch():
    try:
        import torch
    except ImportError:
        raise BrainzooError("torch is not installed; converting deepbet needs the development requirements "
                            "(pip install -r env/requirements-dev.in)") from None
    return torch


def torchscript_path(network: Network) -> Path:
    """The network's file in the installed deepbet package, which must be the release this module maps, byte for
    byte."""
    try:
        version = importlib.metadata.version("deepbet")
        from deepbet.utils import DATA_PATH
    except (importlib.metadata.PackageNotFoundError, ImportError):
        raise BrainzooError(f"deepbet {DEEPBET_VERSION} is not installed; converting it needs the development "
                            "requirements (pip install -r env/requirements-dev.in)") from None
    if version != DEEPBET_VERSION:
        raise BrainzooError(f"deepbet {version} is installed; this converter maps deepbet {DEEPBET_VERSION}")
    path = Path(DATA_PATH) / "models" / network.torchscript_file
    if not path.is_file():
        raise BrainzooError(f"{path}: missing from the deepbet {version} installation")
    if sha256_of(path) != network.sha256:
        raise BrainzooError(f"{path}: not deepbet {version}'s {network.torchscript_file} (sha256 differs from "
                            f"{network.sha256}); it is not loaded")
    return path


def load_torchscript(path: Path):
    torch = _import_torch()
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as err:
        raise BrainzooError(f"{path}: cannot load as TorchScript: {err}") from None


def _graph_constant(value):
    """A constant argument of a graph node, list arguments included."""
    node = value.node()
    if node.kind() == "prim::ListConstruct":
        return tuple(_graph_constant(item) for item in node.inputs())
    if node.kind() == "prim::Constant":
        return value.toIValue()
    return "tensor"


def torchscript_settings(module) -> dict[str, dict]:
    """What each convolution, norm and pooling module of a TorchScript network computes, read from the
    arguments of its single aten call, keyed by module path."""
    calls = {"Conv3d": "aten::_convolution", "ConvTranspose3d": "aten::_convolution",
             "InstanceNorm3d": "aten::instance_norm", "MaxPool3d": "aten::max_pool3d"}
    settings = {}
    for path, submodule in module.named_modules():
        kind = submodule.original_name
        if kind not in calls:
            continue
        nodes = [node for node in submodule.graph.nodes() if node.kind() == calls[kind]]
        if len(nodes) != 1:
            raise BrainzooError(f"{path}: expected one {calls[kind]} call in this {kind}, found {len(nodes)}")
        args = [_graph_constant(value) for value in list(nodes[0].inputs())[1:]]
        if kind in ("Conv3d", "ConvTranspose3d"):
            _, bias, stride, padding, dilation, transposed, output_padding, groups = args[:8]
            settings[path] = {"op": "convolution", "kernel": tuple(submodule.weight.shape[2:]),
                              "bias": bias is not None, "stride": stride, "padding": padding,
                              "dilation": dilation, "transposed": transposed,
                              "output_padding": output_padding, "groups": groups}
        elif kind == "InstanceNorm3d":
            weight, bias, _, _, use_input_stats, _, eps, _ = args
            settings[path] = {"op": "instance_norm", "affine": weight is not None or bias is not None,
                              "use_input_stats": use_input_stats, "eps": eps}
        else:
            kernel, stride, padding, dilation, ceil_mode = args
            settings[path] = {"op": "max_pool", "kernel": kernel, "stride": stride, "padding": padding,
                              "dilation": dilation, "ceil_mode": ceil_mode}
    return settings


def _pad_or_crop(model: tf.keras.Model, name: str, config_key: str) -> tuple[tuple[int, int], ...]:
    """Per-axis (start, end) padding or cropping of the helper layer ``name``; zeros when there is none."""
    try:
        pairs = model.get_layer(name).get_config()[config_key]
    except ValueError:
        return ((0, 0),) * 3
    return tuple((int(start), int(end)) for start, end in pairs)


def _symmetric(pairs: tuple[tuple[int, int], ...]) -> tuple:
    """PyTorch's one number per axis where start and end agree; the pair where they do not (never PyTorch's)."""
    return tuple(start if start == end else (start, end) for start, end in pairs)


def keras_settings(model: tf.keras.Model) -> dict[str, dict]:
    """The same description as :func:`torchscript_settings` for the Keras layers, keyed by layer name.

    Keras ``"same"`` padding counts as PyTorch's symmetric (k - 1) / 2 only at stride 1; with a stride
    it pads unevenly and is reported as ``"same"``, which no TorchScript module matches.
    """
    settings = {}
    for layer in model.layers:
        if isinstance(layer, layers.Conv3D):
            transposed = isinstance(layer, layers.Conv3DTranspose)
            output_padding = (0, 0, 0)
            if layer.padding == "same":
                padding = tuple((k - 1) // 2 for k in layer.kernel_size) if set(layer.strides) == {1} else "same"
            elif transposed:
                crop = _pad_or_crop(model, f"{layer.name}_crop", "cropping")
                padding = tuple(start for start, _ in crop)
                output_padding = tuple(start - end for start, end in crop)
            else:
                padding = _symmetric(_pad_or_crop(model, f"{layer.name}_pad", "padding"))
            settings[layer.name] = {"op": "convolution", "kernel": layer.kernel_size, "bias": layer.use_bias,
                                    "stride": layer.strides, "padding": padding, "dilation": layer.dilation_rate,
                                    "transposed": transposed, "output_padding": output_padding,
                                    "groups": layer.groups}
        elif isinstance(layer, InstanceNormalization):
            settings[layer.name] = {"op": "instance_norm", "affine": False, "use_input_stats": True,
                                    "eps": layer.epsilon}
        elif isinstance(layer, layers.MaxPooling3D):
            padding = _symmetric(_pad_or_crop(model, f"{layer.name}_pad", "padding"))
            settings[layer.name] = {"op": "max_pool", "kernel": layer.pool_size, "stride": layer.strides,
                                    "padding": padding if layer.padding == "valid" else "same",
                                    "dilation": (1, 1, 1), "ceil_mode": False}
    return settings


def keras_layer_name(module_path: str) -> str:
    """The Keras layer that reproduces a TorchScript module (see :mod:`brainzoo.models.deepbet`)."""
    return module_path.replace(".", "_")


def check_architecture(module, model: tf.keras.Model, source: Path) -> None:
    """Every convolution, norm and pooling of the TorchScript graph has a Keras layer of the same name
    that computes the same thing, and the Keras model has no such layer of its own."""
    expected = {keras_layer_name(path): value for path, value in torchscript_settings(module).items()}
    actual = keras_settings(model)
    problems = [f"{name}: no Keras layer" for name in sorted(expected.keys() - actual.keys())]
    problems += [f"{name}: no TorchScript module" for name in sorted(actual.keys() - expected.keys())]
    problems += [f"{name}: TorchScript {expected[name]} but Keras {actual[name]}"
                 for name in sorted(expected.keys() & actual.keys()) if expected[name] != actual[name]]
    if problems:
        raise BrainzooError(f"{source}: the Keras {model.name} does not match this graph:\n  " + "\n  ".join(problems))


def keras_arrays(module, model: tf.keras.Model, source: Path) -> dict[tuple[str, str], np.ndarray]:
    """Every TorchScript tensor in Keras layout, keyed by (Keras layer, ``kernel`` or ``bias``).

    Convolution weights are (out, in, d, h, w) in PyTorch and (d, h, w, in, out) in Keras; transposed
    ones are (in, out, d, h, w) and (d, h, w, out, in). One permutation serves both.
    """
    convolutions = {layer.name: layer for layer in model.layers if isinstance(layer, layers.Conv3D)}
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    arrays, unmapped = {}, []
    for name, tensor in tensors.items():
        module_path, _, kind = name.rpartition(".")
        layer = convolutions.get(keras_layer_name(module_path))
        slot = {"weight": "kernel", "bias": "bias"}.get(kind)
        if layer is None or slot is None or (slot == "bias" and not layer.use_bias):
            unmapped.append(name)
            continue
        array = tensor.detach().cpu().numpy()
        arrays[layer.name, slot] = array.transpose(2, 3, 4, 1, 0) if slot == "kernel" else array
    expected = [(layer.name, "kernel") for layer in convolutions.values()]
    expected += [(layer.name, "bias") for layer in convolutions.values() if layer.use_bias]
    missing = [f"{name}.{slot}" for name, slot in expected if (name, slot) not in arrays]
    if unmapped or missing:
        raise BrainzooError(f"{source}: tensors do not map onto {model.name}; "
                            f"TorchScript tensors with no Keras weight: {', '.join(unmapped) or 'none'}; "
                            f"Keras weights with no TorchScript tensor: {', '.join(missing) or 'none'}")
    return arrays


def assign_weights(model: tf.keras.Model, arrays: dict[tuple[str, str], np.ndarray], source: Path) -> None:
    for (layer_name, slot), array in arrays.items():
        variable = getattr(model.get_layer(layer_name), slot)
        if tuple(variable.shape) != array.shape:
            raise BrainzooError(f"{source}: {layer_name}.{slot} has shape {array.shape} after conversion, "
                                f"the Keras layer wants {tuple(variable.shape)}")
        variable.assign(array)


def subnormal_fraction(arrays: Sequence[np.ndarray]) -> float:
    """Share of float32 values that are subnormal (nonzero, below the smallest normal): CPUs run those
    many times slower unless they are flushed to zero."""
    values = np.concatenate([np.ravel(a) for a in arrays]).astype(np.float32)
    subnormal = (values != 0) & (np.abs(values) < np.finfo(np.float32).tiny)
    return float(subnormal.mean())


def self_check_input(input_shape: Sequence[int], seed: int = SELF_CHECK_SEED) -> np.ndarray:
    """A head-like volume on the network's scale (deepbet feeds mean 0.449, sd 0.226): a bright
    ellipsoid in a dimmer shell, on seeded noise. Batch of one, channels last."""
    spatial = input_shape[:3]
    grid = np.meshgrid(*[np.linspace(-1, 1, size, dtype=np.float32) for size in spatial], indexing="ij")
    radius = np.sqrt(sum((axis / scale) ** 2 for axis, scale in zip(grid, (0.7, 0.8, 0.75))))
    volume = np.where(radius < 0.8, 1.0, np.where(radius < 0.95, 0.5, 0.0)).astype(np.float32)
    volume += np.random.default_rng(seed).normal(0, 0.05, spatial).astype(np.float32)
    volume = 0.226 * (volume - volume.mean()) / volume.std() + 0.449
    return volume[None, ..., None].astype(np.float32)


def max_abs_difference(module, model: tf.keras.Model, volume: np.ndarray) -> float:
    """Largest difference between the two networks' softmax outputs on ``volume`` (batch, d, h, w, 1)."""
    torch = _import_torch()
    with torch.no_grad():
        reference = module(torch.from_numpy(np.moveaxis(volume, -1, 1).copy())).numpy()
    ours = model(volume, training=False).numpy()
    return float(np.abs(np.moveaxis(reference, 1, -1) - ours).max())


def keras_from_torchscript(network: Network):
    """The Keras network at its published size with the TorchScript weights, checked against the graph;
    also the TorchScript module itself and the file it came from."""
    source = torchscript_path(network)
    module = load_torchscript(source)
    model = network.builder(network.input_shape)
    check_architecture(module, model, source)
    assign_weights(model, keras_arrays(module, model, source), source)
    return model, module, source


def convert_network(name: str) -> tuple[tf.keras.Model, dict, dict]:
    """The Keras twin of deepbet's ``name`` network, what was read (package, file, sha256) and the self-check."""
    torch = _import_torch()
    model, module, source = keras_from_torchscript(NETWORKS[name])
    difference = max_abs_difference(module, model, self_check_input(NETWORKS[name].input_shape))
    read = {"file": f"data/models/{NETWORKS[name].torchscript_file}", "size": source.stat().st_size,
            "sha256": NETWORKS[name].sha256, "package": f"deepbet {DEEPBET_VERSION}"}
    check = {"status": "passed" if difference <= SELF_CHECK_TOLERANCE else "failed",
             "reference": "the TorchScript network itself", "torch": str(torch.__version__),
             "input": f"self_check_input(seed={SELF_CHECK_SEED}): a head-like phantom on deepbet's intensity scale",
             "max_abs_difference": difference, "tolerance": SELF_CHECK_TOLERANCE,
             "subnormal_fraction": {"torchscript": subnormal_fraction([t.detach().numpy() for t in module.parameters()]),
                                    "keras": subnormal_fraction(model.get_weights())}}
    return model, read, check
