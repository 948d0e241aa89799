"""The catalogue: version folders under ``neuronets/``, their ``spec.yaml`` and ``model_card.yaml``.

A version folder plus its spec and card is the zoo's "weights value" (see docs/style.md): the CLI,
the predictor and the trainer read preprocessing, output decoding and metrics from here instead of
hard-coding per-model branches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from brainzoo.errors import BrainzooError

if TYPE_CHECKING:
    from brainzoo.spec import Inference, Training

CATALOGUE_DIR = "neuronets"
INDEX_FILE = "spec.yaml"
SPEC_FILE = "spec.yaml"
CARD_FILE = "model_card.yaml"
# The brain-extraction model that `predict brain-mask` and the brain-age pipeline use unless told otherwise.
DEFAULT_BRAIN_MASK_MODEL = "neuronets/deepbet/1.0.2"
INDEX_HEADER = "# The catalogue index: every model version folder under neuronets/ (validated by `brainzoo validate`).\n"


def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The dataset that holds the catalogue.

    ``BRAINZOO_ROOT`` wins; otherwise the nearest folder above ``start`` (default: the current folder)
    with both ``spec.yaml`` and ``neuronets/``; otherwise the checkout this package was installed from.
    """
    if os.environ.get("BRAINZOO_ROOT"):
        return Path(os.environ["BRAINZOO_ROOT"]).resolve()
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / INDEX_FILE).is_file() and (folder / CATALOGUE_DIR).is_dir():
            return folder
    source_checkout = Path(__file__).resolve().parent.parent
    if (source_checkout / CATALOGUE_DIR).is_dir():
        return source_checkout
    raise BrainzooError(f"{here}: not inside a brainzoo dataset (no {INDEX_FILE} with a {CATALOGUE_DIR}/ folder above it)")


def read_yaml(path: Path) -> dict:
    """Parse one YAML mapping, naming the file in every failure."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BrainzooError(f"{path}: file is missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BrainzooError(f"{path}: cannot be read as UTF-8 text ({err})") from None
    except yaml.YAMLError as err:
        raise BrainzooError(f"{path}: malformed YAML: {err}") from None
    if not isinstance(data, dict):
        raise BrainzooError(f"{path}: expected a YAML mapping at the top level, found {type(data).__name__}")
    return data


@dataclass(frozen=True)
class WeightsFile:
    """One entry of a spec's ``weights`` list, with its path made absolute."""

    version_id: str
    entry: dict
    path: Path

    @property
    def name(self) -> str:
        return self.entry["name"]

    @property
    def sha256(self) -> str | None:
        return self.entry.get("sha256")

    @property
    def size(self) -> int | None:
        return self.entry.get("size")

    @property
    def sources(self) -> list[dict]:
        return self.entry.get("sources", [])

    @property
    def published(self) -> bool:
        """Listed with a checksum (annexed), as opposed to still to be produced by a recipe."""
        return self.sha256 is not None

    @property
    def conversion_hint(self) -> str:
        """How a user makes weights that come by conversion from an upstream checkpoint."""
        upstream = self.entry["upstream"]
        name = Path(upstream["file"]).name if upstream.get("file") else None
        where = upstream.get("obtain") or f"download {name or 'the checkpoint'} from {upstream['url']}"
        # A file the spec cannot name goes to its entry by ENTRY=FILE; one whose bytes it does not know, unverified.
        argument = name or f"{self.name}=CHECKPOINT"
        unverified = "" if {"sha256", "git_blob"} & set(upstream) else " --allow-unverified"
        return f"{where}, then run: brainzoo get {self.version_id}{unverified} --upstream {argument}"

    @property
    def present(self) -> bool:
        """The content is in this clone (an annexed symlink resolves to an existing object)."""
        return self.path.exists()


@dataclass(frozen=True)
class Version:
    """One model version folder: ``neuronets/<model>/<semver>[/<variant>]``: its spec (as written, for the
    commands that print or derive specs), the spec's inference and training sections parsed, and its card."""

    id: str
    path: Path
    spec: dict
    card: dict
    inference: Inference
    training: Training | None

    @property
    def task(self) -> str:
        return self.spec["task"]

    @property
    def weights(self) -> list[WeightsFile]:
        return [WeightsFile(self.id, entry, self.path / entry["path"]) for entry in self.spec.get("weights", [])]

    def weights_file(self, name: str | None = None) -> WeightsFile:
        """The weights entry called ``name``; without a name, the only one."""
        files = self.weights
        if name is None:
            if len(files) != 1:
                names = ", ".join(f.name for f in files) or "none"
                raise BrainzooError(f"{self.id}: has {len(files)} weights files ({names}); name one")
            return files[0]
        for f in files:
            if f.name == name:
                return f
        raise BrainzooError(f"{self.id}: no weights entry named {name!r} (have: {', '.join(f.name for f in files)})")


def version_folders(root: Path) -> list[Path]:
    """Every folder under ``neuronets/`` that holds a ``spec.yaml``, sorted."""
    return sorted(p.parent for p in (root / CATALOGUE_DIR).rglob(SPEC_FILE))


def load_version(folder: Path, root: Path | None = None) -> Version:
    """A version folder whose spec is usable: a spec ``brainzoo validate`` would refuse is an error naming it."""
    from brainzoo.validate import parsed_spec

    root = root or repo_root(folder)
    folder = folder.resolve()
    try:
        version_id = folder.relative_to(root).as_posix()
    except ValueError:
        raise BrainzooError(f"{folder}: is not inside the dataset {root}") from None
    spec = read_yaml(folder / SPEC_FILE)
    card = read_yaml(folder / CARD_FILE)
    inference, training, problems = parsed_spec(spec, folder.relative_to(root) / SPEC_FILE, folder)
    if problems:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise BrainzooError(f"{version_id}: unusable spec ({shown}); `brainzoo validate` lists every problem")
    return Version(id=version_id, path=folder, spec=spec, card=card, inference=inference, training=training)


def load_catalogue(root: Path | None = None) -> tuple[list[Version], dict[str, str]]:
    """Every usable version, and why each other version folder is not (one broken spec spoils nothing else)."""
    root = root or repo_root()
    usable, broken = [], {}
    for folder in version_folders(root):
        try:
            usable.append(load_version(folder, root))
        except BrainzooError as err:
            broken[folder.relative_to(root).as_posix()] = str(err)
    return usable, broken


def versions(root: Path | None = None) -> list[Version]:
    """The usable versions (see :func:`load_catalogue` for the others)."""
    return load_catalogue(root)[0]


def model_and_version(version_id: str) -> tuple[str, str] | None:
    """The model name and semver of ``neuronets/<model>/<semver>[/<variant>]``; None for any other path."""
    parts = version_id.strip("/").split("/")
    return (parts[1], parts[2]) if len(parts) in (3, 4) and parts[0] == CATALOGUE_DIR else None


def recommended_ids(root: Path) -> set[str]:
    """The index entries marked ``recommended`` (none if the index cannot be read; `brainzoo validate` says why)."""
    try:
        entries = read_yaml(root / INDEX_FILE).get("catalogue") or []
    except BrainzooError:
        return set()
    return {e["id"] for e in entries if isinstance(e, dict) and e.get("recommended") is True and "id" in e}


def find_version(ref: str, root: Path | None = None) -> Version:
    """Look a version up by id (``neuronets/deepbet/1.0.2``; the ``neuronets/`` may be left out) or folder path;
    a bare model name (``brainzoo-unet``) means the version the index recommends."""
    root = root or repo_root()
    version_id = ref.strip("/")
    if not version_id.startswith(CATALOGUE_DIR + "/"):
        version_id = f"{CATALOGUE_DIR}/{version_id}"
    if (root / version_id / SPEC_FILE).is_file():
        return load_version(root / version_id, root)
    if version_id.count("/") == 1 and (root / version_id).is_dir():
        recommended = sorted(i for i in recommended_ids(root) if i.startswith(version_id + "/"))
        if len(recommended) == 1:
            return load_version(root / recommended[0], root)
        if recommended:
            raise BrainzooError(f"{version_id}: its recommended version has variants; name one: "
                                f"{', '.join(recommended)}")
        raise BrainzooError(f"{version_id}: the index marks no recommended version; name one (`brainzoo list`)")
    candidate = Path(ref)
    if candidate.is_dir() and (candidate / SPEC_FILE).is_file():
        return load_version(candidate.resolve(), root)
    known = ", ".join(p.relative_to(root).as_posix() for p in version_folders(root)) or "none"
    raise BrainzooError(f"{version_id}: no such model version in {root} (known: {known})")


def add_to_index(root: Path, version_id: str, task: str) -> None:
    """List a version in the top-level index (replacing an earlier entry), keeping the index sorted; the first
    version of a model is marked recommended."""
    index_file = root / INDEX_FILE
    index = read_yaml(index_file)
    entries = [e for e in index.get("catalogue") or [] if e["path"] != version_id]
    entry = {"id": version_id, "path": version_id, "task": task}
    model = model_and_version(version_id)
    if not any((model_and_version(e["path"]) or (None,))[0] == model[0] for e in entries):
        entry["recommended"] = True  # a model's first version is its recommended one until another is marked
    entries.append(entry)
    index["catalogue"] = sorted(entries, key=lambda e: e["path"])
    write_yaml(index_file, index, header=INDEX_HEADER)


def write_yaml(path: Path, data: dict, header: str = "") -> None:
    """Replace a catalogue YAML file atomically, in the layout its files are kept in (keys in order, 110 columns)."""
    from brainzoo.fileio import atomic_output

    with atomic_output(path, force=True) as tmp:
        tmp.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110))


def resolve_weights(ref: str | os.PathLike, name: str | None = None) -> Path:
    """A weights file to load: an existing file path as it is, or the weights of a catalogue version.

    A version whose weights are not in this clone is an error that says how to get them.
    """
    if Path(ref).is_file():
        return Path(ref)
    weights = find_version(str(ref)).weights_file(name)
    if not weights.published:
        raise BrainzooError(f"{weights.version_id}: weights {weights.name!r} are made by conversion: "
                            f"{weights.conversion_hint}")
    if not weights.present:
        raise BrainzooError(f"{weights.path}: weights are not in this clone; run: brainzoo get {weights.version_id}")
    return weights.path
