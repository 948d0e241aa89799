"""Offline mirrors end to end: export to a folder (the "USB disk"), add it to a fresh clone that has no
network and no other source, get, fsck, and verify against the mirror."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from brainzoo import sources, zoo
from brainzoo.errors import BrainzooError
from brainzoo.mirror import MANIFEST, mirror_add, mirror_export
from conftest import clone_main, sh
from test_sources import SERVER_LIFETIME_S, TOY, TOY_WEIGHTS, add_web_source, allow_loopback_downloads, empty_store, serving


def network_off() -> list[str]:
    """A prefix that runs a command in a new network namespace (nothing but a downed loopback), where
    this machine allows it (root, or user namespaces); elsewhere the clone's lack of other remotes has
    to stand for the missing network."""
    try:
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30)
    except FileNotFoundError:
        return []
    return ["unshare", "-n"] if probe.returncode == 0 else []


def run_offline(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*network_off(), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def mirror_objects(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("SHA256E-*") if p.is_file()]


@pytest.fixture
def usb(toy_dataset, tmp_path) -> Path:
    """A mirror exported from the toy dataset (which has its weights) into a fresh folder."""
    folder = tmp_path / "usb" / "brainzoo weights"
    records = list(mirror_export(toy_dataset, folder))
    assert [r["status"] for r in records] == ["ok", "ok"], records
    assert records[1]["path"] == TOY_WEIGHTS
    return folder


@pytest.fixture
def bare_clone(toy_dataset, tmp_path) -> Path:
    """A fresh clone of main with no source of the weights at all: origin removed, store emptied."""
    clone = clone_main(toy_dataset, tmp_path / "offline-clone")
    sh("git", "remote", "remove", "origin", cwd=clone)
    empty_store(clone)
    return clone


def test_export_writes_a_directory_store_and_its_manifest(usb, toy_dataset):
    manifest = json.loads((usb / MANIFEST).read_text())
    assert manifest["name"] == "mirror-brainzoo-weights"
    assert sh("git", "config", f"remote.{manifest['name']}.annex-uuid", cwd=toy_dataset).stdout.strip() == manifest["uuid"]
    assert [p.name for p in mirror_objects(usb)] == [Path(sh("git", "annex", "lookupkey", TOY_WEIGHTS, cwd=toy_dataset).stdout.strip()).name]
    again = list(mirror_export(toy_dataset, usb))
    assert [r["status"] for r in again] == ["ok", "notneeded"]
    assert json.loads((usb / MANIFEST).read_text()) == manifest


def test_added_mirror_serves_a_clone_with_no_network(usb, bare_clone, toy_dataset):
    add = run_offline(sys.executable, "-c", "import json, sys; from pathlib import Path; from brainzoo.mirror import mirror_add; "
                      "[print(json.dumps(r)) for r in mirror_add(Path.cwd(), sys.argv[1])]", str(usb), cwd=bare_clone)
    assert add.returncode == 0, add.stderr
    [record] = [json.loads(line) for line in add.stdout.splitlines()]
    assert record["status"] == "ok" and "holds 1 of" in record["message"]
    got = run_offline("datalad", "get", TOY_WEIGHTS, cwd=bare_clone)
    assert got.returncode == 0, got.stdout + got.stderr
    assert (bare_clone / TOY_WEIGHTS).read_bytes() == (toy_dataset / TOY_WEIGHTS).read_bytes()
    fsck = run_offline("git", "annex", "fsck", cwd=bare_clone)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_verify_against_a_mirror(usb, bare_clone):
    [added] = mirror_add(bare_clone, usb)
    assert added["status"] == "ok"
    name = json.loads((usb / MANIFEST).read_text())["name"]
    assert [r["status"] for r in zoo.verify(bare_clone, remote=name)] == ["ok"]
    for obj in mirror_objects(usb):
        obj.chmod(0o644)
        obj.unlink()
    assert [r["status"] for r in zoo.verify(bare_clone, remote=name)] == ["error"]


def test_a_mirror_mounted_elsewhere_is_followed(usb, bare_clone, tmp_path):
    list(mirror_add(bare_clone, usb))
    moved = usb.rename(tmp_path / "elsewhere")
    [record] = mirror_add(bare_clone, moved)
    assert record["status"] == "ok"
    name = json.loads((moved / MANIFEST).read_text())["name"]
    assert sh("git", "config", f"remote.{name}.annex-directory", cwd=bare_clone).stdout.strip() == str(moved)
    assert [r["status"] for r in sources.get(bare_clone, TOY) if r["action"] == "get"] == ["ok"]


@pytest.mark.timeout(SERVER_LIFETIME_S)
def test_the_mirror_is_tried_before_the_web(usb, bare_clone, toy_dataset, tmp_path):
    with serving({}) as server:
        add_web_source(toy_dataset, f"{server.url}/{TOY_WEIGHTS}")
        sh("git", "pull", "-q", str(toy_dataset), "main", cwd=bare_clone)
        allow_loopback_downloads(bare_clone)
        list(mirror_add(bare_clone, usb))
        assert [r["status"] for r in sources.get(bare_clone, TOY) if r["action"] == "get"] == ["ok"]
        assert server.hits == []


def test_exporting_a_version_whose_weights_are_absent_is_refused(bare_clone, tmp_path):
    with pytest.raises(BrainzooError, match=rf"{TOY_WEIGHTS}.*brainzoo get {TOY}"):
        list(mirror_export(bare_clone, tmp_path / "usb", [TOY]))
    assert not (tmp_path / "usb").exists()


def test_adding_a_folder_that_is_no_mirror_names_it(bare_clone, tmp_path):
    with pytest.raises(BrainzooError, match=rf"{tmp_path}: not a brainzoo mirror"):
        list(mirror_add(bare_clone, tmp_path))
