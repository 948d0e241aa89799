"""Training learns, end to end through the real CLI: synthetic heads -> `brainzoo tfrecords` -> `brainzoo train`.

The fixture specs in tests/fixtures/training are tuned so that each run takes a few minutes on two CPU cores.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURES

SHAPE = (32, 32, 32)
SPLITS = {"train": (192, 0), "validation": (48, 1)}  # subjects and seed: other seeds, other anatomy


def cli(*args, cwd) -> dict:
    """Run ``brainzoo ARGS --json`` in a subprocess; its last record."""
    result = subprocess.run([sys.executable, "-m", "brainzoo.cli", *map(str, args), "--json"], cwd=cwd,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> dict:
    """The subjects table of each split, written once for both models."""
    from brainzoo.training.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("heads")
    return {split: write_synthetic_dataset(root / split, n, shape=SHAPE, seed=seed) for split, (n, seed) in SPLITS.items()}


def records(heads: dict, kind: str, folder) -> dict:
    for split, table in heads.items():
        cli("tfrecords", table, folder / split, "--kind", kind, "--label-column", "mask", cwd=folder)
    return {split: folder / split for split in heads}


@pytest.fixture(scope="module")
def segmentation_records(heads, tmp_path_factory) -> dict:
    """Both U-Net tests read the same records."""
    return records(heads, "segmentation", tmp_path_factory.mktemp("segmentation"))


def train(spec: str, data: dict, folder) -> dict:
    return cli("train", FIXTURES / "training" / spec, "--train", data["train"], "--validation", data["validation"],
               "--out", folder / "run", "--no-progress", cwd=folder)


def ages(table) -> np.ndarray:
    with open(table, newline="") as f:
        return np.array([float(row["age"]) for row in csv.DictReader(f)])


@pytest.mark.slow
def test_sfcn_predicts_age_far_better_than_the_training_mean(heads, tmp_path):
    result = train("sfcn-synthetic.yaml", records(heads, "regression", tmp_path), tmp_path)
    baseline = np.abs(ages(heads["validation"]) - ages(heads["train"]).mean()).mean()
    assert result["val_n"] == SPLITS["validation"][0]
    assert result["val_mae"] <= 0.5 * baseline, (result["val_mae"], baseline)


@pytest.mark.slow
def test_unet_finds_the_brain(segmentation_records, tmp_path):
    result = train("unet-synthetic.yaml", segmentation_records, tmp_path)
    assert result["val_dice"] >= 0.9, result["val_dice"]


def test_block_trained_unet_is_saved_for_its_whole_inference_grid_and_starts_a_second_stage(segmentation_records,
                                                                                            tmp_path):
    """Trained on 16^3 blocks, run on whole 32^3 volumes (the spec's inference grid): model.h5 takes 32^3;
    ``--init-weights`` starts another run from it. (In this process: the CLI's train is tested above.)"""
    import tensorflow as tf
    import yaml

    from brainzoo.errors import BrainzooError
    from brainzoo.training.run import train as train_spec

    spec = {"architecture": {"builder": "unet", "options": {"base_filters": 2, "norm": "instance"}},
            "inference": {"input": {"orientation": "RAS", "spacing_mm": [2, 2, 2], "shape": list(SHAPE)}},
            "training": {"data": {"kind": "segmentation", "block_shape": [16, 16, 16], "blocks_per_volume": 1,
                                  "normalization": "percentile"},
                         "loss": {"name": "dice"}, "optimizer": {"name": "adam", "learning_rate": 0.01},
                         "epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "seed": 0}}
    data = segmentation_records
    for name, with_grid in (("whole", True), ("blocks", False)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec if with_grid else {k: v for k, v in spec.items() if k != "inference"}))
        train_spec(str(path), data["train"], None, tmp_path / name, progress=False)
    whole = tf.keras.models.load_model(tmp_path / "whole" / "model.h5", compile=False)
    blocks = tf.keras.models.load_model(tmp_path / "blocks" / "model.h5", compile=False)
    assert whole.input_shape == (None, *SHAPE, 1) and blocks.input_shape == (None, 16, 16, 16, 1)
    for a, b in zip(whole.get_weights(), blocks.get_weights()):  # same seed, same run: the same weights
        np.testing.assert_array_equal(a, b)

    # A second stage on whole volumes starts from the first stage's model (learning rate 0: nothing moves).
    stage2 = {**spec, "training": {**spec["training"], "optimizer": {"name": "adam", "learning_rate": 0.0},
                                   "data": {**spec["training"]["data"], "block_shape": list(SHAPE)}}}
    (tmp_path / "stage2.yaml").write_text(yaml.safe_dump(stage2))
    train_spec(str(tmp_path / "stage2.yaml"), data["train"], None, tmp_path / "stage2", progress=False,
               init_weights=tmp_path / "blocks" / "model.h5")
    for a, b in zip(tf.keras.models.load_model(tmp_path / "stage2" / "model.h5", compile=False).get_weights(),
                    blocks.get_weights()):
        np.testing.assert_array_equal(a, b)
    run = json.loads((tmp_path / "stage2" / "run.json").read_text())
    assert run["init_weights"]["path"] == str(tmp_path / "blocks" / "model.h5")
    with pytest.raises(BrainzooError, match="no such model file"):
        train_spec(str(tmp_path / "stage2.yaml"), data["train"], None, tmp_path / "stage3", init_weights=tmp_path / "no.h5")
    assert not (tmp_path / "stage3").exists()
