"""The prediction API end to end: brain masks on synthetic and real scans, records, QC, and spec errors."""

import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_DATA

from brainzoo.errors import BrainzooError
from brainzoo.metrics import dice
from brainzoo.predict import predict_brain_age, predict_brain_mask
from brainzoo.spec import Inference

MASK_SPEC = {
    "input": {"contrast": ["T1w"], "orientation": "RAS", "spacing_mm": [1, 1, 1], "shape": [64, 64, 64],
              "block_shape": [32, 32, 32]},
    "preprocessing": [{"step": "conform"}, {"step": "zscore"}],
    "output": {"type": "probability-mask", "threshold": 0.5},
}
AGE_SPEC = {
    "input": {"contrast": ["T1w"], "orientation": "RAS", "spacing_mm": [1, 1, 1], "shape": [16, 16, 16]},
    "preprocessing": [{"step": "brain-extraction"}, {"step": "conform"}, {"step": "divide-by-mean"}],
    "output": {"type": "age"},
}
MASK, AGE = Inference.from_spec(MASK_SPEC), Inference.from_spec(AGE_SPEC)


def _head(shape=(50, 61, 37), voxel_mm=(1.2, 1.0, 1.5)):
    """An ellipsoid head: a bright brain inside a darker scalp, noise, on an LIA grid of odd sizes."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(x**2 + y**2 + z**2)
    data = np.where(radius < 0.55, 100.0, np.where(radius < 0.8, 40.0, 0.0))
    data += np.random.default_rng(0).normal(0, 2, shape)
    lia = np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
    affine = lia @ np.diag(list(voxel_mm) + [1.0])
    affine[:3, 3] = -(affine[:3, :3] @ (np.array(shape) - 1) / 2)
    return nib.Nifti1Image(data.astype(np.float32), affine), radius < 0.55


def _shifted_threshold(batch):
    """Brain where the z-scored voxel two places back along the first (left-right) axis is bright."""
    return _pointwise_threshold(np.roll(batch, 2, axis=1))


def _pointwise_threshold(batch):
    """Brain where the z-scored voxel is bright: brain is about 3.4, scalp 1.1, background -0.4."""
    return 1 / (1 + np.exp(-8 * (batch - 2.2)))


def _as_lps(img):
    """The same scan stored left-posterior-superior: flipped voxel order, same world positions."""
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                                nib.orientations.axcodes2ornt("LPS"))
    return img.as_reoriented(transform)


def test_mask_on_the_native_grid_matches_the_brain(tmp_path):
    img, brain = _head()
    mask_img, probability_img, record = predict_brain_mask(img, _pointwise_threshold, inference=MASK,
                                                           qc_png=tmp_path / "qc.png")
    assert mask_img.shape == img.shape and mask_img.get_data_dtype() == np.uint8
    assert probability_img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(mask_img.affine, img.affine)
    assert dice(np.asarray(mask_img.dataobj) > 0, brain) > 0.95
    voxel_ml = 1.2 * 1.0 * 1.5 / 1000
    assert record["prediction"]["brain_volume_ml"] == pytest.approx(record["prediction"]["brain_voxels"] * voxel_ml,
                                                                    abs=1e-3)
    assert record["input"]["orientation"] == "LIA" and record["input"]["shape"] == [50, 61, 37]
    assert [step["step"] for step in record["preprocessing"]] == ["conform", "zscore"]
    assert {"load", "conform", "zscore", "predict", "to-native", "postprocess", "qc", "total"} == set(
        record["timings_s"])
    assert record["qc_png"] == str(tmp_path / "qc.png") and (tmp_path / "qc.png").stat().st_size > 1000


def test_a_scan_stored_lps_gives_the_same_mask_in_world_space():
    img, _ = _head()
    mask = np.asarray(predict_brain_mask(img, _shifted_threshold, inference=MASK)[0].dataobj)
    lps = _as_lps(img)
    mask_lps = np.asarray(predict_brain_mask(lps, _shifted_threshold, inference=MASK)[0].dataobj)
    # The model is not mirror-symmetric, so a missing reorientation would show.
    assert not np.array_equal(mask, mask[::-1])
    np.testing.assert_array_equal(np.asarray(_as_lps(nib.Nifti1Image(mask, img.affine)).dataobj), mask_lps)


def test_qc_failure_is_a_warning_not_an_error(tmp_path):
    img, _ = _head()
    with pytest.warns(UserWarning, match="QC picture not written"):
        mask_img, _, record = predict_brain_mask(img, _pointwise_threshold, inference=MASK,
                                                 qc_png=tmp_path / "absent" / "qc.png")
    assert record["qc_png"] is None
    assert any("QC picture not written" in message for message in record["warnings"])
    assert np.asarray(mask_img.dataobj).any()


def test_warnings_of_the_run_are_recorded(tmp_path):
    img, _ = _head()
    series = nib.Nifti1Image(np.stack([img.get_fdata()] * 2, axis=-1).astype(np.float32), img.affine)
    with pytest.warns(UserWarning) as caught:
        _, _, record = predict_brain_mask(series, lambda batch: np.zeros_like(batch), inference=MASK)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == record["warnings"]
    assert "4D series of 2 volumes" in record["warnings"][0]
    assert "mask is empty" in record["warnings"][1]


@pytest.mark.slow
def test_a_keras_model_runs_in_blocks():
    tf = pytest.importorskip("tensorflow")
    layer = tf.keras.layers.Conv3D(1, 1, activation="sigmoid")
    model = tf.keras.Sequential([tf.keras.Input((None, None, None, 1)), layer])
    layer.set_weights([np.full((1, 1, 1, 1, 1), 8.0, np.float32), np.array([-8 * 2.2], np.float32)])
    img, _ = _head()
    keras_mask = predict_brain_mask(img, model, inference=MASK)[0]
    numpy_mask = predict_brain_mask(img, _pointwise_threshold, inference=MASK)[0]
    np.testing.assert_array_equal(np.asarray(keras_mask.dataobj), np.asarray(numpy_mask.dataobj))


def test_one_block_on_the_brain_gives_the_tiled_mask_and_records_where_it_ran():
    img, _ = _head()
    placement = {"block_placement": "below-head-top", "block_centre_below_head_top_mm": 20}
    spec = {**MASK_SPEC, "input": {**MASK_SPEC["input"], "block_shape": [48, 48, 48], **placement}}
    mask_img, _, record = predict_brain_mask(img, _pointwise_threshold, inference=Inference.from_spec(spec))
    tiled = predict_brain_mask(img, _pointwise_threshold, inference=MASK)[0]
    np.testing.assert_array_equal(np.asarray(mask_img.dataobj), np.asarray(tiled.dataobj))
    assert all(0 <= start <= 64 - 48 for start in record["prediction"]["brain_block_start"])
    assert "overlap" not in record["prediction"]  # no tiling, so no overlap to report
    del spec["input"]["block_shape"]
    with pytest.raises(BrainzooError, match="no block_shape"):
        predict_brain_mask(img, _pointwise_threshold, inference=Inference.from_spec(spec))


def test_a_block_below_the_head_top_needs_its_distance():
    img, _ = _head()
    spec = {**MASK_SPEC, "input": {**MASK_SPEC["input"], "block_placement": "below-head-top"}}
    with pytest.raises(BrainzooError, match="go together"):
        predict_brain_mask(img, _pointwise_threshold, inference=Inference.from_spec(spec))
    spec = {**MASK_SPEC, "input": {**MASK_SPEC["input"], "block_shape": [48, 48, 48], "block_placement": "brain"}}
    with pytest.raises(BrainzooError, match="block_placement"):
        predict_brain_mask(img, _pointwise_threshold, inference=Inference.from_spec(spec))


@pytest.mark.skipif(not (SHARED_DATA / "ixi" / "t1_2mm").is_dir(),
                    reason="needs ../shared/data/ixi/t1_2mm (real IXI T1)")
def test_real_scan_stored_lps_gives_the_same_mask():
    img = nib.load(SHARED_DATA / "ixi" / "t1_2mm" / "IXI012-HH-1211-T1_ds.nii.gz")
    spec = {**MASK_SPEC, "input": {**MASK_SPEC["input"], "spacing_mm": [2, 2, 2], "shape": [128, 128, 96],
                                   "block_shape": [64, 64, 64]}}
    mask_img, _, record = predict_brain_mask(img, _shifted_threshold, inference=Inference.from_spec(spec))
    lps_mask = predict_brain_mask(_as_lps(img), _shifted_threshold, inference=Inference.from_spec(spec))[0]
    mask = np.asarray(mask_img.dataobj)
    assert mask.any() and record["input"]["voxel_size_mm"] == pytest.approx([2, 2, 2], abs=0.01)
    np.testing.assert_array_equal(np.asarray(_as_lps(nib.Nifti1Image(mask, img.affine)).dataobj),
                                  np.asarray(lps_mask.dataobj))
    np.testing.assert_array_equal(mask_img.header.get_qform(), img.header.get_qform())
    np.testing.assert_array_equal(mask_img.header.get_sform(), img.header.get_sform())


def test_brain_age_with_a_mask_on_a_small_grid():
    img, brain = _head(shape=(20, 21, 19), voxel_mm=(1.0, 1.0, 1.0))
    mask_img = nib.Nifti1Image(brain.astype(np.uint8), img.affine)
    seen = []

    def mean_model(batch):
        seen.append(batch)
        return np.array([[40 + batch.mean()]])

    record = predict_brain_age(img, [mean_model], inference=AGE, brain_mask=mask_img, age=39.0)
    assert seen[0].shape == (1, 16, 16, 16, 1)
    assert record["result"]["brain_age"] == pytest.approx(41.0, abs=1e-5)  # mean 1 after divide-by-mean
    assert record["result"]["delta"] == pytest.approx(2.0, abs=1e-5)
    assert record["input"]["brain_mask"] == "<in-memory image>"


@pytest.mark.parametrize("change, message", [
    (lambda spec: spec["preprocessing"].append({"step": "skull-strip"}), "not supported"),
    (lambda spec: spec["preprocessing"].append({"step": "conform", "shape": [8, 8, 8]}), "takes no options"),
    (lambda spec: spec["preprocessing"].insert(0, {"step": "volume"}), "'volume' takes one option, index"),
    (lambda spec: spec["preprocessing"].insert(0, {"step": "volume", "index": -1}), "'volume' takes one option"),
    (lambda spec: spec["preprocessing"].append({"step": "volume", "index": 1}), "'volume' must come first"),
    (lambda spec: spec["preprocessing"].append({"step": "crop", "shape": [60, 64, 64]}),
     "makes a 60x64x64 volume but input.shape is 64x64x64"),
    (lambda spec: spec["input"].update(contrast=["T1w", "FLAIR"]), "several contrasts"),
    (lambda spec: spec["output"].update(type="age"), "expected probability-mask"),
])
def test_spec_problems_are_reported(change, message):
    spec = {key: (value.copy() if isinstance(value, dict) else list(value)) for key, value in MASK_SPEC.items()}
    change(spec)
    with pytest.raises(BrainzooError, match=message):
        predict_brain_mask(_head()[0], _pointwise_threshold, inference=Inference.from_spec(spec))


def test_model_with_two_channels_is_refused_for_a_mask():
    with pytest.raises(BrainzooError, match="2 channels"):
        predict_brain_mask(_head()[0], lambda batch: np.concatenate([batch, batch], axis=-1),
                           inference=MASK)


@pytest.mark.parametrize("options, message", [
    ({"models": []}, "no model"),
    ({"age": -3}, "non-negative"),
    ({"brain_mask": None}, "pass a brain mask"),
])
def test_brain_age_problems_are_reported(options, message):
    img, brain = _head(shape=(20, 21, 19), voxel_mm=(1.0, 1.0, 1.0))
    arguments = {"models": [lambda batch: np.array([[50.0]])],
                 "brain_mask": nib.Nifti1Image(brain.astype(np.uint8), img.affine)} | options
    with pytest.raises(BrainzooError, match=message):
        predict_brain_age(img, arguments.pop("models"), inference=AGE, **arguments)
