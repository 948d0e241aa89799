"""`brainzoo preprocess`: the model-ready volume, the same that `predict brain-age` feeds the networks."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, brainzoo
from test_upstream import whole_head_scan

from brainzoo import catalogue
from brainzoo.predict import runners
from brainzoo.errors import BrainzooError
from brainzoo.predict import predict_brain_age, preprocess_scan

FLAIR_SFCN = "neuronets/flair-brainage-sfcn/1.0.0/flair"


@pytest.fixture(scope="module")
def raw_scan(tmp_path_factory):
    return whole_head_scan(tmp_path_factory.mktemp("scans") / "sub-01_FLAIR.nii.gz")


@pytest.mark.slow
def test_the_network_input_is_the_preprocessed_volume(raw_scan):
    inference = catalogue.find_version(FLAIR_SFCN, REPO).inference
    seen = []

    def network(batch):
        seen.append(batch[0, ..., 0])
        n_bins = inference.output.bins.count
        return np.log(np.full((1, n_bins), 1 / n_bins))

    record = predict_brain_age(raw_scan, [network], inference=inference)
    volume, preprocess_record = preprocess_scan(raw_scan, inference=inference)
    np.testing.assert_array_equal(np.asarray(volume.dataobj), seen[0])
    assert volume.shape == inference.input.shape
    world_map = "template_to_input_world"
    assert preprocess_record["registration"][world_map] == record["registration"][world_map]
    steps = [step.name for step in inference.preprocessing]
    assert [step["step"] for step in preprocess_record["preprocessing"]] == steps


@pytest.mark.slow
def test_preprocess_cli_writes_volume_record_and_qc_and_keeps_existing_outputs(raw_scan, tmp_path):
    out, record_file, qc = tmp_path / "ready.nii.gz", tmp_path / "ready.json", tmp_path / "ready.png"
    proc = brainzoo("preprocess", FLAIR_SFCN, str(raw_scan), str(out), "--record", str(record_file), "--qc", str(qc),
                    cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    volume = nib.load(out)
    assert list(volume.shape) == [160, 192, 160]
    data = np.asarray(volume.dataobj)
    assert 0 <= data.min() < 0.01 and 0.9 < data.max() <= 1  # min-max scaled before the crop
    record = json.loads(record_file.read_text())
    world_map = np.array(record["registration"]["template_to_input_world"])
    assert world_map.shape == (4, 4) and np.allclose(world_map[3], [0, 0, 0, 1])
    assert record["volume"]["shape"] == [160, 192, 160] and qc.stat().st_size > 1000
    # The volume sits in template world: the FSL MNI152 grid (182x218x182, -1/1/1 mm) cropped to 160x192x160.
    np.testing.assert_allclose(volume.affine, [[-1, 0, 0, 79], [0, 1, 0, -113], [0, 0, 1, -61], [0, 0, 0, 1]],
                               atol=1e-4)

    again = brainzoo("preprocess", FLAIR_SFCN, str(raw_scan), str(out), cwd=REPO)
    assert again.returncode == 1 and "already exists; pass --force" in again.stderr


def test_preprocess_refuses_a_mask_for_a_model_that_takes_the_whole_head(raw_scan, tmp_path):
    with pytest.raises(BrainzooError, match="does not skull-strip"):
        runners.preprocess_file(FLAIR_SFCN, raw_scan, tmp_path / "out.nii.gz", mask=raw_scan)
    assert not (tmp_path / "out.nii.gz").exists()


def test_preprocess_refuses_an_unknown_registration(raw_scan, tmp_path):
    with pytest.raises(BrainzooError, match="registration must be one of brainzoo, niftyreg"):
        runners.preprocess_file(FLAIR_SFCN, raw_scan, tmp_path / "out.nii.gz", registration="ants")


@pytest.mark.slow
def test_a_preprocessed_study_feeds_tfrecords(raw_scan, tmp_path):
    table = tmp_path / "study.csv"
    table.write_text(f"id,path,age,sex\nsub-01,{raw_scan},41.5,1\nsub-02,missing.nii.gz,50,0\n")
    out = tmp_path / "ready"
    proc = brainzoo("preprocess", FLAIR_SFCN, str(table), str(out), "--no-progress", "--json", cwd=REPO)
    assert proc.returncode == 1  # one scan failed; the other was written
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["id"], r["status"], r["path"], r["age"]) for r in rows] == [
        ("sub-01", "ok", "sub-01.nii.gz", "41.5"), ("sub-02", "error", "", "50")]
    assert "missing.nii.gz" in rows[1]["error"]
    assert nib.load(out / "sub-01.nii.gz").shape == (160, 192, 160)
    assert json.loads((out / "sub-01.json").read_text())["model"]["id"] == FLAIR_SFCN

    ok_rows = out / "train.csv"
    ok_rows.write_text("path,age,sex\nsub-01.nii.gz,41.5,1\n")
    records = tmp_path / "records"
    proc = brainzoo("tfrecords", str(ok_rows), str(records), "--kind", "regression", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert list(records.glob("shard-*.tfrec*"))
