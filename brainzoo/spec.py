"""A spec's ``inference`` and ``training`` sections as typed values: the model's input, its preprocessing steps,
its output decoding, and the training data.

:func:`brainzoo.catalogue.load_version` parses a version's sections once (``Version.inference``,
``Version.training``), with the checks ``brainzoo validate`` runs, so every reader (the runners, ``preprocess``,
``explain``, ``evaluate``, ``train``, ``transfer``) takes these values instead of indexing the YAML. Each error
names the key that is wrong; the catalogue adds the spec file.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

from brainzoo.errors import BrainzooError
from brainzoo.outputs import OutputDecoding

if TYPE_CHECKING:
    from brainzoo.predict.deepbet import DeepbetSettings

BLOCK_PLACEMENTS = ("tiled", "below-head-top")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _mapping(value, where: str, what: str) -> dict:
    if not isinstance(value, dict):
        raise BrainzooError(f"{where}: {what}, not {value!r}")
    return value


def three_sizes(value, where: str) -> tuple[int, int, int]:
    """A grid's shape: three positive whole numbers."""
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_is_whole(n) and n > 0 for n in value):
        raise BrainzooError(f"{where}: must be three positive integers, not {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class Covariate:
    """A network input after the volume: its name and the number the network takes for each value a user gives."""

    name: str
    coding: dict[str, float]

    @classmethod
    def from_spec(cls, entry, where: str) -> Covariate:
        entry = _mapping(entry, where, "a covariate is a mapping {name, coding}")
        coding = entry.get("coding")
        if (set(entry) != {"name", "coding"} or not isinstance(entry["name"], str) or not isinstance(coding, dict)
                or len(coding) < 2 or not all(_is_number(v) for v in coding.values())):
            raise BrainzooError(f"{where}: needs a name and a coding of at least two values to numbers, not {entry!r}")
        return cls(entry["name"], {str(value): float(number) for value, number in coding.items()})


@dataclass(frozen=True)
class ModelInput:
    """A spec's ``inference.input``: what the network takes, and the grid the preprocessing puts a scan on.

    ``contrast``: the contrasts it was trained on (a catalogue spec names them; a spec written for training alone
    may leave them out). ``block_shape``: the network runs in blocks of this shape (whole if None), tiling the grid or, with
    ``block_placement`` ``below-head-top``, in one block centred ``block_centre_below_head_top_mm`` under the top of
    the head. ``covariates``: the network's inputs after the volume, in order.
    """

    orientation: str
    spacing_mm: tuple[float, float, float]
    shape: tuple[int, int, int]
    contrast: tuple[str, ...] = ()
    block_shape: tuple[int, int, int] | None = None
    block_placement: str = "tiled"
    block_centre_below_head_top_mm: float | None = None
    channels: int = 1
    template: str | None = None
    covariates: tuple[Covariate, ...] = ()

    @classmethod
    def from_spec(cls, values, where: str = "inference.input") -> ModelInput:
        values = _mapping(values, where, "the model's input is a mapping")
        known = [f.name for f in fields(cls)]
        unknown = sorted(map(str, set(values) - set(known)))
        missing = [name for name in ("orientation", "spacing_mm", "shape") if name not in values]
        if unknown or missing:
            problem = f"unknown key(s) {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}"
            raise BrainzooError(f"{where}: {problem} (it takes {', '.join(known)})")
        contrast = values.get("contrast", [])
        if not isinstance(contrast, list) or not all(isinstance(c, str) for c in contrast):
            raise BrainzooError(f"{where}.contrast: must be a list of contrast names, not {contrast!r}")
        orientation = values["orientation"]
        if not isinstance(orientation, str) or len(orientation) != 3:
            raise BrainzooError(f"{where}.orientation: must be three axis codes (RAS), not {orientation!r}")
        spacing = values["spacing_mm"]
        if not isinstance(spacing, (list, tuple)) or len(spacing) != 3 or not all(
                _is_number(s) and s > 0 for s in spacing):
            raise BrainzooError(f"{where}.spacing_mm: must be three positive numbers, not {spacing!r}")
        block_shape = values.get("block_shape")
        placement = values.get("block_placement", "tiled")
        below_mm = values.get("block_centre_below_head_top_mm")
        if placement not in BLOCK_PLACEMENTS:
            raise BrainzooError(f"{where}.block_placement: {placement!r} is neither tiled nor below-head-top")
        if placement == "below-head-top" and block_shape is None:
            raise BrainzooError(f"{where}.block_shape: this model runs in one block placed on the brain, but its spec "
                                "gives no block_shape")
        if (placement == "below-head-top") != (below_mm is not None):
            raise BrainzooError(f"{where}: block_placement below-head-top and block_centre_below_head_top_mm go "
                                "together")
        if below_mm is not None and not (_is_number(below_mm) and below_mm > 0):
            raise BrainzooError(f"{where}.block_centre_below_head_top_mm: must be a positive number, not {below_mm!r}")
        channels = values.get("channels", 1)
        if not _is_whole(channels) or channels < 1:
            raise BrainzooError(f"{where}.channels: must be a positive integer, not {channels!r}")
        covariates = values.get("covariates", [])
        if not isinstance(covariates, list):
            raise BrainzooError(f"{where}.covariates: must be a list, not {covariates!r}")
        return cls(orientation, tuple(spacing), three_sizes(values["shape"], f"{where}.shape"), tuple(contrast),
                   None if block_shape is None else three_sizes(block_shape, f"{where}.block_shape"), placement,
                   below_mm, channels, values.get("template"),
                   tuple(Covariate.from_spec(c, f"{where}.covariates[{i}]") for i, c in enumerate(covariates)))


@dataclass(frozen=True)
class Step:
    """One preprocessing step: its name (``crop``) and its options (``{"shape": [160, 192, 160]}``)."""

    name: str
    options: dict = field(default_factory=dict)

    @classmethod
    def from_spec(cls, entry, where: str) -> Step:
        """The step of a spec entry ``{step: NAME, ...options}``."""
        entry = _mapping(entry, where, "a step is a mapping {step: NAME, ...options}")
        if not isinstance(entry.get("step"), str):
            raise BrainzooError(f"{where}.step: a step is named by a string, not {entry.get('step')!r}")
        return cls(entry["step"], {key: value for key, value in entry.items() if key != "step"})

    def as_spec(self) -> dict:
        """The spec entry again, as records list the steps run."""
        return {"step": self.name, **self.options}


def preprocessing_steps(entries, where: str = "inference.preprocessing") -> tuple[Step, ...]:
    """The steps of a spec's preprocessing list, each one brainzoo.predict runs, with exactly its options."""
    from brainzoo.predict import check_preprocessing

    if not isinstance(entries, list):
        raise BrainzooError(f"{where}: must be a list of steps, not {entries!r}")
    steps = tuple(Step.from_spec(entry, f"{where}[{i}]") for i, entry in enumerate(entries))
    try:
        check_preprocessing(steps)
    except BrainzooError as err:
        raise BrainzooError(f"{where}: {err}") from None
    return steps


@dataclass(frozen=True)
class Inference:
    """A spec's ``inference`` section: the model's input, its preprocessing steps in order, how its outputs are
    decoded and, for a catalogue version, how its networks run (``method``, a key of
    :data:`brainzoo.predict.runners.RUNNERS`; deepbet's numbers) and the ``entry_point`` command template.

    The prediction functions of :mod:`brainzoo.predict` need only the first three, so a caller may build a value
    from those alone.
    """

    input: ModelInput
    preprocessing: tuple[Step, ...]
    output: OutputDecoding
    method: str | None = None
    entry_point: dict | None = None
    deepbet: DeepbetSettings | None = None

    @classmethod
    def from_spec(cls, section, where: str = "inference") -> Inference:
        from brainzoo.predict.deepbet import DeepbetSettings

        section = _mapping(section, where, "must be a mapping")
        missing = [key for key in ("input", "preprocessing", "output") if key not in section]
        if missing:
            raise BrainzooError(f"{where}: missing {', '.join(missing)}")
        method = section.get("method")
        if method == "deepbet":
            deepbet = DeepbetSettings.from_spec(section.get("deepbet"), f"{where}.deepbet")
        elif "deepbet" in section:
            raise BrainzooError(f"{where}.deepbet: only a spec whose inference.method is deepbet takes these numbers")
        else:
            deepbet = None
        output = _mapping(section["output"], f"{where}.output", "must be a mapping")
        return cls(ModelInput.from_spec(section["input"], f"{where}.input"),
                   preprocessing_steps(section["preprocessing"], f"{where}.preprocessing"),
                   OutputDecoding.from_spec(output), method, section.get("entry_point"), deepbet)

    def has_step(self, name: str) -> bool:
        return any(step.name == name for step in self.preprocessing)

    @property
    def series_volume(self) -> int | None:
        """The volume of a 4D series the model takes (its ``volume`` step's index), or None: the first, as loading
        always keeps it (with a warning for a series)."""
        return next((step.options["index"] for step in self.preprocessing if step.name == "volume"), None)


# training.loss.name of a generator trained against a discriminator; its volumes are min-max scaled unless the
# spec says otherwise, every other pipeline's z-scored.
ADVERSARIAL_LOSS = "adversarial-bce"


@dataclass(frozen=True)
class TrainingData:
    """A spec's ``training.data``: what the records hold (``kind``), the network's grid (``input_shape``, or
    ``block_shape`` for blocks cut from segmentation volumes), the last inference step a record holds
    (``preprocessed_until``) and how :mod:`brainzoo.training.pipeline` reads them. ``normalization`` (and
    ``validation_normalization``, the same unless the spec says otherwise) is in the pipeline's vocabulary (a step
    name, steps with options, or None), which the pipeline checks."""

    kind: str
    input_shape: tuple[int, int, int] | None = None
    block_shape: tuple[int, int, int] | None = None
    preprocessed_until: str | None = None
    normalization: str | list | None = "zscore"
    validation_normalization: str | list | None = None
    augmentation: dict | list | None = None
    sampling: str = "random"
    jitter: float = 0.0
    blocks_per_volume: int = 8
    overlap: int = 0
    targets: tuple[str, ...] = ("age",)
    random_crop: bool = False
    random_crop_within: tuple[int, int, int] | None = None
    shuffle_buffer: int = 0
    pairs: int | None = None
    validation_fraction: float = 0.2

    @classmethod
    def from_spec(cls, values, where: str = "training.data", normalization: str = "zscore") -> TrainingData:
        """The data section of a spec; ``normalization`` is the one a section that names none gets."""
        values = _mapping(values, where, "must be a mapping")
        known = [f.name for f in fields(cls)]
        unknown = sorted(map(str, set(values) - set(known)))
        if unknown:
            raise BrainzooError(f"{where}: unknown key(s) {', '.join(unknown)} (it takes {', '.join(known)})")
        if not isinstance(values.get("kind"), str):
            raise BrainzooError(f"{where}.kind: must name what the records hold, not {values.get('kind')!r}")
        grids = {name: three_sizes(values[name], f"{where}.{name}")
                 for name in ("input_shape", "block_shape", "random_crop_within") if values.get(name) is not None}
        parsed = {**values, **grids, "normalization": values.get("normalization", normalization)}
        parsed.setdefault("validation_normalization", parsed["normalization"])
        if "targets" in values:
            parsed["targets"] = tuple(values["targets"])
        return cls(**parsed)

    @property
    def network_input_shape(self) -> tuple[int, int, int, int]:
        """The network's input: a block, or the whole input grid, of one channel."""
        shape = self.block_shape or self.input_shape
        if not shape:
            raise BrainzooError("training.data: needs block_shape (segmentation) or input_shape (regression)")
        return (*shape, 1)


@dataclass(frozen=True)
class Training:
    """The parts of a spec's ``training`` section its readers share: the data (None for a section that only
    records its stages), the loss and a GAN's discriminator options. The loop's numbers (epochs, batch size,
    optimiser...) are :class:`brainzoo.training.engine.TrainingPlan`'s, which the command line can override."""

    data: TrainingData | None
    loss: dict = field(default_factory=dict)
    discriminator: dict = field(default_factory=dict)

    @property
    def adversarial(self) -> bool:
        return self.loss.get("name") == ADVERSARIAL_LOSS

    @classmethod
    def from_spec(cls, section) -> Training | None:
        """A spec's training section (None: the spec has none)."""
        if section is None:
            return None
        section = _mapping(section, "training", "must be a mapping")
        loss = _mapping(section.get("loss", {}), "training.loss", "must be a mapping")
        discriminator = _mapping(section.get("discriminator", {}), "training.discriminator", "must be a mapping")
        training = cls(None, loss, discriminator)
        if "data" not in section:
            return training
        normalization = "minmax" if training.adversarial else "zscore"
        return replace(training, data=TrainingData.from_spec(section["data"], normalization=normalization))
