"""Catalogue validation: JSON Schemas plus the rules a schema cannot express.

Every problem is reported as ``<file>: <field>: <what is wrong>`` so the user knows where to look.
"""

from __future__ import annotations

import json
import os
import re
import string
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterator

import jsonschema

from brainzoo import annex, catalogue
from brainzoo.errors import BrainzooError
from brainzoo.outputs import OutputDecoding, builder_options
from brainzoo.spec import Inference, Training


@lru_cache(maxsize=None)
def schema(name: str) -> jsonschema.protocols.Validator:
    text = resources.files("brainzoo").joinpath("schemas", f"{name}.schema.json").read_text()
    return jsonschema.Draft202012Validator(json.loads(text))


def definition_problems(definition: str, data) -> list[str]:
    """What the spec schema's ``$defs`` entry ``definition`` finds wrong with ``data`` (a weights entry, a record)."""
    spec_schema = schema("spec").schema
    validator = jsonschema.Draft202012Validator({"$defs": spec_schema["$defs"], "$ref": f"#/$defs/{definition}"})
    return [f"{_field(err.absolute_path)}: {err.message}" for err in validator.iter_errors(data)]


def _field(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(top level)"


def schema_problems(name: str, data: dict, file: Path) -> Iterator[str]:
    for err in sorted(schema(name).iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        yield f"{file}: {_field(err.absolute_path)}: {_schema_message(err)}"


def _schema_message(err: jsonschema.ValidationError) -> str:
    """Say which alternative was meant when a weights entry matches neither form."""
    if err.validator == "oneOf" and isinstance(err.instance, dict) and "path" in err.instance:
        return ("a weights entry needs sha256 + size + sources (published), upstream + recipe (to be produced "
                "by conversion), or upstream + recipe + sha256 + size + conversion (converted here)")
    return err.message


def inside(folder: Path, relative: str) -> bool:
    """Whether a spec path stays inside its version folder (no absolute paths, no escaping ``..``)."""
    if Path(relative).is_absolute():
        return False
    # Lexical on purpose: an annexed file is a symlink into .git/annex, which is fine.
    return not os.path.normpath(relative).startswith("..")


def _paths_in(data, trail=()) -> Iterator[tuple[tuple, str]]:
    """Every string under a key called ``path`` or ``file`` anywhere in a spec."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key in ("path", "file") and isinstance(value, str):
                yield trail + (key,), value
            else:
                yield from _paths_in(value, trail + (key,))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _paths_in(value, trail + (i,))


def entry_point_problems(entry_point: dict, where: str) -> Iterator[str]:
    """Each ``{placeholder}`` of an argv template names a declared option whose default has its type."""
    options = entry_point.get("options", {})
    for i, word in enumerate(entry_point.get("argv", [])):
        for _, name, _, _ in string.Formatter().parse(word):
            if name and name not in options:
                yield f"{where}.argv[{i}]: placeholder {{{name}}} is not declared in options"
    types = {"int": int, "float": (int, float), "bool": bool, "str": str, "path": str}
    for name, option in options.items():
        if "default" in option and not isinstance(option["default"], types.get(option.get("type"), object)):
            yield f"{where}.options.{name}.default: {option['default']!r} is not of type {option.get('type')}"


def version_problems(version_folder: Path, root: Path) -> Iterator[str]:
    """Everything wrong with one version folder."""
    spec_file, card_file = version_folder / catalogue.SPEC_FILE, version_folder / catalogue.CARD_FILE
    rel = version_folder.relative_to(root)
    try:
        spec = catalogue.read_yaml(spec_file)
        card = catalogue.read_yaml(card_file)
    except BrainzooError as err:
        yield str(err)
        return
    spec_rel, card_rel = spec_file.relative_to(root), card_file.relative_to(root)
    inference, training, problems = parsed_spec(spec, spec_rel, version_folder)
    yield from problems
    if not problems:  # the explain section's layer is looked up in the architecture the schema vouches for
        from brainzoo.explain import explain_problems

        architecture = [f"{spec_rel}: {p}" for p in architecture_problems(spec)]
        yield from architecture
        if not architecture:
            yield from (f"{spec_rel}: {p}" for p in explain_problems(spec))
    yield from schema_problems("card", card, card_rel)

    parts = rel.parts  # neuronets/<model>/<semver>[/<variant>]
    if len(parts) not in (3, 4) or not re.fullmatch(r"\d+\.\d+\.\d+", parts[2]):
        yield f"{spec_rel}: (folder): version folders are neuronets/<model>/<semver>[/<variant>], got {rel}"
        return
    expected = {"id": rel.as_posix(), "model": parts[1], "version": parts[2]}
    if len(parts) == 4:
        expected["variant"] = parts[3]
    for key, value in expected.items():
        if spec.get(key) != value:
            yield f"{spec_rel}: {key}: {spec.get(key)!r} does not match the folder (expected {value!r})"
    card_version = card.get("Model_details", {}).get("Model_version") if isinstance(card.get("Model_details"), dict) else None
    if card_version != parts[2]:
        yield f"{card_rel}: Model_details.Model_version: {card_version!r} does not match the folder semver {parts[2]!r}"

    for i, entry in enumerate(spec["weights"] if isinstance(spec.get("weights"), list) else []):
        if isinstance(entry, dict):
            yield from (f"{spec_rel}: {p}" for p in weights_problems(entry, f"weights[{i}]", version_folder))
    if isinstance(spec.get("conversion"), dict) and isinstance(spec.get("weights"), list):
        yield from (f"{spec_rel}: {p}" for p in conversion_record_problems(spec, version_folder))
    if not problems:
        from brainzoo.training.engine import monitor_problems

        yield from (f"{spec_rel}: {p}" for p in training_stage_problems(spec, version_folder))
        yield from (f"{spec_rel}: {p}" for p in training_data_problems(inference, training))
        yield from (f"{spec_rel}: {p}" for p in monitor_problems(spec.get("training") or {}))


def training_data_problems(inference: Inference, training: Training | None) -> Iterator[str]:
    """The records' last step is an inference step, and each normalisation step is an intensity step the training
    pipeline runs, with that step's options (the names are the pipeline's, so neither the schema nor
    :class:`brainzoo.spec.TrainingData` lists them). Takes the sections :func:`parsed_spec` parsed."""
    from brainzoo.training.pipeline import normalization_steps

    data = training.data if training else None
    if data is None:
        return
    names = [step.name for step in inference.preprocessing]
    if data.preprocessed_until is not None and data.preprocessed_until not in names:
        yield (f"training.data.preprocessed_until: {data.preprocessed_until!r} is not an inference.preprocessing "
               f"step ({', '.join(names)})")
    fields = {"normalization": data.normalization}
    if data.validation_normalization != data.normalization:
        fields["validation_normalization"] = data.validation_normalization
    for field, normalization in fields.items():
        try:
            normalization_steps(normalization, f"training.data.{field}")
        except BrainzooError as err:
            yield str(err)


def training_stage_problems(spec: dict, version_folder: Path) -> Iterator[str]:
    """Each stage of ``training.stages`` has a unique name, starts from scratch or an earlier stage, and its
    metrics file is committed in the version folder."""
    seen = set()
    for i, stage in enumerate(spec.get("training", {}).get("stages") or []):
        where = f"training.stages[{i}]"
        if stage["name"] in seen:
            yield f"{where}.name: {stage['name']!r} names an earlier stage too"
        if stage["init"] != "scratch" and stage["init"] not in seen:
            yield f"{where}.init: {stage['init']!r} is neither scratch nor an earlier stage"
        seen.add(stage["name"])
        metrics = stage["metrics"]
        if not inside(version_folder, metrics) or not (version_folder / metrics).is_file():
            yield f"{where}.metrics: {metrics} is not a file in the version folder"


def conversion_record_problems(spec: dict, version_folder: Path) -> Iterator[str]:
    """Each record of the spec's ``conversion`` has the record schema and names a weights file by its checksum."""
    checksums = {Path(entry["path"]).name: entry.get("sha256") for entry in spec["weights"]
                 if isinstance(entry, dict) and isinstance(entry.get("path"), str)}
    for i, relative in enumerate(spec["conversion"].get("records") or []):
        where = f"conversion.records[{i}]"
        if not inside(version_folder, relative) or not (version_folder / relative).is_file():
            yield f"{where}: {relative} is not a file in the version folder"
            continue
        try:
            record = json.loads((version_folder / relative).read_text())
        except json.JSONDecodeError as err:
            yield f"{where}: {relative} is not JSON ({err})"
            continue
        problems = definition_problems("conversion_record", record)
        yield from (f"{where}: {relative}: {problem}" for problem in problems)
        if problems:
            continue
        model = record["keras_model"]
        if model["file"] not in checksums:
            yield f"{where}: {relative} records {model['file']}, which no weights entry holds"
        elif checksums[model["file"]] != model["sha256"]:
            yield (f"{where}: {relative} records sha256 {model['sha256']} for {model['file']}; the weights entry says "
                   f"{checksums[model['file']]}")


def spec_problems(spec: dict, spec_rel: Path, version_folder: Path) -> Iterator[str]:
    """What makes a spec unusable (checked whenever a version is loaded); see :func:`parsed_spec`."""
    yield from parsed_spec(spec, spec_rel, version_folder)[2]


def parsed_spec(spec: dict, spec_rel: Path,
                version_folder: Path) -> tuple[Inference | None, Training | None, list[str]]:
    """The spec's inference and training sections parsed (:mod:`brainzoo.spec`), and what makes the spec
    unusable: its schema, paths that leave the version folder, entry points, the two sections' values, the method
    and the output. ``brainzoo validate`` and :func:`brainzoo.catalogue.load_version` both check a spec here."""
    problems = list(schema_problems("spec", spec, spec_rel))
    if problems:
        return None, None, problems  # the checks below read fields the schema vouches for
    for trail, value in _paths_in(spec):
        if not inside(version_folder, value):
            problems.append(f"{spec_rel}: {_field(trail)}: path {value!r} escapes the version folder")
    entry_point = spec["inference"]["entry_point"]
    problems += [f"{spec_rel}: {p}" for p in entry_point_problems(entry_point, "inference.entry_point")]
    problems += [f"{spec_rel}: {p}" for p in method_problems(spec)]
    try:
        inference = Inference.from_spec(spec["inference"])
    except BrainzooError as err:
        inference = None
        problems.append(f"{spec_rel}: {err}")
    else:
        problems += [f"{spec_rel}: {p}" for p in output_problems(spec, inference.output)]
    try:
        training = Training.from_spec(spec.get("training"))
    except BrainzooError as err:
        training = None
        problems.append(f"{spec_rel}: {err}")
    for i, entry in enumerate(spec["weights"]):
        if "recipe" in entry:
            problems += [f"{spec_rel}: {p}" for p in entry_point_problems(entry["recipe"], f"weights[{i}].recipe")]
            problems += [f"{spec_rel}: {p}" for p in recipe_problems(entry["recipe"], spec, f"weights[{i}].recipe")]
    return (None, None, problems) if problems else (inference, training, problems)


def output_problems(spec: dict, decoding: OutputDecoding) -> Iterator[str]:
    """What the output fixes is said nowhere else: the age bins size the builder's head (``n_bins``) and lie under
    the loss's soft labels. A conversion record's output size (``weights[].conversion``) is the bins' count."""
    try:
        builder_options(spec)
        for i, entry in enumerate(spec["weights"]):
            for shape in entry.get("conversion", {}).get("keras_model", {}).get("output_shapes", {}).values():
                decoding.check_output_size(shape[-1], f"weights[{i}] ({entry['path']}), its conversion record")
    except BrainzooError as err:
        yield str(err)
    if "bins" in ((spec.get("training") or {}).get("loss") or {}):
        yield "training.loss.bins: the soft labels lie on inference.output.bins; remove these"


def architecture_problems(spec: dict) -> Iterator[str]:
    """Every ``architecture.options`` key is an option of the builder: a misspelt depth or width would otherwise
    surface as a TypeError when the network is first built for training or explaining."""
    from brainzoo.models import BUILDERS, option_names

    builder = spec["architecture"]["builder"]
    if builder not in BUILDERS:
        return  # deepbet's networks: converted from the package, never built from a spec
    known = option_names(builder)
    unknown = sorted(set(spec["architecture"].get("options") or {}) - known)
    if unknown:
        yield (f"architecture.options: {builder} takes no option {', '.join(unknown)} "
               f"(it takes {', '.join(sorted(known))})")


def recipe_problems(recipe: dict, spec: dict, where: str) -> Iterator[str]:
    """A recipe converts with a registered checkpoint converter that fills the spec's architecture."""
    from brainzoo.convert import CONVERTERS

    argv = recipe["argv"]
    arch = argv[argv.index("--arch") + 1] if "--arch" in argv[:-1] else None
    if argv[:2] != ["brainzoo", "convert"] or arch is None:
        yield f"{where}.argv: a recipe is `brainzoo convert --arch NAME ...`, got {' '.join(argv)!r}"
    elif arch not in CONVERTERS or not CONVERTERS[arch].takes_checkpoint:
        known = ", ".join(name for name, c in CONVERTERS.items() if c.takes_checkpoint)
        yield f"{where}.argv: --arch {arch}: no checkpoint converter of that name (known: {known})"
    elif CONVERTERS[arch].builder != spec["architecture"]["builder"]:
        yield (f"{where}.argv: --arch {arch} fills a {CONVERTERS[arch].builder} network, but the spec's architecture "
               f"is {spec['architecture']['builder']}")


def method_problems(spec: dict) -> Iterator[str]:
    """The method names a runner, one that serves the spec's task."""
    from brainzoo.predict.runners import RUNNERS

    method = spec["inference"]["method"]
    if method not in RUNNERS:
        yield f"inference.method: {method!r} is no runner's (known: {', '.join(RUNNERS)})"
    elif spec["task"] not in RUNNERS[method].tasks:
        yield (f"inference.method: {method} runs {', '.join(RUNNERS[method].tasks)} models, not a {spec['task']} "
               "model")


def weights_problems(entry: dict, where: str, version_folder: Path) -> Iterator[str]:
    """A published weights entry must be an annexed file whose key matches its sha256 and size."""
    if not all(k in entry for k in ("sha256", "size", "path")) or not inside(version_folder, entry["path"]):
        return
    path = version_folder / entry["path"]
    key = annex.annex_key_of(path)
    if key is None:
        yield f"{where}.path: {entry['path']} is not an annexed file (missing, or committed to git directly)"
        return
    want = annex.expected_key(entry["sha256"], entry["size"], path)
    if key != want:
        yield f"{where}.sha256: annexed key {key} does not match the spec's sha256/size ({want})"


def index_problems(root: Path) -> Iterator[str]:
    """The top-level index lists exactly the version folders on disk, with matching ids and tasks."""
    index_file = root / catalogue.INDEX_FILE
    try:
        index = catalogue.read_yaml(index_file)
    except BrainzooError as err:
        yield str(err)
        return
    yield from schema_problems("index", index, Path(catalogue.INDEX_FILE))
    listed = {}
    for i, item in enumerate(index.get("catalogue") or []):
        if not isinstance(item, dict) or "path" not in item:
            continue
        listed[item["path"]] = item
        folder = root / item["path"]
        if item.get("id") != item["path"]:
            yield f"{catalogue.INDEX_FILE}: catalogue[{i}].id: {item.get('id')!r} differs from its path {item['path']!r}"
        if not (folder / catalogue.SPEC_FILE).is_file():
            yield f"{catalogue.INDEX_FILE}: catalogue[{i}].path: {item['path']} has no {catalogue.SPEC_FILE}"
            continue
        try:
            task = catalogue.read_yaml(folder / catalogue.SPEC_FILE).get("task")
        except BrainzooError:
            continue  # reported with the version
        if item.get("task") != task:
            yield f"{catalogue.INDEX_FILE}: catalogue[{i}].task: {item.get('task')!r} but the spec says {task!r}"
    for folder in catalogue.version_folders(root):
        rel = folder.relative_to(root).as_posix()
        if rel not in listed:
            yield f"{catalogue.INDEX_FILE}: catalogue: version {rel} is not listed"
    yield from recommended_problems(list(listed.values()))


def recommended_problems(entries: list[dict]) -> Iterator[str]:
    """Each model has exactly one recommended version, marked on every variant of it."""
    models: dict[str, list[tuple[str, str, bool]]] = {}
    for item in entries:
        parsed = catalogue.model_and_version(str(item["path"]))
        if parsed is not None:
            models.setdefault(parsed[0], []).append((item["path"], parsed[1], item.get("recommended") is True))
    for model, items in sorted(models.items()):
        versions = sorted({version for _, version, marked in items if marked})
        where = f"{catalogue.INDEX_FILE}: catalogue: model {model}"
        if not versions:
            yield f"{where}: no version is marked recommended: true (mark the one to use)"
        elif len(versions) > 1:
            yield f"{where}: {len(versions)} versions are marked recommended ({', '.join(versions)}); mark one"
        else:
            unmarked = [path for path, version, marked in items if version == versions[0] and not marked]
            if unmarked:
                yield (f"{where}: version {versions[0]} is recommended, but not on {', '.join(unmarked)} (mark every "
                       "variant of it)")


def validate(root: Path) -> Iterator[dict]:
    """One record per version folder plus one for the index; status ``error`` lists the problems."""
    checks = [(catalogue.INDEX_FILE, index_problems(root))]
    checks += [(f.relative_to(root).as_posix(), version_problems(f, root)) for f in catalogue.version_folders(root)]
    for path, problems in checks:
        problems = list(problems)
        yield {"action": "validate", "path": path, "status": "error" if problems else "ok",
               "message": "\n".join(problems)}
