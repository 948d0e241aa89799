"""AgeMapper's catalogue versions (neuronets/agemapper/1.0.0/<contrast>-<sex>): the contrast table, the preprocessing
the upstream runs, and `get --upstream` from checkpoints in the upstream's on-disk format to the exact network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import REPO, brainzoo, clone_main, load_fixture, seeded_state_dict, sh
from test_convert import expected_output, fixture_input

from brainzoo import catalogue
from brainzoo.errors import BrainzooError
from brainzoo.models import agemapper
from brainzoo.predict import preprocess_scan

VERSION = REPO / "neuronets" / "agemapper" / "1.0.0"
CONTRASTS = yaml.safe_load((VERSION / "contrasts.yaml").read_text())["contrasts"]
SHARED_CHECKPOINT = REPO.parent / "shared" / "fixtures" / "conversion" / "agemapper_1mm.pth"
T1_FEMALE = "neuronets/agemapper/1.0.0/t1-nonlinear-female"
UPSTREAM_CROP = {"1mm": [10, 170, 12, 204, 0, 160], "2mm": [5, 85, 6, 102, 0, 80]}  # data_utils.py
FULL_GRID = {"1mm": (182, 218, 182), "2mm": (91, 109, 91)}


def agemapper_versions() -> list[catalogue.Version]:
    return [v for v in catalogue.versions(REPO) if v.spec["model"] == "agemapper"]


def test_the_contrast_table_is_the_upstreams_and_each_runnable_contrast_has_a_variant_per_sex():
    assert len(CONTRASTS) == 57 and len({c["name"] for c in CONTRASTS}) == 57
    assert {c["resolution"] for c in CONTRASTS} == {"1mm", "2mm"}
    by_variant = {v.spec["variant"]: v for v in agemapper_versions()}
    assert len(by_variant) == 114
    for contrast in CONTRASTS:
        for sex in ("female", "male"):
            version = by_variant.pop(f"{contrast['name'].lower().replace('_', '-')}-{sex}")
            assert [w.name for w in version.weights] == [f"{sex}-1", f"{sex}-2", f"{sex}-3"]
            assert all(not w.published and w.entry["recipe"]["argv"][3] == f"agemapper-{contrast['resolution']}"
                       for w in version.weights)
            assert version.spec["architecture"]["options"] == {"resolution": contrast["resolution"]}
            assert version.spec["explain"] == {"layer": "conv_4_relu"}
            assert {m["name"] for m in version.card["Metrics"]} == {"MAE", "RMSE", "Pearson r"}
            assert all(m["source"] == "published" for m in version.card["Metrics"])
            assert version.card["Metrics"][0]["value"] == contrast["published"][sex]["mae"]
    assert by_variant == {}


def upstream_preprocessing(volume: np.ndarray, contrast: dict) -> np.ndarray:
    """AgeMapper's utils/data_utils.py load_and_preprocess_evaluation, on an array (its arithmetic, in float64): an
    rsfMRI component is its volume of the 4D series (``[:, :, :, rsfmri_volume]``), taken before the crop."""
    if "volume" in contrast:
        volume = volume[..., contrast["volume"]]
    crop = UPSTREAM_CROP[contrast["resolution"]]
    volume = volume[crop[0]:crop[1], crop[2]:crop[3], crop[4]:crop[5]]
    if contrast["name"] in ("T1_nonlinear", "T1_linear", "T2_nonlinear"):
        volume = volume / volume.mean()
    return np.float32(volume / contrast["scale_factor"])


@pytest.mark.parametrize("variant", ["t1-nonlinear-male", "tbss-fa-female", "vbm-female", "tfmri-c-1-male",
                                     "rsfmri-0-female", "rsfmri-17-male", "rsfmri-24-female"])
def test_the_spec_preprocessing_is_the_upstreams(variant, tmp_path):
    """On a map of the full grid (for rsfMRI, a 4D series of the 25 components, each different)."""
    version = catalogue.find_version(f"neuronets/agemapper/1.0.0/{variant}", REPO)
    contrast = {f"{c['name'].lower().replace('_', '-')}-{version.spec['variant'].rsplit('-', 1)[1]}": c
                for c in CONTRASTS}[variant]
    spacing = 1.0 if contrast["resolution"] == "1mm" else 2.0
    components = (25,) if "volume" in contrast else ()
    data = np.random.default_rng(0).gamma(2.0, 300.0, FULL_GRID[contrast["resolution"]] + components).astype(
        np.float32)
    affine = np.diag([-spacing, spacing, spacing, 1.0])
    path = tmp_path / "map.nii.gz"
    nib.Nifti1Image(data, affine).to_filename(path)
    ready, record = preprocess_scan(path, inference=version.inference)
    np.testing.assert_allclose(np.asarray(ready.dataobj), upstream_preprocessing(data.astype(np.float64), contrast),
                               rtol=1e-5)
    assert not any("4D series" in warning for warning in record["warnings"])  # the volume is chosen, not defaulted


def test_an_rsfmri_component_needs_the_series_that_holds_it(tmp_path):
    """Component 17 of a single 3D map or of a series of 10 volumes does not exist: refused, naming the file."""
    version = catalogue.find_version("neuronets/agemapper/1.0.0/rsfmri-17-female", REPO)
    rng = np.random.default_rng(1)
    for name, shape, held in (("component.nii.gz", (91, 109, 91), "a single 3D volume"),
                              ("short.nii.gz", (91, 109, 91, 10), "a 4D series of 10 volumes")):
        nib.Nifti1Image(rng.gamma(2.0, 30.0, shape).astype(np.float32), np.diag([-2.0, 2, 2, 1])).to_filename(
            tmp_path / name)
        with pytest.raises(BrainzooError, match=f"{name}: is {held}; this model takes volume 17 \\(counted from 0\\)"):
            preprocess_scan(tmp_path / name, inference=version.inference)


def write_upstream_checkpoint(torch, path: Path) -> Path:
    """What the upstream's solver saves as saved_models/<experiment>.pth.tar: model.state_dict(), zip format, no
    prefix; filled with the conversion fixture's seeded tensors."""
    state = seeded_state_dict(load_fixture("agemapper_1mm")["state_dict"])
    torch.save({key: torch.from_numpy(value) for key, value in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A user's clone of main (committed files only)."""
    clone = clone_main(REPO, tmp_path_factory.mktemp("user") / "brainzoo")
    assert (clone / T1_FEMALE / "spec.yaml").is_file(), "commit the AgeMapper versions before running this test"
    return clone


def convert_member(clone: Path, member: str, checkpoint: Path) -> list[dict]:
    proc = brainzoo("get", T1_FEMALE, "--upstream", f"{member}={checkpoint}", "--allow-unverified", "--json",
                    cwd=clone)
    assert "Traceback" not in proc.stderr, proc.stderr
    return [r for r in map(json.loads, proc.stdout.splitlines()) if r["action"] == "get"]  # not the bootstrap's


def assert_converted_member_reproduces_the_reference(clone: Path, member: str) -> None:
    spec = yaml.safe_load((clone / T1_FEMALE / "spec.yaml").read_text())
    entry = next(e for e in spec["weights"] if e["name"] == member)
    assert entry["conversion"]["self_check"]["status"] in ("passed", "skipped")
    assert entry["conversion"]["source"]["verified_by"] == "not verified: converted with --allow-unverified"
    model = agemapper(resolution="1mm", weights=clone / T1_FEMALE / entry["path"])
    fixture = load_fixture("agemapper_1mm")
    volume = fixture_input(fixture["input_shape_ncdhw"])[:1].transpose(0, 2, 3, 4, 1)  # the first sample only
    output = model(volume, training=False).numpy()
    assert np.abs(output - expected_output(fixture)[:1]).max() <= 1e-4


def test_get_upstream_converts_a_member_from_a_checkpoint_in_the_upstream_format(clone, tmp_path):
    torch = pytest.importorskip("torch", reason="writing an upstream-format checkpoint needs torch")
    checkpoint = write_upstream_checkpoint(torch, tmp_path / "AM1-1.pth.tar")
    statuses = {r["path"].split("/")[-1]: r["status"] for r in convert_member(clone, "female-1", checkpoint)}
    assert statuses == {"female-1.h5": "ok", "female-2.h5": "impossible", "female-3.h5": "impossible"}
    assert_converted_member_reproduces_the_reference(clone, "female-1")
    assert sh("git", "status", "--porcelain", cwd=clone).stdout == ""  # saved with DataLad


@pytest.mark.skipif(not SHARED_CHECKPOINT.is_file(), reason=f"{SHARED_CHECKPOINT} is absent")
def test_get_upstream_converts_the_shared_upstream_format_checkpoint(clone, tmp_path):
    checkpoint = shutil.copy(SHARED_CHECKPOINT, tmp_path / "AM1-2.pth.tar")
    records = convert_member(clone, "female-2", Path(checkpoint))
    assert {r["path"].split("/")[-1]: r["status"] for r in records}["female-2.h5"] == "ok"
    assert_converted_member_reproduces_the_reference(clone, "female-2")


def test_get_says_the_networks_are_unpublished_and_names_each_member():
    """The upstream never published its networks: `get` must not send users to download them, and must say how a
    checkpoint from the authors goes to each of the three members."""
    version = catalogue.find_version(T1_FEMALE)
    hints = [w.conversion_hint for w in version.weights]
    assert all(hint.startswith("the upstream has not published its trained networks") for hint in hints)
    assert [hint.rsplit(" ", 1)[1] for hint in hints] == [f"female-{n}=CHECKPOINT" for n in (1, 2, 3)]
    assert all("--allow-unverified" in hint for hint in hints)


def test_an_rsfmri_component_predicts_from_the_4d_file_through_the_cli(clone, tmp_path):
    """rsfmri-17-female's three members converted by ``get --upstream``; ``brainzoo predict brain-age`` on a 25-volume
    dr_stage2 file gives the mean of the three networks on the upstream's preprocessing of volume 17."""
    torch = pytest.importorskip("torch", reason="writing an upstream-format checkpoint needs torch")
    version_id = "neuronets/agemapper/1.0.0/rsfmri-17-female"
    state = seeded_state_dict(load_fixture("agemapper_2mm")["state_dict"])
    arguments = []
    for run, scale in ((1, 1.0), (2, 1.01), (3, 1.02)):
        checkpoint = tmp_path / f"rs17-{run}.pth.tar"
        torch.save({key: torch.from_numpy(value * scale if value.dtype == np.float32 else value)
                    for key, value in state.items()}, checkpoint)
        arguments.append(f"female-{run}={checkpoint}")
    proc = brainzoo("get", version_id, "--upstream", *arguments, "--allow-unverified", cwd=clone)
    assert proc.returncode == 0, proc.stderr

    contrast = next(c for c in CONTRASTS if c["name"] == "rsfmri_17")
    series = np.random.default_rng(2).gamma(2.0, 30.0, (*FULL_GRID["2mm"], 25)).astype(np.float32)
    nib.Nifti1Image(series, np.diag([-2.0, 2, 2, 1])).to_filename(tmp_path / "dr_stage2.nii.gz")
    proc = brainzoo("predict", "brain-age", str(tmp_path / "dr_stage2.nii.gz"), "--model", version_id, "--contrast",
                    "bold", "--out", str(tmp_path / "age.json"), cwd=clone)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "age.json").read_text())
    assert not any("4D series" in warning for warning in record["warnings"])

    network_input = upstream_preprocessing(series.astype(np.float64), contrast)[None, ..., None]
    spec = yaml.safe_load((clone / version_id / "spec.yaml").read_text())
    ages = [float(agemapper(resolution="2mm", weights=clone / version_id / entry["path"])(network_input,
                                                                                          training=False)[0, 0])
            for entry in spec["weights"]]
    assert record["result"]["n_models"] == 3 and np.ptp(ages) > 0
    assert record["result"]["brain_age"] == pytest.approx(np.mean(ages), rel=1e-4, abs=1e-4)
