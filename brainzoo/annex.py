"""git-annex plumbing: the in-repo store, the OSF sibling, web sources, get and fsck.

The in-repo store is a git-annex ``directory`` special remote whose folder, ``store/``, is committed
to git. A fresh clone of ``main`` has no git-annex branch, so nothing in git-annex knows where any
weights file lives; :func:`bootstrap` re-registers the store under a fixed UUID and asks fsck to record
what it holds, after which ``datalad get`` works offline and git-annex checks every checksum.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Iterator

from brainzoo.errors import BrainzooError

STORE_NAME = "inrepo-store"
STORE_DIR = "store"
# Fixed so that every clone registers the same remote: location logs then agree between clones.
STORE_UUID = "6b1c0e4e-2f8a-4c1d-9b7e-3a5d0f9e2b71"
OSF_NAME = "osf-storage"
OSF_ENABLE_TIMEOUT_S = 60


def tool_path() -> None:
    """Put the running interpreter's ``bin/`` first on PATH: the PyPI git-annex lives there."""
    venv_bin = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != venv_bin:
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")


def run(args: list[str], cwd: Path, check: bool = True, timeout: float | None = None,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Run git/git-annex in ``cwd``; a failure becomes a BrainzooError that quotes the tool."""
    tool_path()
    try:
        proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              input=input if input is not None else "")
    except FileNotFoundError:
        raise BrainzooError(f"{args[0]}: not found on PATH; run `make setup`") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise BrainzooError(f"{cwd}: `{' '.join(args[:3])}` failed: {detail}")
    return proc


def git_config(root: Path, key: str) -> str | None:
    proc = run(["git", "config", "--get", key], root, check=False)
    return proc.stdout.strip() or None


def annex_key_of(path: Path) -> str | None:
    """The git-annex key of an annexed file (locked symlink or unlocked pointer), else None."""
    if path.is_symlink():
        target = os.readlink(path)
    elif path.is_file() and path.stat().st_size < 1024:
        target = path.read_text(errors="replace").strip()
    else:
        return None
    if "/annex/objects/" not in target:
        return None
    return Path(target).name


def expected_key(sha256: str, size: int, path: Path) -> str:
    """The SHA256E key git-annex gives a file with this content and name."""
    return f"SHA256E-s{size}--{sha256}{''.join(path.suffixes)}"


def known_special_remotes(root: Path) -> dict[str, dict[str, str]]:
    """Special remotes recorded in the git-annex branch, by name (empty without the branch)."""
    proc = run(["git", "cat-file", "-p", "git-annex:remote.log"], root, check=False)
    remotes = {}
    for line in proc.stdout.splitlines():
        uuid, *fields = line.split()
        config = dict(f.split("=", 1) for f in fields if "=" in f)
        if "name" in config:
            remotes[config["name"]] = {"uuid": uuid, **config}
    return remotes


def verify_remote(root: Path, name: str) -> None:
    """Mark a special remote as safe (git-annex 10.2026 refuses unverified ones met in a clone).

    ``verifyremote NAME`` prints the configuration and the id to confirm it with; we confirm only
    remotes whose configuration we checked ourselves before calling this.
    """
    if git_config(root, f"remote.{name}.annex-verified") == "verified":
        return
    shown = run(["git", "annex", "verifyremote", name], root, check=False)
    match = re.search(r"--safe (\S+)", shown.stdout + shown.stderr)
    if match is None:
        return  # nothing to verify: this git-annex trusts the remote already
    run(["git", "annex", "verifyremote", name, "--safe", match.group(1)], root)


def ensure_directory_remote(root: Path, name: str, folder: Path, uuid: str | None) -> str:
    """(Re)register ``folder`` as the directory special remote ``name`` (under ``uuid`` when given);
    returns its UUID. Follows a folder mounted somewhere else since the last time."""
    local_uuid = git_config(root, f"remote.{name}.annex-uuid")
    known_uuid = known_special_remotes(root).get(name, {}).get("uuid")
    existing = local_uuid or known_uuid
    if existing is not None and existing != uuid:
        raise BrainzooError(f"{root}: a remote named {name} already exists (uuid {existing}) and is not the store "
                            f"in {folder} (uuid {uuid or 'not yet assigned'}); use another name")
    if local_uuid is not None:
        run(["git", "config", f"remote.{name}.annex-directory", str(folder)], root)
    elif known_uuid is not None:
        run(["git", "annex", "enableremote", name, f"directory={folder}"], root)
    else:
        run(["git", "annex", "initremote", name, "type=directory", f"directory={folder}",
             "encryption=none", *([f"uuid={uuid}"] if uuid else [])], root)
    verify_remote(root, name)
    return git_config(root, f"remote.{name}.annex-uuid")


def ensure_store(root: Path) -> None:
    """(Re)register ``store/`` as the directory special remote ``inrepo-store`` in this clone."""
    store = root / STORE_DIR
    store.mkdir(exist_ok=True)
    ensure_directory_remote(root, STORE_NAME, store, STORE_UUID)


def store_keys(root: Path) -> set[str]:
    """Keys whose content is committed in ``store/`` (directory remote layout: hash/hash/KEY/KEY)."""
    store = root / STORE_DIR
    return {p.name for p in store.glob("*/*/*/*") if p.is_file() and p.name == p.parent.name}


def annexed_files(root: Path, paths: Iterable[str] = ()) -> dict[str, str]:
    """Annexed files of the work tree (or under ``paths``) mapped to their keys."""
    proc = run(["git", "annex", "find", "--include=*", "--format=${file}\\t${key}\\n", *paths], root)
    return dict(line.split("\t", 1) for line in proc.stdout.splitlines() if "\t" in line)


def record_store_contents(root: Path) -> int:
    """Tell the location log which annexed files the store holds; returns how many."""
    in_store = store_keys(root)
    files = [f for f, key in annexed_files(root).items() if key in in_store]
    if files:
        run(["git", "annex", "fsck", "--from", STORE_NAME, "--fast", "--quiet", *files], root)
    return len(files)


STORE_MAX_BYTES = 25 * 1024 * 1024


def add_to_store(root: Path, paths: list[Path]) -> None:
    """Copy annexed weights into the in-repo store (small files only: the store is committed to git)."""
    too_big = [f"{p} ({p.stat().st_size / 2**20:.1f} MiB)" for p in paths if p.stat().st_size > STORE_MAX_BYTES]
    if too_big:
        raise BrainzooError(f"too large for the in-repo store (limit {STORE_MAX_BYTES >> 20} MiB; publish to OSF): "
                            + ", ".join(too_big))
    run(["git", "annex", "copy", "--to", STORE_NAME, *map(str, paths)], root)


def ensure_osf(root: Path) -> str:
    """Enable the OSF sibling when the git-annex branch configures it; offline is not an error."""
    if OSF_NAME not in known_special_remotes(root):
        return "not configured"
    if git_config(root, f"remote.{OSF_NAME}.annex-uuid"):
        return "enabled"
    try:
        proc = run(["git", "annex", "enableremote", OSF_NAME], root, check=False, timeout=OSF_ENABLE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "unreachable (timed out); run `make setup` again when online"
    if proc.returncode != 0:
        return f"not enabled: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
    verify_remote(root, OSF_NAME)
    return "enabled"


def register_urls(root: Path, urls_by_file: dict[Path, list[str]]) -> int:
    """Record web URLs for annexed files (offline: no download), so the web remote can serve them."""
    lines = []
    for path, urls in urls_by_file.items():
        key = annex_key_of(path)
        if key is None:
            continue
        lines += [f"{key} {url}" for url in urls]
    if lines:
        run(["git", "annex", "registerurl", "--batch"], root, input="\n".join(lines) + "\n")
    return len(lines)


def init(root: Path) -> None:
    """``git annex init`` once per clone."""
    if not (root / ".git").exists():
        raise BrainzooError(f"{root}: not a git repository")
    if git_config(root, "annex.uuid") is None:
        run(["git", "annex", "init", "brainzoo clone"], root)


def get(root: Path, paths: list[str], source: str | None = None) -> Iterator[dict]:
    """``datalad get`` of annexed files (git-annex picks the cheapest reachable source and checks
    the checksum); one result record per file, with DataLad's progress bars on the terminal."""
    tool_path()
    import datalad.api as dl

    # Absolute paths: DataLad reads relative ones against the current folder, not the dataset.
    for res in dl.get(path=[str(root / p) for p in paths], dataset=str(root), source=source, on_failure="ignore",
                      result_renderer="disabled", return_type="generator"):
        if res.get("type") != "file":
            continue
        message = res.get("error_message") or res.get("message") or ""
        if isinstance(message, (tuple, list)):
            message = message[0] % tuple(message[1:])
        yield {"action": "get", "path": res["path"], "status": res["status"], "message": message}


def bad_content_dir(root: Path) -> Path:
    """Where ``git annex fsck`` moves content whose checksum it found wrong (``.git/annex/bad``); the file's
    link then dangles, and git-annex's location log no longer counts this clone as holding the key."""
    folder = Path(run(["git", "rev-parse", "--git-path", "annex/bad"], root).stdout.strip())
    return folder if folder.is_absolute() else root / folder


def fsck(root: Path, paths: list[str], remote: str | None = None) -> Iterator[dict]:
    """Check checksums of present files (content that fails is moved to :func:`bad_content_dir`), or with
    ``remote`` that the remote holds each key."""
    args = ["git", "annex", "fsck", "--json", "--json-error-messages"]
    if remote:
        args += ["--from", remote, "--fast"]
    yield from _annex_json(root, args + paths, action="fsck")


def _annex_json(root: Path, args: list[str], action: str) -> Iterator[dict]:
    """Stream git-annex's JSON lines as brainzoo result records."""
    tool_path()
    proc = subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        item = json.loads(line)
        notes = item.get("error-messages") or ([item["note"]] if item.get("note") else [])
        yield {"action": action, "path": item.get("file"), "key": item.get("key"),
               "status": "ok" if item.get("success") else "error",
               "message": "; ".join(m.strip() for m in notes)}
    stderr = proc.stderr.read().strip()
    if proc.wait() != 0 and stderr and "failed" not in stderr.splitlines()[-1]:
        yield {"action": action, "path": str(root), "status": "error", "message": stderr.splitlines()[-1]}
