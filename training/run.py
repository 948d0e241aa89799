"""`brainzoo train` and `brainzoo transfer`: a version's spec, the user's TFRecords, and the engine.

The spec's ``training`` section says everything that makes a run reproducible: the data pipeline
(``training.data``), loss, optimiser and schedule, epochs, batch size and seed. Command-line values
override it for one run and are written into the run's own record.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import datetime
import fnmatch
import json
import shlex
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from brainzoo import catalogue
from brainzoo.errors import BrainzooError
from brainzoo.fileio import atomic_output, sha256_of
from brainzoo.model_files import load_keras_model, open_model_file, verified_weights_path
from brainzoo.models import BUILDERS
from brainzoo.models.layers import pytorch_parameter_count
from brainzoo.outputs import BIN_KEYS, AgeBins, builder_options
from brainzoo.spec import ModelInput, Training, TrainingData
from brainzoo.training.adversarial import generated_pairs, train_gan
from brainzoo.training.engine import CHECKPOINT_DIR, TrainingPlan, fit
from brainzoo.training.objectives import Objective
from brainzoo.training.pipeline import augmentation_from_spec, regression_volumes, segmentation_blocks
from brainzoo.training.tfrecords import check_records, read_dataset

# training.data.kind of an encoder trained on its generator's own (G(z), z) pairs, and of an autoencoder (each
# volume its own target).
GENERATED_PAIRS = "generated-pairs"
RECONSTRUCTION = "reconstruction"


def model_builder(spec: dict, input_shape) -> Callable[[], tf.keras.Model]:
    name = spec["architecture"]["builder"]
    if name not in BUILDERS:
        raise BrainzooError(f"architecture.builder: unknown builder {name!r} (known: {', '.join(sorted(BUILDERS))})")
    options = builder_options(spec)
    return lambda: BUILDERS[name](input_shape=input_shape, **options)


def datasets(data: TrainingData, plan: TrainingPlan, train_records, validation_records, orientation: str = "RAS"):
    """``train(epoch)`` and ``validation()`` factories of ``(x, y)`` batches, deterministic per epoch, their volumes
    in ``orientation`` (the spec's inference.input.orientation; the records hold RAS).

    ``validation_normalization`` serves a recipe whose validation (and inference) normalised otherwise than its
    training did (the FLAIR SFCN: min-max when training, non-zero z-score then min-max when validating).
    """
    kind = data.kind
    augmentation = augmentation_from_spec(data.augmentation)

    def common(training: bool) -> dict:
        return {"batch_size": plan.batch_size, "drop_remainder": training, "orientation": orientation,
                "normalization": data.normalization if training else data.validation_normalization,
                "augmentation": augmentation if training else None,
                "shuffle_buffer": data.shuffle_buffer if training else 0}

    if kind == "segmentation":
        def pipeline(records, seed, training):
            return segmentation_blocks(read_dataset(records), data.block_shape,
                                       sampling=data.sampling if training else "grid", jitter=data.jitter,
                                       blocks_per_volume=data.blocks_per_volume,
                                       overlap=0 if training else data.overlap, seed=seed, **common(training))
    elif kind == "regression":
        def pipeline(records, seed, training):
            return regression_volumes(read_dataset(records), data.input_shape, targets=list(data.targets),
                                      random_crop=training and data.random_crop,
                                      random_crop_within=data.random_crop_within, seed=seed, **common(training))
    elif kind == RECONSTRUCTION:
        def pipeline(records, seed, training):
            volumes = regression_volumes(read_dataset(records), data.input_shape, targets=["label"], seed=seed,
                                         **common(training))
            return volumes.map(lambda volume, _: (volume, volume))
    elif kind == GENERATED_PAIRS:
        return generated_pair_datasets(data, plan, train_records)
    else:
        raise BrainzooError(f"training.data.kind: {kind!r} is not segmentation, regression, {RECONSTRUCTION} or "
                            f"{GENERATED_PAIRS}")

    def train(epoch: int) -> tf.data.Dataset:
        return pipeline(train_records, plan.seed + epoch, True).repeat()

    def validation() -> tf.data.Dataset:
        return pipeline(validation_records, plan.seed, False)

    return train, (validation if validation_records else None)


def generated_pair_datasets(data: TrainingData, plan: TrainingPlan, generator_ref):
    """The encoder's data: ``data.pairs`` fixed (G(z), z) pairs of the generator ``generator_ref`` (a catalogue id
    or a model file), the last ``validation_fraction`` of them held out."""
    generator = load_keras_model(verified_weights_path(generator_ref))
    validation_count = int(round(data.pairs * data.validation_fraction))
    train_count = data.pairs - validation_count
    if train_count < plan.batch_size or validation_count < 1:
        raise BrainzooError(f"training.data: {data.pairs} pairs leave {train_count} for training and "
                            f"{validation_count} for validation; need a batch ({plan.batch_size}) and one")

    def train(epoch: int) -> tf.data.Dataset:
        return generated_pairs(generator, 0, train_count, batch_size=plan.batch_size, seed=plan.seed,
                               shuffle_seed=plan.seed + epoch).repeat()

    def validation() -> tf.data.Dataset:
        return generated_pairs(generator, train_count, validation_count, batch_size=plan.batch_size, seed=plan.seed)

    return train, validation


def check_training_records(train_records, validation_records) -> None:
    """Every record of the training and validation shards read once before any work: a damaged shard (a validation
    shard too, which would otherwise fail only at the first epoch's end) is named with its record number now."""
    for records in (train_records, validation_records):
        if records:
            check_records(records)


def resolve_spec(ref: str) -> tuple[dict, Path | None]:
    """A catalogue version (id or folder) or a path to a spec file."""
    path = Path(ref)
    if path.is_file():
        return catalogue.read_yaml(path), None
    version = catalogue.find_version(ref)
    return version.spec, version.path


def training_of(spec: dict, ref: str) -> tuple[Training, ModelInput | None]:
    """A spec's training section and its network's input parsed, for a run (a spec written for training alone may
    have no inference.input); a spec without training data is an error."""
    training = Training.from_spec(spec.get("training"))
    if training is None or training.data is None:
        raise BrainzooError(f"{ref}: its spec has no training section (training.data) to train with")
    inference = spec.get("inference") or {}
    return training, ModelInput.from_spec(inference["input"]) if "input" in inference else None


def network_orientation(model_input: ModelInput | None) -> str:
    """The orientation of the network's input arrays, as predict builds them; without an input section, the
    records' RAS."""
    return model_input.orientation if model_input else "RAS"


def claim_run_folder(folder: Path, run: dict, force: bool) -> None:
    """Record ``run`` in ``folder/run.json``; the same run resumes from its checkpoints there.

    A different earlier run is an error, or with ``force`` is replaced: its checkpoints go, since the engine
    would otherwise resume from them, and so do its model.h5 and metrics.json, which would otherwise say that the
    new run is done while it is still in chunks.
    """
    run_file = folder / "run.json"
    if run_file.exists() and json.loads(run_file.read_text()) != json.loads(json.dumps(run)):
        if not force:
            raise BrainzooError(f"{folder}: holds a different run ({run_file.read_text()}); "
                                "choose another folder or pass --force")
        for checkpoints in folder.glob(f"**/{CHECKPOINT_DIR}"):
            shutil.rmtree(checkpoints)
        for output in (folder / "model.h5", folder / "metrics.json"):
            output.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(run_file, force=True) as tmp:
        tmp.write_text(json.dumps(run, indent=2))


def train(ref: str, train_records, validation_records, out_dir, *, init_weights: str | None = None,
          force: bool = False, progress: bool = True, max_steps: int | None = None,
          time_budget_s: float | None = None, **overrides) -> dict:
    """Train the model a spec describes; resumes when ``out_dir`` holds this run's checkpoints.

    ``init_weights``: a saved model (.h5) whose weights, matched by layer name, start the run instead of a
    random initialisation: a second stage (say, whole volumes after blocks) goes on from the first's model.
    ``max_steps`` and ``time_budget_s`` bound this call (see :func:`.engine.fit`): the run goes on in chunks, the
    same call each time, until the result says ``finished`` and ``out_dir`` holds model.h5 and metrics.json. They
    are not part of the run's identity (run.json), so a chunk may have another bound than the one before.
    """
    spec, _ = resolve_spec(ref)
    training, model_input = training_of(spec, ref)
    out_dir = Path(out_dir)
    run = {"spec": ref, "train": str(train_records), "validation": str(validation_records),
           "overrides": {k: v for k, v in overrides.items() if v is not None}}
    if init_weights is not None and training.adversarial:
        raise BrainzooError(f"{ref}: --init-weights does not apply to adversarial training (two networks)")
    if training.adversarial and (max_steps is not None or time_budget_s is not None):
        raise BrainzooError(f"{ref}: adversarial training does not run in chunks (--max-steps, --time-budget)")
    if training.adversarial and spec["training"].get("select") is not None:
        raise BrainzooError(f"{ref}: adversarial training has no validation value to select an epoch by; remove "
                            "training.select")
    if init_weights is not None:
        if not Path(init_weights).is_file():
            raise BrainzooError(f"{init_weights}: no such model file to start from")
        open_model_file(init_weights).close()  # a file that could run code is refused before any work starts
        run["init_weights"] = {"path": str(init_weights), "sha256": sha256_of(Path(init_weights))}
    if training.data.kind == GENERATED_PAIRS:
        if validation_records:
            raise BrainzooError(f"{ref}: trains on pairs its generator makes (--train names the generator) and "
                                "validates on held-out ones; --validation does not apply")
        run["train"] = {"generator": str(train_records), "sha256": sha256_of(verified_weights_path(train_records))}
    else:
        check_training_records(train_records, validation_records)
    plan = TrainingPlan.from_spec(spec, **overrides)
    if training.adversarial:
        claim_run_folder(out_dir, run, force)
        return train_gan(spec, training, train_records, out_dir, plan, progress=progress)
    train_data, validation_data = datasets(training.data, plan, train_records, validation_records,
                                           network_orientation(model_input))
    plan.check_validation(validation_data)  # before run.json names a run without validation records
    claim_run_folder(out_dir, run, force)
    builder = model_builder(spec, training.data.network_input_shape)
    if init_weights is not None:
        fresh = builder

        def builder() -> tf.keras.Model:  # the engine restores its checkpoints over this when resuming
            model = fresh()
            transplant(load_keras_model(init_weights), model, [])
            return model
    result = fit(builder, train_data, validation_data, plan, out_dir, progress=progress, max_steps=max_steps,
                 time_budget_s=time_budget_s)
    grid = whole_grid_shape(model_input, training.data)
    if grid and result["finished"] and grid != training.data.block_shape and (out_dir / "model.h5").exists():
        whole = model_builder(spec, (*grid, 1))()
        whole.set_weights(load_keras_model(out_dir / "model.h5").get_weights())
        with atomic_output(out_dir / "model.h5", force=True) as tmp:
            whole.save(tmp, save_format="h5")
    return result


def whole_grid_shape(model_input: ModelInput | None, data: TrainingData) -> tuple[int, int, int] | None:
    """The grid a block-trained segmentation model is saved for: its whole inference grid, when it runs on
    that grid in one piece (``inference.input`` has a ``shape`` and no ``block_shape``).

    The U-Net is fully convolutional, so the weights are the same; but ``nobrainer predict`` and a bare
    ``load_model`` need a model whose input is the volume they are given.
    """
    if data.kind != "segmentation" or model_input is None or model_input.block_shape is not None:
        return None
    return model_input.shape


def transplant(source: tf.keras.Model, target: tf.keras.Model, replace: list[str]) -> list[str]:
    """Copy weights layer by layer (by name); layers matching ``replace`` keep their fresh initialisation.

    A layer present in both with different weight shapes must be listed in ``replace``: nothing is
    copied by position or shape guessing. Returns the names of the replaced layers.
    """
    source_layers = {layer.name: layer for layer in source.layers}
    replaced = []
    for layer in target.layers:
        if not layer.weights:
            continue
        if any(fnmatch.fnmatch(layer.name, pattern) for pattern in replace):
            replaced.append(layer.name)
            continue
        if layer.name not in source_layers:
            raise BrainzooError(f"transfer: layer {layer.name} has no counterpart in the source model; list it in --replace")
        weights = source_layers[layer.name].get_weights()
        if [w.shape for w in weights] != [w.shape for w in layer.get_weights()]:
            raise BrainzooError(f"transfer: layer {layer.name} changes shape; list it in --replace")
        layer.set_weights(weights)
    return replaced


def transfer(source_ref: str, train_records, validation_records, dest: str, *, options: dict | None = None,
             replace: list[str] = (), freeze_epochs: int = 0, trainable: list[str] = (), root: Path | None = None,
             fit_bias_correction: bool = False, force: bool = False, progress: bool = True, **overrides) -> dict:
    """Fine-tune a catalogue version on the user's TFRecords and write a new version folder ``dest``.

    ``options`` change the architecture; a ``bins`` option (start, stop, step) gives new age bins
    (``inference.output.bins``, which size the network's head and the loss's soft labels), and a ``labels`` option (class names, see :func:`label_names`) moves a U-Net to a
    new label set: a new head, a segmentation task and a label-map output. For ``freeze_epochs`` epochs only
    layers matching ``trainable`` (and the replaced ones) learn; then everything does. ``fit_bias_correction``
    (brain age) fits the age-bias line on the held-out validation records with the fine-tuned network and writes
    it to the new spec. The new folder gets a spec (source recorded), a card with the measured validation metric
    and the exact command, and ``weights/model.h5``, ready for ``datalad save``.
    """
    root = root or catalogue.repo_root()
    source = catalogue.find_version(source_ref, root)
    dest_id = dest.strip("/") if dest.startswith(catalogue.CATALOGUE_DIR + "/") else f"{catalogue.CATALOGUE_DIR}/{dest.strip('/')}"
    dest_dir = root / dest_id
    if (dest_dir / catalogue.SPEC_FILE).exists() and not force:
        raise BrainzooError(f"{dest_id}: already exists; choose a new version or pass --force")
    if not validation_records:
        raise BrainzooError("transfer: needs --validation records; the new version's card reports the metric on them")
    check_training_records(train_records, validation_records)
    if source.training is None or source.training.data is None:
        raise BrainzooError(f"{source.id}: its spec has no training section to fine-tune with")
    spec = copy.deepcopy(source.spec)  # the new version's, written with what the options change
    architecture = spec["architecture"]
    architecture["options"] = {**architecture.get("options", {}), **(options or {})}
    bins = architecture["options"].pop("bins", None)
    if bins:
        spec["inference"]["output"]["bins"] = dict(zip(BIN_KEYS, bins))
        AgeBins.from_spec(spec["inference"]["output"]["bins"], "--bins")
    spec["inference"]["output"].pop("bias_correction", None)  # the source's line, not the fine-tuned network's
    labels = architecture["options"].pop("labels", None)
    architecture["options"].pop("label_table", None)  # the command line's; _write_version records it
    if labels:
        replace = [*replace, *_relabel(spec, labels)]
    training, model_input = training_of(spec, source.id)
    plan = TrainingPlan.from_spec(spec, **overrides)
    input_shape = training.data.network_input_shape
    build = model_builder(spec, input_shape)
    if "parameters" in architecture:
        architecture["parameters"] = pytorch_parameter_count(build())
    source_weights = verified_weights_path(source.id)

    def build_initialised() -> tf.keras.Model:
        model = build()
        transplant(_source_model(source, source_weights, input_shape), model, list(replace))
        return model

    # Work inside the new folder, so an interrupted transfer resumes; it is removed once the version is written.
    work = dest_dir / ".transfer"
    claim_run_folder(work, {"source": source.id, "train": str(train_records), "validation": str(validation_records),
                            "options": options, "replace": replace, "freeze_epochs": freeze_epochs,
                            "trainable": trainable, "overrides": {k: v for k, v in overrides.items() if v is not None}},
                     force)
    results = []
    phases = [("frozen", freeze_epochs), ("all", plan.epochs - freeze_epochs)] if freeze_epochs else [("all", plan.epochs)]
    previous = None
    for phase, epochs in phases:
        if epochs <= 0:
            continue
        phase_plan = dataclasses.replace(plan, epochs=epochs)
        train_data, validation_data = datasets(training.data, phase_plan, train_records, validation_records,
                                               network_orientation(model_input))
        patterns = list(trainable) + list(replace) if phase == "frozen" else None

        def phase_model(previous=previous, patterns=patterns) -> tf.keras.Model:
            # Weights only: a saved SFCN's log_softmax activation does not deserialise with load_model.
            if previous is None:
                model = build_initialised()
            else:
                model = build()
                model.load_weights(previous)
            if patterns is not None:
                for layer in model.layers:
                    layer.trainable = any(fnmatch.fnmatch(layer.name, p) for p in patterns)
            return model

        results.append(fit(phase_model, train_data, validation_data, phase_plan, work / phase, progress=progress))
        previous = work / phase / "model.h5"
    if fit_bias_correction:
        model = build()
        model.load_weights(previous)
        spec["inference"]["output"]["bias_correction"] = fitted_bias_correction(
            model, validation_data, plan.objective, validation_records)
    record = _write_version(root, dest_id, source, spec, previous, results[-1], source_ref, train_records,
                            validation_records, options, replace, freeze_epochs, trainable, overrides)
    shutil.rmtree(work)
    return record


def fitted_bias_correction(model: tf.keras.Model, validation_data: Callable[[], tf.data.Dataset],
                           objective: Objective, records) -> dict:
    """De Lange & Cole (2020)'s line, predicted = slope * age + intercept, fitted by least squares to the model's
    predictions on held-out records (their first target is the age): the spec's ``output.bias_correction``."""
    if objective.metric != "mae":
        raise BrainzooError("transfer: a bias correction is for brain-age models")
    predicted, ages = [], []
    for x, y in validation_data():
        predicted.append(objective.predicted_age(model(x, training=False)).numpy())
        ages.append(y.numpy()[:, 0])
    predicted, ages = np.concatenate(predicted), np.concatenate(ages)
    if np.ptp(ages) == 0:
        raise BrainzooError(f"{records}: a bias correction needs held-out scans of at least two different ages")
    slope, intercept = np.polyfit(ages.astype(np.float64), predicted.astype(np.float64), 1)
    return {"method": "de-lange-cole-2020", "slope": round(float(slope), 6), "intercept": round(float(intercept), 6),
            "citation": f"de Lange & Cole 2020 (NeuroImage: Clinical 26:102229), fitted by brainzoo transfer on "
                        f"{records} (n={len(ages)}, held out from fine-tuning)"}


def label_names(classes: int | None = None, table: str | None = None) -> list[str]:
    """The class names of a new label set: from a CSV/TSV table with ``value`` and ``label`` columns (values
    0..N-1, 0 the background), or ``classes`` generic names (one class: a foreground mask)."""
    if table is not None:
        path = Path(table)
        try:
            rows = list(csv.DictReader(path.open(newline=""), delimiter="\t" if path.suffix == ".tsv" else ","))
        except OSError as err:
            raise BrainzooError(f"{table}: cannot read the label table ({err.strerror})") from err
        if not rows or not {"value", "label"} <= set(rows[0]):
            raise BrainzooError(f"{table}: a label table needs value and label columns")
        values = [row["value"].strip() for row in rows]
        if values != [str(i) for i in range(len(rows))]:
            raise BrainzooError(f"{table}: values must be 0, 1, ... in order (background 0), got {', '.join(values)}")
        names = [row["label"].strip() for row in rows]
    elif classes is not None and classes >= 1:
        names = ["foreground"] if classes == 1 else ["background", *(f"class-{i}" for i in range(1, classes))]
    else:
        raise BrainzooError(f"--classes must be at least 1, got {classes}")
    if classes is not None and len(names) != classes:
        raise BrainzooError(f"{table}: names {len(names)} classes, but --classes says {classes}")
    return names


def _relabel(spec: dict, labels: list[str]) -> list[str]:
    """Move a U-Net spec to the classes ``labels``; returns the layers to re-initialise (the head)."""
    if spec["architecture"]["builder"] != "unet":
        raise BrainzooError(f"transfer: a new label set is for a U-Net, not {spec['architecture']['builder']!r}")
    loss = spec["training"]["loss"]
    if loss["name"] not in ("dice", "jaccard"):
        raise BrainzooError(f"transfer: a new label set needs a dice or jaccard loss, not {loss['name']!r}")
    spec["architecture"]["options"]["n_classes"] = len(labels)
    loss.pop("classes", None)
    if len(labels) > 1:
        loss["classes"] = len(labels)
    spec["task"] = "segmentation"
    spec["inference"]["output"] = ({"type": "probability-mask", "threshold": 0.5} if len(labels) == 1 else
                                   {"type": "label-map", "classes": [{"label": name} for name in labels]})
    spec["inference"]["entry_point"] = {
        "argv": ["brainzoo", "predict", "segment", "{infile}", "{outfile}", "--model", "{model}"],
        "options": {"infile": {"type": "path", "required": True, "help": "scan (NIfTI)"},
                    "outfile": {"type": "path", "required": True, "help": "uint8 label map on the input grid"},
                    "model": {"type": "str", "default": spec["id"], "help": "catalogue id"}}}
    return ["head_conv"]


def _source_model(source: catalogue.Version, weights: Path, input_shape) -> tf.keras.Model:
    model = model_builder(source.spec, input_shape)()
    model.load_weights(weights)
    return model


def _write_version(root, dest_id, source, spec, model_file, result, source_ref, train_records, validation_records,
                   options, replace, freeze_epochs, trainable, overrides) -> dict:
    dest_dir = root / dest_id
    model_name, version = dest_id.split("/")[1:3]
    spec.update(id=dest_id, model=model_name, version=version)
    spec.pop("variant", None)
    if len(dest_id.split("/")) == 4:
        spec["variant"] = dest_id.split("/")[3]
    spec["weights"] = [{"name": "model", "path": "weights/model.h5", "format": "keras-h5",
                        "size": model_file.stat().st_size, "sha256": sha256_of(model_file),
                        "sources": [{"type": "inrepo-store"}]}]
    spec.pop("conversion", None)
    spec["training"].pop("stages", None)  # the source's run; transferred_from names it
    spec["training"]["transferred_from"] = {"id": source.id, "sha256": source.weights_file().sha256}
    for option in spec["inference"]["entry_point"]["options"].values():
        if option.get("default") == source.id:
            option["default"] = dest_id
    command = ["brainzoo", "transfer", source_ref, dest_id, "--train", str(train_records),
               "--validation", str(validation_records)]
    if options and options.get("bins"):
        command += ["--bins", *map(str, options["bins"])]
    if options and options.get("label_table"):
        command += ["--labels", str(options["label_table"])]
    elif options and options.get("labels"):
        command += ["--classes", str(len(options["labels"]))]
    command += [a for pattern in replace for a in ("--replace", pattern)]
    if "bias_correction" in spec["inference"]["output"]:
        command += ["--fit-bias-correction"]
    if freeze_epochs:
        command += ["--freeze-epochs", str(freeze_epochs)] + [a for p in trainable for a in ("--trainable", p)]
    command += [a for key, value in overrides.items() if value is not None for a in (f"--{key.replace('_', '-')}", str(value))]
    metric = next(k for k in result if k.startswith("val_") and k not in ("val_loss", "val_n"))
    card = copy.deepcopy(source.card)
    card["Model_details"].update(Model_version=version, Model_date=datetime.date.today().isoformat(),
                                 More_information=f"Fine-tuned from {source.id} with brainzoo transfer.")
    card["Caveats_and_recommendations"] = (f"Fine-tuned from {source.id}, whose card's caveats apply too. The measured "
                                           "metric covers only the records named under Evaluation_data.")
    card["Metrics"] = [{"name": metric.removeprefix("val_").upper() if metric == "val_mae" else "Dice",
                        "value": round(float(result[metric]), 4), "unit": "years" if metric == "val_mae" else "",
                        "statistic": "mean", "dataset": str(validation_records), "split": "validation",
                        "n": int(result["val_n"]), "source": "measured", "command": shlex.join(command)}]
    if spec["task"] != source.spec["task"]:
        output = spec["inference"]["output"]
        classes = [c["label"] for c in output.get("classes", [])] or ["foreground"]
        card["Intended_use"]["Primary_intended_uses"] = (
            f"Research segmentation of {', '.join(classes)} ({output['type']}), as trained on the records named "
            f"under Training_data; the network started from {source.id} ({source.spec['task']}) with a new head.")
    card["Training_data"] = {"Datasets": str(train_records), "Motivation": "fine-tuning on the user's data",
                             "Preprocessing": f"as in {source.id}'s spec (training.data)"}
    card["Evaluation_data"] = {"Datasets": str(validation_records), "Motivation": "held-out validation records",
                               "Preprocessing": "as for training, without augmentation"}
    (dest_dir / "weights").mkdir(parents=True, exist_ok=True)
    with atomic_output(dest_dir / "weights" / "model.h5", force=True) as tmp:
        tmp.write_bytes(model_file.read_bytes())
    catalogue.write_yaml(dest_dir / catalogue.SPEC_FILE, spec)
    catalogue.write_yaml(dest_dir / catalogue.CARD_FILE, card)
    catalogue.add_to_index(root, dest_id, spec["task"])
    return {"action": "transfer", "path": dest_id, "status": "ok", "message": f"{metric} {result[metric]:.4f}",
            "metrics": {k: v for k, v in result.items() if k.startswith("val_")}}
