"""Shared test helpers: paths, a git identity, and real throw-away DataLad datasets."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
VENV_BIN = str(Path(sys.executable).parent)

DEEPBET = "neuronets/deepbet/1.0.2"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent (real MRI lives there)")


@pytest.fixture(autouse=True, scope="session")
def git_identity(tmp_path_factory):
    """Commits made by tests need an identity; git-annex needs the venv's bin/ on PATH; caches stay in the run."""
    saved = dict(os.environ)
    os.environ.update(GIT_AUTHOR_NAME="brainzoo tests", GIT_AUTHOR_EMAIL="tests@brainzoo.invalid",
                      GIT_COMMITTER_NAME="brainzoo tests", GIT_COMMITTER_EMAIL="tests@brainzoo.invalid",
                      PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
                      BRAINZOO_CACHE=str(tmp_path_factory.mktemp("cache")))
    yield
    os.environ.clear()
    os.environ.update(saved)


def sh(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=check)


def brainzoo_command(*args) -> list[str]:
    """The real CLI's command line (-P: the installed brainzoo, even in a clone of this one)."""
    return [sys.executable, "-P", "-m", "brainzoo.cli", *map(str, args)]


def cli_environment() -> dict[str, str]:
    """The tests' environment without BRAINZOO_ROOT: the CLI finds its dataset from its working folder."""
    env = dict(os.environ)
    env.pop("BRAINZOO_ROOT", None)
    return env


def brainzoo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, run inside a dataset."""
    return subprocess.run(brainzoo_command(*args), cwd=cwd, capture_output=True, text=True, env=cli_environment())


def load_fixture(name: str) -> dict:
    """A conversion fixture: the original architecture's state_dict shapes, input rule and outputs."""
    return json.loads((FIXTURES / "conversion" / f"{name}.json").read_text())


def seeded_state_dict(shapes: dict) -> dict[str, np.ndarray]:
    """The fixtures' ``seeding_rule``: every tensor from a generator seeded with the CRC32 of its key."""
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = np.array(0, np.int64)
            continue
        rng = np.random.default_rng(zlib.crc32(key.encode("utf-8")))
        if "running_var" in key:
            values = rng.uniform(0.5, 1.5, shape)
        elif "running_mean" in key:
            values = rng.uniform(-0.1, 0.1, shape)
        elif len(shape) >= 2:
            values = rng.uniform(-1, 1, shape) * np.sqrt(3 / np.prod(shape[1:]))
        elif key.endswith("weight"):
            values = rng.uniform(0.5, 1.5, shape)
        else:
            values = rng.uniform(-0.1, 0.1, shape)
        state[key] = values.astype(np.float32)
    return state


def fixture_spec() -> dict:
    return yaml.safe_load((FIXTURES / "catalogue" / "spec.yaml").read_text())


def fixture_card() -> dict:
    return yaml.safe_load((FIXTURES / "catalogue" / "model_card.yaml").read_text())


def write_version(root: Path, spec: dict, card: dict, weights: dict[str, bytes] | None = None) -> Path:
    """Write a version folder; ``weights`` (relative path -> bytes) are written and their size/sha256 set."""
    folder = root / spec["id"]
    folder.mkdir(parents=True, exist_ok=True)
    for entry in spec.get("weights", []):
        content = (weights or {}).get(entry["path"])
        if content is not None:
            (folder / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
            (folder / entry["path"]).write_bytes(content)
            entry.update(size=len(content), sha256=hashlib.sha256(content).hexdigest())
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (folder / "model_card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return folder


def write_index(root: Path) -> None:
    """The index of every version folder, each model's highest version (all its variants) marked recommended."""
    entries = []
    for spec_file in sorted((root / "neuronets").rglob("spec.yaml")):
        spec = yaml.safe_load(spec_file.read_text())
        entries.append({"id": spec["id"], "path": spec_file.parent.relative_to(root).as_posix(), "task": spec["task"]})
    newest = {}
    for entry in entries:
        model, version = entry["path"].split("/")[1:3]
        newest[model] = max(newest.get(model, version), version, key=lambda v: tuple(map(int, v.split("."))))
    for entry in entries:
        entry["recommended"] = entry["path"].split("/")[2] == newest[entry["path"].split("/")[1]]
    (root / "spec.yaml").write_text(yaml.safe_dump({"schema_version": 1, "catalogue": entries}, sort_keys=False))


@pytest.fixture
def toy_dataset(tmp_path) -> Path:
    """A real DataLad dataset laid out like this repository, with one annexed weights file in its
    committed in-repo store, all on ``main``."""
    root = tmp_path / "origin"
    root.mkdir()
    sh("git", "init", "-q", "-b", "main", cwd=root)
    shutil.copy(REPO / ".gitattributes", root / ".gitattributes")
    (root / ".datalad").mkdir()
    shutil.copy(REPO / ".datalad" / "config", root / ".datalad" / "config")
    write_version(root, fixture_spec(), fixture_card(), weights={"weights/model.h5": os.urandom(4096)})
    write_index(root)
    assert brainzoo("bootstrap", cwd=root).returncode == 0
    sh("git", "annex", "add", "neuronets", cwd=root)
    sh("git", "annex", "copy", "--to", "inrepo-store", "neuronets", cwd=root)
    sh("git", "add", ".", cwd=root)
    sh("git", "commit", "-q", "-m", "toy dataset", cwd=root)
    return root


def clone_main(origin: Path, dest: Path) -> Path:
    """What CI and a new user get: main only, no git-annex branch."""
    sh("git", "clone", "-q", "--single-branch", "--branch", "main", str(origin), str(dest), cwd=origin.parent)
    assert sh("git", "branch", "-a", cwd=dest).stdout.count("git-annex") == 0
    return dest


@pytest.fixture(scope="session")
def deepbet_weights() -> str:
    """deepbet's catalogue id, its weights fetched from the in-repo store if this clone lacks them."""
    from brainzoo import sources

    failed = [r for r in sources.get(REPO, DEEPBET) if r["status"] == "error"]
    assert not failed, failed
    return DEEPBET
