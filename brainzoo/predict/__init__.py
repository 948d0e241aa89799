"""Prediction: a brain mask, a brain age or a class (an age group) from one NIfTI scan, driven by a model version's
spec.

The spec's ``inference`` section, parsed (:class:`brainzoo.spec.Inference`), says what the model expects:
``input`` (orientation, spacing, shape, optional block shape), ``preprocessing`` (steps run in the listed order)
and ``output`` (how to decode). A model is a Keras model or any callable on float32 arrays shaped (batch, D, H, W, 1).

Preprocessing steps: ``first-volume`` (always done on loading unless a ``volume`` step, the first, names another
volume of a 4D series by its ``index`` counted from 0), ``n4`` (bias-field correction),
``brain-extraction`` (multiply by the brain mask passed in), ``register`` (affine to MNI152 1 mm, 182x218x182:
``template: mni152-brain``, a brain to the template brain, or ``mni152-head``, a whole head to a whole head),
``reorient`` / ``resample`` / ``conform`` (= both, to ``input``'s orientation, spacing and shape), and the
array steps of :mod:`brainzoo.predict.steps` (``crop``, ``pad``, ``resize``, ``bounds-crop``, ``zoom``,
``transpose``, ``zscore``, ``zscore-above-mean``, ``divide-by-mean``, ``minmax``, ``percentile``, ``scale``,
``histogram-standardisation``).

Each call returns a record (a plain dict, JSON-ready): the input, the steps with their options, the
predictions, per-step timings in seconds and the warnings raised on the way (which are also re-issued).
"""

from __future__ import annotations

import contextlib
import numbers
import os
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import nibabel as nib
import numpy as np

from brainzoo.errors import BrainzooError
from brainzoo.predict import brain_age, classification
from brainzoo.predict.blocks import Model, predict_block_below_head_top, predict_blocks, run_model
from brainzoo.predict.postprocess import clean_mask
from brainzoo.predict.steps import ARRAY_STEPS, apply_array_step, check_step_options
from brainzoo.predict.volumes import (DEFAULT_MAX_VOXELS, GriddedVolume, ImageSource, conform, load_mask,
                                      load_volume, native_like, reorient, resample, source_name)

if TYPE_CHECKING:
    from brainzoo.spec import Inference, ModelInput, Step

# SimpleITK (registration, N4) and matplotlib (QC pictures) are imported by the steps that use them: a brain
# mask needs neither, and their imports would add ~0.4 s to every brain-extraction process.

# What can fit a register step: our own affine registration, or NiftyReg's reg_aladin (the upstream's tool).
REGISTRATIONS = ("brainzoo", "niftyreg")


def _voxelwise_output(volume: GriddedVolume, model: Model, model_input: ModelInput, overlap: float,
                      batch_size: int) -> tuple[np.ndarray, list[int] | None]:
    """The network's output over the model grid (D, H, W, channels): in blocks tiling it, or in one block below
    the top of the head (then also that block's start)."""
    if model_input.block_placement == "below-head-top":
        return predict_block_below_head_top(volume.data, model, block_shape=model_input.block_shape,
                                            spacing_mm=volume.voxel_sizes,
                                            below_mm=model_input.block_centre_below_head_top_mm)
    return predict_blocks(volume.data, model, block_shape=model_input.block_shape, overlap=overlap,
                          batch_size=batch_size), None


def predict_label_map(img: ImageSource, model: Model, *, inference: Inference, overlap: float = 0.5,
                      batch_size: int = 1, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[nib.Nifti1Image, dict]:
    """The most probable class of each voxel on the scan's own grid (uint8: the class's position in
    ``output.classes``, 0 the background), from a network with one softmax channel per class."""
    _check_spec(inference, {"label-map"})
    classes = list(inference.output.labels)
    with _Recorder(img, "segmentation") as recorder:
        with recorder.timed("load"):
            image = load_volume(img, max_voxels=max_voxels, volume=inference.series_volume)
        recorder.describe_input(image)
        volume = _preprocess(GriddedVolume.native(image), inference, _Context(), recorder)
        with recorder.timed("predict"):
            probability, _ = _voxelwise_output(volume, model, inference.input, overlap, batch_size)
        if probability.shape[-1] != len(classes):
            raise BrainzooError(f"the model returned {probability.shape[-1]} channels; output.classes names "
                                f"{len(classes)}")
        with recorder.timed("to-native"):
            # Outside the model grid every class is 0, so the background (class 0) wins there.
            native = np.stack([volume.to_native_grid(probability[..., c]) for c in range(len(classes))], axis=-1)
            labels = np.argmax(native, axis=-1).astype(np.uint8)
        recorder.record["prediction"] = {"classes": classes,
                                         "voxels": {name: int((labels == i).sum()) for i, name in enumerate(classes)}}
    return native_like(image, labels, np.uint8), recorder.record


def predict_brain_mask(img: ImageSource, model: Model, *, inference: Inference, overlap: float = 0.5,
                       batch_size: int = 1, keep_largest: bool = True, fill_holes: bool = True,
                       max_voxels: int = DEFAULT_MAX_VOXELS, qc_png: str | os.PathLike | None = None,
                       force: bool = False) -> tuple[nib.Nifti1Image, nib.Nifti1Image, dict]:
    """Brain mask (uint8) and brain probability (float32) of a scan, both on the scan's own grid and header.

    The model runs on the grid the spec's preprocessing makes (in blocks of ``input.block_shape`` blended
    with Gaussian weights, ``overlap`` apart, ``batch_size`` at a time; whole if no block shape; in one block
    centred ``input.block_centre_below_head_top_mm`` under the top of the head if ``input.block_placement`` is
    ``below-head-top``, 0 outside the block); its probability map is resampled back to the native grid,
    thresholded at ``output.threshold`` (0.5 if not given) and cleaned (largest component, holes filled).
    ``qc_png``, if given, gets a picture of the mask.
    """
    _check_spec(inference, {"probability-mask"})
    with _Recorder(img, "brain-extraction") as recorder:
        with recorder.timed("load"):
            image = load_volume(img, max_voxels=max_voxels, volume=inference.series_volume)
        recorder.describe_input(image)
        volume = _preprocess(GriddedVolume.native(image), inference, _Context(), recorder)
        threshold = inference.output.threshold
        with recorder.timed("predict"):
            probability, block_start = _voxelwise_output(volume, model, inference.input, overlap, batch_size)
        if probability.shape[-1] != 1:
            raise BrainzooError(f"the model returned {probability.shape[-1]} channels; a probability-mask model "
                                "returns one")
        with recorder.timed("to-native"):
            native_probability = np.clip(volume.to_native_grid(probability[..., 0]), 0, 1)
        with recorder.timed("postprocess"):
            mask = clean_mask(native_probability, threshold, keep_largest=keep_largest, fill=fill_holes)
        if not mask.any():
            warnings.warn(f"{source_name(img)}: the predicted brain mask is empty", stacklevel=2)
        mask_img = native_like(image, mask, np.uint8)
        probability_img = native_like(image, native_probability, np.float32)
        brain_voxels = int(mask.sum())
        voxel_ml = float(abs(np.linalg.det(image.affine[:3, :3]))) / 1000
        placement = ({"overlap": overlap} if block_start is None else
                     {"brain_block_start": list(block_start)})
        recorder.record["prediction"] = {
            "threshold": threshold, "largest_component": keep_largest, "holes_filled": fill_holes, **placement,
            "brain_voxels": brain_voxels, "brain_volume_ml": round(brain_voxels * voxel_ml, 3),
        }
        if qc_png is not None:
            with recorder.timed("qc"):
                from brainzoo.predict import qc
                written = qc.save_mask_qc(qc_png, image, mask_img, force=force)
                recorder.record["qc_png"] = str(qc_png) if written else None
    return mask_img, probability_img, recorder.record


def preprocess_scan(img: ImageSource, *, inference: Inference, brain_mask: ImageSource | None = None,
                    registration: str = "brainzoo", max_voxels: int = DEFAULT_MAX_VOXELS,
                    qc_png: str | os.PathLike | None = None, until: str | None = None,
                    force: bool = False) -> tuple[nib.Nifti1Image, dict]:
    """The model-ready volume of a scan after every preprocessing step of the spec (or only those up to and
    including the step named ``until``: a training record, whose other steps the training pipeline runs), and
    its record.

    The volume is exactly what :func:`predict_brain_age` feeds the networks. After a ``register`` step it is
    placed in template (MNI) world, on the template grid as the later crops and resizes leave it, so it
    overlays the template; the record's ``registration.template_to_input_world`` takes it back to the scan.
    ``registration`` says what fits a ``register`` step: ``brainzoo`` or ``niftyreg``.
    """
    with _Recorder(img, "preprocess") as recorder:
        volume, context = _load_and_preprocess(img, inference, brain_mask, registration, max_voxels, recorder, until)
        if qc_png is not None:
            with recorder.timed("qc"):
                recorder.record["qc_png"] = _registration_qc(qc_png, context, force)
    return nib.Nifti1Image(volume.data, model_grid_affine(volume, context)), recorder.record


def model_grid_affine(volume: GriddedVolume, context: _Context) -> np.ndarray:
    """Where the network's input grid lies: in the scan's world, or in template world after a register step."""
    if context.template_to_input is None:
        return volume.affine
    return np.linalg.inv(context.template_to_input) @ volume.affine


def predict_brain_age(img: ImageSource, models: Sequence[Model], *, inference: Inference, age: float | None = None,
                      brain_mask: ImageSource | None = None, registration: str = "brainzoo",
                      max_voxels: int = DEFAULT_MAX_VOXELS, qc_png: str | os.PathLike | None = None,
                      force: bool = False) -> dict:
    """Brain age of a scan from one model or an ensemble sharing one spec; the record holds the result.

    The scan is preprocessed once as the spec says (``brain_mask`` serves a ``brain-extraction`` step), every
    model runs on the whole preprocessed volume, each output is decoded (``age``, and ``sd`` of the predicted
    age distribution where the model gives one), and the ensemble mean and spread are reported. With the
    chronological ``age``, the record adds the gap and, if the spec has ``output.bias_correction``, the
    bias-corrected gap (see :mod:`brainzoo.predict.brain_age`). ``qc_png`` gets a picture of the
    registration when the preprocessing registers.
    """
    _check_spec(inference, {"age-log-probabilities", "age"})
    if not models:
        raise BrainzooError("no model given")
    if age is not None and not (isinstance(age, numbers.Real) and np.isfinite(age) and age >= 0):
        raise BrainzooError(f"chronological age must be a non-negative number of years, not {age!r}")
    with _Recorder(img, "brain-age") as recorder:
        volume, context = _load_and_preprocess(img, inference, brain_mask, registration, max_voxels, recorder)
        predictions = []
        for index, model in enumerate(models):
            with recorder.timed("predict"):
                output = run_model(model, volume.data[np.newaxis, ..., np.newaxis])
            predictions.append({"model": index} | brain_age.decode_output(output, inference.output))
        recorder.record["predictions"] = predictions
        recorder.record["result"] = brain_age.ensemble([p["age"] for p in predictions])
        if age is not None:
            recorder.record["result"] |= brain_age.brain_age_gap(recorder.record["result"]["brain_age"], age,
                                                                 inference.output.bias_correction)
        if qc_png is not None:
            with recorder.timed("qc"):
                recorder.record["qc_png"] = _registration_qc(qc_png, context, force)
    return recorder.record


def predict_classification(img: ImageSource, models: Sequence[Model], *, inference: Inference,
                           covariates: Sequence[float] = (), brain_mask: ImageSource | None = None,
                           max_voxels: int = DEFAULT_MAX_VOXELS) -> dict:
    """Class probabilities and the most probable class of a scan (an age group, say), as the spec's output says.

    The scan is preprocessed once as the spec says (``brain_mask`` serves a ``brain-extraction`` step); each
    model takes the volume and then ``covariates`` (already coded, see
    :func:`brainzoo.predict.classification.covariate_values`), returns logits, and the record holds each model's
    probabilities and their mean's most probable class.
    """
    _check_spec(inference, classification.CLASS_OUTPUTS)
    if not models:
        raise BrainzooError("no model given")
    classes = inference.output.classes
    with _Recorder(img, "classification") as recorder:
        volume, _ = _load_and_preprocess(img, inference, brain_mask, "brainzoo", max_voxels, recorder)
        inputs = [volume.data[np.newaxis, ..., np.newaxis], *(np.full((1, 1), c, np.float32) for c in covariates)]
        predictions = []
        for index, model in enumerate(models):
            with recorder.timed("predict"):
                output = run_model(model, inputs if covariates else inputs[0])
            predictions.append({"model": index} | classification.decode_class_logits(output, classes))
        recorder.record["predictions"] = predictions
        recorder.record["result"] = classification.class_result([p["probabilities"] for p in predictions], classes)
    return recorder.record


def _load_and_preprocess(img: ImageSource, inference: Inference, brain_mask: ImageSource | None, registration: str,
                         max_voxels: int, recorder: _Recorder,
                         until: str | None = None) -> tuple[GriddedVolume, _Context]:
    """Load a scan (and its brain mask) and run the spec's preprocessing: the network input, and what it left."""
    if registration not in REGISTRATIONS:
        raise BrainzooError(f"registration must be one of {', '.join(REGISTRATIONS)}, not {registration!r}")
    with recorder.timed("load"):
        image = load_volume(img, max_voxels=max_voxels, volume=inference.series_volume)
        context = _Context(brain_mask=None if brain_mask is None else load_mask(brain_mask, image,
                                                                                max_voxels=max_voxels),
                           registration=registration)
    recorder.describe_input(image)
    if brain_mask is not None:
        recorder.record["input"]["brain_mask"] = source_name(brain_mask)
        if not inference.has_step("brain-extraction"):
            warnings.warn(f"{source_name(brain_mask)}: not used; this model's preprocessing has no "
                          "brain-extraction step", stacklevel=3)
    return _preprocess(GriddedVolume.native(image), inference, context, recorder, until), context


def _check_spec(inference: Inference, allowed: set[str]) -> None:
    kind = inference.output.type
    if kind not in allowed:
        raise BrainzooError(f"this model's output type is {kind!r}; expected {' or '.join(sorted(allowed))}")
    if len(inference.input.contrast) > 1 or inference.input.channels != 1:
        raise BrainzooError("this model takes several contrasts at once; prediction takes one scan")


class _Recorder:
    """Builds one prediction's record: input, steps, timings, and the warnings raised while it runs."""

    def __init__(self, img: ImageSource, task: str):
        self.record = {"task": task, "input": {"path": source_name(img)}, "preprocessing": [], "timings_s": {},
                       "warnings": []}
        self._catcher = warnings.catch_warnings(record=True)

    def __enter__(self) -> _Recorder:
        self._start = time.perf_counter()
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc_info) -> None:
        self._catcher.__exit__(*exc_info)
        for caught in self._caught:
            if issubclass(caught.category, UserWarning):
                self.record["warnings"].append(str(caught.message))
            warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
        self.record["timings_s"]["total"] = round(time.perf_counter() - self._start, 3)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        timings = self.record["timings_s"]
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 3)

    def describe_input(self, image: nib.Nifti1Image) -> None:
        self.record["input"] |= {
            "shape": list(image.shape[:3]),
            "voxel_size_mm": [round(float(s), 4) for s in nib.affines.voxel_sizes(image.affine)],
            "orientation": "".join(nib.aff2axcodes(image.affine)),
            "data_type": str(image.get_data_dtype()),
        }


@dataclass
class _Context:
    """What image steps need beyond the volume, and what they leave for the record and the QC picture."""

    brain_mask: np.ndarray | None = None
    registered: np.ndarray | None = None
    registration: str = "brainzoo"  # what fits a register step: "brainzoo" (ours) or "niftyreg" (reg_aladin)
    step_options: dict | None = None  # the running image step's options (a register step's template)
    template_to_input: np.ndarray | None = None  # a register step's map from template world to scan world


def check_preprocessing(steps: Sequence[Step]) -> None:
    """Every step is one this library runs, with exactly the options it takes (checked when a spec is parsed,
    :func:`brainzoo.spec.preprocessing_steps`, before any work)."""
    for position, step in enumerate(steps):
        name, options = step.name, step.options
        if name == "volume":
            index = options.get("index")
            if set(options) != {"index"} or isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise BrainzooError(f"preprocessing step 'volume' takes one option, index: the volume of a 4D "
                                    f"series, counted from 0 (got {step.as_spec()})")
            if position != 0:
                raise BrainzooError("preprocessing step 'volume' must come first: the volume is chosen on loading")
        elif name in ARRAY_STEPS:
            check_step_options(step)
        elif name not in _IMAGE_STEPS:
            raise BrainzooError(f"preprocessing step {name!r} is not supported by brainzoo.predict")
        elif name == "register":
            from brainzoo.predict.registration import TEMPLATES
            if set(options) != {"template"} or options["template"] not in TEMPLATES:
                raise BrainzooError(f"preprocessing step 'register' takes one option, template: one of "
                                    f"{', '.join(TEMPLATES)} (got {step.as_spec()})")
        elif options:
            raise BrainzooError(f"preprocessing step {name!r} takes no options (it uses the spec's input)")


def _preprocess(volume: GriddedVolume, inference: Inference, context: _Context, recorder: _Recorder,
                until: str | None = None) -> GriddedVolume:
    """Run the spec's preprocessing steps in order; the result must have the model's input shape. With ``until``,
    only the steps up to and including the one of that name run, and the shape is not yet the model's."""
    model_input, steps = inference.input, inference.preprocessing
    if until is not None:
        names = [step.name for step in steps]
        if until not in names:
            raise BrainzooError(f"preprocessing until {until!r}: no such step (the spec's: {', '.join(names)})")
        steps = steps[:names.index(until) + 1]
    for step in steps:
        with recorder.timed(step.name):
            if step.name in ARRAY_STEPS:
                volume = apply_array_step(volume, step)
            else:
                context.step_options = step.options
                volume = _IMAGE_STEPS[step.name](volume, model_input, context, recorder.record)
        recorder.record["preprocessing"].append(step.as_spec())
    if until is None and volume.data.shape != model_input.shape:
        raise BrainzooError(f"the spec's preprocessing makes a {'x'.join(map(str, volume.data.shape))} volume but "
                            f"input.shape is {'x'.join(map(str, model_input.shape))}")
    return volume


def _first_volume(volume: GriddedVolume, model_input: ModelInput, context: _Context, record: dict) -> GriddedVolume:
    """Nothing left to do: loading always keeps the first volume of a series (and warns)."""
    return volume


def _volume(volume: GriddedVolume, model_input: ModelInput, context: _Context, record: dict) -> GriddedVolume:
    """Nothing left to do: loading kept the step's volume of the series (see :attr:`brainzoo.spec.Inference.series_volume`)."""
    return volume


def _n4(volume: GriddedVolume, model_input: ModelInput, context: _Context, record: dict) -> GriddedVolume:
    from brainzoo.predict.registration import n4_correct
    return volume.moved(n4_correct(volume.data, volume.affine)[0])


def _brain_extraction(volume: GriddedVolume, model_input: ModelInput, context: _Context, record: dict) -> GriddedVolume:
    if context.brain_mask is None:
        raise BrainzooError("this model's preprocessing has a brain-extraction step: pass a brain mask")
    mask = volume.from_native_grid(context.brain_mask.astype(np.float32), order=0) > 0
    return volume.moved(volume.data * mask)


def _register(volume: GriddedVolume, model_input: ModelInput, context: _Context, record: dict) -> GriddedVolume:
    from brainzoo.predict.registration import FSL_MNI152_AFFINE, check_fit, register_to_mni152
    template = context.step_options["template"]
    if context.registration == "niftyreg":
        from brainzoo.predict.niftyreg import register_with_reg_aladin
        registered, template_to_input, summary = register_with_reg_aladin(volume.data, volume.affine,
                                                                          template=template)
    else:
        registered, template_to_input, summary = register_to_mni152(volume.data, volume.affine, template=template)
    summary = {"registration": context.registration, **summary,
               "template_to_input_world": np.round(template_to_input, 6).tolist()}
    record["registration"] = summary
    check_fit(summary, record["input"]["path"])
    context.registered, context.template_to_input = registered, template_to_input
    return volume.moved(registered, np.linalg.inv(volume.affine) @ template_to_input @ FSL_MNI152_AFFINE)


def _reorient(volume: GriddedVolume, model_input: ModelInput, context: _Context, record: dict) -> GriddedVolume:
    return reorient(volume, model_input.orientation)


def _resample(volume: GriddedVolume, model_input: ModelInput, context: _Context, record: dict) -> GriddedVolume:
    return resample(volume, model_input.spacing_mm, model_input.shape)


def _conform(volume: GriddedVolume, model_input: ModelInput, context: _Context, record: dict) -> GriddedVolume:
    return conform(volume, model_input.orientation, model_input.spacing_mm, model_input.shape)


_IMAGE_STEPS: dict[str, Callable[[GriddedVolume, ModelInput, _Context, dict], GriddedVolume]] = {
    "first-volume": _first_volume, "volume": _volume, "n4": _n4, "brain-extraction": _brain_extraction, "register": _register,
    "reorient": _reorient, "resample": _resample, "conform": _conform,
}


def _registration_qc(path: str | os.PathLike, context: _Context, force: bool) -> str | None:
    if context.registered is None:
        warnings.warn(f"{path}: no QC picture; this model's preprocessing does not register", stacklevel=2)
        return None
    from brainzoo.predict import qc
    from brainzoo.predict.registration import FSL_MNI152_AFFINE, mni152_brain
    brain = nib.Nifti1Image(context.registered, FSL_MNI152_AFFINE)
    template_mask = nib.Nifti1Image(mni152_brain()[1].astype(np.uint8), FSL_MNI152_AFFINE)
    return str(path) if qc.save_registration_qc(path, brain, template_mask, force=force) else None


__all__ = ["predict_brain_mask", "predict_brain_age", "predict_classification", "preprocess_scan"]
