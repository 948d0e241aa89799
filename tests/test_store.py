"""The in-repo store end to end: fresh clone of main, bootstrap, datalad get, corruption, verify."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import REPO, brainzoo, clone_main, sh

TOY_WEIGHTS = "neuronets/toy/0.1.0/weights/model.h5"


def records(proc, action: str) -> list[dict]:
    """The JSON records of one action (get also reports the set-up steps it took first)."""
    found = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return [r for r in found if r["action"] == action]


def test_fresh_clone_gets_weights_from_the_store(toy_dataset, tmp_path):
    clone = clone_main(toy_dataset, tmp_path / "clone")
    assert not (clone / TOY_WEIGHTS).exists()  # a dangling annex link until fetched
    boot = brainzoo("bootstrap", "--json", cwd=clone)
    assert boot.returncode == 0, boot.stderr
    assert "holds 1 weights file" in boot.stdout
    got = brainzoo("get", "neuronets/toy/0.1.0", "--json", cwd=clone)
    assert got.returncode == 0, got.stdout + got.stderr
    assert [r["status"] for r in records(got, "get")] == ["ok"]
    assert (clone / TOY_WEIGHTS).read_bytes() == (toy_dataset / TOY_WEIGHTS).read_bytes()
    verified = brainzoo("verify", "--json", cwd=clone)
    assert verified.returncode == 0 and [r["status"] for r in records(verified, "verify")] == ["ok"]


def test_bootstrap_is_idempotent_and_follows_a_moved_clone(toy_dataset, tmp_path):
    clone = clone_main(toy_dataset, tmp_path / "clone")
    for _ in range(2):
        assert brainzoo("bootstrap", cwd=clone).returncode == 0
    moved = tmp_path / "moved"
    clone.rename(moved)
    assert brainzoo("bootstrap", cwd=moved).returncode == 0
    assert sh("git", "config", "remote.inrepo-store.annex-directory", cwd=moved).stdout.strip() == str(moved / "store")
    assert brainzoo("get", "neuronets/toy/0.1.0", cwd=moved).returncode == 0


def test_clone_with_git_annex_branch_verifies_the_store(toy_dataset, tmp_path):
    """A full clone meets the store in the git-annex branch; git-annex 10.2026 refuses it until verified."""
    clone = tmp_path / "full"
    sh("git", "clone", "-q", str(toy_dataset), str(clone), cwd=tmp_path)
    sh("git", "remote", "remove", "origin", cwd=clone)  # only the store may serve the file
    assert brainzoo("bootstrap", cwd=clone).returncode == 0
    assert sh("git", "config", "remote.inrepo-store.annex-verified", cwd=clone).stdout.strip() == "verified"
    assert brainzoo("get", "neuronets/toy/0.1.0", cwd=clone).returncode == 0


def test_corrupted_store_object_is_rejected(toy_dataset, tmp_path):
    clone = clone_main(toy_dataset, tmp_path / "clone")
    assert brainzoo("bootstrap", cwd=clone).returncode == 0
    [obj] = [p for p in (clone / "store").rglob("SHA256E-*") if p.is_file()]
    os.chmod(obj, 0o644)
    obj.write_bytes(b"x" * obj.stat().st_size)  # same size, wrong content
    got = brainzoo("get", "neuronets/toy/0.1.0", "--json", cwd=clone)
    assert got.returncode == 1
    [record] = records(got, "get")
    assert record["status"] == "error" and "verification" in record["message"].lower()
    assert not (clone / TOY_WEIGHTS).exists()
    assert not any((clone / ".git" / "annex" / "objects").rglob("SHA256E-*.h5"))


def test_verify_reports_a_spec_whose_sha256_disagrees(toy_dataset, tmp_path):
    clone = clone_main(toy_dataset, tmp_path / "clone")
    assert brainzoo("bootstrap", cwd=clone).returncode == 0
    assert brainzoo("get", "neuronets/toy/0.1.0", cwd=clone).returncode == 0
    spec_file = clone / "neuronets/toy/0.1.0/spec.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    spec["weights"][0]["sha256"] = "1" * 64
    spec_file.write_text(yaml.safe_dump(spec))
    verified = brainzoo("verify", "--json", cwd=clone)
    assert verified.returncode == 1
    assert "differs from the spec" in records(verified, "verify")[0]["message"]


def test_verify_remote_checks_the_store_holds_every_file(toy_dataset, tmp_path):
    clone = clone_main(toy_dataset, tmp_path / "clone")
    assert brainzoo("bootstrap", cwd=clone).returncode == 0
    assert brainzoo("verify", "--remote", "inrepo-store", cwd=clone).returncode == 0
    for obj in (clone / "store").rglob("SHA256E-*"):
        if obj.is_file():
            obj.unlink()
    assert brainzoo("verify", "--remote", "inrepo-store", cwd=clone).returncode == 1


def published_weights_in_repo() -> list[str]:
    out = []
    for spec_file in sorted((REPO / "neuronets").rglob("spec.yaml")):
        spec = yaml.safe_load(spec_file.read_text())
        out += [spec["id"] for w in spec.get("weights", []) if "sha256" in w and any(s["type"] == "inrepo-store" for s in w["sources"])]
    return sorted(set(out))


@pytest.mark.parametrize("version_id", published_weights_in_repo())
def test_this_repository_serves_its_store_weights_from_a_fresh_clone(version_id, tmp_path):
    """The real catalogue: every version whose weights live in the in-repo store is gettable offline
    from a single-branch clone of this repository's committed main."""
    clone = clone_main(REPO, tmp_path / "clone")
    assert brainzoo("bootstrap", cwd=clone).returncode == 0
    assert brainzoo("verify", "--remote", "inrepo-store", cwd=clone).returncode == 0  # every key is in the store
    got = brainzoo("get", version_id, "--json", cwd=clone)
    assert got.returncode == 0, got.stdout + got.stderr
    assert brainzoo("verify", cwd=clone).returncode == 0
