"""The distilled student U-Net (neuronets/brainzoo-unet) runs in nobrainer predict as in brainzoo."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, SHARED_DATA, needs_shared_data
from brainzoo import catalogue, sources
from brainzoo.predict.runners import BrainMasker
from brainzoo.metrics import dice
from brainzoo.predict.volumes import GriddedVolume, conform, load_volume
from brainzoo.training.synthetic import synthetic_head

# The student runs on one 96^3 block of its 128^3 grid, placed from the top of the head.
STUDENTS = ["neuronets/brainzoo-unet/0.5.0"]


@pytest.fixture(scope="module", params=STUDENTS)
def student(request):
    failed = [r for r in sources.get(REPO, request.param) if r["status"] == "error"]
    assert not failed, failed
    return BrainMasker.load(request.param)


def _model_input(student) -> dict:
    return student.version.spec["inference"]["input"]


def _network_shape(student) -> list[int]:
    """What the network itself takes: its spec's block, or the whole grid for a model without one."""
    return _model_input(student).get("block_shape", _model_input(student)["shape"])


def _nobrainer_predict(student, infile, outfile) -> np.ndarray:
    model = catalogue.resolve_weights(student.version.id, "model")
    block = [str(n) for n in _network_shape(student)]
    argv = [sys.executable, "-c", "from nobrainer.cli.main import cli; cli()", "predict", "-m", str(model),
            "-b", *block, "-r", *block, str(infile), str(outfile)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.asarray(nib.load(outfile).dataobj) > 0


def _agreement(student, image, tmp_path) -> tuple[float, np.ndarray]:
    """Dice between brainzoo's mask and nobrainer predict's on what nobrainer is given: the scan conformed to the
    model's grid, cut to the block brainzoo ran the model on (the whole grid for a model without one)."""
    grid = _model_input(student)
    conformed = conform(GriddedVolume.native(image), grid["orientation"], grid["spacing_mm"], grid["shape"])
    nib.save(nib.Nifti1Image(conformed.data, conformed.affine), tmp_path / "conformed.nii.gz")
    mask, _, record = student.run(tmp_path / "conformed.nii.gz")
    start = record["prediction"].get("brain_block_start", [0, 0, 0])
    window = tuple(slice(a, a + n) for a, n in zip(start, _network_shape(student)))
    moved = np.eye(4)
    moved[:3, 3] = start
    nib.save(nib.Nifti1Image(conformed.data[window], conformed.affine @ moved), tmp_path / "block.nii.gz")
    theirs = _nobrainer_predict(student, tmp_path / "block.nii.gz", tmp_path / "nobrainer.nii.gz")
    ours = np.asarray(mask.dataobj) > 0
    return dice(ours[window], theirs), ours


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

    from brainzoo.convert.deepbet import subnormal_fraction

    model = tf.keras.models.load_model(catalogue.resolve_weights(student.version.id, "model"), compile=False)
    assert model.count_params() == 1_193_761
    assert model.input_shape == (None, *_network_shape(student), 1)
    assert subnormal_fraction(model.get_weights()) == 0
