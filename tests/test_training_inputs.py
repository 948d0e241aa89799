"""Training sees what predict sees: a scan through `brainzoo preprocess --training` and `brainzoo tfrecords` is, on
the training pipeline's validation path, the very array `predict brain-age` feeds the network. And every training
section of the catalogue trains (reduced) and checkpoints; `brainzoo train` killed with SIGKILL resumes exactly."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, brainzoo_command, cli_environment
from test_engine import final_weights

from brainzoo import catalogue, validate
from brainzoo.errors import BrainzooError
from brainzoo.predict import predict_brain_age, preprocess_scan
from brainzoo.outputs import AgeBins
from brainzoo.spec import Inference, Training
from brainzoo.training import run
from brainzoo.training.engine import CHECKPOINT_DIR, TrainingPlan, fit
from brainzoo.training.tfrecords import write_tfrecords


def scan_for(shape) -> nib.Nifti1Image:
    """A textured, left-right asymmetric head on a zero background, RAS at 1 mm (the records' orientation)."""
    rng = np.random.default_rng(3)
    grid = np.indices(shape) - (np.array(shape)[:, None, None, None] - 1) / 2
    inside = ((grid / (np.array(shape)[:, None, None, None] / 2.3)) ** 2).sum(axis=0) < 1
    data = np.where(inside, rng.gamma(4.0, 100.0, shape) + 40 * np.arange(shape[0])[:, None, None], 0)
    return nib.Nifti1Image(data.astype(np.float32), np.eye(4))


@pytest.mark.parametrize("version, shape", [
    ("neuronets/flair-brainage-densenet169/1.0.0/flair", (60, 72, 60)),
    ("neuronets/flair-brainage-sfcn/1.0.0/flair", (164, 196, 164)),
])
def test_the_validation_input_is_predicts_input(version, shape, tmp_path):
    """The spec's steps after registration (n4 and register run the same code on both paths and are left out to
    keep the test fast; a reorient step to the network's LAS stands for register's output grid)."""
    spec = copy.deepcopy(catalogue.find_version(version, REPO).spec)
    steps = [step for step in spec["inference"]["preprocessing"] if step["step"] not in ("n4", "register")]
    spec["inference"]["preprocessing"] = [{"step": "reorient"}, *steps]
    data = spec["training"]["data"]
    if data["preprocessed_until"] == "register":
        data["preprocessed_until"] = "reorient"
    output = spec["inference"]["output"]
    seen = []

    def network(batch):
        seen.append(batch[0, ..., 0])
        if output["type"] == "age":
            return np.array([[50.0]])
        n_bins = AgeBins.from_spec(output["bins"]).count
        return np.log(np.full((1, n_bins), 1 / n_bins))

    scan = scan_for(shape)
    inference = Inference.from_spec(spec["inference"])
    predict_brain_age(scan, [network], inference=inference)
    record_volume, _ = preprocess_scan(scan, inference=inference, until=data["preprocessed_until"])
    nib.save(record_volume, tmp_path / "scan.nii.gz")
    (tmp_path / "table.csv").write_text("path,age,sex\nscan.nii.gz,50,F\n")
    write_tfrecords(tmp_path / "table.csv", tmp_path / "records", kind="regression", progress=False)

    plan = TrainingPlan.from_spec(spec, batch_size=1)
    _, validation = run.datasets(Training.from_spec(spec["training"]).data, plan, tmp_path / "records",
                                 tmp_path / "records", inference.input.orientation)
    (x, y), = list(validation())
    assert y.numpy().tolist() == [[50.0]]
    np.testing.assert_allclose(x.numpy()[0, ..., 0], seen[0], atol=1e-5)
    assert np.abs(x.numpy()[0, ..., 0] - seen[0][::-1]).max() > 0.1  # a mirrored record would fail


def catalogue_training_sections() -> dict[str, dict]:
    """Every distinct (builder, training section) pair of the catalogue's brain-age and brain-extraction specs, by
    the first version that has it (variants of one model share theirs), with that version's spec."""
    sections = {}
    for spec_file in sorted((REPO / "neuronets").rglob("spec.yaml")):
        spec = catalogue.read_yaml(spec_file)
        training = spec.get("training")
        if training and spec["task"] in ("brain-age", "brain-extraction"):
            key = json.dumps([spec["architecture"]["builder"], {k: v for k, v in training.items() if k != "stages"}],
                             sort_keys=True)
            sections.setdefault(key, spec)
    return {spec["id"]: spec for spec in sections.values()}


SECTIONS = catalogue_training_sections()
# Each builder's own options make its network small: SFCN with 4 channels per block, a 4-filter U-Net with batch
# normalisation (whose graph builds in seconds where instance normalisation's takes ten), DenseNet169-3D with one
# dense layer per block, growth 4 and an 8-channel stem, Inception-ResNet-v2-3D with one block of each kind at 1/16
# of its channels. Depth sets the time to build a training graph (Inception's stem and reductions, which no option
# removes, are 23 of its 40 units here), width the time of a step and the size of the checkpoint written after each;
# `pytest tests/test_training_inputs.py -k trains_and --durations=0` shows what each case takes.
REDUCED_OPTIONS = {
    "unet": {"base_filters": 4, "norm": "batch"},
    "densenet169_3d": {"block_layers": [1, 1, 1, 1], "growth_rate": 4, "stem_features": 8},
    "inception_resnet_v2_3d": {"block_repeats": [1, 1, 1], "width_multiplier": 1 / 16},
}


def reduced(spec: dict) -> dict:
    """The spec with its training section at 32^3 volumes (16^3 blocks), 2 epochs of 2 steps of 2, a checkpoint
    every step, and a small network of its own builder (:data:`REDUCED_OPTIONS`)."""
    spec = copy.deepcopy(spec)
    training = spec["training"]
    training.pop("stages", None)
    data = training["data"]
    if data["kind"] == "regression":
        data["input_shape"] = [32, 32, 32]
        if "random_crop_within" in data:
            data["random_crop_within"] = [34, 34, 34]
    else:
        data.update(block_shape=[16, 16, 16], shuffle_buffer=0)
    training.update(epochs=2, steps_per_epoch=2, batch_size=2, checkpoint_every_steps=1)
    builder = spec["architecture"]["builder"]
    options = spec["architecture"].setdefault("options", {})
    if builder == "sfcn":
        options["channels"] = [4] * len(options.get("channels", [0] * 6))
    options.update(REDUCED_OPTIONS.get(builder, {}))
    return spec


def reduced_flair_sfcn(folder, **training) -> Path:
    """The FLAIR SFCN recipe, reduced (random crop, its listed transforms, dropout), its training section updated
    with ``training``, as ``folder``/spec.yaml."""
    spec = reduced(catalogue.find_version("neuronets/flair-brainage-sfcn/1.0.0/flair", REPO).spec)
    spec["training"].update(training)
    catalogue.write_yaml(folder / "spec.yaml", spec)
    return folder / "spec.yaml"


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Synthetic heads with brain masks and ages, at 32^3, as regression and as segmentation records."""
    from brainzoo.training.synthetic import write_synthetic_dataset

    folder = tmp_path_factory.mktemp("heads")
    table = write_synthetic_dataset(folder, 4, shape=(32, 32, 32), seed=0)
    rows = table.read_text().replace("mask", "label", 1)
    (folder / "segmentation.csv").write_text(rows)
    write_tfrecords(table, folder / "regression", kind="regression", progress=False)
    write_tfrecords(folder / "segmentation.csv", folder / "segmentation", kind="segmentation", progress=False)
    return folder


@pytest.mark.parametrize("version", sorted(SECTIONS))
def test_every_catalogue_training_section_trains_and_checkpoints(version, heads, tmp_path):
    spec = reduced(SECTIONS[version])
    data = Training.from_spec(spec["training"]).data
    plan = TrainingPlan.from_spec(spec)
    records = heads / data.kind
    train_data, validation_data = run.datasets(data, plan, records, records,
                                               Inference.from_spec(spec["inference"]).input.orientation)

    builder = run.model_builder(spec, data.network_input_shape)
    result = fit(builder, train_data, validation_data, plan, tmp_path, tf.distribute.get_strategy(),
                 progress=False)
    losses = [epoch["loss"] for epoch in result["history"]]
    assert result["steps"] == 4 and np.isfinite(losses).all() and losses[0] != losses[1]
    assert np.isfinite(result["history"][-1]["val_loss"])
    assert (tmp_path / "model.h5").is_file()
    assert list((tmp_path / CHECKPOINT_DIR).glob("ckpt-4.index"))


def test_brainzoo_train_killed_with_sigkill_resumes_to_the_weights_of_an_uninterrupted_run(heads, tmp_path):
    """The FLAIR SFCN recipe, reduced (random crop, its listed transforms, dropout), through `brainzoo train` in a
    subprocess: killed with SIGKILL once the first step's checkpoint exists (mid first epoch; the end of the run is
    seconds away), the same command resumes from the last checkpoint. (test_engine kills a run in its second epoch,
    so the restored history and early-stopping state are covered there.)

    The weights must be equal bit for bit, not merely close: each epoch's batches are a function of (seed, epoch),
    dropout draws from generators whose state is checkpointed, and TensorFlow's CPU kernels for these ops do not
    depend on thread timing, so any difference is a resumption bug, not rounding.
    """
    spec_file = reduced_flair_sfcn(tmp_path)
    records = heads / "regression"
    command = brainzoo_command("train", spec_file, "--train", records, "--validation", records, "--no-progress",
                               "--out")

    def start(name: str, out: str) -> subprocess.Popen:
        with open(tmp_path / f"{name}.log", "w") as log:
            return subprocess.Popen([*command, tmp_path / out], cwd=tmp_path, env=cli_environment(), stdout=log,
                                    stderr=subprocess.STDOUT)

    def succeeded(process: subprocess.Popen, name: str) -> None:
        assert process.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]

    straight, killed = start("straight", "straight"), start("killed", "interrupted")  # two cores: side by side
    checkpoints = tmp_path / "interrupted" / CHECKPOINT_DIR
    deadline = time.monotonic() + 300
    while not (checkpoints / "ckpt-1.index").exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not (tmp_path / "interrupted" / "model.h5").exists()
    succeeded(start("resumed", "interrupted"), "resumed")
    succeeded(straight, "straight")

    assert [epoch["step"] for epoch in same_run(tmp_path / "straight", tmp_path / "interrupted")] == [2, 4]


def same_run(expected_run, run_folder) -> list[dict]:
    """Assert that two run folders hold the same weights, bit for bit, and the same history; return the history."""
    expected, got = final_weights(expected_run), final_weights(run_folder)
    assert expected.keys() == got.keys() and len(expected) > 10
    for name in expected:
        np.testing.assert_array_equal(expected[name], got[name], err_msg=name)
    history = json.loads((run_folder / "metrics.json").read_text())["history"]
    assert history == json.loads((expected_run / "metrics.json").read_text())["history"]
    return history


def test_brainzoo_train_in_chunks_of_max_steps_ends_with_the_weights_of_an_uninterrupted_run(heads, tmp_path):
    """The same reduced FLAIR SFCN recipe as the SIGKILL test, selecting its epoch by validation MAE, through
    `brainzoo train --max-steps 3`: the first call stops at a checkpoint after step 3 of 4 (mid epoch 2, epoch 1
    selected so far) with no model.h5 or metrics.json, the same command again finishes the run, and the weights and
    the selected epoch equal an uninterrupted run's, the weights bit for bit (cron or cluster-array style)."""
    spec_file = reduced_flair_sfcn(tmp_path, select={"monitor": "val_mae"})
    records = heads / "regression"
    command = brainzoo_command("train", spec_file, "--train", records, "--validation", records, "--no-progress",
                               "--json", "--out")

    def start(name: str, out: str, *bound) -> subprocess.Popen:
        with open(tmp_path / f"{name}.log", "w") as log:
            return subprocess.Popen([*command, tmp_path / out, *bound], cwd=tmp_path, env=cli_environment(),
                                    stdout=subprocess.PIPE, stderr=log, text=True)

    def record(process: subprocess.Popen, name: str) -> dict:
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        return json.loads(out)

    straight, first = start("straight", "straight"), start("first", "chunked", "--max-steps", "3")
    first = record(first, "first")
    assert (first["steps"], first["planned_steps"], first["finished"]) == (3, 4, False)
    assert "run the same command again" in first["message"] and first["selection"]["epoch"] == 1
    assert not (tmp_path / "chunked" / "model.h5").exists() and not (tmp_path / "chunked" / "metrics.json").exists()
    assert (tmp_path / "chunked" / CHECKPOINT_DIR / "ckpt-3.index").exists()
    second = record(start("second", "chunked", "--max-steps", "3"), "second")
    assert (second["steps"], second["steps_this_run"], second["finished"]) == (4, 1, True)
    assert record(straight, "straight")["selection"] == second["selection"]
    assert "selected by val_mae (last epoch 2: " in second["message"]
    same_run(tmp_path / "straight", tmp_path / "chunked")


def test_brainzoo_train_that_selects_an_epoch_needs_validation_records_before_it_starts(heads, tmp_path):
    """Said before the run folder names a run (run.json), so the same command with --validation is not another run."""
    spec_file = reduced_flair_sfcn(tmp_path, select={"monitor": "val_mae"})
    with pytest.raises(BrainzooError, match=r"training.select: .* no validation data \(brainzoo train --validation"):
        run.train(spec_file, heads / "regression", None, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_replaced_run_takes_its_checkpoints_and_outputs_with_it(tmp_path):
    """--force on a folder of another run: a chunked new run must not look finished by the old run's files."""
    run.claim_run_folder(tmp_path, {"spec": "a"}, force=False)
    (tmp_path / CHECKPOINT_DIR).mkdir()
    for name in ("model.h5", "metrics.json"):
        (tmp_path / name).write_text("old")
    with pytest.raises(BrainzooError, match="holds a different run"):
        run.claim_run_folder(tmp_path, {"spec": "b"}, force=False)
    run.claim_run_folder(tmp_path, {"spec": "b"}, force=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run.json"]
    run.claim_run_folder(tmp_path, {"spec": "b"}, force=False)  # the same run: kept, it resumes


def test_validate_names_a_record_step_or_a_normalisation_the_inference_steps_lack():
    spec = copy.deepcopy(catalogue.find_version("neuronets/flair-brainage-sfcn/1.0.0/flair", REPO).spec)
    assert not list(validate.training_data_problems(Inference.from_spec(spec["inference"]),
                                                    Training.from_spec(spec["training"])))
    spec["training"]["data"].update(preprocessed_until="warp",
                                    validation_normalization=[{"step": "zscore", "non_zero": True}])
    first, second = validate.training_data_problems(Inference.from_spec(spec["inference"]),
                                                    Training.from_spec(spec["training"]))
    assert first.startswith("training.data.preprocessed_until: 'warp' is not an inference.preprocessing step (n4,")
    assert second.startswith("training.data.validation_normalization[0]: preprocessing step 'zscore': unknown option")
