"""Grad-CAM saliency maps of the brain-age regressors and the age-group classifiers, on the scan's own grid.

Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization"): for a convolutional layer's output channels ``A_k`` and a score ``y``, the map is
``ReLU(sum_k alpha_k A_k)`` with ``alpha_k`` the mean of ``dy / dA_k`` over the layer's grid. The score is what
the model's output means: the age of an ``age`` regressor, the expected age over the bins of an
``age-log-probabilities`` model (SFCN), the logit of one class of an ``age-group-logits`` classifier (by default
the predicted class). An ensemble's map is the mean of its members' maps.

The layer-grid map is resized to the network's input grid (trilinear, voxel centres aligned as torch's
``interpolate(align_corners=False)``), scaled so that its peak is 1, and taken back to the scan through the
very preprocessing ``brainzoo predict`` runs: the inverse of its crops, resizes and pads into template world,
then the registration's recorded map into the scan's world (:meth:`GriddedVolume.to_native_grid`).

A spec's ``explain`` section names the default ``layer`` (the last convolutional block's output) and, for a
classifier, the default ``target``; :func:`explain_problems` is what ``brainzoo validate`` checks of it.
TensorFlow is imported only by the functions that build or run a network.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import nibabel as nib
import numpy as np

from brainzoo import catalogue
from brainzoo.errors import BrainzooError
from brainzoo.fileio import NIFTI_SUFFIXES, all_or_nothing, save_nifti
from brainzoo.outputs import OutputDecoding, builder_options
from brainzoo.predict import _load_and_preprocess, _Recorder, model_grid_affine
from brainzoo.predict.steps import resize
from brainzoo.predict.volumes import DEFAULT_MAX_VOXELS, ImageSource, native_like
from brainzoo.spec import Inference

EXPLAINED_TASKS = ("brain-age", "age-group")
CLASS_OUTPUT = "age-group-logits"
EXPLAINED_OUTPUTS = ("age", "age-log-probabilities", CLASS_OUTPUT)
PREDICTED = "predicted"  # a classifier's default target: the class the model (the ensemble's mean) predicts


def class_index(target: str | int, decoding: OutputDecoding) -> int | None:
    """The output a classifier's map explains: None for ``predicted``, else the class named by label or index."""
    if decoding.type != CLASS_OUTPUT:
        raise BrainzooError(f"a {decoding.type!r} model's map explains its age; a target is for classifiers")
    if target == PREDICTED:
        return None
    labels = decoding.labels
    if str(target) in labels:
        return labels.index(str(target))
    if str(target).isdigit() and int(target) < len(labels):
        return int(target)
    raise BrainzooError(f"target {target!r} is neither {PREDICTED!r}, a class label ({', '.join(labels)}) nor a "
                        f"class index below {len(labels)}")


def output_score(outputs, decoding: OutputDecoding, index: int | None):
    """The scalar the map explains, from one sample's outputs (a TensorFlow tensor, so it can be differentiated)."""
    import tensorflow as tf

    if decoding.bins:
        return tf.reduce_sum(tf.exp(outputs[0]) * tf.constant(decoding.bins.centres, outputs.dtype))
    if decoding.type == "age":
        if outputs.shape[-1] != 1:
            raise BrainzooError(f"the model returned {outputs.shape[-1]} values; output type 'age' needs one")
        return outputs[0, 0]
    return outputs[0, index]


def feature_layer(model, name: str):
    """The layer whose output is explained: it must exist and give a 3D feature map (batch, D, H, W, channels)."""
    try:
        layer = model.get_layer(name)
    except ValueError:
        raise BrainzooError(f"{model.name} has no layer {name!r}") from None
    if len(layer.output.shape) != 5:
        raise BrainzooError(f"layer {name!r} of {model.name} gives a {layer.output.shape} output, not a 3D feature map")
    return layer


def layer_grad_cam(model, inputs, layer_name: str, score: Callable) -> tuple[np.ndarray, float]:
    """One Keras model's Grad-CAM on ``layer_name``'s grid, and the score it explains."""
    import tensorflow as tf

    features_and_outputs = tf.keras.Model(model.inputs, [feature_layer(model, layer_name).output, model.output])
    with tf.GradientTape() as tape:
        features, outputs = features_and_outputs(inputs, training=False)
        value = score(outputs)
    gradients = tape.gradient(value, features)
    channel_weights = tf.reduce_mean(gradients, axis=(1, 2, 3), keepdims=True)
    return tf.nn.relu(tf.reduce_sum(channel_weights * features, axis=-1))[0].numpy(), float(value)


@dataclass
class GradCam:
    """An (ensemble's mean) Grad-CAM on its layer's grid, and what it explains."""

    map: np.ndarray
    scores: list[float]  # each member's score (age, expected age, or the class's logit)
    class_index: int | None


def predicted_class(models: Sequence, inputs) -> int:
    """The class of the ensemble's mean probabilities."""
    import tensorflow as tf

    probabilities = [tf.nn.softmax(model(inputs, training=False)[0]).numpy() for model in models]
    return int(np.argmax(np.mean(probabilities, axis=0)))


def grad_cam(models: Sequence, inputs, *, layer: str, decoding: OutputDecoding,
             target: str | int = PREDICTED) -> GradCam:
    """The mean Grad-CAM of Keras ``models`` (an ensemble's members share an architecture) for one sample."""
    if decoding.type not in EXPLAINED_OUTPUTS:
        raise BrainzooError(f"output type {decoding.type!r} is not explained (explained: "
                            f"{', '.join(EXPLAINED_OUTPUTS)})")
    index = None
    if decoding.type == CLASS_OUTPUT:
        index = class_index(target, decoding)
        index = predicted_class(models, inputs) if index is None else index
    maps, scores = zip(*(layer_grad_cam(model, inputs, layer, lambda out: output_score(out, decoding, index))
                         for model in models))
    return GradCam(np.mean(maps, axis=0), list(scores), index)


def on_input_grid(layer_map: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, float]:
    """A layer-grid map resized to the network's input grid and scaled to a peak of 1, and its peak before."""
    resized, _ = resize(layer_map, [int(n) for n in shape])
    peak = float(resized.max())
    return (resized / peak if peak > 0 else resized), peak


def explain_scan(img: ImageSource, models: Sequence, *, inference: Inference, layer: str,
                 target: str | int = PREDICTED, covariates: Sequence[float] = (),
                 brain_mask: ImageSource | None = None, registration: str = "brainzoo",
                 max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[nib.Nifti1Image, nib.Nifti1Image, dict]:
    """The Grad-CAM map of a scan on the scan's own grid and on the network's input grid (float32, peak 1), and
    the record.

    The scan is preprocessed exactly as ``predict`` does (``brain_mask`` serves a ``brain-extraction`` step,
    ``registration`` fits a ``register`` step); the Keras ``models`` take the volume and then ``covariates``
    (coded, see :func:`brainzoo.predict.classification.covariate_values`). The model-grid map's affine places it
    where ``brainzoo preprocess`` places the volume (template world after a ``register`` step).
    """
    decoding = inference.output
    if not models:
        raise BrainzooError("no model given")
    with _Recorder(img, "explain") as recorder:
        volume, context = _load_and_preprocess(img, inference, brain_mask, registration, max_voxels, recorder)
        batch = volume.data[np.newaxis, ..., np.newaxis]
        inputs = [batch, *(np.full((1, 1), value, np.float32) for value in covariates)] if covariates else batch
        with recorder.timed("grad-cam"):
            result = grad_cam(models, inputs, layer=layer, decoding=decoding, target=target)
        network_map, peak = on_input_grid(result.map, volume.data.shape)
        if peak == 0:
            warnings.warn(f"{recorder.record['input']['path']}: the Grad-CAM map is 0 everywhere: no channel of "
                          f"{layer!r} raises the score where it is active", stacklevel=2)
        with recorder.timed("to-native"):
            native_map = np.clip(volume.to_native_grid(network_map), 0, 1)
        if result.class_index is None:
            explained = {"score": "age" if decoding.type == "age" else "expected age over the bins"}
        else:
            label = decoding.labels[result.class_index]
            explained = {"score": f"logit of class {label!r}", "class_index": result.class_index, "label": label,
                         "chosen": "predicted" if target == PREDICTED else "given"}
        recorder.record["explanation"] = {
            "method": "grad-cam", "layer": layer, "layer_grid": list(result.map.shape), "target": explained,
            "scores": result.scores, "n_models": len(result.scores), "peak_before_scaling": peak,
        }
    reference = img if isinstance(img, nib.Nifti1Image) else nib.load(img)
    model_grid = nib.Nifti1Image(network_map.astype(np.float32), model_grid_affine(volume, context))
    return native_like(reference, native_map, np.float32), model_grid, recorder.record


def explain_settings(spec: dict, layer: str | None = None, target: str | int | None = None) -> tuple[str, str | int]:
    """The layer and target to explain: those given, else the spec's ``explain`` defaults."""
    if spec["task"] not in EXPLAINED_TASKS:
        raise BrainzooError(f"{spec['id']}: is a {spec['task']} model; Grad-CAM explains the brain-age and "
                            "age-group models")
    defaults = spec.get("explain", {})
    if layer is None and "layer" not in defaults:
        raise BrainzooError(f"{spec['id']}: its spec names no layer to explain (explain.layer); pass --layer")
    if target is not None:
        class_index(target, OutputDecoding.from_spec(spec["inference"]["output"]))  # refuses a target for a regressor, and an unknown class
    return layer or defaults["layer"], target if target is not None else defaults.get("target", PREDICTED)


def explain_file(ref: str, infile: Path, outfile: Path, *, layer: str | None = None, target: str | None = None,
                 sex: str | None = None, model_grid: Path | None = None, qc_png: Path | None = None,
                 record_json: Path | None = None, contrast: str | None = None, mask: Path | None = None,
                 registration: str = "brainzoo", force: bool = False) -> dict:
    """``brainzoo explain``: the map of one scan written on its grid (and on request on the model's grid, with a
    QC picture and the record), all or none; every bad input and output is refused before any work."""
    from brainzoo.predict import runners
    from brainzoo.predict.classification import covariate_values

    version = catalogue.find_version(ref)
    layer, target = explain_settings(version.spec, layer, target)
    outputs = runners.check_outputs([(outfile, NIFTI_SUFFIXES), (model_grid, NIFTI_SUFFIXES), (qc_png, (".png",)),
                                       (record_json, (".json",))], [infile, mask], force)
    runners.check_scan(version, infile, runners.input_contrast(infile, contrast), force)
    covariates = covariate_values(version.inference.input, {"sex": sex}, version.id)
    runners.check_converted(version)
    networks = runners.load_networks(version, "keras")
    models = [keras_model(network) for network in networks.models.values()]
    feature_layer(models[0], layer)
    with all_or_nothing(outputs):
        brain_mask, mask_record = runners.spec_brain_mask(version, infile, None, mask)
        native_map, model_grid_map, record = explain_scan(
            infile, models, inference=version.inference, layer=layer, target=target,
            covariates=covariates, brain_mask=brain_mask, registration=registration)
        record["model"] = runners.model_provenance(version, networks.runtime)
        if mask_record is not None:
            record["brain_extraction"] = mask_record
        record["outputs"] = {"map": str(outfile)}
        save_nifti(native_map, outfile, force)
        if model_grid is not None:
            save_nifti(model_grid_map, model_grid, force)
            record["outputs"]["model_grid_map"] = str(model_grid)
        if qc_png is not None:
            from brainzoo.predict import qc

            if qc.save_saliency_qc(qc_png, nib.load(infile), native_map, force=force):
                record["outputs"]["qc_png"] = str(qc_png)
        if record_json is not None:
            runners._save_json(record, record_json, force)
        return record


def keras_model(network):
    """A loaded network as a Keras model holding its weights (an ensemble member's are swapped into its graph)."""
    from brainzoo.model_files import EnsembleMember

    return network.keras_model() if isinstance(network, EnsembleMember) else network


@functools.lru_cache(maxsize=None)
def _layer_ranks(builder: str, options_json: str) -> dict[str, int]:
    """Each layer of an architecture built with its spec's options, with the rank of its output."""
    from brainzoo.models import BUILDERS

    model = BUILDERS[builder](**json.loads(options_json))
    return {layer.name: len(layer.output.shape) for layer in model.layers}


def explain_problems(spec: dict) -> Iterator[str]:
    """What is wrong with a spec's ``explain`` section: every brain-age and age-group spec has one, its layer is a
    layer of the built architecture with a 3D feature map, and its target is a class of the model's output."""
    from brainzoo.models import BUILDERS

    explain = spec.get("explain")
    if spec["task"] not in EXPLAINED_TASKS:
        if explain is not None:
            yield f"explain: a {spec['task']} model is not explained (only {', '.join(EXPLAINED_TASKS)} models are)"
        return
    if explain is None:
        yield (f"explain: missing; a {spec['task']} model names the layer `brainzoo explain` maps by default "
               "(its last convolutional block's output)")
        return
    if "target" in explain:
        try:
            class_index(explain["target"], OutputDecoding.from_spec(spec["inference"]["output"]))
        except BrainzooError as err:
            yield f"explain.target: {err}"
    builder = spec["architecture"]["builder"]
    if builder not in BUILDERS:
        return  # reported with the architecture
    ranks = _layer_ranks(builder, json.dumps(builder_options(spec), sort_keys=True))
    if explain["layer"] not in ranks:
        yield f"explain.layer: {explain['layer']!r} is not a layer of the {builder} architecture"
    elif ranks[explain["layer"]] != 5:
        yield f"explain.layer: {explain['layer']!r} of the {builder} architecture does not give a 3D feature map"


__all__ = ["explain_file", "explain_scan", "explain_problems", "grad_cam", "on_input_grid"]
