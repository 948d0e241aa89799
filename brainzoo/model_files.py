"""Opening model files safely: weights checked against their spec, and no code stored in a file ever run.

A Keras ``.h5`` model file stores its architecture as JSON (``model_config``) and ``load_model`` builds every
layer that JSON names. A ``Lambda`` layer carries marshalled Python bytecode that runs while it is built, a
``TFOpLambda`` calls any TensorFlow function named in the file, and a custom class registered by any imported
package (tensorflow-probability's ``DistributionLambda``, say) runs that package's code. So
:func:`check_model_config` reads the JSON with h5py first and refuses every layer, nested model and setting
object whose class is not on the allow-lists below: Keras built-ins whose config is data only, and brainzoo's
own registered layers. :func:`load_keras_model` builds the model only then, from that checked JSON, and reads
the weight arrays from the same open file.

:func:`verified_sha256` checks a catalogue weights file's size and sha256 against its spec before it is used.
The verdict is kept in the user's cache folder keyed by the file's identity (real path, device, inode, size,
modification and change times), so a warm run does not hash again; any change to the file hashes it again.
Nothing here imports TensorFlow until a Keras model is built (ONNX Runtime runs without it).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py
import numpy as np

from brainzoo import catalogue
from brainzoo.catalogue import WeightsFile
from brainzoo.errors import BrainzooError
from brainzoo.fileio import atomic_output, sha256_of

# Keras built-in layers whose config is numbers, names and shapes, and whose call is fixed tensor arithmetic.
# Not here on purpose: Lambda, TFOpLambda and SlicingOpLambda (code or a TensorFlow function named in the file),
# wrappers and recurrent layers (they hold further layers or cells), preprocessing layers (vocabularies, files).
BUILTIN_LAYERS = frozenset({
    "InputLayer", "Dense", "Activation", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
    "GaussianNoise", "GaussianDropout", "AlphaDropout", "Flatten", "Reshape", "Permute", "RepeatVector", "Identity",
    "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
    "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D",
    "UpSampling1D", "UpSampling2D", "UpSampling3D",
    "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate", "Dot",
    "BatchNormalization", "LayerNormalization", "GroupNormalization", "UnitNormalization",
    "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "ThresholdedReLU",
})
# brainzoo's registered layers (brainzoo.models.layers, brainzoo.models.deepbet), as a saved .h5 names them;
# tests/test_hostile_weights.py holds this list to what those modules register.
BRAINZOO_LAYERS = frozenset({
    "brainzoo>InstanceNormalization", "brainzoo>ScaledResidual", "brainzoo>TrilinearUpsampling3D",
})
MODEL_CLASSES = frozenset({"Functional", "Model", "Sequential"})
# Objects inside a layer's config: initialisers, regularisers, constraints, the dtype policy.
SETTING_CLASSES = frozenset({
    "Constant", "GlorotNormal", "GlorotUniform", "HeNormal", "HeUniform", "Identity", "LecunNormal", "LecunUniform",
    "Ones", "Orthogonal", "RandomNormal", "RandomUniform", "TruncatedNormal", "VarianceScaling", "Zeros",
    "L1", "L1L2", "L2", "OrthogonalRegularizer", "MaxNorm", "MinMaxNorm", "NonNeg", "RadialConstraint", "UnitNorm",
    "Policy",
})
# Activations are looked up by name among registered objects first; only Keras' own names are accepted.
ACTIVATIONS = frozenset({
    "elu", "exponential", "gelu", "hard_sigmoid", "linear", "log_softmax", "mish", "relu", "selu", "sigmoid", "softmax",
    "softplus", "softsign", "swish", "tanh",
})
ACTIVATION_KEYS = ("activation", "recurrent_activation")

VERIFIED_CACHE_NAME = "verified-weights.json"
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


def _refuse(source: str, layer: str, problem: str) -> BrainzooError:
    return BrainzooError(f"{source}: layer {layer!r}: {problem}; brainzoo does not build it, because loading it "
                         "could run code stored in the file")


def _check_settings(value, source: str, layer: str) -> None:
    """Every object and activation named inside one layer's config is on an allow-list."""
    if isinstance(value, dict):
        kind = value.get("class_name")
        if kind is not None and kind not in SETTING_CLASSES:
            raise _refuse(source, layer, f"its config names a {kind} object")
        for key, item in value.items():
            if key in ACTIVATION_KEYS and isinstance(item, str) and item not in ACTIVATIONS:
                raise _refuse(source, layer, f"activation {item!r} is not a Keras activation")
            _check_settings(item, source, layer)
    elif isinstance(value, list):
        for item in value:
            _check_settings(item, source, layer)


def _check_layers(model: dict, source: str) -> None:
    """A model's layers: each a built-in, a brainzoo layer, or a nested model whose layers are checked in turn."""
    config = model["config"]
    for layer in config if isinstance(config, list) else config["layers"]:  # old Sequential configs are a list
        kind, settings = layer["class_name"], layer["config"]
        if kind in MODEL_CLASSES:
            _check_layers(layer, source)
        elif kind in BUILTIN_LAYERS or kind in BRAINZOO_LAYERS:
            _check_settings(settings, source, settings.get("name", "?"))
        else:
            raise _refuse(source, settings.get("name", "?"), f"{kind} is neither a Keras built-in layer on brainzoo's "
                          "allow-list nor a brainzoo layer")


def check_model_config(file: h5py.File, source: str | os.PathLike) -> None:
    """Refuse (naming the file and the layer) a Keras .h5 whose architecture names anything not allow-listed."""
    source = str(source)
    if "model_config" not in file.attrs:
        raise BrainzooError(f"{source}: has no model_config (a weights-only file?); a whole Keras .h5 model is needed")
    try:
        model = json.loads(file.attrs["model_config"])
        if model["class_name"] not in MODEL_CLASSES:
            raise BrainzooError(f"{source}: holds a {model['class_name']}, not a Keras model")
        _check_layers(model, source)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        raise BrainzooError(f"{source}: the model_config is not a Keras model architecture ({err!r})") from None


def open_model_file(path: str | os.PathLike) -> h5py.File:
    """The .h5 open for reading, its architecture checked by :func:`check_model_config`."""
    try:
        file = h5py.File(path, "r")
    except (OSError, ValueError) as err:
        raise BrainzooError(f"{path}: not a Keras .h5 model file ({err})") from None
    try:
        check_model_config(file, path)
    except BrainzooError:
        file.close()
        raise
    return file


def load_keras_model(path: str | os.PathLike):
    """A ``tf.keras.Model`` from a .h5 file: built (uncompiled, in Keras' safe mode) from the very architecture
    :func:`check_model_config` passed, then given the file's weight arrays. Nothing in the file is deserialised
    any other way: no ``load_model``, which would rebuild whatever the file names."""
    import tensorflow as tf
    from keras.src.saving.serialization_lib import SafeModeScope

    import brainzoo.models  # noqa: F401  registers brainzoo's layers
    import brainzoo.models.deepbet  # noqa: F401

    with open_model_file(path) as file, SafeModeScope(True):
        try:
            model = tf.keras.models.model_from_config(json.loads(file.attrs["model_config"]))
            _load_weights(model, file)
        except (ValueError, TypeError, KeyError, OSError) as err:
            raise BrainzooError(f"{path}: cannot build the Keras model: {err}") from None
    return model


def _load_weights(model, file: h5py.File) -> None:
    """The weight arrays of a whole-model .h5 (its ``model_weights`` group) into ``model``, layer by layer in
    the file's order: arrays only, no code."""
    from keras.src.saving.legacy import hdf5_format

    hdf5_format.load_weights_from_hdf5_group(file["model_weights"], model)


class EnsembleMember:
    """One weights file of an ensemble whose files share an architecture: the members share one Keras graph and
    each swaps its own weights in when called (building a large graph costs far more than setting its weights)."""

    def __init__(self, graph, weights: list[np.ndarray]):
        self.graph, self.weights = graph, weights

    def keras_model(self):
        """The shared graph holding this member's weights, for what a call does not give (a layer's gradients)."""
        if getattr(self.graph, "_brainzoo_member", None) is not self:
            self.graph.set_weights(self.weights)
            self.graph._brainzoo_member = self
        return self.graph

    @property
    def output_shape(self):
        return self.graph.output_shape

    def __call__(self, batch: np.ndarray):
        return self.keras_model()(batch, training=False)


def load_keras_models(paths: dict[str, Path]) -> dict[str, object]:
    """Keras models of several .h5 files (checked as :func:`load_keras_model` does); files with the same
    architecture share one built graph (:class:`EnsembleMember`)."""
    configs = {}
    for name, path in paths.items():
        with open_model_file(path) as file:
            configs[name] = file.attrs["model_config"]
    shared = {config for config in configs.values() if list(configs.values()).count(config) > 1}
    models, graphs = {}, {}
    for name, path in paths.items():
        config = configs[name]
        if config not in shared:
            models[name] = load_keras_model(path)
            continue
        if config in graphs:
            with open_model_file(path) as file:
                _load_weights(graphs[config], file)
        else:
            graphs[config] = load_keras_model(path)
        models[name] = EnsembleMember(graphs[config], graphs[config].get_weights())
    return models


def user_cache_folder() -> Path:
    """``$BRAINZOO_CACHE``, else ``$XDG_CACHE_HOME/brainzoo``, else ``~/.cache/brainzoo``."""
    if os.environ.get("BRAINZOO_CACHE"):
        return Path(os.environ["BRAINZOO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "brainzoo"


def _identity(path: Path) -> tuple[str, list[int]]:
    """What tells a file's content has not changed since it was hashed: where it lives and its inode's stamps."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    return real, [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _read_verified_cache(cache: Path) -> dict:
    try:
        entries = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: files are hashed again
    return entries if isinstance(entries, dict) else {}


def _remember(cache: Path, real: str, stamps: list[int], sha256: str) -> None:
    entries = {path: entry for path, entry in _read_verified_cache(cache).items() if os.path.exists(path)}
    entries[real] = {"stat": stamps, "sha256": sha256}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(cache, force=True) as tmp:
            tmp.write_text(json.dumps(entries, indent=1) + "\n")
    except OSError:
        pass  # a read-only cache only costs the hashing again next time


def verified_sha256(weights: WeightsFile) -> str:
    """The sha256 of a present catalogue weights file, once its size and content match the spec; else an error
    naming the file, both checksums and how to repair it."""
    repair = (f"repair it with `git annex fsck {weights.path}` (which moves a damaged copy aside) and then "
              f"`brainzoo get {weights.version_id}`")
    try:
        real, stamps = _identity(weights.path)
    except OSError as err:
        raise BrainzooError(f"{weights.path}: cannot read the weights file ({err}); {repair}") from None
    if weights.size is not None and stamps[2] != weights.size:
        raise BrainzooError(f"{weights.path}: {stamps[2]} bytes, but the spec of {weights.version_id} says "
                            f"{weights.size}; the file is damaged or not the published one; {repair}")
    cache = user_cache_folder() / VERIFIED_CACHE_NAME
    entry = _read_verified_cache(cache).get(real)
    if isinstance(entry, dict) and entry.get("stat") == stamps and SHA256_PATTERN.fullmatch(str(entry.get("sha256"))):
        actual = entry["sha256"]
    else:
        actual = sha256_of(real)
        _remember(cache, real, stamps, actual)
    if actual != weights.sha256:
        raise BrainzooError(f"{weights.path}: sha256 {actual} differs from the spec's {weights.sha256} "
                            f"({weights.version_id}, weights {weights.name!r}): the file is damaged or not the "
                            f"published one; {repair}")
    return actual


def verified_weights_path(ref: str | os.PathLike, name: str | None = None) -> Path:
    """A weights file to load: an existing file path as it is, or a catalogue version's weights entry ``name``
    once :func:`verified_sha256` has checked it."""
    if Path(ref).is_file():
        return Path(ref)
    path = catalogue.resolve_weights(ref, name)
    verified_sha256(catalogue.find_version(str(ref)).weights_file(name))
    return path
