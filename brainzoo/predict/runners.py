"""`brainzoo predict`: catalogue versions run on scans, one at a time or a whole study.

The version's spec decides everything: which networks to load (every weights entry; several make an
ensemble), how they run (``inference.method``, a key of ``RUNNERS``), preprocessing and output decoding. Its
``task`` decides which command runs it (``TASK_COMMANDS``): one check, :func:`runnable_version`, turns away a
version asked for something it does not do. Every record names the model versions, the sha256 of each weights file
used and the runtime that ran them, so a result can be traced to exact bytes.

Runtimes: every network runs by ONNX Runtime where every layer of its .h5 maps (:mod:`brainzoo.predict.onnx_runtime`;
``auto``, the default), which spares the process TensorFlow's import; every network of the catalogue maps, so Keras
is only the fallback for a .h5 holding a layer that does not. ``keras`` runs it in TensorFlow.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import nibabel as nib
import numpy as np
from tqdm import tqdm

import brainzoo
from brainzoo import catalogue
from brainzoo.catalogue import Version
from brainzoo.errors import BrainzooError
from brainzoo.fileio import (NIFTI_SUFFIXES, all_or_nothing, atomic_output, check_output, output_folder, save_nifti,
                             write_csv)
from brainzoo.predict.volumes import check_field_of_view, check_intensity_profile, load_volume

BIDS_CONTRAST = re.compile(r"_(T1w|T2w|FLAIR|PD)\.nii(\.gz)?$")


def input_contrast(path: Path, declared: str | None) -> str | None:
    """The scan's contrast: as declared, else from a BIDS suffix (``_T1w``, ``_FLAIR``...), else unknown."""
    if declared:
        return declared
    match = BIDS_CONTRAST.search(path.name)
    return match.group(1) if match else None


def check_contrast(version: Version, path: Path, contrast: str | None, force: bool) -> None:
    accepted = version.inference.input.contrast
    if contrast and contrast not in accepted and not force:
        raise BrainzooError(f"{path}: is {contrast}, but {version.id} was trained on {', '.join(accepted)}; "
                            "pass --force to run it anyway")


# No head fits in less; a model whose input grid is smaller than this (a test's toy) sets its own minimum.
HEAD_FIELD_OF_VIEW_MM = 100.0


def check_scan(version: Version, path: Path, contrast: str | None, force: bool) -> nib.Nifti1Image:
    """The scan, loaded once before any work: every bad input stops here. Unless ``force``, also refused: another
    contrast than the model's, a field of view too small for a head, and (when no contrast is declared or named by
    a BIDS suffix) inverted intensities."""
    check_contrast(version, path, contrast, force)
    scan = load_volume(path, volume=version.inference.series_volume)
    if not force:
        grid = version.inference.input
        model_extent = np.asarray(grid.shape) * np.asarray(grid.spacing_mm)
        check_field_of_view(scan, str(path), min(HEAD_FIELD_OF_VIEW_MM, float(model_extent.min())))
        if contrast is None:
            check_intensity_profile(scan, str(path))
    return scan


def check_outputs(outputs: list[tuple[Path | None, tuple[str, ...]]], inputs: list[Path | None],
                  force: bool) -> list[Path]:
    """The outputs asked for (None: not asked), each with its allowed suffixes, checked before any work: writable,
    the right kind of name, no input overwritten, and no two outputs at one path."""
    paths = [check_output(path, suffixes, inputs=[i for i in inputs if i is not None], force=force)
             for path, suffixes in outputs if path is not None]
    seen: dict[Path, Path] = {}
    for path in paths:
        if path.resolve() in seen:
            raise BrainzooError(f"{path}: given for two outputs ({seen[path.resolve()]} too)")
        seen[path.resolve()] = path
    return paths


RUNTIMES = ("auto", "onnxruntime", "keras")


@dataclass
class Networks:
    """A version's weights files as callables on float32 batches, and the runtime that runs them."""

    models: dict[str, Callable[[np.ndarray], object]]
    runtime: str  # e.g. "onnxruntime 1.32.0", "tensorflow 2.15.1"


def model_provenance(version: Version, runtime: str) -> dict:
    """The version, the sha256 each of its weights files was verified to have, and the runtime."""
    from brainzoo.model_files import verified_sha256

    return {"id": version.id, "weights": {w.name: verified_sha256(w) for w in version.weights},
            "brainzoo": brainzoo.__version__, "runtime": runtime}


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise BrainzooError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")


def load_networks(version: Version, runtime: str = "auto", outputs: Sequence[str] | None = None) -> Networks:
    """Every weights file of a version, run by ONNX Runtime (``onnxruntime``; ``auto`` if every layer of every
    file maps, else Keras) or as Keras models (``keras``); each returns its model's outputs or, given ``outputs``
    (layer names), those layers' (an autoencoder's code).

    Before either runtime reads a file, its size and sha256 are checked against the spec and its architecture
    against brainzoo's allow-list of layers (:mod:`brainzoo.model_files`): damaged weights and files that could
    run code are refused, whichever runtime was asked for. A network whose output does not fit the spec's
    ``inference.output`` (another number of age bins) is refused by file before it predicts anything.
    """
    from brainzoo.model_files import open_model_file, verified_sha256

    check_runtime(runtime)
    paths = {}
    for w in version.weights:
        paths[w.name] = catalogue.resolve_weights(version.id, w.name)
        verified_sha256(w)
        open_model_file(paths[w.name]).close()
    networks = _run_by(paths, runtime, outputs)
    for name, model in networks.models.items():
        version.inference.output.check_output_size(model.output_shape[-1], str(paths[name]))
    return networks


def load_network_file(path: Path, runtime: str = "auto", outputs: Sequence[str] | None = None) -> Networks:
    """A Keras .h5 file that no spec describes (a training run's ``model.h5``), its architecture checked, run as
    :func:`load_networks` runs a version's; its one network is named ``model``."""
    from brainzoo.model_files import open_model_file

    check_runtime(runtime)
    open_model_file(path).close()
    return _run_by({"model": path}, runtime, outputs)


def _run_by(paths: dict[str, Path], runtime: str, outputs: Sequence[str] | None = None) -> Networks:
    """The files at ``paths`` as callables of ``runtime`` (see :func:`load_networks`)."""
    if runtime != "keras":
        import onnxruntime

        from brainzoo.predict.onnx_runtime import OnnxModel, UnsupportedModel

        try:
            return Networks({name: OnnxModel(path, outputs) for name, path in paths.items()},
                            f"onnxruntime {onnxruntime.__version__}")
        except UnsupportedModel:
            if runtime == "onnxruntime":
                raise
    import tensorflow as tf

    from brainzoo.model_files import load_keras_models

    models = load_keras_models(paths)
    if outputs:
        models = {name: _layer_outputs(model, outputs, paths[name]) for name, model in models.items()}
    return Networks(models, f"tensorflow {tf.__version__}")


def _layer_outputs(model, outputs: Sequence[str], path: Path):
    """The Keras model computing the ``outputs`` layers of ``model`` (loaded from ``path``)."""
    import tensorflow as tf

    names = {layer.name for layer in model.layers}
    for name in outputs:
        if name not in names:
            raise BrainzooError(f"{path}: has no layer {name!r} to take an output from")
    taken = [model.get_layer(name).output for name in outputs]
    return tf.keras.Model(model.input, taken if len(taken) > 1 else taken[0])


MaskRun = Callable[[nib.Nifti1Image | Path], tuple[nib.Nifti1Image, nib.Nifti1Image, dict]]


def _blocks_runner(version: Version, networks: Callable[[], Networks], threshold: float) -> MaskRun:
    """A U-Net run on the grid its spec's preprocessing makes, whole or in blocks (:func:`predict_brain_mask`)."""
    from brainzoo.predict import predict_brain_mask

    inference = replace(version.inference, output=replace(version.inference.output, threshold=threshold))

    def run(scan):
        [network] = networks().models.values()
        return predict_brain_mask(scan, network, inference=inference)
    return run


def _deepbet_runner(version: Version, networks: Callable[[], Networks], threshold: float) -> MaskRun:
    """deepbet's two stages (:mod:`brainzoo.predict.deepbet`) with the numbers of the spec's ``inference.deepbet``."""
    from brainzoo.predict.deepbet import DeepbetExtractor

    settings = version.inference.deepbet
    extractor = functools.cache(lambda: DeepbetExtractor(networks().models["bbox"], networks().models["segmentation"],
                                                         settings))

    def run(scan):
        started = time.perf_counter()
        image = load_volume(scan)  # the same input checks as every other model
        result = extractor().extract(image, threshold=threshold)
        record = {"task": "brain-extraction", "input": {"shape": list(image.shape)},
                  "prediction": {"threshold": threshold, "brain_voxels": int(result.mask.get_fdata().sum()),
                                 "brain_volume_ml": round(result.tiv_cm3, 3)},
                  "timings_s": {"total": round(time.perf_counter() - started, 3)}}
        return result.mask, result.probability, record
    return run


@dataclass(frozen=True)
class Runner:
    """One ``inference.method``: how its networks run, and the spec tasks it serves (checked by validate)."""

    how: str
    tasks: tuple[str, ...]
    brain_mask: Callable[[Version, Callable[[], Networks], float], MaskRun] | None = None  # brain-extraction


# How a version's networks run, by its spec's ``inference.method``.
RUNNERS = {
    "blocks": Runner("a U-Net over the model grid, whole or in blended blocks", ("brain-extraction", "segmentation"),
                     _blocks_runner),
    "deepbet": Runner("deepbet's two stages, a brain box then the brain in it", ("brain-extraction",),
                      _deepbet_runner),
    "whole-volume": Runner("each network once over the whole preprocessed volume, its output decoded",
                           ("brain-age", "age-group", "sex-classification")),
    "generation": Runner("a generator from latents, or an encoder from volumes to latents",
                         ("image-generation", "latent-encoding")),
}

# The command that runs a version, by its spec's task.
TASK_COMMANDS = {"brain-extraction": "predict brain-mask", "segmentation": "predict segment",
                 "brain-age": "predict brain-age", "age-group": "predict classify",
                 "sex-classification": "predict classify", "image-generation": "generate",
                 "latent-encoding": "encode"}


def runnable_version(ref: str, command: str) -> tuple[Version, Runner]:
    """The version ``ref`` names and its runner, if ``brainzoo COMMAND`` is what runs it."""
    version = catalogue.find_version(ref)
    runner = RUNNERS[version.inference.method]  # validate vouches for the key
    if TASK_COMMANDS[version.task] != command:
        raise BrainzooError(f"{version.id}: its task is {version.task} ({runner.how}); `brainzoo "
                            f"{TASK_COMMANDS[version.task]}` runs it, not `brainzoo {command}`")
    return version, runner


@dataclass
class BrainMasker:
    """A brain-extraction version loaded once, for many scans."""

    version: Version
    run: MaskRun
    networks: Callable[[], Networks]  # loads at the first call, then cached

    @classmethod
    def load(cls, ref: str, threshold: float | None = None, runtime: str = "auto") -> BrainMasker:
        version, runner = runnable_version(ref, "predict brain-mask")
        check_runtime(runtime)
        if threshold is None:
            threshold = version.inference.output.threshold
        # Loaded at the first scan, so that a bad input or output path fails before seconds of model loading.
        networks = functools.cache(lambda: load_networks(version, runtime))
        return cls(version, runner.brain_mask(version, networks, threshold), networks)

    def brain(self, scan: nib.Nifti1Image | Path) -> np.ndarray:
        """The scan's brain mask as a boolean array on its own grid."""
        return np.asarray(self.run(scan)[0].dataobj) > 0

    def provenance(self) -> dict:
        """The version, its weights' sha256 and the runtime that ran them (loads the networks if not yet)."""
        return model_provenance(self.version, self.networks().runtime)


def predict_brain_mask_file(masker: BrainMasker, infile: Path, outfile: Path, *, brain: Path | None = None,
                            probability: Path | None = None, qc_png: Path | None = None, record_json: Path | None = None,
                            contrast: str | None = None, force: bool = False) -> dict:
    """Write the mask (and optionally the masked brain, probability map, QC picture, JSON record): all or none."""
    outputs = check_outputs([(outfile, NIFTI_SUFFIXES), (brain, NIFTI_SUFFIXES), (probability, NIFTI_SUFFIXES),
                             (qc_png, (".png",)), (record_json, (".json",))], [infile], force)
    scan = check_scan(masker.version, infile, input_contrast(infile, contrast), force)
    with all_or_nothing(outputs):
        mask, probability_img, record = masker.run(scan)
        record["input"]["path"] = str(infile)
        record["model"] = masker.provenance()
        record["outputs"] = {"mask": str(outfile)}
        save_nifti(mask, outfile, force)
        if brain is not None:
            brain_data = scan.get_fdata(dtype=np.float32) * (mask.get_fdata() > 0)
            save_nifti(nib.Nifti1Image(brain_data, scan.affine, scan.header), brain, force)
            record["outputs"]["brain"] = str(brain)
        if probability is not None:
            save_nifti(probability_img, probability, force)
            record["outputs"]["probability"] = str(probability)
        if qc_png is not None:
            from brainzoo.predict import qc

            if qc.save_mask_qc(qc_png, scan, mask, force=force):
                record["outputs"]["qc_png"] = str(qc_png)
        if record_json is not None:
            _save_json(record, record_json, force)
        return record


def predict_label_map_file(ref: str, infile: Path, outfile: Path, *, record_json: Path | None = None,
                           contrast: str | None = None, runtime: str = "auto", force: bool = False) -> dict:
    """``brainzoo predict segment``: a segmentation version's label map of one scan (and its record), all or none."""
    from brainzoo.predict import predict_label_map

    version, _ = runnable_version(ref, "predict segment")
    outputs = check_outputs([(outfile, NIFTI_SUFFIXES), (record_json, (".json",))], [infile], force)
    scan = check_scan(version, infile, input_contrast(infile, contrast), force)
    with all_or_nothing(outputs):
        networks = load_networks(version, runtime)
        [network] = networks.models.values()
        labels, record = predict_label_map(scan, network, inference=version.inference)
        record["input"]["path"] = str(infile)
        record |= {"model": model_provenance(version, networks.runtime), "outputs": {"labels": str(outfile)}}
        save_nifti(labels, outfile, force)
        if record_json is not None:
            _save_json(record, record_json, force)
        return record


def check_converted(version: Version) -> None:
    """Converted weights (brain age, age group) are made in the user's clone from the upstream checkpoints; say how
    if they are not."""
    unconverted = [w for w in version.weights if not w.published]
    if unconverted:
        hints = "; ".join(f"{w.name}: {w.conversion_hint}" for w in unconverted)
        raise BrainzooError(f"{version.id}: no prediction without its weights, which are made here by conversion "
                            f"from the upstream checkpoints ({hints})")


def spec_brain_mask(version: Version, infile: Path, masker: BrainMasker | None,
                    mask: Path | None) -> tuple[object, dict | None]:
    """The brain mask a spec's brain-extraction step needs: the user's, else our brain-extraction model's.

    Returns the mask (None when the spec has no such step) and what made it, for the record.
    """
    if not version.inference.has_step("brain-extraction"):
        if mask is not None:
            raise BrainzooError(f"{mask}: {version.id} does not skull-strip (no brain-extraction step); "
                                "it takes the whole head")
        return None, None
    if mask is not None:
        return mask, {"mask": str(mask), "made_by": "the user (--mask)"}
    masker = masker or BrainMasker.load(catalogue.DEFAULT_BRAIN_MASK_MODEL)
    brain_mask, _, mask_record = masker.run(infile)
    return brain_mask, {"model": masker.provenance(), **mask_record}


def preprocess_file(ref: str, infile: Path, outfile: Path, *, record_json: Path | None = None,
                    qc_png: Path | None = None, contrast: str | None = None, mask: Path | None = None,
                    registration: str = "brainzoo", masker: BrainMasker | None = None, training: bool = False,
                    force: bool = False) -> dict:
    """``brainzoo preprocess``: the model-ready volume of one scan (what the networks would see), no weights needed,
    or with ``training`` the volume a training record holds (the steps up to the spec's
    ``training.data.preprocessed_until``; the training pipeline runs the rest); the volume and its record and
    picture are written all or none."""
    from brainzoo.predict import preprocess_scan

    version = catalogue.find_version(ref)
    data = version.training.data if version.training else None
    until = data.preprocessed_until if training and data else None
    outputs = check_outputs([(outfile, NIFTI_SUFFIXES), (record_json, (".json",)), (qc_png, (".png",))],
                            [infile, mask], force)
    check_scan(version, infile, input_contrast(infile, contrast), force)
    with all_or_nothing(outputs):
        brain_mask, mask_record = spec_brain_mask(version, infile, masker, mask)
        image, record = preprocess_scan(infile, inference=version.inference, brain_mask=brain_mask,
                                        registration=registration, qc_png=qc_png, until=until, force=force)
        record |= {"model": {"id": version.id, "brainzoo": brainzoo.__version__}, "outputs": {"volume": str(outfile)},
                   "volume": {"shape": list(image.shape), "affine": np.round(image.affine, 6).tolist()}}
        if mask_record is not None:
            record["brain_extraction"] = mask_record
        save_nifti(image, outfile, force)
        if record_json is not None:
            _save_json(record, record_json, force)
        return record


# Result files an upstream's container writes, by the name a spec's ``output.container_files`` gives: the file
# names and what each holds. FLAIR-Brain-Age's container writes these two, with these fields.
CONTAINER_FILES = {"flair-brain-age": ("brainAge.txt", "results.json")}


def _container_files(version: Version, folder: Path | None) -> list[Path | None]:
    """The container result files asked for (``--flair-outputs``), if the spec declares them."""
    if folder is None:
        return [None, None]
    declared = version.inference.output.container_files
    if declared is None:
        raise BrainzooError(f"{version.id}: its spec declares no container result files, so --flair-outputs "
                            f"{folder} has nothing to write")
    return [folder / name for name in CONTAINER_FILES[declared]]


def predict_brain_age_file(ref: str, infile: Path, *, age: float | None = None, masker: BrainMasker | None = None,
                           out_json: Path | None = None, flair_outputs: Path | None = None, qc_png: Path | None = None,
                           contrast: str | None = None, mask: Path | None = None, registration: str = "brainzoo",
                           force: bool = False, networks: Networks | None = None) -> dict:
    """Brain age of one raw scan: brain extraction (if the spec needs one), then the predictor; outputs all or none.
    ``flair_outputs``: a folder for the container result files the spec declares."""
    from brainzoo.predict import predict_brain_age

    version, _ = runnable_version(ref, "predict brain-age")
    check_converted(version)
    age_file, results_file = _container_files(version, flair_outputs)
    outputs = check_outputs([(out_json, (".json",)), (qc_png, (".png",)), (age_file, (".txt",)),
                             (results_file, (".json",))], [infile, mask], force)
    check_scan(version, infile, input_contrast(infile, contrast), force)
    networks = networks or load_networks(version)
    with all_or_nothing(outputs):
        brain_mask, mask_record = spec_brain_mask(version, infile, masker, mask)
        record = predict_brain_age(infile, list(networks.models.values()), inference=version.inference,
                                   age=age, brain_mask=brain_mask, registration=registration, qc_png=qc_png,
                                   force=force)
        record["model"] = model_provenance(version, networks.runtime)
        if mask_record is not None:
            record["brain_extraction"] = mask_record
        if out_json is not None:
            _save_json(record, out_json, force)
        if age_file is not None:
            brain_age = record["result"]["brain_age"]
            with atomic_output(age_file, force) as tmp:
                tmp.write_text(f"{brain_age}\n")
            _save_json({"brainAge": brain_age, "biologicalAge": age}, results_file, force)
        return record


def predict_classification_file(ref: str, infile: Path, *, covariates: dict[str, str | None],
                                masker: BrainMasker | None = None, out_json: Path | None = None,
                                contrast: str | None = None, mask: Path | None = None, force: bool = False,
                                networks: Networks | None = None) -> dict:
    """Class probabilities and label of one raw scan (brain extraction if the spec needs one); the record, written
    to ``out_json`` if given. ``covariates``: the values given by name, e.g. ``{"sex": "F"}``."""
    from brainzoo.predict import predict_classification
    from brainzoo.predict.classification import covariate_values

    version, _ = runnable_version(ref, "predict classify")
    coded = covariate_values(version.inference.input, covariates, version.id)
    check_converted(version)
    outputs = check_outputs([(out_json, (".json",))], [infile, mask], force)
    check_scan(version, infile, input_contrast(infile, contrast), force)
    networks = networks or load_networks(version)
    with all_or_nothing(outputs):
        brain_mask, mask_record = spec_brain_mask(version, infile, masker, mask)
        record = predict_classification(infile, list(networks.models.values()),
                                        inference=version.inference, covariates=coded,
                                        brain_mask=brain_mask)
        record["input"]["covariates"] = {name: value for name, value in covariates.items() if value is not None}
        record["model"] = model_provenance(version, networks.runtime)
        if mask_record is not None:
            record["brain_extraction"] = mask_record
        if out_json is not None:
            _save_json(record, out_json, force)
        return record


def parse_shard(text: str | None) -> tuple[int, int]:
    """``K/N`` (1-based K) -> (K, N); a cluster array job passes its task index as K."""
    if text is None:
        return 1, 1
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise BrainzooError(f"--shard {text!r}: expected K/N with 1 <= K <= N, e.g. 3/10")
    return int(match.group(1)), int(match.group(2))


SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def study_scans(source: Path) -> list[dict]:
    """Scans of a study: a CSV/TSV (``path`` column, optional ``id``, ``age``, ``contrast``) or a BIDS folder.

    Ids name each scan's outputs, so they must be unique and plain file-name parts (no folders).
    """
    if source.is_dir():
        scans = sorted(source.glob("sub-*/**/anat/*.nii*"))
        if not scans:
            raise BrainzooError(f"{source}: no sub-*/[ses-*/]anat/*.nii[.gz] scans found")
        rows = [{"path": str(p), "id": p.name.split(".nii")[0]} for p in scans]
    else:
        try:
            text = source.read_text()
            rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if source.suffix == ".tsv" else ","))
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise BrainzooError(f"{source}: cannot read the table: {err}") from None
        if not rows or "path" not in rows[0]:
            raise BrainzooError(f"{source}: needs a 'path' column (and optionally 'id', 'age', 'contrast')")
        for row in rows:
            row["path"] = str(source.parent / (row["path"] or ""))
            if not row.get("id"):
                row["id"] = Path(row["path"]).name.split(".nii")[0]
    seen: dict[str, str] = {}
    for row in rows:
        if not SAFE_ID.fullmatch(row["id"]):
            raise BrainzooError(f"{source}: id {row['id']!r} (of {row['path']}) must be letters, digits, '.', '_' "
                                "or '-': it names the scan's output files")
        if row["id"] in seen:
            raise BrainzooError(f"{source}: {seen[row['id']]} and {row['path']} share the id {row['id']!r}; "
                                "give each scan its own id in an 'id' column")
        seen[row["id"]] = row["path"]
    return rows


def scan_age(scan: dict) -> float | None:
    """A table row's chronological age, if it gives one."""
    text = (scan.get("age") or "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise BrainzooError(f"{scan['path']}: age {text!r} is not a number of years") from None


STUDY_TASKS = ("brain-mask", "brain-age", "classify", "preprocess")


def run_study(task: str, source: Path, out_dir: Path, *, model: str | None, shard: str | None, force: bool,
              progress: bool = True, runtime: str = "auto", registration: str = "brainzoo",
              training: bool = False) -> Iterator[dict]:
    """One CSV row per scan in ``out_dir/results[-K-of-N].csv``; a failing scan's row records its error.

    ``preprocess`` writes each scan's model-ready volume (with ``training``, its training record's volume); its
    table keeps the study table's columns (age, sex...) with ``path`` naming that volume, so it feeds
    ``brainzoo tfrecords`` as it is. ``classify`` takes
    each covariate the classifier's spec declares from the column of that name (``sex``).
    """
    if task not in STUDY_TASKS:
        raise BrainzooError(f"study task must be one of {', '.join(STUDY_TASKS)}, not {task!r}")
    action = task if task == "preprocess" else f"predict-{task}"
    k, n = parse_shard(shard)
    scans = study_scans(source)[k - 1::n]
    table = out_dir / ("results.csv" if n == 1 else f"results-{k}-of-{n}.csv")
    with output_folder(out_dir):  # a study that cannot start leaves no empty folder
        check_output(table, (".csv",), inputs=[source], force=force)
        masker = BrainMasker.load(model if task == "brain-mask" else catalogue.DEFAULT_BRAIN_MASK_MODEL,
                                  runtime=runtime)
        version = runnable_version(model, f"predict {task}")[0] if task in ("brain-age", "classify") else None
        # Unconverted weights: every row then records predict_brain_age_file's explanation.
        networks = load_networks(version) if version and all(w.published for w in version.weights) else None
    rows = []
    for scan in tqdm(scans, desc=task, unit="scan", disable=not progress):
        path = Path(scan["path"])
        row = {"id": scan["id"], "path": str(path), "status": "ok", "error": ""}
        try:
            if task == "brain-mask":
                record = predict_brain_mask_file(masker, path, out_dir / f"{scan['id']}_mask.nii.gz",
                                                 record_json=out_dir / f"{scan['id']}_mask.json",
                                                 contrast=scan.get("contrast"), force=force)
                row["brain_volume_ml"] = record["prediction"]["brain_volume_ml"]
            elif task == "brain-age":
                record = predict_brain_age_file(model, path, age=scan_age(scan), masker=masker, networks=networks,
                                                out_json=out_dir / f"{scan['id']}_brain_age.json",
                                                contrast=scan.get("contrast"), registration=registration, force=force)
                row |= {k: v for k, v in record["result"].items() if not isinstance(v, (list, dict))}
            elif task == "classify":
                covariates = {c.name: scan.get(c.name) for c in version.inference.input.covariates}
                record = predict_classification_file(model, path, covariates=covariates, masker=masker,
                                                     networks=networks, out_json=out_dir / f"{scan['id']}_class.json",
                                                     contrast=scan.get("contrast"), force=force)
                result = record["result"]
                row |= {"label": result["label"], "probability": result["probability"],
                        **{f"p_{label}": p for label, p in result["probabilities"].items()}}
            else:
                row = {**scan, **row, "path": "", "input": str(path)}
                output = f"{scan['id']}.nii.gz"
                preprocess_file(model, path, out_dir / output, record_json=out_dir / f"{scan['id']}.json",
                                contrast=scan.get("contrast"), registration=registration, masker=masker,
                                training=training, force=force)
                row["path"] = output
        except BrainzooError as err:
            row |= {"status": "error", "error": str(err)}
        rows.append(row)
        yield {"action": action, "path": str(path), "status": row["status"], "message": row["error"]}
    write_csv(table, rows, list(dict.fromkeys(key for row in rows for key in row)), force)
    yield {"action": action, "path": str(table), "status": "ok", "message": f"{len(rows)} scan(s)"}


def _save_json(record: dict, path: Path, force: bool) -> None:
    with atomic_output(path, force) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
