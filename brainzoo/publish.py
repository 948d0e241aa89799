"""Publishing a version's weights to OSF with datalad-osf, and recording their public download URLs.

A fresh clone of ``main`` has no git-annex branch and so never learns about the OSF special remote; the
download URL of each file, written into ``spec.yaml`` next to its sha256 and size, is what lets every
clone fetch from OSF (bootstrap and ``brainzoo get`` register spec URLs with git-annex).

One result record per step; ``dry_run`` yields the same records with the exact call each step would make,
and runs none of them (no network). Everything that can be checked offline is checked before the first
step, so bad input publishes nothing. Every step is idempotent: when one fails, its record says what is
done and re-running the command continues.

1. ``save``     datalad save of the version folder
2. ``sibling``  reuse ``osf-storage``; enable it where the git-annex branch has it; attach an existing OSF
                project with the special remote options datalad-osf's create-sibling-osf uses; or create
                a new public project with ``datalad create-sibling-osf``
3. ``push``     datalad push to ``osf-storage`` of the weights OSF does not hold yet
4. ``urls``     list the project's files with osfclient; add ``{type: osf, url}`` to each weights entry of
                ``spec.yaml`` and register the URL with git-annex
5. ``save``     datalad save of ``spec.yaml``
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from brainzoo import annex, catalogue, sources
from brainzoo.catalogue import Version, WeightsFile
from brainzoo.errors import BrainzooError
from brainzoo.fileio import sha256_of

OSF_GIT_SIBLING = "osf"  # create-sibling-osf's git remote; annex.OSF_NAME is its storage special remote
OSF_PROJECT_ID = re.compile(r"[a-z0-9]{5}")
OSF_STORAGE_PROVIDER = "osfstorage"
# OSF's persistent download link of a file (any storage region; public projects need no login).
OSF_DOWNLOAD_URL = "https://osf.io/download/{file_id}/"
NEW_NODE = "<the project the sibling step creates>"


def osf_remote_options(node: str) -> list[str]:
    """The ``git annex initremote`` options datalad-osf's create-sibling-osf uses in annex mode."""
    return ["type=external", "externaltype=osf", "encryption=none", "autoenable=true", f"node={node}"]


def osf_credentials() -> dict:
    """OSF credentials the way datalad-osf finds them: OSF_TOKEN, or OSF_USERNAME + OSF_PASSWORD, or
    what ``datalad osf-credentials`` stored; never a file in the repository."""
    from datalad_osf.utils import get_credentials

    credentials = get_credentials(allow_interactive=False)
    if not credentials.get("token") and not (credentials.get("username") and credentials.get("password")):
        raise BrainzooError("no OSF credentials: set OSF_TOKEN (or OSF_USERNAME and OSF_PASSWORD), "
                            "or store a token once with `datalad osf-credentials`")
    return credentials


def osf_node(root: Path) -> str | None:
    """The OSF project ``osf-storage`` points at, as recorded in the git-annex branch."""
    return annex.known_special_remotes(root).get(annex.OSF_NAME, {}).get("node")


def osf_download_urls(osf, node: str, keys: list[str]) -> dict[str, str]:
    """The public download URL of each key in an OSF project; datalad-osf stores a key as a file named
    after it at the root of the project's storage. ``osf`` is an ``osfclient.OSF``."""
    response = osf.session.get(osf.session.build_url("nodes", node))
    response.raise_for_status()
    if not response.json()["data"]["attributes"]["public"]:
        raise BrainzooError(f"OSF project {node} is private, so its download URLs would need a login; "
                            f"make it public at https://osf.io/{node}/")
    files = {f.path.lstrip("/"): f for f in osf.project(node).storage(OSF_STORAGE_PROVIDER).files}
    missing = [key for key in keys if key not in files]
    if missing:
        raise BrainzooError(f"OSF project {node} does not hold {', '.join(missing)}")
    return {key: OSF_DOWNLOAD_URL.format(file_id=files[key].id) for key in keys}


def keys_on(root: Path, remote: str, paths: list[str]) -> set[str]:
    """Keys of ``paths`` that the location log places on ``remote``."""
    proc = annex.run(["git", "annex", "find", f"--in={remote}", "--format=${key}\\n", *paths], root)
    return set(proc.stdout.split())


def spec_key(weights: WeightsFile) -> str:
    """The key the file has once saved (checked against the annexed key before anything runs)."""
    return annex.expected_key(weights.sha256, weights.size, weights.path)


def has_osf_url(weights: WeightsFile) -> bool:
    return any(s["type"] == "osf" and "url" in s for s in weights.sources)


def check_weights(root: Path, version: Version, on_osf: set[str]) -> None:
    """Refuse weights not produced yet, changed since their sha256 went into the spec, or neither here
    nor on OSF; every problem at once, before anything runs."""
    problems = []
    if not version.weights:
        problems.append("lists no weights")
    for weights in version.weights:
        rel = weights.path.relative_to(root)
        if not weights.published:
            problems.append(f"{rel}: not produced yet (no sha256 in the spec); convert it first")
        elif weights.present and (actual := sha256_of(weights.path)) != weights.sha256:
            problems.append(f"{rel}: content has sha256 {actual}, the spec says {weights.sha256} "
                            "(changed after it was published?); restore the file or update the spec")
        elif not weights.present and (problem := sources.key_problem(weights)):
            problems.append(f"{rel}: {problem}")
        elif not weights.present and spec_key(weights) not in on_osf:
            problems.append(f"{rel}: not in this clone and not on OSF; `brainzoo get {version.id}` first")
    if problems:
        raise BrainzooError(f"{version.id}: cannot publish: " + "; ".join(problems))


def check_project(root: Path, osf_project: str | None, new_osf_project: str | None) -> str | None:
    """Check the OSF project options against each other and the existing sibling; returns its node."""
    node = osf_node(root)
    if osf_project is not None and new_osf_project is not None:
        raise BrainzooError("give either --osf-project ID or --new-osf-project TITLE, not both")
    if osf_project is not None and not OSF_PROJECT_ID.fullmatch(osf_project):
        raise BrainzooError(f"{osf_project!r}: not an OSF project id (5 lowercase letters or digits, "
                            "as in https://osf.io/abcde/)")
    if new_osf_project is not None and not new_osf_project.strip():
        raise BrainzooError("--new-osf-project needs a title")
    if node is not None and osf_project not in (None, node):
        raise BrainzooError(f"{root}: {annex.OSF_NAME} already points at OSF project {node}, not {osf_project}")
    if node is None and osf_project is None and new_osf_project is None:
        raise BrainzooError(f"{root}: no {annex.OSF_NAME} sibling yet; pass --osf-project ID (an existing "
                            "OSF project) or --new-osf-project TITLE")
    return node


@dataclass(frozen=True)
class Step:
    """One publishing step: the exact calls it makes (shown by a dry run) and the function making them,
    which returns (status, message) or raises; no function means there is nothing to do."""

    name: str
    operations: list[dict]
    run: Callable[[], tuple[str, str]] | None
    message: str = ""


def call(name: str, arguments) -> dict:
    return {"call": name, "arguments": arguments}


def describe(operation: dict) -> str:
    """One operation as a person would type it: a command line, or a Python call."""
    if isinstance(operation["arguments"], list):
        return shlex.join([operation["call"], *operation["arguments"]])
    return f"{operation['call']}(" + ", ".join(f"{k}={v!r}" for k, v in operation["arguments"].items()) + ")"


def datalad_step(name: str, function: str, arguments: dict) -> Step:
    """A step that is one DataLad API call; any error result fails it."""
    def run() -> tuple[str, str]:
        results = list(sources.datalad_results(function, arguments))
        failed = [f"{r['path']}: {r['message']}" for r in results if r["status"] in ("error", "impossible")]
        if failed:
            raise BrainzooError("; ".join(failed))
        done = [r for r in results if r["status"] == "ok"]
        return ("ok", "; ".join(f"{r['action']} {r['path']}" + (f": {r['message']}" if r["message"] else "")
                                for r in done)) if done else ("notneeded", "nothing to do")
    return Step(name, [call(f"datalad.api.{function}", arguments)], run)


def sibling_step(root: Path, node: str | None, osf_project: str | None, new_osf_project: str | None) -> Step:
    if node is not None and annex.git_config(root, f"remote.{annex.OSF_NAME}.annex-uuid"):
        return Step("sibling", [], None, f"reusing {annex.OSF_NAME} (OSF project {node})")
    if node is not None:
        argv = ["annex", "enableremote", annex.OSF_NAME]

        def enable() -> tuple[str, str]:
            annex.run(["git", *argv], root)
            annex.verify_remote(root, annex.OSF_NAME)
            return "ok", f"enabled {annex.OSF_NAME} (OSF project {node})"
        return Step("sibling", [call("git", argv)], enable)
    if osf_project is not None:
        argv = ["annex", "initremote", annex.OSF_NAME, *osf_remote_options(osf_project)]

        def attach() -> tuple[str, str]:
            annex.run(["git", *argv], root)
            return "ok", f"{annex.OSF_NAME} attached to OSF project {osf_project}"
        return Step("sibling", [call("git", argv)], attach)
    return datalad_step("sibling", "create_sibling_osf", {
        "dataset": str(root), "title": new_osf_project, "name": OSF_GIT_SIBLING, "storage_name": annex.OSF_NAME,
        "mode": "annex", "public": True, "category": "data", "existing": "error"})


def urls_step(root: Path, version: Version, node: str | None, credentials: dict) -> Step:
    """Find each file's download URL on OSF, write it into the spec and register it with git-annex."""
    spec_file = version.path / catalogue.SPEC_FILE
    missing = {i: w for i, w in enumerate(version.weights) if not has_osf_url(w)}
    if not missing:
        return Step("urls", [], None, "spec.yaml lists an OSF URL for every weights file")
    keys = {i: spec_key(w) for i, w in missing.items()}
    operations = [
        call("osfclient.OSF.project", {"project_id": node or NEW_NODE}),
        call("osfclient.Project.storage", {"provider": OSF_STORAGE_PROVIDER}),
        call("brainzoo.sources.add_spec_source", {
            "spec_file": str(spec_file),
            "sources": {missing[i].name: {"type": "osf", "url": OSF_DOWNLOAD_URL.format(file_id=f"<OSF file id of {key}>")}
                        for i, key in keys.items()}}),
        call("git", ["annex", "registerurl", "--batch"]),
    ]

    def run() -> tuple[str, str]:
        from osfclient import OSF

        urls = osf_download_urls(OSF(**credentials), osf_node(root), list(keys.values()))
        for i, key in keys.items():
            sources.add_spec_source(spec_file, i, {"type": "osf", "url": urls[key]})
        annex.register_urls(root, {missing[i].path: [urls[key]] for i, key in keys.items()})
        return "ok", f"{len(keys)} OSF download URL(s) written to {spec_file.relative_to(root)}"
    return Step("urls", operations, run)


def plan(root: Path, version: Version, node: str | None, on_osf: set[str], osf_project: str | None,
         new_osf_project: str | None, credentials: dict) -> list[Step]:
    to_push = [str(w.path) for w in version.weights if spec_key(w) not in on_osf]
    push = (datalad_step("push", "push", {"dataset": str(root), "to": annex.OSF_NAME, "path": to_push, "data": "anything"})
            if to_push else Step("push", [], None, f"OSF holds all {len(version.weights)} weights file(s)"))
    return [
        datalad_step("save", "save", {"dataset": str(root), "path": [str(version.path)],
                                      "message": f"{version.id}: weights to publish on OSF"}),
        sibling_step(root, node, osf_project, new_osf_project),
        push,
        urls_step(root, version, node or osf_project, credentials),
        datalad_step("save", "save", {"dataset": str(root), "path": [str(version.path / catalogue.SPEC_FILE)],
                                      "message": f"{version.id}: OSF download URLs of its weights"}),
    ]


def state(root: Path, version_id: str, project_option: str) -> str:
    """What a failed publication leaves behind, and the command that continues it."""
    version = catalogue.find_version(version_id, root)
    node = osf_node(root)
    paths = [str(w.path) for w in version.weights]
    on_osf = keys_on(root, annex.OSF_NAME, paths) if node else set()
    unsaved = annex.run(["git", "status", "--porcelain", "--", str(version.path)], root).stdout.strip()
    return "\n".join([
        "state: " + (f"{annex.OSF_NAME} points at OSF project {node}" if node else f"no {annex.OSF_NAME} sibling"),
        f"state: OSF holds {len(on_osf)} of {len(paths)} weights file(s) (git-annex location log)",
        f"state: spec.yaml lists OSF URLs for {sum(has_osf_url(w) for w in version.weights)} of {len(paths)}",
        "state: " + ("unsaved changes in the version folder" if unsaved else "version folder saved"),
        f"resume: brainzoo publish {version.id}" + ("" if node else project_option),
    ])


def publish(root: Path, version_id: str, osf_project: str | None = None, new_osf_project: str | None = None,
            dry_run: bool = False) -> Iterator[dict]:
    """Publish a version's weights on OSF and record their download URLs in its spec (see module doc)."""
    version = catalogue.find_version(version_id, root)
    if annex.git_config(root, "annex.uuid") is None:
        raise BrainzooError(f"{root}: git-annex is not initialised here; run `brainzoo bootstrap` first")
    node = check_project(root, osf_project, new_osf_project)
    on_osf = keys_on(root, annex.OSF_NAME, [str(w.path) for w in version.weights]) if node else set()
    check_weights(root, version, on_osf)
    credentials = osf_credentials()
    project_option = f" --osf-project {osf_project}" if osf_project else f" --new-osf-project {shlex.quote(new_osf_project or '')}"
    for step in plan(root, version, node, on_osf, osf_project, new_osf_project, credentials):
        record = {"action": "publish", "path": version.id, "step": step.name, "operations": step.operations}
        if step.run is None:
            yield dict(record, status="notneeded", message=step.message)
            continue
        if dry_run:
            yield dict(record, status="ok", message=f"dry run of the {step.name} step; would call:\n" + "\n".join(map(describe, step.operations)))
            continue
        try:
            status, message = step.run()
        except Exception as err:  # a step boundary: whatever broke, say what is done and how to go on
            yield dict(record, status="error", message=f"{err}\n{state(root, version.id, project_option)}")
            return
        yield dict(record, status=status, message=message)
