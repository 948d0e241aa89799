"""Training sees what predict sees: a scan through `brainzoo preprocess --training` and `brainzoo tfrecords` is, on
the training pipeline's validation path, the very array `predict brain-age` feeds the network. And every training
section of the catalogue trains (reduced), checkpoints and resumes exactly."""

from __future__ import annotations

import copy
import json

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from test_engine import final_weights

from brainzoo import catalogue, validate
from brainzoo.errors import BrainzooError
from brainzoo.predict import predict_brain_age, preprocess_scan
from brainzoo.outputs import AgeBins
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
    predict_brain_age(scan, [network], spec_inference=spec["inference"])
    record_volume, _ = preprocess_scan(scan, spec_inference=spec["inference"], until=data["preprocessed_until"])
    nib.save(record_volume, tmp_path / "scan.nii.gz")
    (tmp_path / "table.csv").write_text("path,age,sex\nscan.nii.gz,50,F\n")
    write_tfrecords(tmp_path / "table.csv", tmp_path / "records", kind="regression", progress=False)

    plan = TrainingPlan.from_spec(spec, batch_size=1)
    _, validation = run.datasets(data, plan, tmp_path / "records", tmp_path / "records", run.network_orientation(spec))
    (x, y), = list(validation())
    assert y.numpy().tolist() == [[50.0]]
    np.testing.assert_allclose(x.numpy()[0, ..., 0], seen[0], atol=1e-5)
    assert np.abs(x.numpy()[0, ..., 0] - seen[0][::-1]).max() > 0.1  # a mirrored record would fail


def catalogue_training_sections() -> dict[str, dict]:
    """Every distinct training section of the catalogue's brain-age and brain-extraction specs, by the first
    version that has it (variants of one model share theirs), with that version's spec."""
    sections = {}
    for spec_file in sorted((REPO / "neuronets").rglob("spec.yaml")):
        spec = catalogue.read_yaml(spec_file)
        training = spec.get("training")
        if training and spec["task"] in ("brain-age", "brain-extraction"):
            key = json.dumps({k: v for k, v in training.items() if k != "stages"}, sort_keys=True)
            sections.setdefault(key, spec)
    return {spec["id"]: spec for spec in sections.values()}


SECTIONS = catalogue_training_sections()
# Networks too large to train in this suite's budget on 2 cores (a DenseNet169 step takes a minute at 32^3) are
# stood in for by a small network with the same output; every other part of their section runs as written.
STAND_IN = {"densenet169_3d", "inception_resnet_v2_3d"}


def stand_in(input_shape) -> tf.keras.Model:
    """Conv, global mean, Linear(n, 1), Linear(1, 1): the FLAIR networks' regression head on a tiny body."""
    inputs = tf.keras.Input(input_shape)
    x = tf.keras.layers.Conv3D(4, 3, strides=2, activation="relu")(inputs)
    x = tf.keras.layers.GlobalAveragePooling3D()(x)
    outputs = tf.keras.layers.Dense(1)(tf.keras.layers.Dense(1)(x))
    return tf.keras.Model(inputs, outputs)


def reduced(spec: dict) -> tuple[dict, callable]:
    """The spec's training section at 32^3 volumes (16^3 blocks), 2 epochs of 2 steps of 2, a checkpoint every
    step; and a builder: the spec's own (SFCN with 4 channels per block, a 4-filter U-Net with batch
    normalisation, whose graph builds in seconds where instance normalisation's takes ten) or the stand-in."""
    training = copy.deepcopy(spec["training"])
    training.pop("stages", None)
    data = training["data"]
    if data["kind"] == "regression":
        data["input_shape"] = [32, 32, 32]
        if "random_crop_within" in data:
            data["random_crop_within"] = [34, 34, 34]
    else:
        data.update(block_shape=[16, 16, 16], shuffle_buffer=0)
    training.update(epochs=2, steps_per_epoch=2, batch_size=2, checkpoint_every_steps=1)
    architecture = copy.deepcopy(spec["architecture"])
    options = architecture.get("options", {})
    if architecture["builder"] == "sfcn":
        options["channels"] = [4] * len(options.get("channels", [0] * 6))
    elif architecture["builder"] == "unet":
        options.update(base_filters=4, norm="batch")
    if architecture["builder"] in STAND_IN:
        return training, lambda: stand_in((32, 32, 32, 1))
    return training, run.model_builder({**spec, "architecture": architecture}, run.model_input_shape(data))


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


def interrupted_at(train_data, epoch: int, steps: int):
    """``train_data`` whose epoch ``epoch`` ends after ``steps`` batches: the run stops there with an error."""
    return lambda e: train_data(e).take(steps) if e == epoch else train_data(e)


@pytest.mark.parametrize("version", sorted(SECTIONS))
def test_every_catalogue_training_section_trains_checkpoints_and_resumes(version, heads, tmp_path):
    spec = SECTIONS[version]
    training, build = reduced(spec)
    data = training["data"]
    plan = TrainingPlan.from_spec({**spec, "training": training})
    records = heads / data["kind"]
    train_data, validation_data = run.datasets(data, plan, records, records, run.network_orientation(spec))
    strategy = tf.distribute.get_strategy()

    result = fit(build, train_data, validation_data, plan, tmp_path / "straight", strategy, progress=False)
    losses = [epoch["loss"] for epoch in result["history"]]
    assert result["steps"] == 4 and np.isfinite(losses).all() and losses[0] != losses[1]
    assert np.isfinite(result["history"][-1]["val_loss"])
    assert (tmp_path / "straight" / "model.h5").is_file()
    assert list((tmp_path / "straight" / CHECKPOINT_DIR).glob("ckpt-4.index"))
    if not spec["id"].startswith("neuronets/flair-brainage-sfcn"):
        return
    # The FLAIR recipe's listed transforms (test_engine resumes a fixed pipeline after a real kill -9) stop in the
    # middle of the second epoch; the run resumes from the last checkpoint to the uninterrupted run's weights.
    with pytest.raises(BrainzooError, match="ended after 1 of 2 steps"):
        fit(build, interrupted_at(train_data, 1, 1), validation_data, plan, tmp_path / "resumed", strategy,
            progress=False)
    fit(build, train_data, validation_data, plan, tmp_path / "resumed", strategy, progress=False)
    straight, resumed = (final_weights(tmp_path / run_dir) for run_dir in ("straight", "resumed"))
    assert straight.keys() == resumed.keys() and straight
    for name in straight:
        np.testing.assert_array_equal(straight[name], resumed[name], err_msg=name)



def test_validate_names_a_record_step_or_a_normalisation_the_inference_steps_lack():
    spec = copy.deepcopy(catalogue.find_version("neuronets/flair-brainage-sfcn/1.0.0/flair", REPO).spec)
    assert not list(validate.training_data_problems(spec))
    spec["training"]["data"].update(preprocessed_until="warp",
                                    validation_normalization=[{"step": "zscore", "non_zero": True}])
    first, second = validate.training_data_problems(spec)
    assert first.startswith("training.data.preprocessed_until: 'warp' is not an inference.preprocessing step (n4,")
    assert second.startswith("training.data.validation_normalization[0]: preprocessing step 'zscore': unknown option")
