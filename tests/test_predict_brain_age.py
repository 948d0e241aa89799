"""Brain age: output decoding and gap maths by hand, N4, registration to MNI152, and the whole pipeline."""

import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_DATA

from brainzoo.errors import BrainzooError
from brainzoo.metrics import dice
from brainzoo.predict import predict_brain_age
from brainzoo.outputs import OutputDecoding
from brainzoo.predict.brain_age import brain_age_gap, decode_output, ensemble
from brainzoo.predict import registration
from brainzoo.predict.registration import (FSL_MNI152_AFFINE, FSL_MNI152_SHAPE, describe_fit, head_threshold,
                                           mni152_brain,
                                           n4_correct, register_to_mni152, resample_to_template)
from brainzoo.predict.volumes import resample_world
from brainzoo.spec import Inference

SFCN_BINS = {"start": 42, "stop": 82, "step": 1}


def _log_probabilities(weights_by_bin, n_bins=40):
    p = np.full(n_bins, 1e-12)
    for index, weight in weights_by_bin.items():
        p[index] = weight
    return np.log(p / p.sum())[np.newaxis]


def _rigid(axis, degrees, shift_mm):
    """A rotation about one world axis followed by a shift, as a 4x4 world map."""
    angle = np.deg2rad(degrees)
    i, j = [k for k in range(3) if k != axis]
    transform = np.eye(4)
    transform[[i, i, j, j], [i, j, i, j]] = [np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)]
    transform[:3, 3] = shift_mm
    return transform


def _brain_points():
    """World positions (4 x n) of every 50th voxel of the template brain, to compare world maps on."""
    voxels = np.argwhere(mni152_brain()[1])[::50]
    return FSL_MNI152_AFFINE @ np.c_[voxels, np.ones(len(voxels))].T


def _mean_distance_mm(first, second, points):
    return float(np.linalg.norm((first @ points - second @ points)[:3], axis=0).mean())


def test_the_cached_template_is_the_one_made_from_nilearn(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINZOO_CACHE", str(tmp_path))
    mni152_brain.cache_clear()
    try:
        made = mni152_brain()
        assert registration.template_cache_file().parent == tmp_path
        mni152_brain.cache_clear()
        cached = mni152_brain()
        registration.template_cache_file().write_bytes(b"not a cache")  # a broken cache is made again
        mni152_brain.cache_clear()
        remade = mni152_brain()
    finally:
        mni152_brain.cache_clear()
    for first, second in ((made, cached), (made, remade)):
        for a, b in zip(first, second):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert made[1].sum() > 1_500_000 and made[0][~made[1]].max() == 0


def test_decoding_log_probabilities_by_hand():
    spec = OutputDecoding.from_spec({"type": "age-log-probabilities", "bins": SFCN_BINS})
    one_bin = decode_output(_log_probabilities({20: 1.0}), spec)
    assert one_bin["age"] == pytest.approx(62.5) and one_bin["sd"] == pytest.approx(0, abs=1e-4)
    # Half on 50.5, half on 52.5: mean 51.5, SD 1.
    two_bins = decode_output(_log_probabilities({8: 0.5, 10: 0.5}), spec)
    assert two_bins["age"] == pytest.approx(51.5) and two_bins["sd"] == pytest.approx(1.0)
    # 0.2 on 42.5, 0.8 on 47.5: mean 46.5, SD sqrt(0.2 * 16 + 0.8 * 1) = 2.
    skewed = decode_output(_log_probabilities({0: 0.2, 5: 0.8}), spec)
    assert skewed["age"] == pytest.approx(46.5) and skewed["sd"] == pytest.approx(2.0)


def test_decoding_rejects_outputs_that_do_not_fit_the_spec():
    spec = OutputDecoding.from_spec({"type": "age-log-probabilities", "bins": SFCN_BINS})
    with pytest.raises(BrainzooError, match="39 values but output.bins defines 40"):
        decode_output(np.zeros((1, 39)), spec)
    with pytest.raises(BrainzooError, match="not log-probabilities"):
        decode_output(np.zeros((1, 40)), spec)
    assert decode_output(np.array([[57.25]]), OutputDecoding("age")) == {"age": 57.25}
    with pytest.raises(BrainzooError, match="needs one"):
        decode_output(np.array([[57.25, 3.0]]), OutputDecoding("age"))


def test_ensemble_mean_and_spread():
    assert ensemble([60.0, 62.0, 64.0]) == {"brain_age": 62.0, "ensemble_sd": 2.0, "n_models": 3}
    assert ensemble([55.0]) == {"brain_age": 55.0, "ensemble_sd": 0.0, "n_models": 1}


def test_gap_and_bias_correction_by_hand():
    assert brain_age_gap(62.0, 60.0) == {"age": 60.0, "delta": 2.0}
    # de Lange & Cole: expected prediction at 60 is 0.8 * 60 + 10 = 58, so the corrected gap is 62 - 58 = 4.
    de_lange = brain_age_gap(62.0, 60.0, {"method": "de-lange-cole-2020", "slope": 0.8, "intercept": 10.0,
                                          "citation": "doi:10.1016/j.nicl.2020.102229"})
    assert de_lange["corrected_delta"] == pytest.approx(4.0)
    assert de_lange["corrected_brain_age"] == pytest.approx(64.0)
    assert de_lange["bias_correction"]["citation"] == "doi:10.1016/j.nicl.2020.102229"
    # Beheshti: expected gap at 60 is -0.2 * 60 + 10 = -2, so the corrected gap is 2 - (-2) = 4: the same line.
    beheshti = brain_age_gap(62.0, 60.0, {"method": "beheshti-2019", "slope": -0.2, "intercept": 10.0,
                                          "citation": "doi:10.1016/j.nicl.2019.102063"})
    assert beheshti["corrected_delta"] == pytest.approx(4.0)
    with pytest.raises(BrainzooError, match="unknown"):
        brain_age_gap(62.0, 60.0, {"method": "cole-2018", "slope": 1, "intercept": 0, "citation": ""})


def test_n4_removes_a_smooth_bias_field():
    shape = (64, 64, 48)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(x**2 + y**2 + z**2)
    tissue = np.where(radius < 0.5, 100.0, np.where(radius < 0.8, 60.0, 0.0))
    bias = np.exp(0.3 * x + 0.2 * z)
    noise = np.random.default_rng(0).normal(0, 1, shape)
    corrupted = (tissue * bias + noise).astype(np.float32)
    corrected, field = n4_correct(corrupted, np.diag([2.0, 2.0, 2.0, 1.0]))
    inner = radius < 0.45

    def spread(image):
        return image[inner].std() / image[inner].mean()

    assert spread(corrected) < spread(corrupted) / 3
    assert np.corrcoef(np.log(field[inner]), np.log(bias[inner]))[0, 1] > 0.95


@pytest.mark.slow
def test_registration_recovers_a_known_affine_and_repeats_exactly():
    brain = mni152_brain()[0]
    known = _rigid(1, -15, [-8, 12, -5]) @ np.diag([1.1, 0.95, 1.0, 1.0])
    moved = known @ FSL_MNI152_AFFINE
    registered, template_to_input, summary = register_to_mni152(brain * 1000, moved, template="mni152-brain")
    assert _mean_distance_mm(template_to_input, known, _brain_points()) < 0.2
    # The summary's Dice thresholds the resampled brain, so a few hundredths of a millimetre off the known map
    # cost it no more than a few thousandths (every voxel above 0 cost 0.015: a shell of faint edge voxels).
    exact = describe_fit(resample_to_template(brain * 1000, moved, known), known, "mni152-brain",
                         head_threshold(brain * 1000))
    assert summary["dice_with_template_mask"] > 0.97
    assert summary["dice_with_template_mask"] == pytest.approx(exact["dice_with_template_mask"], abs=0.005)
    assert registered.shape == FSL_MNI152_SHAPE
    repeated = register_to_mni152(brain * 1000, moved, template="mni152-brain")[1]
    np.testing.assert_array_equal(repeated, template_to_input)


@pytest.mark.slow
def test_brain_age_pipeline_on_a_moved_template(tmp_path):
    """The template brain in a rotated and shifted LAS header: registration undoes it; two models average."""
    brain, mask = mni152_brain()
    moved = _rigid(0, 8, [4, -6, 3]) @ FSL_MNI152_AFFINE
    scan = nib.Nifti1Image(np.round(brain * 1000).astype(np.int16), moved)
    spec = {
        "input": {"contrast": ["T1w"], "orientation": "RAS", "spacing_mm": [1, 1, 1], "shape": [160, 192, 160]},
        "preprocessing": [{"step": "n4"}, {"step": "brain-extraction"},
                          {"step": "register", "template": "mni152-brain"},
                          {"step": "divide-by-mean"}, {"step": "crop", "shape": [160, 192, 160]}],
        "output": {"type": "age-log-probabilities", "bins": SFCN_BINS,
                   "bias_correction": {"method": "de-lange-cole-2020", "slope": 0.8, "intercept": 12.0,
                                       "citation": "test"}},
    }
    inputs = []

    def model_for_bin(index):
        def model(batch):
            inputs.append(batch)
            return _log_probabilities({index: 1.0})
        return model

    record = predict_brain_age(scan, [model_for_bin(20), model_for_bin(22)], inference=Inference.from_spec(spec),
                               age=60, brain_mask=nib.Nifti1Image(mask.astype(np.uint8), moved),
                               qc_png=tmp_path / "qc.png")
    assert [batch.shape for batch in inputs] == [(1, 160, 192, 160, 1)] * 2
    full_mean = inputs[0].sum() / brain.size  # divided by the mean before cropping (nothing is cut off)
    assert 0.95 < full_mean < 1.05
    world_map = np.array(record["registration"]["template_to_input_world"])
    assert _mean_distance_mm(world_map, _rigid(0, 8, [4, -6, 3]), _brain_points()) < 0.5
    result = record["result"]
    assert [p["age"] for p in record["predictions"]] == pytest.approx([62.5, 64.5])
    assert result["brain_age"] == pytest.approx(63.5) and result["ensemble_sd"] == pytest.approx(np.sqrt(2))
    assert result["delta"] == pytest.approx(3.5)
    assert result["corrected_delta"] == pytest.approx(3.5)  # 0.8 * 60 + 12 = 60 expected
    assert record["qc_png"] == str(tmp_path / "qc.png") and (tmp_path / "qc.png").stat().st_size > 1000
    assert {"load", "n4", "brain-extraction", "register", "predict", "qc", "total"} <= set(record["timings_s"])
    assert record["warnings"] == []


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "templates" / "colin27").is_dir(),
                    reason="needs ../shared/data/templates/colin27 (real Colin27 brain)")
def test_registration_of_a_real_brain_to_the_template():
    """Colin27's brain, rotated 12 degrees and shifted in its header, lands on the template brain mask."""
    folder = SHARED_DATA / "templates" / "colin27"
    brain = nib.load(folder / "ch2bet.nii.gz")
    brain_mask = nib.load(folder / "ch2_brainmask_derived_from_ch2bet.nii.gz")
    moved = _rigid(2, 12, [10, -5, 8]) @ brain.affine
    registered, template_to_input, summary = register_to_mni152(brain.get_fdata(dtype=np.float32), moved,
                                                                template="mni152-brain")
    assert registered.shape == FSL_MNI152_SHAPE
    warped_mask = resample_world((np.asarray(brain_mask.dataobj) > 0).astype(np.float32), moved, FSL_MNI152_SHAPE,
                                 template_to_input @ FSL_MNI152_AFFINE, order=0) > 0
    assert dice(warped_mask, mni152_brain()[1]) > 0.93
    assert summary["dice_with_template_mask"] > 0.93
    unmoved = register_to_mni152(brain.get_fdata(dtype=np.float32), brain.affine, template="mni152-brain")[1]
    # The same brain gives the same alignment however its header places it (within a millimetre).
    assert _mean_distance_mm(np.linalg.inv(_rigid(2, 12, [10, -5, 8])) @ template_to_input, unmoved,
                             _brain_points()) < 1.0


def test_container_result_files_are_written_only_for_specs_that_declare_them(tmp_path):
    from brainzoo import catalogue
    from brainzoo.predict.runners import _container_files

    flair = catalogue.find_version("neuronets/flair-brainage-sfcn/1.0.0/flair")
    assert _container_files(flair, tmp_path) == [tmp_path / "brainAge.txt", tmp_path / "results.json"]
    assert _container_files(flair, None) == [None, None]
    ukbiobank = catalogue.find_version("neuronets/sfcn-ukbiobank/1.0.0")
    with pytest.raises(BrainzooError, match=f"{ukbiobank.id}: its spec declares no container result files"):
        _container_files(ukbiobank, tmp_path)
