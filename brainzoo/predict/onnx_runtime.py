"""A saved Keras U-Net run by ONNX Runtime, without importing TensorFlow.

Importing TensorFlow and loading a Keras .h5 is most of a one-scan brain extraction with a small network on our
2-core machines; ONNX Runtime starts in a fraction of that and runs the same network about as fast, so the
whole process takes about half the time (``benchmarks/bench_brain_mask.py`` runs the student both ways).
The ONNX graph is built in memory from the .h5 file itself (its ``model_config`` and weights, read with h5py),
so it runs exactly the bytes the catalogue checksums; nothing else is stored or cached.

Layers mapped (what :func:`brainzoo.models.unet.unet` and nobrainer's U-Nets are made of): ``InputLayer``,
``Conv3D`` ("same" with odd kernels, or "valid"), ``Conv3DTranspose`` (kernel = strides), ``MaxPooling3D``
("valid"), ``BatchNormalization`` (inference statistics), ``GroupNormalization`` with one group per channel
(instance normalisation), ``Activation`` / ``ReLU`` (linear, relu, sigmoid, softmax), ``Concatenate``,
``Dropout`` (identity at inference). Any other layer raises :class:`UnsupportedModel`, naming it.

Keras works channels-last and ONNX channels-first: the graph transposes once on the way in and once out.
Outputs agree with Keras to float32 rounding, of which the instance normalisations' sums over whole blocks
are the largest part (the two runtimes add in different orders); tests/test_onnx_runtime.py holds them to
each other, on small U-Nets of every kind and on the published student.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from brainzoo.errors import BrainzooError

OPSET = 17
# Channels-last tensors at the graph's ends; ':' keeps them apart from Keras layer names.
GRAPH_INPUT, GRAPH_OUTPUT = "input:channels_last", "output:channels_last"


class UnsupportedModel(BrainzooError):
    """The .h5 holds a layer or option with no mapping here; the model still runs in Keras."""


def _decoded(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_keras_h5(path: str | os.PathLike) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """A Keras 2 .h5 model file's functional config and each layer's weights, in the file's order."""
    try:
        with h5py.File(path, "r") as file:
            config = json.loads(file.attrs["model_config"])
            group = file["model_weights"]
            weights = {}
            for layer in map(_decoded, group.attrs["layer_names"]):
                names = map(_decoded, group[layer].attrs["weight_names"])
                weights[layer] = [np.asarray(group[layer][name]) for name in names]
    except (OSError, KeyError, ValueError) as err:
        raise BrainzooError(f"{path}: not a Keras .h5 model file ({err})") from None
    if config.get("class_name") not in ("Functional", "Model"):
        raise UnsupportedModel(f"{path}: a {config.get('class_name')} model; only functional models are mapped")
    return config["config"], weights


class _GraphBuilder:
    """ONNX nodes and initialisers for one Keras functional model, layer by layer."""

    def __init__(self, onnx_module, source: str):
        self.onnx = onnx_module
        self.source = source
        self.nodes: list = []
        self.initializers: list = []

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32),
                                                                   name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attributes) -> str:
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def activation(self, kind: str, x: str, layer: str) -> str:
        """Keras activation ``kind`` on ``x``, as the output of ``layer``."""
        if kind == "linear":
            return self.node("Identity", [x], layer)
        if kind in ("relu", "sigmoid"):
            return self.node({"relu": "Relu", "sigmoid": "Sigmoid"}[kind], [x], layer)
        if kind == "softmax":
            return self.node("Softmax", [x], layer, axis=1)  # over channels, as Keras's last axis
        raise self.unsupported(layer, f"activation {kind!r} is not mapped to ONNX")

    def kernel_inputs(self, name: str, c: dict, w: list, x: str) -> list[str]:
        """A (transposed) convolution's inputs: Keras kernels (d, h, w, a, b) become ONNX's (b, a, d, h, w)."""
        inputs = [x, self.constant(f"{name}/kernel", w[0].transpose(4, 3, 0, 1, 2))]
        if c["use_bias"]:
            inputs.append(self.constant(f"{name}/bias", w[1]))
        return inputs

    def unsupported(self, layer: str, problem: str):
        return UnsupportedModel(f"{self.source}: layer {layer!r}: {problem}; run it with --runtime keras")


def _conv3d(b: _GraphBuilder, name: str, c: dict, w: list, x: str) -> str:
    if c.get("groups", 1) != 1 or c["data_format"] != "channels_last":
        raise b.unsupported(name, "grouped or channels-first convolution")
    kernel = c["kernel_size"]
    if c["padding"] == "same":
        if any(k % 2 == 0 for k in kernel) or any(s != 1 for s in c["strides"]):
            raise b.unsupported(name, "'same' padding with an even kernel or a stride")
        pads = [(k - 1) // 2 * d for k, d in zip(kernel, c["dilation_rate"])] * 2
    elif c["padding"] == "valid":
        pads = [0] * 6
    else:
        raise b.unsupported(name, f"padding {c['padding']!r}")
    y = b.node("Conv", b.kernel_inputs(name, c, w, x), f"{name}/linear", kernel_shape=kernel, strides=c["strides"],
               pads=pads, dilations=c["dilation_rate"])  # kernel (d, h, w, in, out) -> (out, in, d, h, w)
    return b.activation(c["activation"], y, name)


def _conv3d_transpose(b: _GraphBuilder, name: str, c: dict, w: list, x: str) -> str:
    if c["kernel_size"] != c["strides"] or c.get("output_padding") is not None or c.get("groups", 1) != 1:
        raise b.unsupported(name, "a transposed convolution whose kernel differs from its strides")
    y = b.node("ConvTranspose", b.kernel_inputs(name, c, w, x), f"{name}/linear", kernel_shape=c["kernel_size"],
               strides=c["strides"])  # kernel (d, h, w, out, in) -> (in, out, d, h, w)
    return b.activation(c["activation"], y, name)


def _scale_and_shift(b: _GraphBuilder, name: str, c: dict, weights, channels: int) -> list[str]:
    """A normalisation's gamma and beta (Keras stores each only if ``scale`` / ``center``) as ONNX inputs."""
    gamma = next(weights) if c["scale"] else np.ones(channels)
    beta = next(weights) if c["center"] else np.zeros(channels)
    return [b.constant(f"{name}/gamma", np.reshape(gamma, -1)), b.constant(f"{name}/beta", np.reshape(beta, -1))]


def _group_normalization(b: _GraphBuilder, name: str, c: dict, w: list, x: str) -> str:
    channels = len(w[0]) if w else None  # gamma and/or beta, one value per channel
    if channels is None or c["groups"] not in (-1, channels) or c["axis"] not in (-1, 4):
        raise b.unsupported(name, "group normalisation other than one group per channel, with gamma or beta")
    return b.node("InstanceNormalization", [x, *_scale_and_shift(b, name, c, iter(w), channels)], name,
                  epsilon=c["epsilon"])


def _batch_normalization(b: _GraphBuilder, name: str, c: dict, w: list, x: str) -> str:
    axis = c["axis"][0] if isinstance(c["axis"], list) and len(c["axis"]) == 1 else c["axis"]
    if axis not in (-1, 4):
        raise b.unsupported(name, f"batch normalisation over axis {c['axis']!r}")
    weights = iter(w)
    scale_and_shift = _scale_and_shift(b, name, c, weights, channels=len(w[-1]))
    statistics = [b.constant(f"{name}/{key}", next(weights)) for key in ("moving_mean", "moving_variance")]
    return b.node("BatchNormalization", [x, *scale_and_shift, *statistics], name, epsilon=c["epsilon"])


def _max_pooling3d(b: _GraphBuilder, name: str, c: dict, w: list, x: str) -> str:
    if c["padding"] != "valid":
        raise b.unsupported(name, f"pooling with padding {c['padding']!r}")
    return b.node("MaxPool", [x], name, kernel_shape=c["pool_size"], strides=c["strides"])


def _activation(b: _GraphBuilder, name: str, c: dict, w: list, x: str) -> str:
    return b.activation(c["activation"], x, name)


def _relu(b: _GraphBuilder, name: str, c: dict, w: list, x: str) -> str:
    if c.get("max_value") is not None or c.get("negative_slope", 0) or c.get("threshold", 0):
        raise b.unsupported(name, "a ReLU with a ceiling, slope or threshold")
    return b.node("Relu", [x], name)


def _identity(b: _GraphBuilder, name: str, c: dict, w: list, x: str) -> str:
    return b.node("Identity", [x], name)


_SINGLE_INPUT_LAYERS: dict[str, Callable[[_GraphBuilder, str, dict, list, str], str]] = {
    "Conv3D": _conv3d, "Conv3DTranspose": _conv3d_transpose, "GroupNormalization": _group_normalization,
    "BatchNormalization": _batch_normalization, "MaxPooling3D": _max_pooling3d, "Activation": _activation,
    "ReLU": _relu, "Dropout": _identity, "SpatialDropout3D": _identity,
}


def keras_h5_to_onnx(path: str | os.PathLike):
    """The ONNX model (an ``onnx.ModelProto``) computing what the Keras .h5 model at ``path`` computes.

    Its one input and one output are channels-last, (batch, D, H, W, C), with free batch and
    spatial sizes (each must suit the network, as in Keras).
    """
    import onnx

    source = str(path)
    config, weights = read_keras_h5(path)
    if len(config["input_layers"]) != 1 or len(config["output_layers"]) != 1:
        raise UnsupportedModel(f"{source}: a model with several inputs or outputs")
    b = _GraphBuilder(onnx, source)
    output_name = config["output_layers"][0][0]
    channels = None
    for layer in config["layers"]:
        kind, name, c = layer["class_name"], layer["name"], layer["config"]
        inbound = [node[0] for node in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else []
        if len(layer["inbound_nodes"]) > 1:
            raise b.unsupported(name, "a layer called more than once")
        if kind == "InputLayer":
            shape = c["batch_input_shape"]
            if len(shape) != 5 or shape[-1] is None:
                raise b.unsupported(name, f"input shape {shape}: a 3D volume with channels is expected")
            channels = shape[-1]
            b.node("Transpose", [GRAPH_INPUT], name, perm=[0, 4, 1, 2, 3])
        elif kind == "Concatenate":
            if c["axis"] not in (-1, 4):
                raise b.unsupported(name, f"concatenation along axis {c['axis']}")
            b.node("Concat", inbound, name, axis=1)
        elif kind in _SINGLE_INPUT_LAYERS:
            _SINGLE_INPUT_LAYERS[kind](b, name, c, weights.get(name, []), inbound[0])
        else:
            raise b.unsupported(name, f"{kind} layers are not mapped to ONNX")
    b.node("Transpose", [output_name], GRAPH_OUTPUT, perm=[0, 2, 3, 4, 1])
    free = ["batch", "depth", "height", "width"]
    graph = onnx.helper.make_graph(
        b.nodes, Path(source).stem, [onnx.helper.make_tensor_value_info(
            GRAPH_INPUT, onnx.TensorProto.FLOAT, free + [channels])],
        [onnx.helper.make_tensor_value_info(GRAPH_OUTPUT, onnx.TensorProto.FLOAT, free + [None])],
        b.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="brainzoo")
    onnx.checker.check_model(model)
    return model


class OnnxModel:
    """A Keras .h5 U-Net as a callable on float32 batches (batch, D, H, W, C), run by ONNX Runtime.

    Threads: ``OMP_NUM_THREADS`` if set, else ONNX Runtime's default (one per physical core).
    """

    def __init__(self, path: str | os.PathLike):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        threads = os.environ.get("OMP_NUM_THREADS", "")
        options.intra_op_num_threads = int(threads) if threads.isdigit() else 0  # "4,2" (nested OpenMP): default
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(keras_h5_to_onnx(path).SerializeToString(), options,
                                                     providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run([GRAPH_OUTPUT], {GRAPH_INPUT: np.asarray(batch, dtype=np.float32)})[0]
