"""Where weights come from, in which order, and how a clone learns about the sources a spec lists.

git-annex tries the remotes that hold a key from the cheapest to the most expensive and moves on when
one fails (unreachable, or content that does not match its checksum). The costs below make that order
in-repo store, offline mirrors, OSF, then any web URL. A clone of ``main`` has no git-annex branch, so
the web URLs listed in the specs (OSF download links included) exist for git-annex only once they are
registered: :func:`get` does that for the version it fetches, so it works even where bootstrap was not run
or ran before the spec gained a URL.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import yaml

from brainzoo import annex, catalogue, zoo
from brainzoo.catalogue import Version, WeightsFile
from brainzoo.errors import BrainzooError
from brainzoo.fileio import sha256_of

# git-annex remote costs by kind of source (lower is tried first), set in each clone's git config.
COSTS = {"inrepo-store": 100, "mirror": 150, "osf": 200, "web": 250}
URL_SOURCE_TYPES = ("osf", "web")


def source_urls(weights: WeightsFile) -> list[str]:
    """The download URLs a spec lists for one weights file, in the order they should be tried."""
    listed = [s for s in weights.sources if s["type"] in URL_SOURCE_TYPES and "url" in s]
    return [s["url"] for s in sorted(listed, key=lambda s: COSTS[s["type"]])]


def is_set_up(root: Path) -> bool:
    """Whether bootstrap has run in this clone (git-annex initialised, in-repo store registered)."""
    return (annex.git_config(root, "annex.uuid") is not None
            and annex.git_config(root, f"remote.{annex.STORE_NAME}.annex-uuid") is not None)


def set_cost(root: Path, remote: str, kind: str) -> None:
    annex.run(["git", "config", f"remote.{remote}.annex-cost", str(COSTS[kind])], root)


def prepare(root: Path, version: Version) -> Iterator[dict]:
    """Make every source of a version's weights known to git-annex in this clone."""
    if not is_set_up(root):
        yield from zoo.bootstrap(root)
    for remote, kind in ((annex.STORE_NAME, "inrepo-store"), (annex.OSF_NAME, "osf"), ("web", "web")):
        if remote == "web" or annex.git_config(root, f"remote.{remote}.annex-uuid"):
            set_cost(root, remote, kind)
    urls = {w.path: source_urls(w) for w in version.weights if w.published}
    registered = annex.register_urls(root, {path: u for path, u in urls.items() if u})
    yield {"action": "sources", "path": version.id, "status": "ok",
           "message": f"{registered} source URL(s) known to git-annex"}


def key_problem(weights: WeightsFile) -> str | None:
    """Why the annexed file does not carry the content the spec describes, if it does not."""
    key = annex.annex_key_of(weights.path)
    want = annex.expected_key(weights.sha256, weights.size, weights.path)
    if key is None:
        return "is not an annexed file in this clone"
    if key != want:
        return f"annexed key {key} does not match the spec's sha256/size ({want})"
    return None


def get(root: Path, ref: str, source: str | None = None) -> Iterator[dict]:
    """``brainzoo get``: fetch a version's weights from the first source that serves them and check each
    file's sha256 against the spec; content that does not match is dropped again, so nothing wrong stays."""
    version = catalogue.find_version(ref, root)
    yield from prepare(root, version)
    fetchable = {}
    for weights in version.weights:
        rel = str(weights.path.relative_to(root))
        if not weights.published:
            yield {"action": "get", "path": rel, "status": "impossible",
                   "message": f"made by conversion from the upstream checkpoint: {weights.conversion_hint}"}
        elif problem := key_problem(weights):
            yield {"action": "get", "path": rel, "status": "error", "message": f"{rel}: {problem}; not fetched"}
        else:
            fetchable[str(weights.path)] = weights
    if not fetchable:
        return
    # Absolute paths: DataLad reads relative ones against the current folder, not the dataset.
    for record in annex.get(root, list(fetchable), source=source):
        weights = fetchable.get(record["path"])
        if weights is not None and record["status"] in ("ok", "notneeded"):
            record = dict(record, **checksum_outcome(root, weights))
        yield dict(record, path=str(Path(record["path"]).relative_to(root)))


def checksum_outcome(root: Path, weights: WeightsFile) -> dict:
    """Compare a fetched file with the spec's sha256 (git-annex checks too, unless verification is off)."""
    actual = sha256_of(weights.path)
    if actual == weights.sha256:
        return {"status": "ok", "message": "sha256 matches the spec"}
    annex.run(["git", "annex", "drop", "--force", str(weights.path)], root)
    return {"status": "error",
            "message": f"downloaded content has sha256 {actual}, the spec says {weights.sha256}; dropped it"}


def _last_scalar_end(node: yaml.Node) -> int:
    """Index just after the last scalar inside a node (where a block item really ends)."""
    if isinstance(node, yaml.ScalarNode):
        return node.end_mark.index
    children = node.value if isinstance(node, yaml.SequenceNode) else [part for pair in node.value for part in pair]
    return max(_last_scalar_end(child) for child in children)


def _mapping_value(node: yaml.Node, key: str) -> yaml.Node:
    return next(value for name, value in node.value if name.value == key)


def add_spec_source(spec_file: Path, weights_index: int, source: dict) -> bool:
    """Append ``source`` to the sources of ``weights[weights_index]`` in a spec, keeping the rest of the
    file (comments, layout) as written; False when it is listed already."""
    text = spec_file.read_text()
    expected = yaml.safe_load(text)
    sources = expected["weights"][weights_index].setdefault("sources", [])
    if source in sources:
        return False
    sources.append(source)
    item = yaml.safe_dump(source, default_flow_style=True, width=float("inf")).strip()
    node = _mapping_value(_mapping_value(yaml.compose(text), "weights").value[weights_index], "sources")
    if node.flow_style:
        closing = node.end_mark.index - 1
        edited = text[:closing] + (", " if node.value else "") + item + text[closing:]
    else:
        line_end = text.find("\n", _last_scalar_end(node))
        line_end = len(text) if line_end == -1 else line_end
        edited = text[:line_end] + "\n" + " " * node.start_mark.column + "- " + item + text[line_end:]
    if yaml.safe_load(edited) != expected:
        raise BrainzooError(f"{spec_file}: could not add {item} to weights[{weights_index}].sources "
                            "without rewriting the file; add it by hand")
    spec_file.write_text(edited)
    return True


def datalad_results(function: str, arguments: dict) -> Iterator[dict]:
    """Run ``datalad.api.<function>(**arguments)`` (``dataset`` among them) and yield each DataLad
    result as a brainzoo record, its path relative to the dataset."""
    annex.tool_path()
    import datalad.api as dl

    for res in getattr(dl, function)(**arguments, on_failure="ignore", result_renderer="disabled",
                                      return_type="generator"):
        message = res.get("error_message") or res.get("message") or ""
        if isinstance(message, (tuple, list)):
            message = message[0] % tuple(message[1:])
        yield {"action": res["action"], "path": os.path.relpath(res.get("path") or arguments["dataset"], arguments["dataset"]),
               "status": res["status"], "message": message, "type": res.get("type")}


def push(root: Path, remote: str, paths: list[str]) -> Iterator[dict]:
    """``datalad push`` of annexed files to a special remote, one record per file."""
    for record in datalad_results("push", {"dataset": str(root), "to": remote, "path": paths, "data": "anything"}):
        if record.pop("type") == "file":
            yield dict(record, action="push")


def present_keys(root: Path, remote: str, keys: list[str]) -> set[str]:
    """Which keys a remote really holds, asked of the remote itself (not of the location log)."""
    if not keys:
        return set()
    proc = annex.run(["git", "annex", "checkpresentkey", "--batch", remote], root, input="\n".join(keys) + "\n")
    return {key for key, answer in zip(keys, proc.stdout.split()) if answer == "1"}

