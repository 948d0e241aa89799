"""PyTorch checkpoints (state_dicts) -> Keras models, tensor by tensor and by name.

Every tensor is placed by name: each Keras layer's name translates to the PyTorch module path it came from (the
tables in :mod:`brainzoo.convert.names`), and from the layer type follow the tensor names and layouts. A checkpoint
with a missing, unexpected or misshapen tensor is refused with the offending keys listed; nothing is matched by
position or by shape. Checkpoints are read without torch (:mod:`brainzoo.checkpoints`); the result is checked
against the PyTorch reference implementation (:mod:`brainzoo.models.torch_reference`) where torch is installed.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tensorflow as tf

from brainzoo.convert.names import architecture, torch_module_path
from brainzoo.errors import BrainzooError
from brainzoo.fileio import sha256_of
from brainzoo.models import BUILDERS, option_names

layers = tf.keras.layers

DATA_PARALLEL_PREFIX = "module."
# Where training scripts commonly nest the state_dict inside a saved dict.
STATE_DICT_CONTAINERS = ("state_dict", "model_state_dict", "model")
# A training counter with no role at inference; checkpoints from before PyTorch 0.4.1 lack it.
OPTIONAL_SUFFIX = "num_batches_tracked"
# The conversion fixtures' tolerance: float32 agreement relative to the output's magnitude.
RELATIVE_TOLERANCE = 1e-4
LISTED_KEYS = 12

def resolved_options(arch: str, options: Mapping | None = None) -> dict:
    """Every builder option for ``arch``: its defaults, then ``options``, then what the name implies."""
    spec = architecture(arch)
    names = option_names(spec.builder)
    unknown = set(options or {}) - names
    if unknown:
        raise BrainzooError(f"{arch}: unknown options {', '.join(sorted(unknown))}")
    clashing = {key for key, value in (options or {}).items()
                if key in spec.fixed_options and spec.fixed_options[key] != value}
    if clashing:
        raise BrainzooError(f"{arch}: options {', '.join(sorted(clashing))} contradict the architecture name")
    parameters = inspect.signature(BUILDERS[spec.builder]).parameters
    defaults = {key: p.default for key, p in parameters.items() if key in names}
    return {**defaults, **(options or {}), **spec.fixed_options}


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
    unused_pattern = architecture(arch).unused
    unused = {key for key in state if unused_pattern and re.fullmatch(unused_pattern, key)}
    missing = expected - set(state)
    unexpected = set(state) - expected - optional - unused
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
    model = into if into is not None else build(arch, options)
    load_state_dict(model, arch, state, source)
    return model


def build(arch: str, options: Mapping | None = None) -> tf.keras.Model:
    """An untrained Keras model of ``arch`` with ``options`` (completed by :func:`resolved_options`)."""
    return BUILDERS[architecture(arch).builder](**resolved_options(arch, options))


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


def convert_checkpoint(arch: str, src: str | os.PathLike, options: Mapping | None = None,
                       into: tf.keras.Model | None = None) -> tuple[tf.keras.Model, dict, dict]:
    """The Keras model of the checkpoint ``src``, what was read (file, size, sha256) and the self-check.

    ``options`` are completed by :func:`resolved_options` (the model is built with them); ``into`` as for
    :func:`convert_state_dict`.
    """
    src = Path(src)
    state = read_checkpoint(src)
    options = resolved_options(arch, options)
    model = convert_state_dict(arch, state, options, source=str(src), into=into)
    source = {"file": str(src), "size": src.stat().st_size, "sha256": sha256_of(src)}
    return model, source, self_check(arch, model, state, options)
