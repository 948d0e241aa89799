"""`brainzoo evaluate brain-mask`: the metrics against brute force, and the command on real deepbet weights."""

from __future__ import annotations

import csv
import json
import shlex
import shutil

import nibabel as nib
import numpy as np
import pytest
import yaml
from scipy.spatial.distance import cdist

from brainzoo import catalogue, evaluate
from brainzoo.errors import BrainzooError
from brainzoo.metrics import dice, hausdorff95
from conftest import DEEPBET, REPO, brainzoo, sh, write_index, write_version


def brute_force_hausdorff95(first, second, spacing) -> float:
    """Surface voxels (a face-neighbour outside the mask) and every pairwise distance."""
    def surface_points(mask):
        padded = np.pad(mask, 1)
        inner = np.ones_like(mask)
        for axis in range(3):
            for shift in (-1, 1):
                inner &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    distances = cdist(surface_points(first), surface_points(second))
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


@pytest.mark.parametrize("seed", range(4))
def test_hausdorff95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    first, second = (np.zeros((14, 12, 16), bool) for _ in range(2))
    first[2:9, 3:11, 1:12] = True
    second[4:13, 1:9, 5:16] = True  # reaches the border: outside the image counts as outside the mask
    first &= rng.random(first.shape) > 0.2
    spacing = (2.0, 1.0, 0.7)
    assert hausdorff95(first, second, spacing) == pytest.approx(brute_force_hausdorff95(first, second, spacing))


def test_metrics_of_simple_cases():
    one, shifted = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    one[2, 5, 5], shifted[5, 5, 5] = True, True
    assert hausdorff95(one, shifted, (2.0, 1.0, 1.0)) == 6.0
    assert hausdorff95(one, one, (1.0, 1.0, 1.0)) == 0.0
    assert dice(one, shifted) == 0.0 and dice(one, one) == 1.0
    with pytest.raises(BrainzooError, match="empty"):
        hausdorff95(one, np.zeros_like(one), (1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Three synthetic heads with their masks, and a row whose scan is not an image."""
    from brainzoo.training.synthetic import write_synthetic_dataset

    folder = tmp_path_factory.mktemp("heads")
    table = write_synthetic_dataset(folder, 3, shape=(64, 64, 64), seed=3)
    (folder / "broken_T1w.nii.gz").write_text("not an image")
    with open(table, "a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerow(["broken_T1w.nii.gz", "sub-001_mask.nii.gz", "50", "F"])
    return table


@pytest.mark.slow
def test_scans_are_measured_and_a_bad_one_is_recorded(deepbet_weights, heads, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "write_card_metrics", lambda *args: pytest.fail("a card was written"))
    records = evaluate.evaluate_brain_masks(deepbet_weights, heads, tmp_path / "eval", dataset="synthetic heads",
                                            split="unseen", update_card=True, progress=False)
    scans = [next(records) for _ in range(4)]
    with pytest.raises(BrainzooError, match="not put on the card: 1 scan"):
        next(records)
    assert [r["status"] for r in scans] == ["ok", "ok", "ok", "error"]
    assert "broken_T1w.nii.gz" in scans[-1]["message"]
    rows = list(csv.DictReader(open(tmp_path / "eval" / "scans.csv")))
    assert [row["id"] for row in rows] == ["sub-001_T1w", "sub-002_T1w", "sub-003_T1w", "broken_T1w"]
    for row in rows[:3]:
        assert 0.5 < float(row["dice"]) <= 1 and 0 <= float(row["hd95_mm"]) < 30 and float(row["seconds"]) > 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n"] == 3 and summary["failed"] == ["broken_T1w"]
    assert summary["summary"]["dice"]["min"] == min(float(row["dice"]) for row in rows[:3])
    assert summary["model"]["weights"] == {w.name: w.sha256 for w in catalogue.find_version(DEEPBET, REPO).weights}
    assert summary["protocol"]["timed"].startswith("the model's whole brain extraction")

    with pytest.raises(BrainzooError, match="exists"):
        next(evaluate.evaluate_brain_masks(deepbet_weights, heads, tmp_path / "eval", progress=False))
    with pytest.raises(BrainzooError, match="no column 'label'"):
        next(evaluate.evaluate_brain_masks(deepbet_weights, heads, tmp_path / "other", reference_column="label"))


@pytest.mark.slow
def test_the_card_gets_the_numbers_and_the_command(deepbet_weights, heads, toy_dataset, tmp_path):
    """Against its own masks a model scores Dice 1 and HD95 0; the card then validates and records how."""
    root = toy_dataset
    version = catalogue.find_version(DEEPBET, REPO)
    folder = write_version(root, version.spec, version.card,
                           weights={w.entry["path"]: w.path.read_bytes() for w in version.weights})
    shutil.copytree(version.path / "conversion", folder / "conversion")  # the records its spec names
    write_index(root)
    sh("datalad", "save", "-d", ".", "-m", "deepbet", cwd=root)
    table = shutil.copytree(heads.parent, tmp_path / "heads") / heads.name
    table.write_text("".join(table.read_text().splitlines(keepends=True)[:2]))  # one good scan

    without_split = brainzoo("evaluate", "brain-mask", "--model", DEEPBET, "--data", str(table), "--out",
                             str(tmp_path / "eval"), "--reference-model", DEEPBET, "--update-card", cwd=root)
    assert without_split.returncode == 1 and "--split" in without_split.stderr
    args = ["evaluate", "brain-mask", "--model", DEEPBET, "--data", str(table), "--out", str(tmp_path / "eval"),
            "--reference-model", DEEPBET, "--dataset", "a synthetic head", "--split", "unseen", "--update-card",
            "--no-progress"]
    result = brainzoo(*args, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = {(m["name"], m["statistic"]): m for m in yaml.safe_load((root / DEEPBET / "model_card.yaml").read_text())["Metrics"]}
    assert metrics[(f"Dice vs {DEEPBET}", "min")]["value"] == 1.0
    assert metrics[(f"Hausdorff-95 vs {DEEPBET}", "max")]["value"] == 0.0
    timing = metrics[("wall time per scan", "median")]
    assert timing["value"] > 0 and "threads" in timing["note"] and timing["n"] == 1
    assert timing["command"] == shlex.join(["brainzoo", *args]) and timing["dataset"] == "a synthetic head"
    assert ("Dice vs deepbet package", "min") in metrics  # the card's other metrics stay
    assert brainzoo("validate", cwd=root).returncode == 0


def test_the_ixi_split_follows_its_stated_rule_and_synthesis_reads_only_the_train_label_maps():
    """evaluation/README.md: the 10 IXI DLMUSE subjects ordered by sex (F first), then age from the oldest, are dealt
    test, train, validation, train, test, ... (fixed 2026-12-03, before any model was measured on them)."""
    from brainzoo.training.head_synthesis import read_sources

    folder = REPO / "evaluation"
    tables = {name: list(csv.DictReader((folder / f"ixi-2mm-{name}.csv").open()))
              for name in ("train", "validation", "test")}
    rows = [row for split in tables.values() for row in split]
    every = list(csv.DictReader((folder / "ixi-2mm-dlmuse.csv").open()))
    assert sorted((row["path"], row["labels"]) for row in rows) == sorted((row["path"], row["mask"]) for row in every)
    assert all(row["path"].split("/")[-1].startswith(row["id"]) for row in rows)
    order = sorted(rows, key=lambda row: (row["sex"] != "F", -float(row["age"])))
    rule = {row["id"]: ("test", "train", "validation", "train")[index % 4] for index, row in enumerate(order)}
    assert {row["id"]: name for name, split in tables.items() for row in split} == rule
    assert [len(tables[name]) for name in ("train", "validation", "test")] == [5, 2, 3]
    sources = read_sources(folder / "ixi-2mm-train.csv")  # what `brainzoo synth-heads` draws heads from
    assert sorted(source.labels.name for source in sources) == sorted(row["labels"].split("/")[-1]
                                                                       for row in tables["train"])
    assert all(source.scan is not None and source.age for source in sources)


@pytest.mark.slow
def test_thick_slice_versions_are_measured_against_their_label_maps(deepbet_weights, tmp_path):
    """The test split's evaluation at another resolution (evaluation/README.md): `brainzoo lower-resolution` makes
    thick-slice scans, and evaluate brings the reference masks, left on their own grid, onto them."""
    from brainzoo.cli import main
    from brainzoo.training.synthetic import write_synthetic_dataset

    table = write_synthetic_dataset(tmp_path / "heads", 2, shape=(64, 64, 64), seed=4)
    voxel = float(nib.load(table.parent / "sub-001_T1w.nii.gz").header.get_zooms()[0])
    assert main(["lower-resolution", str(table), "--spacing", str(voxel), str(voxel), str(2 * voxel),
                 "--out", str(tmp_path / "thick")]) == 0  # slices two voxels thick
    records = list(evaluate.evaluate_brain_masks(deepbet_weights, tmp_path / "thick" / "scans.csv", tmp_path / "eval",
                                                 reference_column="mask", progress=False))
    assert [r["status"] for r in records] == ["ok"] * 3
    rows = list(csv.DictReader(open(tmp_path / "eval" / "scans.csv")))
    assert [row["reference"] for row in rows] == [str(tmp_path / "thick" / f"../heads/sub-00{i}_mask.nii.gz")
                                                  for i in (1, 2)]
    for row in rows:
        assert 0.5 < float(row["dice"]) <= 1
        assert nib.load(row["path"]).shape == (64, 64, 32)
