"""The catalogue operations behind the CLI: each yields result records (DataLad style).

A record is a dict with at least ``action``, ``path`` (or ``id``), ``status`` (ok, notneeded,
impossible, error) and ``message``. The CLI renders records as text or JSON and exits non-zero when
any record is an error, so batch work reports every item and never stops silently.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from brainzoo import annex, catalogue
from brainzoo.catalogue import Version, WeightsFile
from brainzoo.fileio import sha256_of


def bootstrap(root: Path) -> Iterator[dict]:
    """Make a clone usable offline: annex init, in-repo store, its contents, web URLs, OSF sibling."""
    annex.init(root)
    yield {"action": "bootstrap", "path": ".", "status": "ok", "message": "git-annex initialised"}
    annex.ensure_store(root)
    count = annex.record_store_contents(root)
    yield {"action": "bootstrap", "path": annex.STORE_DIR, "status": "ok",
           "message": f"{annex.STORE_NAME} registered; holds {count} weights file(s)"}
    usable, broken = catalogue.load_catalogue(root)
    yield from broken_records("bootstrap", broken)
    urls = {w.path: [s["url"] for s in w.sources if s["type"] in ("web", "osf") and "url" in s]
            for v in usable for w in v.weights if w.published}
    registered = annex.register_urls(root, {p: u for p, u in urls.items() if u})
    yield {"action": "bootstrap", "path": ".", "status": "ok", "message": f"{registered} web URL(s) registered"}
    yield {"action": "bootstrap", "path": annex.OSF_NAME, "status": "ok", "message": annex.ensure_osf(root)}


def weights_summary(version: Version) -> dict:
    files = version.weights
    published = [w for w in files if w.published]
    return {"weights_files": len(files), "weights_published": len(published),
            "weights_present": sum(w.present for w in published),
            "weights_bytes": sum(w.size for w in published)}


def broken_records(action: str, broken: dict[str, str]) -> Iterator[dict]:
    """An error record for each version folder whose spec cannot be used; the others go on."""
    for version_id, problem in broken.items():
        yield {"action": action, "id": version_id, "path": version_id, "status": "error", "message": problem}


def list_versions(root: Path) -> Iterator[dict]:
    usable, broken = catalogue.load_catalogue(root)
    yield from broken_records("list", broken)
    recommended = catalogue.recommended_ids(root)
    for version in usable:
        spec = version.spec
        yield {"action": "list", "id": version.id, "status": "ok", "message": "",
               "model": spec.get("model"), "version": spec.get("version"), "variant": spec.get("variant", ""),
               "recommended": version.id in recommended,
               "task": spec.get("task"), "contrast": ",".join(version.inference.input.contrast),
               **weights_summary(version)}


def info(ref: str, root: Path) -> Iterator[dict]:
    version = catalogue.find_version(ref, root)
    card = version.card
    yield {"action": "info", "id": version.id, "status": "ok", "message": "",
           "recommended": version.id in catalogue.recommended_ids(root),
           "task": version.task, "architecture": version.spec["architecture"],
           "input": version.spec["inference"]["input"], "preprocessing": version.spec["inference"]["preprocessing"],
           "output": version.spec["inference"]["output"],
           "weights": [dict(w.entry, present=w.present) for w in version.weights],
           "license": card.get("License"), "citation": card.get("Citation"), "metrics": card.get("Metrics"),
           **weights_summary(version)}


def verify(root: Path, remote: str | None = None) -> Iterator[dict]:
    """git-annex fsck of every present weights file and sha256 against the spec; or, with ``remote``, that the
    remote holds every published weights file.

    Damaged content is an error with what to do, on the run that finds it and on every later run: fsck moves
    it to ``.git/annex/bad``, after which the file looks merely absent.
    """
    usable, broken = catalogue.load_catalogue(root)
    yield from broken_records("verify", broken)
    weights = [w for v in usable for w in v.weights if w.published]
    if remote:
        paths = [str(w.path.relative_to(root)) for w in weights]
        yield from (dict(r, action="verify") for r in annex.fsck(root, paths, remote=remote)) if paths else ()
        return
    present = [w for w in weights if w.present]
    bad_dir = annex.bad_content_dir(root)
    for w in weights:
        if not w.present:
            yield _absent_record(root, w, bad_dir)
    if not present:
        return
    actual = {w.path: sha256_of(w.path) for w in present}  # before fsck, which moves damaged content away
    fsck_status = {r["path"]: r for r in annex.fsck(root, [str(w.path.relative_to(root)) for w in present])}
    for w in present:
        rel = str(w.path.relative_to(root))
        record = fsck_status.get(rel, {"status": "error", "message": "git-annex fsck did not report this file"})
        problems = [record["message"]] if record["status"] != "ok" else []
        if actual[w.path] != w.sha256:
            problems.append(f"sha256 {actual[w.path]} differs from the spec's {w.sha256}")
        if problems and not w.present:
            problems.append(f"run `brainzoo get {w.version_id}` to fetch a good copy")
        yield {"action": "verify", "path": rel, "status": "error" if problems else "ok",
               "message": "; ".join(problems) or "git-annex fsck ok; sha256 matches the spec"}


def _absent_record(root: Path, weights: WeightsFile, bad_dir: Path) -> dict:
    """An absent weights file: not fetched (fine), or damaged content that an earlier fsck moved aside."""
    rel = str(weights.path.relative_to(root))
    key = annex.annex_key_of(weights.path)
    if key is not None and (bad_dir / key).exists():
        return {"action": "verify", "path": rel, "status": "error",
                "message": f"damaged: git-annex fsck found its content's checksum wrong and moved it to "
                           f"{os.path.relpath(bad_dir / key, root)}; run `brainzoo get {weights.version_id}` to "
                           "fetch a good copy, then delete the damaged one"}
    return {"action": "verify", "path": rel, "status": "notneeded",
            "message": f"not present; `brainzoo get {weights.version_id}` fetches it"}
