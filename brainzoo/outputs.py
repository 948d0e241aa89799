"""What a network's outputs mean: a spec's ``inference.output``, parsed once into :class:`OutputDecoding`.

A soft-classification brain-age model's age bins are one fact, ``inference.output.bins``: the network's output
size (the builder's ``n_bins``, :func:`builder_options`), the decoding of its predictions and the soft-label
targets it trains on all read them from here, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brainzoo.errors import BrainzooError

BINNED_OUTPUT = "age-log-probabilities"
BIN_KEYS = ("start", "stop", "step")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


@dataclass(frozen=True)
class AgeBins:
    """Age bins [start, start + step), ..., [stop - step, stop) in years."""

    start: float
    stop: float
    step: float

    @classmethod
    def from_spec(cls, bins, where: str = "inference.output.bins") -> AgeBins:
        """The bins of a spec's ``{start, stop, step}``; an error naming the value that is wrong or missing."""
        if not isinstance(bins, dict) or set(bins) != set(BIN_KEYS):
            raise BrainzooError(f"{where}: needs exactly {', '.join(BIN_KEYS)}; got {bins!r}")
        if not all(_is_number(bins[key]) for key in BIN_KEYS):
            raise BrainzooError(f"{where}: start, stop and step must be numbers; got {bins!r}")
        start, stop, step = (float(bins[key]) for key in BIN_KEYS)
        count = round((stop - start) / step) if step > 0 else 0
        if count < 1 or not np.isclose(start + count * step, stop):
            raise BrainzooError(f"{where}: {bins}: (stop - start) must be a positive whole number of steps")
        return cls(start, stop, step)

    @property
    def count(self) -> int:
        return round((self.stop - self.start) / self.step)

    @property
    def centres(self) -> np.ndarray:
        """start + step/2, ..., stop - step/2: the age each bin stands for."""
        return self.start + self.step * (np.arange(self.count) + 0.5)


@dataclass(frozen=True)
class OutputDecoding:
    """A spec's ``inference.output`` as its readers need it: the output type, the age bins of an
    ``age-log-probabilities`` output, the classes (in output order: a label and, for an age group, its
    ``min_age`` and ``max_age``) of a classifier or label map, a mask's threshold, a brain-age model's
    ``bias_correction`` line and the upstream container's result files it can write (``container_files``)."""

    type: str
    bins: AgeBins | None = None
    classes: tuple[dict, ...] = ()
    threshold: float = 0.5
    bias_correction: dict | None = None
    container_files: str | None = None

    @classmethod
    def from_spec(cls, output: dict) -> OutputDecoding:
        kind = output["type"]
        if (kind == BINNED_OUTPUT) != ("bins" in output):
            raise BrainzooError(f"inference.output.bins: an {BINNED_OUTPUT} output has its age bins, and only it"
                                f" (this output is {kind!r})")
        bins = AgeBins.from_spec(output["bins"]) if kind == BINNED_OUTPUT else None
        return cls(kind, bins, tuple(output.get("classes", [])), output.get("threshold", 0.5),
                   output.get("bias_correction"), output.get("container_files"))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(c["label"] for c in self.classes)

    def builder_options(self) -> dict:
        """The builder options this output fixes: a binned output's size."""
        return {"n_bins": self.bins.count} if self.bins else {}

    def check_output_size(self, size: int, source: str) -> None:
        """Refuse a network (``source``: its file) whose head does not have one value per age bin, such as an SFCN
        converted at the builder's default size: its output would be decoded on the wrong ages."""
        if self.bins and size != self.bins.count:
            raise BrainzooError(f"{source}: the network gives {size} values, but inference.output.bins has "
                                f"{self.bins.count}; it was made for other bins (a conversion sizes the head with "
                                f"--option n_bins={self.bins.count})")


def builder_options(spec: dict) -> dict:
    """The keyword arguments of ``spec``'s architecture builder: its ``architecture.options`` and what its output
    fixes (an SFCN's ``n_bins`` is the count of ``inference.output.bins``)."""
    options = spec["architecture"].get("options") or {}
    output = spec.get("inference", {}).get("output")
    fixed = OutputDecoding.from_spec(output).builder_options() if output else {}
    repeated = sorted(options.keys() & fixed.keys())
    if repeated:
        raise BrainzooError(f"architecture.options: {', '.join(repeated)} follow(s) from inference.output; "
                            "remove it from the options")
    return {**options, **fixed}
