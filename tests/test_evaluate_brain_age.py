"""`brainzoo evaluate brain-age`: the age metrics by hand, and the command on a seeded SFCN in a throw-away catalogue.

The SFCN holds the conversion fixture's seeded tensors and takes a 32^3 volume (it pools globally, so the tensors
fit any size); its spec keeps only array steps (crop, divide by the mean), so each scan takes milliseconds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shlex

import nibabel as nib
import numpy as np
import pytest
import yaml

from brainzoo import evaluate
from brainzoo.errors import BrainzooError
from brainzoo.metrics import age_bias, mean_absolute_error, pearson_r, root_mean_squared_error
from conftest import REPO, brainzoo, load_fixture, seeded_state_dict, sh, write_index, write_version

MODEL = "neuronets/sfcn-seeded/1.0.0"
INPUT_SIZE = 32
SPEC_BIAS_CORRECTION = {"method": "beheshti-2019", "slope": -0.2, "intercept": 12.0, "citation": "a test"}
GOOD_AGES = [45.0, 52.5, 61.0, 70.0]


def test_age_metrics_by_hand():
    ages, brain_ages = [40, 50, 60], [44, 51, 58]  # errors 4, 1, -2
    assert mean_absolute_error(brain_ages, ages) == pytest.approx(7 / 3)
    assert root_mean_squared_error(brain_ages, ages) == pytest.approx(math.sqrt((16 + 1 + 4) / 3))
    # The error falls 3 years per decade: 4 = -0.3 * 40 + 16.
    assert age_bias(ages, brain_ages) == pytest.approx((-0.3, 16.0))
    assert pearson_r(brain_ages, ages) == pytest.approx(1.0)
    # Deviations (-1, 1, 0) and (-1, 0, 1): covariance 1, each sum of squares 2, so r = 1 / 2.
    assert pearson_r([1, 3, 2], [1, 2, 3]) == pytest.approx(0.5)


def test_undefined_age_metrics_are_errors():
    with pytest.raises(BrainzooError, match="all the same"):
        pearson_r([61.0, 62.0], [50.0, 50.0])
    with pytest.raises(BrainzooError, match="every age is the same"):
        age_bias([50.0, 50.0], [45.0, 60.0])
    with pytest.raises(BrainzooError, match="at least 2"):
        pearson_r([60.0], [50.0])
    with pytest.raises(BrainzooError, match="equally long"):
        mean_absolute_error([60.0, 61.0], [50.0])


def test_one_scan_leaves_r_and_the_age_bias_undefined_and_off_the_card():
    done = [{"age": 60.0, "brain_age": 63.5, "delta": 3.5}]
    metrics, bias, undefined = evaluate.age_figures(done)
    assert metrics == {"mae_years": 3.5, "rmse_years": 3.5, "pearson_r": None, "mean_error_years": 3.5}
    assert bias is None and len(undefined) == 2 and "in_sample_corrected_delta" not in done[0]
    record = {"metrics": metrics, "age_bias": bias, "n": 1, "command": "brainzoo evaluate brain-age ...",
              "data": {"dataset": "one scan", "split": "unseen"}}
    assert [entry["name"] for entry in evaluate.brain_age_card_metrics(record)] == ["MAE", "mean error (brain age - age)"]


@pytest.fixture(scope="module")
def seeded_sfcn(tmp_path_factory) -> bytes:
    """The bytes of a Keras .h5 SFCN holding the conversion fixture's seeded tensors."""
    from brainzoo.convert.state_dict import convert_state_dict

    state = seeded_state_dict(load_fixture("sfcn_peng2021")["state_dict"])
    model = convert_state_dict("sfcn", state, {"input_shape": (INPUT_SIZE,) * 3 + (1,)})
    path = tmp_path_factory.mktemp("sfcn") / "model.h5"
    model.save(path, save_format="h5")
    return path.read_bytes()


def add_brain_age_version(root, weights: bytes) -> None:
    """The published SFCN's spec and card with these weights annexed, its input cut to a 32^3 crop."""
    published = REPO / "neuronets" / "sfcn-ukbiobank" / "1.0.0"
    spec = yaml.safe_load((published / "spec.yaml").read_text())
    spec.update(id=MODEL, model="sfcn-seeded")
    spec["inference"]["entry_point"]["options"]["model"]["default"] = MODEL
    spec["inference"]["input"]["shape"] = [INPUT_SIZE] * 3
    spec["inference"]["preprocessing"] = [{"step": "crop", "shape": [INPUT_SIZE] * 3}, {"step": "divide-by-mean"}]
    spec["inference"]["output"]["bias_correction"] = SPEC_BIAS_CORRECTION
    spec["weights"] = [{"name": "model", "path": "weights/model.h5", "format": "keras-h5",
                        "sources": [{"type": "inrepo-store"}]}]
    write_version(root, spec, yaml.safe_load((published / "model_card.yaml").read_text()),
                  weights={"weights/model.h5": weights})
    write_index(root)
    sh("datalad", "save", "-d", ".", "-m", "a seeded brain-age model", cwd=root)


def write_table(folder, rows: list[tuple[str, str]]) -> object:
    """Balls of different sizes in noise as 40^3 scans, and a table of (scan, age) rows; "broken" is not an image."""
    rng = np.random.default_rng(0)
    radius = np.linalg.norm(np.indices((40, 40, 40)) - 19.5, axis=0)
    for index, (name, _) in enumerate(rows):
        scan = folder / f"{name}.nii.gz"
        if name == "broken":
            scan.write_text("not an image")
        else:
            data = np.where(radius < 6 + 3 * index, 100.0, 10.0) + rng.normal(0, 5, radius.shape)
            nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), scan)
    table = folder / "ages.csv"
    table.write_text("path,age\n" + "".join(f"{name}.nii.gz,{age}\n" for name, age in rows))
    return table


def test_scans_are_measured_and_error_rows_block_the_card(seeded_sfcn, toy_dataset, tmp_path, monkeypatch):
    add_brain_age_version(toy_dataset, seeded_sfcn)
    monkeypatch.setenv("BRAINZOO_ROOT", str(toy_dataset))
    card_file = toy_dataset / MODEL / "model_card.yaml"
    card_before = card_file.read_text()
    good = [(f"sub-{i}", str(age)) for i, age in enumerate(GOOD_AGES)]
    table = write_table(tmp_path, [*good[:2], ("no-age", "unknown"), ("broken", "50"), *good[2:]])
    out = tmp_path / "eval"
    with pytest.raises(BrainzooError, match="--split"):
        next(evaluate.evaluate_brain_ages(MODEL, table, out, update_card=True))

    records = evaluate.evaluate_brain_ages(MODEL, table, out, dataset="balls", split="unseen", update_card=True,
                                           progress=False)
    scans = [next(records) for _ in range(6)]
    with pytest.raises(BrainzooError, match="not put on the card: 2 scan"):
        next(records)
    assert [r["status"] for r in scans] == ["ok", "ok", "error", "error", "ok", "ok"]
    assert "age 'unknown' is not a non-negative number" in scans[2]["message"]
    assert "broken.nii.gz" in scans[3]["message"]
    assert card_file.read_text() == card_before

    rows = list(csv.DictReader((out / "scans.csv").open()))
    done = [row for row in rows if row["status"] == "ok"]
    assert [row["id"] for row in done] == ["sub-0", "sub-1", "sub-2", "sub-3"]
    assert [row["error"] for row in rows if row["status"] == "error"] == [scans[2]["message"], scans[3]["message"]]
    ages, brain_ages, deltas = (np.array([float(row[key]) for row in done]) for key in ("age", "brain_age", "delta"))
    assert list(ages) == GOOD_AGES and len(set(brain_ages)) == 4  # the scans give different brain ages
    np.testing.assert_allclose(deltas, brain_ages - ages, atol=1e-9)
    # The spec's Beheshti coefficients: the expected error at each age is subtracted.
    expected_errors = SPEC_BIAS_CORRECTION["slope"] * ages + SPEC_BIAS_CORRECTION["intercept"]
    np.testing.assert_allclose([float(row["corrected_delta"]) for row in done], deltas - expected_errors, atol=2e-4)
    for row in done:
        assert float(row["ensemble_sd"]) == 0 and 0 < float(row["distribution_sd"]) < 20 and float(row["seconds"]) > 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 4 and summary["failed"] == ["no-age", "broken"]
    metrics = summary["metrics"]
    assert metrics["mae_years"] == pytest.approx(np.mean(np.abs(deltas)))
    assert metrics["rmse_years"] == pytest.approx(np.sqrt(np.mean(deltas ** 2)))
    assert metrics["mean_error_years"] == pytest.approx(np.mean(deltas))
    assert metrics["pearson_r"] == pytest.approx(np.corrcoef(brain_ages, ages)[0, 1])
    slope, intercept = np.polyfit(ages, deltas, 1)
    bias = summary["age_bias"]
    assert bias["slope"] == pytest.approx(slope) and bias["intercept_years"] == pytest.approx(intercept)
    assert bias["fitted_on"].startswith("in-sample")
    residuals = deltas - (slope * ages + intercept)
    np.testing.assert_allclose([float(row["in_sample_corrected_delta"]) for row in done], residuals, atol=1e-4)
    assert bias["corrected_delta"]["mean_absolute"] == pytest.approx(np.mean(np.abs(residuals)), abs=1e-4)
    assert summary["spec_bias_correction"] == SPEC_BIAS_CORRECTION
    assert "spec's own output.bias_correction" in summary["per_scan_corrected_delta"]
    assert summary["model"]["weights"] == {"model": hashlib.sha256(seeded_sfcn).hexdigest()}
    assert summary["data"] == {"table": str(table), "sha256": hashlib.sha256(table.read_bytes()).hexdigest(),
                               "dataset": "balls", "split": "unseen"}
    assert summary["protocol"]["timed"].startswith("the model's whole brain-age prediction")
    assert summary["brain_extraction"] is None  # the spec has no brain-extraction step

    written = {path: path.read_bytes() for path in out.iterdir()}
    with pytest.raises(BrainzooError, match="already exists; pass --force"):
        next(evaluate.evaluate_brain_ages(MODEL, table, out, progress=False))
    assert {path: path.read_bytes() for path in out.iterdir()} == written


def test_the_card_gets_the_figures_and_the_command(seeded_sfcn, toy_dataset, tmp_path):
    add_brain_age_version(toy_dataset, seeded_sfcn)
    table = write_table(tmp_path, [(f"sub-{i}", str(age)) for i, age in enumerate(GOOD_AGES)])
    args = ["evaluate", "brain-age", "--model", MODEL, "--data", str(table), "--out", str(tmp_path / "eval"),
            "--dataset", "balls", "--split", "unseen", "--update-card", "--no-progress"]
    result = brainzoo(*args, cwd=toy_dataset)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 scan(s): MAE" in result.stdout and "card updated" in result.stdout

    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    card = yaml.safe_load((toy_dataset / MODEL / "model_card.yaml").read_text())
    measured = {m["name"]: m for m in card["Metrics"] if m["source"] == "measured"}
    assert measured["MAE"]["value"] == round(summary["metrics"]["mae_years"], 2)
    assert measured["mean error (brain age - age)"]["value"] == round(summary["metrics"]["mean_error_years"], 2)
    assert measured["Pearson r, brain age vs age"]["value"] == round(summary["metrics"]["pearson_r"], 3)
    assert measured["age-bias slope"]["value"] == round(summary["age_bias"]["slope"], 3)
    assert "in-sample" in measured["age-bias slope"]["note"]
    for entry in measured.values():
        assert entry["command"] == shlex.join(["brainzoo", *args])
        assert (entry["dataset"], entry["split"], entry["n"]) == ("balls", "unseen", 4)
    assert any(m["source"] == "published" and m["name"] == "MAE" for m in card["Metrics"])  # the paper's stays
    validated = brainzoo("validate", cwd=toy_dataset)
    assert validated.returncode == 0, validated.stdout[-3000:]
