"""Training sees what predict sees: a scan through `brainzoo preprocess --training` and `brainzoo tfrecords` is, on
the training pipeline's validation path, the very array `predict brain-age` feeds the network."""

from __future__ import annotations

import copy

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO

from brainzoo import catalogue
from brainzoo.predict import predict_brain_age, preprocess_scan
from brainzoo.predict.brain_age import bin_centres
from brainzoo.training import run
from brainzoo.training.engine import TrainingPlan
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
        n_bins = len(bin_centres(output["bins"]))
        return np.log(np.full((1, n_bins), 1 / n_bins))

    scan = scan_for(shape)
    predict_brain_age(scan, [network], spec_inference=spec["inference"])
    record_volume, _ = preprocess_scan(scan, spec_inference=spec["inference"], until=data["preprocessed_until"])
    nib.save(record_volume, tmp_path / "scan.nii.gz")
    (tmp_path / "table.csv").write_text("path,age,sex\nscan.nii.gz,50,F\n")
    write_tfrecords(tmp_path / "table.csv", tmp_path / "records", kind="regression", progress=False)

    plan = TrainingPlan.from_spec(spec["training"], batch_size=1)
    _, validation = run.datasets(data, plan, tmp_path / "records", tmp_path / "records", run.network_orientation(spec))
    (x, y), = list(validation())
    assert y.numpy().tolist() == [[50.0]]
    np.testing.assert_allclose(x.numpy()[0, ..., 0], seen[0], atol=1e-5)
    assert np.abs(x.numpy()[0, ..., 0] - seen[0][::-1]).max() > 0.1  # a mirrored record would fail
