"""The distilled student U-Net (neuronets/brainzoo-unet/0.1.0) runs in nobrainer predict as in brainzoo."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, SHARED_DATA, needs_shared_data
from brainzoo import catalogue, sources
from brainzoo.inference import BrainMasker
from brainzoo.metrics import dice
from brainzoo.predict.volumes import GriddedVolume, conform, load_volume
from brainzoo.training.synthetic import synthetic_head

STUDENT = "neuronets/brainzoo-unet/0.1.0"


@pytest.fixture(scope="module")
def student():
    failed = [r for r in sources.get(REPO, STUDENT) if r["status"] == "error"]
    assert not failed, failed
    return BrainMasker.load(STUDENT)


def _conformed(image: nib.Nifti1Image, path) -> nib.Nifti1Image:
    """The scan on the student's grid, as a user would prepare it for nobrainer predict."""
    grid = catalogue.find_version(STUDENT).spec["inference"]["input"]
    volume = conform(GriddedVolume.native(image), grid["orientation"], grid["spacing_mm"], grid["shape"])
    nib.save(nib.Nifti1Image(volume.data, volume.affine), path)
    return path


def _nobrainer_predict(infile, outfile) -> np.ndarray:
    model = catalogue.resolve_weights(STUDENT, "model")
    argv = [sys.executable, "-c", "from nobrainer.cli.main import cli; cli()", "predict", "-m", str(model),
            "-b", "128", "128", "128", "-r", "128", "128", "128", str(infile), str(outfile)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.asarray(nib.load(outfile).dataobj) > 0


def _agreement(student, image, tmp_path) -> tuple[float, np.ndarray]:
    conformed = _conformed(image, tmp_path / "conformed.nii.gz")
    theirs = _nobrainer_predict(conformed, tmp_path / "nobrainer.nii.gz")
    ours = np.asarray(student.run(conformed)[0].dataobj) > 0
    return dice(ours, theirs), ours


def test_nobrainer_predict_agrees_on_a_synthetic_head(student, tmp_path):
    head = synthetic_head(40.0, shape=(96, 112, 96), seed=3)
    image = nib.Nifti1Image(head.volume, head.affine)
    agreement, ours = _agreement(student, image, tmp_path)
    assert ours.sum() > 0.5 * head.mask.sum()
    assert agreement >= 0.95, agreement


@needs_shared_data
def test_nobrainer_predict_agrees_on_a_real_scan_it_never_saw(student, tmp_path):
    image = load_volume(SHARED_DATA / "ixi" / "raw" / "IXI533-Guys-1066-T1.nii.gz")
    agreement, _ = _agreement(student, image, tmp_path)
    assert agreement >= 0.97, agreement


def test_weights_are_the_cards_network_without_subnormal_floats(student):
    """The card's 1.19 M parameters, and none of HD-BET's trap: subnormal floats that make CPUs crawl."""
    import tensorflow as tf

    from brainzoo.models.deepbet_convert import subnormal_fraction

    model = tf.keras.models.load_model(catalogue.resolve_weights(STUDENT, "model"), compile=False)
    assert model.count_params() == 1_193_761
    assert model.input_shape == (None, 128, 128, 128, 1)
    assert subnormal_fraction(model.get_weights()) == 0
