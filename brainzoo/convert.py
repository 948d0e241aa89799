"""PyTorch checkpoints of the published brain-age networks -> Keras HDF5 models.

Every tensor is placed by name: each Keras layer's name translates to the PyTorch module path it came
from (a table of patterns per architecture below), and from the layer type follow the tensor names and
layouts. A checkpoint with a missing, unexpected or misshapen tensor is refused with the offending keys
listed; nothing is matched by position or by shape.

``convert_state_dict`` works on numpy arrays; ``convert_checkpoint`` reads the file without torch
(:mod:`brainzoo.checkpoints`), checks the Keras model against the PyTorch reference implementation
(:mod:`brainzoo.models.torch_reference`) and writes the model plus a JSON record of the conversion.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from brainzoo.errors import BrainzooError
from brainzoo.fileio import atomic_output, check_writable, sha256_of
from brainzoo.models import BUILDERS

layers = tf.keras.layers

DATA_PARALLEL_PREFIX = "module."
# Where training scripts commonly nest the state_dict inside a saved dict.
STATE_DICT_CONTAINERS = ("state_dict", "model_state_dict", "model")
# A training counter with no role at inference; checkpoints from before PyTorch 0.4.1 lack it.
OPTIONAL_SUFFIX = "num_batches_tracked"
# The conversion fixtures' tolerance: float32 agreement relative to the output's magnitude.
RELATIVE_TOLERANCE = 1e-4
LISTED_KEYS = 12

Rule = tuple[str, str | Callable[[re.Match], str]]


def _irv2_block(name: str) -> str:
    """Inception-ResNet-v2 block name -> its index in the original ``features`` Sequential."""
    kind, number = re.fullmatch(r"(stem|block_a|reduction_a|block_b|reduction_b|block_c)(\d*)", name).groups()
    first_index = {"stem": 0, "block_a": 0, "reduction_a": 6, "block_b": 6, "reduction_b": 17, "block_c": 17}[kind]
    return f"features.{first_index + int(number or 0)}"


# Keras layer name (full match) -> PyTorch module path, per architecture. Group references keep the table short.
SFCN_RULES: tuple[Rule, ...] = (
    (r"conv_(\d+)_conv", r"feature_extractor.conv_\1.0"),
    (r"conv_(\d+)_bn", r"feature_extractor.conv_\1.1"),
    (r"classifier_conv_(\d+)", r"classifier.conv_\1"),
)
AGEMAPPER_RULES: tuple[Rule, ...] = (
    (r"conv_(\d+)_conv", r"Feature_Extractor.Convolution_\1.0"),
    (r"conv_(\d+)_bn", r"Feature_Extractor.Convolution_\1.1"),
    (r"fc_(\d)", r"FullyConnected.FullyConnected_\1"),
)
DENSENET169_RULES: tuple[Rule, ...] = (
    (r"(conv0|norm0|norm5)", r"0.features.\1"),
    (r"denseblock(\d)_denselayer(\d+)_(norm1|conv1|norm2|conv2)", r"0.features.denseblock\1.denselayer\2.layers.\3"),
    (r"transition(\d)_(norm|conv)", r"0.features.transition\1.\2"),
    (r"class_layers_out", "0.class_layers.out"),
    (r"output_linear", "1"),
)
INCEPTION_RESNET_V2_RULES: tuple[Rule, ...] = (
    (r"stem_features_(\d)_(conv|bn)", r"features.0.features.\1.\2"),
    (r"stem_branch_(a|2)_(conv|bn)", r"features.0.branch_\1.\2"),
    (r"stem_branch_(\d)_(\d)_(conv|bn)", r"features.0.branch_\1.\2.\3"),
    (r"(block_\w\d+|reduction_\w)_branch_(\d)_(conv|bn)", lambda m: f"{_irv2_block(m[1])}.branch_{m[2]}.{m[3]}"),
    (r"(block_\w\d+|reduction_\w)_branch_(\d)_(\d)_(conv|bn)",
     lambda m: f"{_irv2_block(m[1])}.branch_{m[2]}.{m[3]}.{m[4]}"),
    (r"(block_\w\d+)_conv", lambda m: f"{_irv2_block(m[1])}.conv"),
    (r"head_(conv|bn)", r"conv.\1"),
    (r"head_linear", "linear.0"),
    (r"output_linear", "linear.1"),
)
S500MRI_RULES: tuple[Rule, ...] = (
    (r"block_(\d)_conv_1", r"features.\1.s500mri.0"),
    (r"block_(\d)_bn_1", r"features.\1.s500mri.1"),
    (r"block_(\d)_conv_2", r"features.\1.s500mri.4"),
    (r"block_(\d)_bn_2", r"features.\1.s500mri.5"),
    (r"head_conv", "clf.flatten.0"),
    (r"logits", "clf.clf"),
)
# VAE-C stages are [conv, BN, Dropout3d, LeakyReLU] in one Sequential, so stage i's conv is index 4 i (the decoder's
# is 4 i + 1, after its Unflatten).
VAE_C_ENCODER_RULES: tuple[Rule, ...] = (
    (r"down_(\d)_(conv|bn)", lambda m: f"down_sample.{4 * int(m[1]) + (m[2] == 'bn')}"),
    (r"features_conv", "flatten.0"),
    (r"features_bn", "flatten.1"),
    (r"(age_mean|age_log_var|z_mean|z_log_var)", r"\1"),
    (r"z_prior_mean", "z_cond_age_mean"),
)
VAE_C_DECODER_RULES: tuple[Rule, ...] = (
    (r"up_(\d)_(conv|bn)", lambda m: f"decoder.{4 * int(m[1]) + 1 + (m[2] == 'bn')}"),
    (r"reconstruction", "decoder.20"),
)
# The children of ml_MRI's whole VAE_age, which its checkpoints hold: the encoder and decoder converters each take one.
VAE_AGE_PARTS = ("encoder", "decoder")


@dataclass(frozen=True)
class Architecture:
    """A convertible architecture: its Keras builder, the options its name implies, its name table.

    ``part``: the child of a larger upstream model (one of ``whole_model``'s children) that this network is; the
    rules name its own state_dict keys, and a checkpoint of the whole model gives the tensors under ``part.``.
    """

    builder: str
    rules: tuple[Rule, ...]
    fixed_options: dict = field(default_factory=dict)
    part: str = ""
    whole_model: tuple[str, ...] = ()


ARCHITECTURES = {
    "sfcn": Architecture("sfcn", SFCN_RULES),
    "densenet169": Architecture("densenet169_3d", DENSENET169_RULES),
    "inception-resnet-v2": Architecture("inception_resnet_v2_3d", INCEPTION_RESNET_V2_RULES),
    "agemapper-1mm": Architecture("agemapper", AGEMAPPER_RULES, {"resolution": "1mm"}),
    "agemapper-2mm": Architecture("agemapper", AGEMAPPER_RULES, {"resolution": "2mm"}),
    "s500mri": Architecture("s500mri_classifier", S500MRI_RULES),
    "vae-c-encoder": Architecture("vae_c_encoder", VAE_C_ENCODER_RULES, part="encoder", whole_model=VAE_AGE_PARTS),
    "vae-c-decoder": Architecture("vae_c_decoder", VAE_C_DECODER_RULES, part="decoder", whole_model=VAE_AGE_PARTS),
}


def architecture(arch: str) -> Architecture:
    if arch not in ARCHITECTURES:
        raise BrainzooError(f"{arch}: unknown architecture (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[arch]


def resolved_options(arch: str, options: Mapping | None = None) -> dict:
    """Every builder option for ``arch``: its defaults, then ``options``, then what the name implies."""
    spec = architecture(arch)
    builder = BUILDERS[spec.builder]
    parameters = inspect.signature(builder).parameters
    unknown = set(options or {}) - (set(parameters) - {"weights", "name"})
    if unknown:
        raise BrainzooError(f"{arch}: unknown options {', '.join(sorted(unknown))}")
    clashing = {key for key, value in (options or {}).items()
                if key in spec.fixed_options and spec.fixed_options[key] != value}
    if clashing:
        raise BrainzooError(f"{arch}: options {', '.join(sorted(clashing))} contradict the architecture name")
    defaults = {key: p.default for key, p in parameters.items() if key not in ("weights", "name")}
    return {**defaults, **(options or {}), **spec.fixed_options}


def torch_module_path(arch: str, keras_layer: str) -> str:
    """The PyTorch module path that a Keras layer with weights translates to."""
    for pattern, replacement in architecture(arch).rules:
        match = re.fullmatch(pattern, keras_layer)
        if match:
            return match.expand(replacement) if isinstance(replacement, str) else replacement(match)
    raise LookupError(f"{arch}: Keras layer {keras_layer} has no PyTorch counterpart in the name table")


# Axis orders that turn PyTorch tensors into Keras weights (None: unchanged).
CONV_KERNEL_AXES = (2, 3, 4, 1, 0)  # (out, in, d, h, w) -> (d, h, w, in, out)
LINEAR_KERNEL_AXES = (1, 0)  # (out, in) -> (in, out)


def _tensor_plan(layer: layers.Layer) -> list[tuple[str, tuple[int, ...] | None]]:
    """The PyTorch tensors a Keras layer's weights come from, in ``layer.weights`` order, with their axis orders."""
    if isinstance(layer, layers.Conv3D):
        return [("weight", CONV_KERNEL_AXES)] + ([("bias", None)] if layer.use_bias else [])
    if isinstance(layer, layers.Dense):
        return [("weight", LINEAR_KERNEL_AXES), ("bias", None)]
    if isinstance(layer, layers.BatchNormalization):
        return [("weight", None), ("bias", None), ("running_mean", None), ("running_var", None)]
    raise LookupError(f"no PyTorch counterpart for Keras layer type {type(layer).__name__} ({layer.name})")


def _torch_shape(keras_shape: tuple[int, ...], axes: tuple[int, ...] | None) -> tuple[int, ...]:
    """The PyTorch shape that ``transpose(axes)`` turns into ``keras_shape``."""
    if axes is None:
        return keras_shape
    shape = [0] * len(axes)
    for keras_axis, torch_axis in enumerate(axes):
        shape[torch_axis] = keras_shape[keras_axis]
    return tuple(shape)


def _listing(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:LISTED_KEYS])
    return shown + (f" (and {len(keys) - LISTED_KEYS} more)" if len(keys) > LISTED_KEYS else "")


def _counted(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def strip_data_parallel_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the ``module.`` prefix that ``nn.DataParallel`` puts on every key (only when every key has it)."""
    if state and all(key.startswith(DATA_PARALLEL_PREFIX) for key in state):
        return {key[len(DATA_PARALLEL_PREFIX):]: value for key, value in state.items()}
    return dict(state)


def network_state(arch: str, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors of ``arch``'s own network, without a ``module.`` prefix.

    A state_dict with keys under every child of the architecture's ``whole_model`` is the whole upstream model
    (VAE_age's ``encoder.`` and ``decoder.``): only the tensors under ``part.`` are this network's.
    """
    state = strip_data_parallel_prefix(state)
    spec = architecture(arch)
    if spec.part and all(any(key.startswith(f"{child}.") for key in state) for child in spec.whole_model):
        prefix = f"{spec.part}."
        return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return state


def load_state_dict(model: tf.keras.Model, arch: str, state: Mapping[str, np.ndarray], source: str) -> None:
    """Put every tensor of ``state`` into ``model``; refuse the whole state on any missing, extra or misshapen key."""
    state = network_state(arch, state)
    plan = []  # (layer, [(torch key, axis order)])
    for layer in model.layers:
        if layer.weights:
            prefix = torch_module_path(arch, layer.name)
            plan.append((layer, [(f"{prefix}.{tensor}", axes) for tensor, axes in _tensor_plan(layer)]))
    expected = {key for _, tensors in plan for key, _ in tensors}
    optional = {f"{key.rsplit('.', 1)[0]}.{OPTIONAL_SUFFIX}" for key in expected if key.endswith(".running_var")}
    missing = expected - set(state)
    unexpected = set(state) - expected - optional
    if missing or unexpected:
        problems = [f"{_counted(len(keys), kind)}: {_listing(keys)}"
                    for kind, keys in (("missing key", missing), ("unexpected key", unexpected)) if keys]
        raise BrainzooError(f"{source}: does not match the {arch} architecture: " + "; ".join(problems))

    misshapen = []
    for layer, tensors in plan:
        for (key, axes), weight in zip(tensors, layer.weights):
            wanted = _torch_shape(tuple(weight.shape), axes)
            if tuple(np.shape(state[key])) != wanted:
                misshapen.append(f"{key} has shape {tuple(np.shape(state[key]))}, {arch} needs {wanted}")
    if misshapen:
        shown = "; ".join(misshapen[:LISTED_KEYS]) + (f" (and {len(misshapen) - LISTED_KEYS} more)"
                                                      if len(misshapen) > LISTED_KEYS else "")
        raise BrainzooError(f"{source}: {_counted(len(misshapen), 'tensor')} with the wrong shape for {arch} "
                            f"with these options: {shown}")
    for layer, tensors in plan:
        arrays = [np.asarray(state[key], dtype=np.float32) for key, _ in tensors]
        layer.set_weights([a if axes is None else a.transpose(axes) for a, (_, axes) in zip(arrays, tensors)])


def convert_state_dict(arch: str, state: Mapping[str, np.ndarray], options: Mapping | None = None,
                       source: str = "state_dict", into: tf.keras.Model | None = None) -> tf.keras.Model:
    """A Keras model of ``arch`` (built with ``options``) holding the tensors of a PyTorch state_dict.

    ``state`` maps PyTorch keys (with or without ``module.``) to numpy arrays; ``source`` names it in errors.
    ``into``: a model built earlier with the same architecture and options, whose every weight is replaced (members
    of an ensemble share one build, which takes longer than the conversion itself).
    """
    options = resolved_options(arch, options)
    model = into if into is not None else BUILDERS[architecture(arch).builder](**options)
    load_state_dict(model, arch, state, source)
    return model


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state_dict of a PyTorch checkpoint as numpy arrays, read without torch and without running pickled code.

    Reads the legacy (non-zip) and the zip format (:mod:`brainzoo.checkpoints`): a bare state_dict, a dict
    holding one under a usual key, or a whole pickled ``nn.Module`` (its parameters and buffers).
    """
    from brainzoo.checkpoints import Opaque, module_state_dict, read_pickled

    path = Path(path)
    content = read_pickled(path)

    def is_state_dict(value) -> bool:
        return isinstance(value, Mapping) and bool(value) and all(isinstance(t, np.ndarray) for t in value.values())

    if isinstance(content, Opaque) and module_state_dict(content):
        return module_state_dict(content)
    if is_state_dict(content):
        return dict(content)
    nested = [content[key] for key in STATE_DICT_CONTAINERS
              if isinstance(content, Mapping) and is_state_dict(content.get(key))]
    if not nested:
        found = (f"a dict with keys {_listing(map(str, content))}" if isinstance(content, Mapping)
                 else f"a {getattr(content, 'name', type(content).__name__)}")
        raise BrainzooError(f"{path}: holds no state_dict of tensors (found {found}; "
                            f"looked at the top level and under {', '.join(STATE_DICT_CONTAINERS)})")
    return dict(nested[0])


def input_shapes(model: tf.keras.Model) -> dict[str, list[int]]:
    """Each input's name and channels-last shape, without the batch axis."""
    return {name: list(tensor.shape[1:]) for name, tensor in zip(model.input_names, model.inputs)}


def _channels_first(array: np.ndarray) -> np.ndarray:
    return array.transpose(0, 4, 1, 2, 3) if array.ndim == 5 else array


def _channels_last(array: np.ndarray) -> np.ndarray:
    return array.transpose(0, 2, 3, 4, 1) if array.ndim == 5 else array


def self_check(arch: str, model: tf.keras.Model, state: Mapping[str, np.ndarray], options: Mapping) -> dict:
    """Compare ``model`` with the PyTorch reference implementation holding the same tensors.

    The reference is built with the same options and loads ``state`` strictly, so its keys must be the
    original's; both run one random value of every input (in order: a volume, at the model's own input size,
    the published one unless options say otherwise; a second input such as sex) and every output is compared.
    Skipped, and said so, without torch.
    """
    try:
        import torch
    except ImportError:
        return {"status": "skipped", "reason": "torch is not installed (pip install 'brainzoo[torch]' to check)"}

    from brainzoo.models.torch_reference import REFERENCES

    reference_class = REFERENCES[architecture(arch).builder]
    accepted = inspect.signature(reference_class).parameters
    reference = reference_class(**{key: value for key, value in options.items() if key in accepted}).eval()
    reference.load_state_dict({key: torch.from_numpy(np.asarray(value))
                               for key, value in network_state(arch, state).items()}, strict=True)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, *shape)).astype(np.float32) for shape in input_shapes(model).values()]
    with torch.no_grad():
        expected = reference(*(torch.from_numpy(_channels_first(x)) for x in inputs))
    expected = [_channels_last(t.numpy()) for t in (expected if isinstance(expected, tuple) else (expected,))]
    outputs = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    outputs = [t.numpy() for t in (outputs if isinstance(outputs, list) else [outputs])]
    difference = max(float(np.abs(output - wanted).max()) for output, wanted in zip(outputs, expected, strict=True))
    tolerance = RELATIVE_TOLERANCE * max(1.0, *(float(np.abs(wanted).max()) for wanted in expected))
    shapes = {name: list(_channels_first(x).shape) for name, x in zip(input_shapes(model), inputs)}
    return {"status": "passed" if difference <= tolerance else "failed",
            "reference": f"{reference_class.__module__}.{reference_class.__name__}", "input_shapes_torch": shapes,
            "max_abs_difference": difference, "tolerance": tolerance, "torch": str(torch.__version__)}


def record_path(dst: str | os.PathLike) -> Path:
    """The JSON record written beside a converted model: the model's name with a .json suffix."""
    return Path(dst).with_suffix(".json")


def convert_checkpoint(arch: str, src: str | os.PathLike, dst: str | os.PathLike, options: Mapping | None = None,
                       force: bool = False, into: tf.keras.Model | None = None) -> dict:
    """Convert the PyTorch checkpoint ``src`` into the Keras HDF5 model ``dst``; return the record.

    The record (also written to ``dst`` with a .json suffix) names the source and its sha256, the
    architecture and options, the torch and TensorFlow versions and the self-check against the PyTorch
    reference. A failing self-check is an error. Either both files are written or neither.
    """
    src, dst = Path(src), Path(dst)
    options = resolved_options(arch, options)
    record_file = record_path(dst)
    if record_file == dst:
        raise BrainzooError(f"{dst}: the converted model needs a suffix other than .json (e.g. .h5)")
    check_writable(dst, force)
    check_writable(record_file, force)
    state = read_checkpoint(src)
    model = convert_state_dict(arch, state, options, source=str(src), into=into)
    check = self_check(arch, model, state, options)
    if check["status"] == "failed":
        raise BrainzooError(f"{src}: the converted {arch} model disagrees with the PyTorch reference by "
                            f"{check['max_abs_difference']:.3g} (tolerance {check['tolerance']:.3g}); nothing written")
    record = {
        "architecture": arch,
        "options": options,
        "input_shape": list(model.input_shape[1:]) if len(model.inputs) == 1 else input_shapes(model),
        "parameters": int(sum(np.prod(w.shape) for w in model.trainable_weights)),  # as PyTorch counts them
        "source": str(src),
        "source_sha256": sha256_of(src),
        "keras_model": dst.name,
        "torch_version": check.get("torch"),
        "tensorflow_version": tf.__version__,
        "self_check": check,
    }
    with atomic_output(dst, force) as model_tmp, atomic_output(record_file, force) as record_tmp:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*HDF5 file.*legacy", category=UserWarning)
            model.save(model_tmp, save_format="h5")
        record_tmp.write_text(json.dumps(record, indent=2) + "\n")
    return record
