"""``brainzoo get VERSION --upstream FILE...``: weights made here, by exact conversion of the upstream checkpoints.

Some models cannot be redistributed or are not yet published as Keras files; their spec lists, per weights
file, the ``upstream`` checkpoint (URL, licence, file name and, where we know its bytes, size / sha256 / git
blob id) and the conversion ``recipe``. The user downloads the checkpoints and passes them here. Each file is
matched to its weights entry by its upstream file name, checked to be the upstream file, converted with the
recipe's architecture and the spec's builder options, self-checked against the PyTorch reference, annexed
(SHA256E) and saved with DataLad; the spec entry then carries the result's size and sha256 plus a
``conversion`` record, so ``brainzoo verify`` and ``brainzoo predict`` accept it at once.

All or nothing: every given file is converted into a scratch folder first; the version folder, the annex and
the spec change only once all of them have passed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from brainzoo import annex, catalogue, zoo
from brainzoo.sources import datalad_results, is_set_up
from brainzoo.catalogue import Version, WeightsFile
from brainzoo.errors import BrainzooError
from brainzoo.fileio import sha256_of
from brainzoo.outputs import builder_options
from brainzoo.validate import definition_problems


@dataclass(frozen=True)
class UpstreamFile:
    """A downloaded upstream checkpoint, its identity, and the weights entry it converts to."""

    path: Path
    weights: WeightsFile
    size: int
    sha256: str
    git_blob: str
    verified: str | None  # how its identity was checked ("sha256", "git blob"), None if it could not be


def git_blob_id(path: Path) -> str:
    """The id git gives a file's content (what a GitHub repository's tree lists for it)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def upstream_name(weights: WeightsFile) -> str | None:
    """The upstream file name a weights entry converts from (``upstream.file``'s last part), if the spec gives one."""
    listed = weights.entry["upstream"].get("file")
    return Path(listed).name if listed else None


def match_files(version: Version, files: list[str]) -> dict[Path, WeightsFile]:
    """Each given file's weights entry: named (``member-2=FILE``), by upstream file name, or the only entry.

    Naming the entry serves upstream files whose names the spec does not know (or that were renamed on download).
    """
    convertible = {w.name: w for w in version.weights if "upstream" in w.entry}
    if not convertible:
        raise BrainzooError(f"{version.id}: has no weights converted from upstream checkpoints")
    by_name = {upstream_name(w): w for w in convertible.values() if upstream_name(w)}
    matched: dict[Path, WeightsFile] = {}
    for given in files:
        entry, sep, named_path = str(given).partition("=")
        path = Path(named_path if sep and entry in convertible else given).absolute()
        if sep and entry in convertible:
            matched[path] = convertible[entry]
        elif path.name in by_name:
            matched[path] = by_name[path.name]
        elif len(convertible) == 1 and len(files) == 1:
            [matched[path]] = convertible.values()
        else:
            expected = ", ".join(sorted(by_name)) or "none recorded"
            raise BrainzooError(f"{path}: matches no weights entry of {version.id} by name (upstream names: "
                                f"{expected}); name its entry as ENTRY=FILE, entries: {', '.join(convertible)}")
    taken: dict[str, Path] = {}
    for path, weights in matched.items():
        if weights.name in taken:
            raise BrainzooError(f"{path} and {taken[weights.name]}: both are the upstream file of {weights.name!r}")
        taken[weights.name] = path
    return matched


def identify(path: Path, weights: WeightsFile, allow_unverified: bool) -> UpstreamFile:
    """Check a downloaded file against the identity the spec records for its upstream file.

    A mismatch, or a file whose bytes the spec does not know, is an error unless ``allow_unverified``.
    """
    if not path.is_file():
        raise BrainzooError(f"{path}: no such file")
    upstream = weights.entry["upstream"]
    size, sha256, blob = path.stat().st_size, sha256_of(path), git_blob_id(path)
    checks = [(name, wanted, actual) for name, wanted, actual in
              (("size", upstream.get("size"), size), ("sha256", upstream.get("sha256"), sha256),
               ("git blob", upstream.get("git_blob"), blob)) if wanted is not None]
    wrong = [f"{name} {actual} (the upstream file's is {wanted})"
             for name, wanted, actual in checks if wanted != actual]
    where = f"the upstream file of {weights.version_id} {weights.name!r} ({upstream['url']})"
    if wrong and not allow_unverified:
        raise BrainzooError(f"{path}: is not {where}: {'; '.join(wrong)}. Download it again, or pass "
                            "--allow-unverified to convert it anyway (the spec and record will say so)")
    if not checks and not allow_unverified:
        raise BrainzooError(f"{path}: the spec records no size or checksum of {where}, so the file cannot be "
                            "checked; pass --allow-unverified to convert it anyway (the spec and record will say so)")
    verified = None if wrong or not checks else " and ".join(name for name, _, _ in checks if name != "size") or "size"
    return UpstreamFile(path, weights, size, sha256, blob, verified)


def recipe_architecture(weights: WeightsFile) -> str:
    """The ``--arch`` of a weights entry's conversion recipe."""
    argv = weights.entry["recipe"]["argv"]
    if "--arch" not in argv[:-1]:
        raise BrainzooError(f"{weights.version_id}: weights {weights.name!r}: the recipe names no --arch")
    return argv[argv.index("--arch") + 1]


def already_converted(source: UpstreamFile) -> bool:
    """The entry holds this very file's conversion, present and intact."""
    entry = source.weights.entry
    return (entry.get("conversion", {}).get("source", {}).get("sha256") == source.sha256 and source.weights.present
            and sha256_of(source.weights.path) == entry.get("sha256"))


def convert_into(source: UpstreamFile, version: Version, scratch: Path, built: dict) -> tuple[Path, dict]:
    """Convert one upstream file into ``scratch``; the model file and its conversion record (as the spec keeps it).

    ``built`` keeps the Keras model built for each architecture, refilled for every member of an ensemble.
    """
    from brainzoo import convert
    from brainzoo.convert import state_dict

    arch = recipe_architecture(source.weights)
    options = builder_options(version.spec)
    target = scratch / source.weights.name / source.weights.path.name
    target.parent.mkdir(parents=True)
    if arch not in built:
        built[arch] = state_dict.build(arch, options)
    record = convert.convert(arch, source.path, target, options, into=built[arch])
    expected_parameters = version.spec.get("architecture", {}).get("parameters")
    if expected_parameters is not None and record["keras_model"]["parameters"] != expected_parameters:
        raise BrainzooError(f"{source.path}: converts to {record['keras_model']['parameters']:,} parameters; "
                            f"{version.id} has {expected_parameters:,}")
    record["source"].update(file=source.path.name, git_blob=source.git_blob,
                            verified_by=source.verified or "not verified: converted with --allow-unverified")
    return target, record


def get_upstream(root: Path, ref: str, files: list[str | os.PathLike],
                 allow_unverified: bool = False) -> Iterator[dict]:
    """Convert the given upstream checkpoints of a version into its annexed weights; one record per file.

    ``files``: paths, each optionally prefixed by the weights entry it belongs to (``member-2=path``).
    """
    version = catalogue.find_version(ref, root)
    matched = match_files(version, [str(f) for f in files])
    sources = [identify(path, weights, allow_unverified) for path, weights in matched.items()]
    todo = []
    for source in sources:
        if already_converted(source):
            yield record(root, source, "notneeded", "already converted from this file")
        else:
            todo.append(source)
    if todo:
        if not is_set_up(root):
            yield from zoo.bootstrap(root)
        with tempfile.TemporaryDirectory(prefix=".brainzoo-convert-", dir=version.path) as scratch:
            built: dict = {}
            converted = [(source, *convert_into(source, version, Path(scratch), built)) for source in todo]
            install(root, version, converted)
        for source, _, conversion in converted:
            check = conversion["self_check"]
            checked = (f"self-check against PyTorch: max abs difference {check['max_abs_difference']:.3g}"
                       if check["status"] == "passed" else f"self-check skipped: {check['reason']}")
            note = "" if source.verified else "; NOT verified as the upstream file (--allow-unverified)"
            yield record(root, source, "ok", f"converted from {source.path} ({checked}){note}")
    for weights in version.weights:
        if "upstream" in weights.entry and weights not in matched.values() and not weights.published:
            yield {"action": "get", "path": rel(root, weights.path), "status": "impossible",
                   "message": f"still to convert: pass its upstream file ({upstream_name(weights) or 'checkpoint'}, "
                              f"from {weights.entry['upstream']['url']}) with --upstream"}


CONVERTED_HEADER = ("# Weights converted here from the upstream checkpoints (brainzoo get --upstream); "
                    "see weights[].conversion.\n")


def install(root: Path, version: Version, converted: list[tuple[UpstreamFile, Path, dict]]) -> None:
    """Move the converted files into place, annex them, record them in the spec and save it all with DataLad.

    The new spec is made and checked against the schema before anything in the version folder changes.
    """
    spec_file = version.path / catalogue.SPEC_FILE
    spec = catalogue.read_yaml(spec_file)
    entries = {entry["name"]: entry for entry in spec["weights"]}
    for source, model_file, conversion in converted:
        entries[source.weights.name].update(size=model_file.stat().st_size, sha256=sha256_of(model_file),
                                            conversion=conversion)
    problems = [f"weights {s.weights.name!r}: {problem}" for s, _, _ in converted
                for problem in definition_problems("weights_entry", entries[s.weights.name])]
    if problems:
        raise BrainzooError(f"{spec_file}: the converted weights cannot be recorded: {'; '.join(problems)}")
    for source, model_file, _ in converted:
        destination = source.weights.path
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.is_symlink() or destination.exists():
            destination.unlink()
        shutil.move(model_file, destination)
    annex.run(["git", "annex", "add", "--quiet", *(str(s.weights.path) for s, _, _ in converted)], root)
    catalogue.write_yaml(spec_file, spec, header=CONVERTED_HEADER)
    names = ", ".join(s.weights.name for s, _, _ in converted)
    message = f"brainzoo get --upstream: {version.id} {names} converted from the upstream checkpoint(s)"
    paths = [str(spec_file), *(str(s.weights.path) for s, _, _ in converted)]
    failed = [r for r in datalad_results("save", {"dataset": str(root), "message": message, "path": paths})
              if r["status"] in ("error", "impossible")]
    if failed:
        raise BrainzooError(f"{version.id}: converted, but datalad save failed: {failed[0]['message']}")


def rel(root: Path, path: Path) -> str:
    return os.path.relpath(path, root)


def record(root: Path, source: UpstreamFile, status: str, message: str) -> dict:
    return {"action": "get", "path": rel(root, source.weights.path), "status": status, "message": message,
            "upstream_file": str(source.path), "upstream_verified": source.verified is not None}
