"""Offline mirrors: weights on a disk you carry to a machine with no network.

A mirror is a git-annex ``directory`` special remote in a folder of your choice, plus
``brainzoo-mirror.json`` naming the remote and its UUID. :func:`mirror_export` fills it from a clone that
has the weights; :func:`mirror_add` registers the same folder in any other clone under the same UUID and
asks the folder itself which keys it holds, so ``datalad get`` copies from it with no network and
git-annex checks every checksum, exactly as with the in-repo store.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from brainzoo import annex, catalogue, sources
from brainzoo.errors import BrainzooError
from brainzoo.fileio import atomic_output

MANIFEST = "brainzoo-mirror.json"


def default_name(folder: Path) -> str:
    """``mirror-<folder name>``, reduced to what git accepts in a remote name."""
    return "mirror-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", folder.name).strip("-.") or "disk")


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BrainzooError(f"{folder}: not a brainzoo mirror (no {MANIFEST}); "
                            "make one with `brainzoo mirror export`") from None
    except json.JSONDecodeError as err:
        raise BrainzooError(f"{path}: malformed JSON: {err}") from None
    if not isinstance(manifest, dict) or not {"name", "uuid"} <= manifest.keys():
        raise BrainzooError(f"{path}: expected a JSON object with name and uuid")
    return manifest


def mirror_export(root: Path, dest_dir: str | Path, version_ids: list[str] | None = None) -> Iterator[dict]:
    """Copy the weights of ``version_ids`` (default: every version whose weights are here) into a mirror
    folder, creating it or adding to the one already there."""
    dest = Path(dest_dir).resolve()
    chosen = [catalogue.find_version(v, root) for v in version_ids] if version_ids else catalogue.versions(root)
    weights = [w for v in chosen for w in v.weights if w.published]
    absent = [w for w in weights if not w.present]
    if version_ids and absent:
        raise BrainzooError("not in this clone, so not exported: " + ", ".join(str(w.path.relative_to(root)) for w in absent)
                            + f"; run `brainzoo get {absent[0].version_id}` first")
    present = [w for w in weights if w.present]
    if not present:
        raise BrainzooError(f"{root}: no weights present to export; `brainzoo get` some first")
    manifest = read_manifest(dest) if (dest / MANIFEST).exists() else {"name": default_name(dest), "uuid": None}
    for w in absent:
        yield {"action": "mirror-export", "path": str(w.path.relative_to(root)), "status": "notneeded",
               "message": "not in this clone; left out"}
    dest.mkdir(parents=True, exist_ok=True)
    uuid = annex.ensure_directory_remote(root, manifest["name"], dest, manifest["uuid"])
    sources.set_cost(root, manifest["name"], "mirror")
    if manifest["uuid"] is None:
        with atomic_output(dest / MANIFEST) as tmp:
            tmp.write_text(json.dumps({"name": manifest["name"], "uuid": uuid}, indent=2) + "\n")
    yield {"action": "mirror-export", "path": str(dest), "status": "ok",
           "message": f"remote {manifest['name']} ({uuid}); add it elsewhere with `brainzoo mirror add {dest}`"}
    by_key = {annex.annex_key_of(w.path): w for w in present}
    held = sources.present_keys(root, manifest["name"], list(by_key))
    for key in sorted(held):
        yield {"action": "mirror-export", "path": str(by_key[key].path.relative_to(root)), "status": "notneeded",
               "message": "already in the mirror"}
    to_copy = [str(w.path) for key, w in by_key.items() if key not in held]
    if to_copy:
        yield from (dict(record, action="mirror-export") for record in sources.push(root, manifest["name"], to_copy))


def mirror_add(root: Path, folder: str | Path, name: str | None = None) -> Iterator[dict]:
    """Register a mirror folder in this clone and record which weights it holds."""
    folder = Path(folder).resolve()
    manifest = read_manifest(folder)
    name = name or manifest["name"]
    annex.init(root)
    uuid = annex.ensure_directory_remote(root, name, folder, manifest["uuid"])
    sources.set_cost(root, name, "mirror")
    keys = sorted(set(annex.annexed_files(root).values()))
    held = sorted(sources.present_keys(root, name, keys))
    if held:
        annex.run(["git", "annex", "setpresentkey", "--batch"], root,
                  input="".join(f"{key} {uuid} 1\n" for key in held))
    yield {"action": "mirror-add", "path": str(folder), "status": "ok",
           "message": f"remote {name} registered; holds {len(held)} of this clone's {len(keys)} annexed file(s)"}
