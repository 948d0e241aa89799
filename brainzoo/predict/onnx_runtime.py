"""A saved Keras network run by ONNX Runtime, without importing TensorFlow.

Importing TensorFlow and loading a Keras .h5 is most of a one-scan prediction with a small network on our
2-core machines; ONNX Runtime starts in a fraction of that and runs the same network about as fast, so the
whole process takes about half the time (``benchmarks/bench_brain_mask.py`` runs the student both ways).
The ONNX graph is built in memory from the .h5 file itself (its ``model_config`` and weights, read with h5py),
so it runs exactly the bytes the catalogue checksums; nothing else is stored or cached, and no code stored in the
file is run: a layer is mapped from its class name and its config's numbers, never built.

Every network of the catalogue maps: the U-Nets, the deepbet port, SFCN, DenseNet169-3D, Inception-ResNet-v2-3D,
AgeMapper and the ml_MRI networks. :data:`LAYERS` lists the Keras layers mapped, one function each; a layer or
an option with no exact ONNX equivalent (``Lambda`` and every other class not in the table, ``"same"`` padding
that pads unevenly, a ReLU with a ceiling...) raises :class:`UnsupportedModel`, naming the file and the layer.

Keras works channels-last and ONNX's convolutions channels-first. Each tensor of the graph remembers which of the
two layouts it holds; a layer that needs the other gets it through one ``Transpose`` (made once per tensor and
layout), so a convolutional network transposes once on the way in and once out, and a dense head reads its
features in Keras's order. Outputs agree with Keras to float32 rounding (the two runtimes sum in different
orders); tests/test_onnx_runtime.py holds every network to Keras.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np

from brainzoo.errors import BrainzooError

OPSET = 17
# Keras activations with an exact ONNX operator; softmax and log_softmax act on the channel axis.
ACTIVATIONS = {"linear": "Identity", "relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softmax": "Softmax",
               "log_softmax": "LogSoftmax"}


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


@dataclass(frozen=True)
class Tensor:
    """A Keras tensor in the ONNX graph: its value's name, its rank, and whether the graph holds it channels-first
    (Keras's last axis moved to axis 1) or in Keras's own axis order. Rank 2 is the same either way."""

    name: str
    rank: int
    channels_first: bool

    def like(self, name: str, **changes) -> Tensor:
        """Another value of this shape and layout (or as ``changes`` say)."""
        return dataclasses.replace(self, name=name, **changes)

    def axis(self, keras_axis: int) -> int:
        """Where Keras axis ``keras_axis`` (negative counts from the end) is in the graph's value."""
        axis = keras_axis % self.rank
        if not self.channels_first:
            return axis
        return 1 if axis == self.rank - 1 else axis + (axis > 0)

    @property
    def channel_axis(self) -> int:
        return self.axis(-1)


class GraphBuilder:
    """ONNX nodes and initialisers for one Keras functional model, layer by layer."""

    def __init__(self, onnx_module, source: str):
        self.onnx = onnx_module
        self.source = source
        self.nodes: list = []
        self.initializers: list = []
        self._layouts: dict[tuple[str, bool], str] = {}

    def constant(self, name: str, array, dtype=np.float32) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attributes) -> str:
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def layout(self, x: Tensor, channels_first: bool) -> str:
        """The name of ``x``'s value in the layout asked for, transposed (once) if the graph holds the other."""
        if x.channels_first == channels_first or x.rank <= 2:
            return x.name
        key = (x.name, channels_first)
        if key not in self._layouts:
            last = x.rank - 1
            perm = [0, last, *range(1, last)] if channels_first else [0, *range(2, x.rank), 1]
            suffix = "channels_first" if channels_first else "channels_last"
            self._layouts[key] = self.node("Transpose", [x.name], f"{x.name}:{suffix}", perm=perm)
        return self._layouts[key]

    def volume(self, x: Tensor, layer: str) -> str:
        """A 5-D tensor (batch, D, H, W, C) channels-first, for ONNX's convolutions, pools and norms."""
        if x.rank != 5:
            raise self.unsupported(layer, f"a rank-{x.rank} input where a 3-D volume with channels is expected")
        return self.layout(x, True)

    def activation(self, kind: str, x: Tensor, layer: str) -> Tensor:
        """Keras activation ``kind`` on ``x``, as the output of ``layer``."""
        if kind not in ACTIVATIONS:
            raise self.unsupported(layer, f"activation {kind!r} is not mapped to ONNX")
        axis = {"axis": x.channel_axis} if kind in ("softmax", "log_softmax") else {}
        return x.like(self.node(ACTIVATIONS[kind], [x.name], layer, **axis))

    def convolution(self, op: str, name: str, c: dict, w: list, x: Tensor, **attributes) -> Tensor:
        """A (transposed) convolution and its activation: Keras kernels (d, h, w, a, b) become ONNX's
        (b, a, d, h, w), which is (out, in, ...) for a convolution and (in, out, ...) for a transposed one."""
        _check_channels_last(self, name, c)
        inputs = [self.volume(x, name), self.constant(f"{name}/kernel", w[0].transpose(4, 3, 0, 1, 2))]
        if c["use_bias"]:
            inputs.append(self.constant(f"{name}/bias", w[1]))
        y = self.node(op, inputs, f"{name}/linear", kernel_shape=c["kernel_size"], strides=c["strides"], **attributes)
        return self.activation(c["activation"], Tensor(y, 5, True), name)

    def unsupported(self, layer: str, problem: str) -> UnsupportedModel:
        return UnsupportedModel(f"{self.source}: layer {layer!r}: {problem}; run it with --runtime keras")


Mapping = Callable[[GraphBuilder, str, dict, list, list[Tensor]], Tensor]


def _check_channels_last(b: GraphBuilder, name: str, c: dict) -> None:
    if c.get("data_format", "channels_last") != "channels_last":
        raise b.unsupported(name, f"data format {c['data_format']!r}")


def _single_axis(value) -> int | None:
    """A layer's ``axis`` setting as one int (Keras writes some as a one-element list); None if several."""
    value = value[0] if isinstance(value, list) and len(value) == 1 else value
    return value if isinstance(value, int) else None


def _conv3d(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    if c.get("groups", 1) != 1:
        raise b.unsupported(name, "a grouped convolution")
    kernel = c["kernel_size"]
    if c["padding"] == "same":
        if any(k % 2 == 0 for k in kernel) or any(s != 1 for s in c["strides"]):
            raise b.unsupported(name, "'same' padding with an even kernel or a stride (it pads unevenly)")
        pads = [(k - 1) // 2 * d for k, d in zip(kernel, c["dilation_rate"])] * 2
    elif c["padding"] == "valid":
        pads = [0] * 6
    else:
        raise b.unsupported(name, f"padding {c['padding']!r}")
    return b.convolution("Conv", name, c, w, inputs[0], pads=pads, dilations=c["dilation_rate"])


def _conv3d_transpose(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    """Keras "valid" ((n - 1) stride + kernel voxels, ONNX's size without pads), or "same" where kernel = stride."""
    if c["padding"] == "same" and c["kernel_size"] != c["strides"]:
        raise b.unsupported(name, "a 'same' transposed convolution whose kernel differs from its strides")
    if c.get("output_padding") is not None or c.get("groups", 1) != 1 or set(c.get("dilation_rate", [1])) != {1}:
        raise b.unsupported(name, "a transposed convolution with output padding, groups or dilation")
    return b.convolution("ConvTranspose", name, c, w, inputs[0])


def _scale_and_shift(b: GraphBuilder, name: str, c: dict, w: list, channels: int) -> list[str]:
    """A normalisation's gamma and beta (Keras stores each, in that order, only if ``scale`` / ``center``)."""
    weights = iter(w)
    gamma = next(weights) if c["scale"] else np.ones(channels)
    beta = next(weights) if c["center"] else np.zeros(channels)
    return [b.constant(f"{name}/gamma", np.reshape(gamma, -1)), b.constant(f"{name}/beta", np.reshape(beta, -1))]


def _group_normalization(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    channels = len(w[0]) if w else None  # gamma and/or beta, one value per channel
    if channels is None or c["groups"] not in (-1, channels) or _single_axis(c["axis"]) not in (-1, 4):
        raise b.unsupported(name, "group normalisation other than one group per channel, with gamma or beta")
    x = inputs[0]
    y = b.node("InstanceNormalization", [b.volume(x, name), *_scale_and_shift(b, name, c, w, channels)], name,
               epsilon=c["epsilon"])
    return x.like(y, channels_first=True)


def _instance_normalization(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    """brainzoo's InstanceNormalization (the deepbet port's), summed as that layer sums: along the first spatial axis
    in float32, those partial sums in float64. ONNX's InstanceNormalization sums in float32, which over whole 128^3
    feature maps moves deepbet's probabilities by up to 3e-3 after its twenty norms."""
    x = inputs[0]
    value = b.volume(x, name)

    def channel_mean(y: str, what: str) -> str:  # float64 (batch, channels, 1, 1, 1)
        partial = b.node("ReduceMean", [y], f"{name}/{what}_partial", axes=[2], keepdims=1)
        wide = b.node("Cast", [partial], f"{name}/{what}_partial_float64", to=b.onnx.TensorProto.DOUBLE)
        return b.node("ReduceMean", [wide], f"{name}/{what}", axes=[3, 4], keepdims=1)

    mean = b.node("Cast", [channel_mean(value, "mean")], f"{name}/mean_float32", to=b.onnx.TensorProto.FLOAT)
    centred = b.node("Sub", [value, mean], f"{name}/centred")
    squares = b.node("Mul", [centred, centred], f"{name}/squares")
    epsilon = b.constant(f"{name}/epsilon", c["epsilon"], np.float64)
    deviation = b.node("Sqrt", [b.node("Add", [channel_mean(squares, "variance"), epsilon], f"{name}/variance_eps")],
                       f"{name}/deviation")
    scale = b.node("Reciprocal", [deviation], f"{name}/scale_float64")
    scale = b.node("Cast", [scale], f"{name}/scale", to=b.onnx.TensorProto.FLOAT)
    return x.like(b.node("Mul", [centred, scale], name), channels_first=True)


def _batch_normalization(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    x = inputs[0]
    axis = _single_axis(c["axis"])
    if axis is None or axis % x.rank != x.rank - 1:
        raise b.unsupported(name, f"batch normalisation over axis {c['axis']!r}")
    scale_and_shift = _scale_and_shift(b, name, c, w[:-2], channels=len(w[-1]))
    statistics = [b.constant(f"{name}/{key}", value) for key, value in zip(("moving_mean", "moving_variance"), w[-2:])]
    y = b.node("BatchNormalization", [b.layout(x, True), *scale_and_shift, *statistics], name, epsilon=c["epsilon"])
    return x.like(y, channels_first=x.rank > 2)


def _pool(op: str) -> Mapping:
    """Keras "valid" pooling as ONNX ``op``: no padding, so nothing to fill or leave out of an average."""
    def pool(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
        _check_channels_last(b, name, c)
        if c["padding"] != "valid":
            raise b.unsupported(name, f"pooling with padding {c['padding']!r}")
        x = inputs[0]
        return x.like(b.node(op, [b.volume(x, name)], name, kernel_shape=c["pool_size"],
                             strides=c["strides"] or c["pool_size"]), channels_first=True)
    return pool


def _global_average_pooling3d(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    _check_channels_last(b, name, c)
    x, keepdims = inputs[0], bool(c.get("keepdims", False))
    y = b.node("ReduceMean", [b.volume(x, name)], name, axes=[2, 3, 4], keepdims=int(keepdims))
    return x.like(y, rank=5 if keepdims else 2, channels_first=True)


def _zero_padding3d(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    _check_channels_last(b, name, c)
    (d0, d1), (h0, h1), (w0, w1) = c["padding"]
    x, pads = inputs[0], b.constant(f"{name}/pads", [0, 0, d0, h0, w0, 0, 0, d1, h1, w1], np.int64)
    return x.like(b.node("Pad", [b.volume(x, name), pads], name, mode="constant"), channels_first=True)


def _cropping3d(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    _check_channels_last(b, name, c)
    x = inputs[0]
    starts = [start for start, _ in c["cropping"]]
    ends = [-end if end else np.iinfo(np.int64).max for _, end in c["cropping"]]
    bounds = [b.constant(f"{name}/{key}", value, np.int64)
              for key, value in (("starts", starts), ("ends", ends), ("axes", [2, 3, 4]))]
    return x.like(b.node("Slice", [b.volume(x, name), *bounds], name), channels_first=True)


def _trilinear_upsampling3d(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    """brainzoo's TrilinearUpsampling3D: output voxel i samples the input at i (n - 1) / (scale n - 1)."""
    x, scales = inputs[0], b.constant(f"{name}/scales", [1, 1, *[c["scale"]] * 3])
    return x.like(b.node("Resize", [b.volume(x, name), "", scales], name, mode="linear",
                         coordinate_transformation_mode="align_corners"), channels_first=True)


def _dense(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    x = inputs[0]
    y = b.node("MatMul", [b.layout(x, False), b.constant(f"{name}/kernel", w[0])], f"{name}/product")
    if c["use_bias"]:
        y = b.node("Add", [y, b.constant(f"{name}/bias", w[1])], f"{name}/linear")
    return b.activation(c["activation"], x.like(y, channels_first=False), name)


def _flatten(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    _check_channels_last(b, name, c)
    return Tensor(b.node("Flatten", [b.layout(inputs[0], False)], name, axis=1), 2, False)


def _permute(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    x = inputs[0]
    return x.like(b.node("Transpose", [b.layout(x, False)], name, perm=[0, *c["dims"]]), channels_first=False)


def _reshape(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    target = c["target_shape"]
    shape = b.constant(f"{name}/shape", [0, *target], np.int64)  # 0: the batch size, copied
    return Tensor(b.node("Reshape", [b.layout(inputs[0], False), shape], name), 1 + len(target), False)


def _concatenate(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    first = inputs[0]
    axis = first.axis(c["axis"])
    values = [b.layout(x, first.channels_first) for x in inputs]
    return first.like(b.node("Concat", values, name, axis=axis))


def _add(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    first = inputs[0]
    return first.like(b.node("Sum", [b.layout(x, first.channels_first) for x in inputs], name))


def _scaled_residual(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    """brainzoo's ScaledResidual: shortcut + scale * residual, in that order of operations."""
    shortcut, residual = inputs
    scaled = b.node("Mul", [b.layout(residual, shortcut.channels_first), b.constant(f"{name}/scale", c["scale"])],
                    f"{name}/scaled")
    return shortcut.like(b.node("Add", [shortcut.name, scaled], name))


def _activation(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    return b.activation(c["activation"], inputs[0], name)


def _softmax(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    x, axis = inputs[0], _single_axis(c["axis"])
    if axis is None or axis % x.rank != x.rank - 1:
        raise b.unsupported(name, f"a softmax over axis {c['axis']!r} (only the last axis is mapped)")
    return b.activation("softmax", x, name)


def _relu(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    if c.get("max_value") is not None or c.get("negative_slope", 0) or c.get("threshold", 0):
        raise b.unsupported(name, "a ReLU with a ceiling, slope or threshold")
    return b.activation("relu", inputs[0], name)


def _leaky_relu(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    x = inputs[0]
    return x.like(b.node("LeakyRelu", [x.name], name, alpha=c["alpha"]))


def _identity(b: GraphBuilder, name: str, c: dict, w: list, inputs: list[Tensor]) -> Tensor:
    """Dropout layers, which do nothing at inference."""
    x = inputs[0]
    return x.like(b.node("Identity", [x.name], name))


# Every Keras layer class mapped, as a saved .h5 names it (brainzoo's registered layers with their package).
LAYERS: dict[str, Mapping] = {
    "Conv3D": _conv3d, "Conv3DTranspose": _conv3d_transpose, "Dense": _dense,
    "BatchNormalization": _batch_normalization, "GroupNormalization": _group_normalization,
    "brainzoo>InstanceNormalization": _instance_normalization,
    "MaxPooling3D": _pool("MaxPool"), "AveragePooling3D": _pool("AveragePool"),
    "GlobalAveragePooling3D": _global_average_pooling3d, "ZeroPadding3D": _zero_padding3d,
    "Cropping3D": _cropping3d, "brainzoo>TrilinearUpsampling3D": _trilinear_upsampling3d,
    "Flatten": _flatten, "Permute": _permute, "Reshape": _reshape,
    "Concatenate": _concatenate, "Add": _add, "brainzoo>ScaledResidual": _scaled_residual,
    "Activation": _activation, "Softmax": _softmax, "ReLU": _relu, "LeakyReLU": _leaky_relu,
    "Dropout": _identity, "SpatialDropout3D": _identity,
}


def _input(b: GraphBuilder, layer: dict) -> tuple[Tensor, object]:
    """A Keras input as a graph input of the same name and axis order; every size but the channels is free."""
    name, shape = layer["name"], layer["config"]["batch_input_shape"]
    if shape[-1] is None:
        raise b.unsupported(name, f"input shape {shape} with a free channel count")
    free = ["batch", *(f"{name}:{axis}" for axis in range(1, len(shape) - 1))]
    info = b.onnx.helper.make_tensor_value_info(name, b.onnx.TensorProto.FLOAT, [*free, shape[-1]])
    return Tensor(name, len(shape), False), info


def _inbound(b: GraphBuilder, layer: dict, tensors: dict[str, Tensor]) -> list[Tensor]:
    """The tensors a layer is called on, each the only output of a layer called once."""
    if len(layer["inbound_nodes"]) != 1:
        raise b.unsupported(layer["name"], "a layer called more than once (shared weights)")
    inbound = []
    for source, node_index, tensor_index, *_ in layer["inbound_nodes"][0]:
        if (node_index, tensor_index) != (0, 0) or source not in tensors:
            raise b.unsupported(layer["name"], f"an input from layer {source!r} that is not mapped before it")
        inbound.append(tensors[source])
    return inbound


def keras_h5_to_onnx(path: str | os.PathLike, outputs: Sequence[str] | None = None):
    """The ONNX model (an ``onnx.ModelProto``) computing what the Keras .h5 model at ``path`` computes, or, given
    ``outputs`` (layer names), what those layers of it compute (an autoencoder's code).

    ONNX Runtime checks the graph as it loads it; ``onnx.checker`` (a second check, a second of a 200 MB network's
    load) is left to the tests.

    Its inputs and outputs are the Keras model's, in the same order and axis order (channels-last), named after
    the Keras input layers (outputs after the output layers, with ``:channels_last`` where a transpose makes them);
    batch and spatial sizes are free (each must suit the network, as in Keras).
    """
    import onnx

    source = str(path)
    config, weights = read_keras_h5(path)
    b = GraphBuilder(onnx, source)
    tensors: dict[str, Tensor] = {}
    inputs = {}
    for layer in config["layers"]:
        kind, name = layer["class_name"], layer["name"]
        if kind == "InputLayer":
            tensors[name], inputs[name] = _input(b, layer)
        elif kind in LAYERS:
            tensors[name] = LAYERS[kind](b, name, layer["config"], weights.get(name, []), _inbound(b, layer, tensors))
        else:
            raise b.unsupported(name, f"{kind} layers are not mapped to ONNX")
    graph_outputs = []
    for name in outputs or [name for name, *_ in config["output_layers"]]:
        if name not in tensors:
            raise BrainzooError(f"{source}: has no layer {name!r} to take an output from")
        value, rank = b.layout(tensors[name], False), tensors[name].rank
        graph_outputs.append(onnx.helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT,
                                                                [f"{value}:{axis}" for axis in range(rank)]))
    graph = onnx.helper.make_graph(b.nodes, Path(source).stem, [inputs[name] for name, *_ in config["input_layers"]],
                                   graph_outputs, b.initializers)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="brainzoo")


class OnnxModel:
    """A Keras .h5 network as a callable, run by ONNX Runtime: called as the Keras model is, on one float32 batch
    (or a list of them, one per input), it returns one array (or a list of them, one per output).

    Threads: ``OMP_NUM_THREADS`` if set, else ONNX Runtime's default (one per physical core).
    """

    def __init__(self, model, outputs: Sequence[str] | None = None):
        """``model``: a Keras .h5 file's path (``outputs``: as :func:`keras_h5_to_onnx`'s), or the ONNX model
        :func:`keras_h5_to_onnx` made of one."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        threads = os.environ.get("OMP_NUM_THREADS", "")
        options.intra_op_num_threads = int(threads) if threads.isdigit() else 0  # "4,2" (nested OpenMP): default
        options.inter_op_num_threads = 1
        graph = model if hasattr(model, "SerializeToString") else keras_h5_to_onnx(model, outputs)
        self._session = onnxruntime.InferenceSession(graph.SerializeToString(), options,
                                                     providers=["CPUExecutionProvider"])
        self._inputs = [value.name for value in self._session.get_inputs()]

    @property
    def input_shape(self) -> tuple:
        """The first input's shape, as Keras gives a model's, but with every size but the channels free (None)."""
        return tuple(size if isinstance(size, int) else None for size in self._session.get_inputs()[0].shape)

    @property
    def output_shape(self) -> tuple:
        """The first output's shape, as Keras gives a model's (the batch size a name or None)."""
        return tuple(self._session.get_outputs()[0].shape)

    def __call__(self, batch: np.ndarray | Sequence[np.ndarray]) -> np.ndarray | list[np.ndarray]:
        batches = [batch] if len(self._inputs) == 1 else list(batch)
        if len(batches) != len(self._inputs):
            raise BrainzooError(f"the network takes {len(self._inputs)} inputs ({', '.join(self._inputs)}), "
                                f"not {len(batches)}")
        feed = {name: np.asarray(value, dtype=np.float32) for name, value in zip(self._inputs, batches)}
        outputs = self._session.run(None, feed)
        return outputs[0] if len(outputs) == 1 else outputs
