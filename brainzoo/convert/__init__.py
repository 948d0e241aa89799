"""Every converter of published weights into a Keras model, in one registry, with one record.

``brainzoo convert --arch`` offers exactly :data:`CONVERTERS`; a spec's recipe must name one of them whose Keras
builder is the spec's architecture (``brainzoo validate``), and ``brainzoo get --upstream`` runs it. Two kinds:

- ``checkpoint``: a PyTorch checkpoint file the user downloaded (brain age, AgeMapper, ml_MRI); tensors placed by
  name (:mod:`brainzoo.convert.state_dict`, tables in :mod:`brainzoo.convert.names`);
- ``deepbet``: a TorchScript network inside the installed deepbet package, its graph checked before any tensor is
  copied (:mod:`brainzoo.convert.deepbet`).

Every conversion writes the Keras model and a record of one schema (``conversion_record`` in the spec schema; the
spec of a version converted by ``get --upstream`` embeds it): what was read, what was written, the software and the
self-check against the original network. Either both files are written or neither. This module imports neither
TensorFlow nor torch (the CLI builds its choices from it); a conversion imports what it needs.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import brainzoo
from brainzoo.convert.names import ARCHITECTURES
from brainzoo.errors import BrainzooError
from brainzoo.fileio import atomic_output, check_writable, sha256_of

READS_CHECKPOINT, READS_DEEPBET = "checkpoint", "deepbet"


@dataclass(frozen=True)
class Converter:
    """A name ``--arch`` accepts: what it reads and the Keras builder (``brainzoo.models.BUILDERS`` key) it fills."""

    name: str
    reads: str
    builder: str

    @property
    def takes_checkpoint(self) -> bool:
        return self.reads == READS_CHECKPOINT


CONVERTERS = {
    **{name: Converter(name, READS_CHECKPOINT, arch.builder) for name, arch in ARCHITECTURES.items()},
    **{f"deepbet-{network}": Converter(f"deepbet-{network}", READS_DEEPBET, f"deepbet_{network}")
       for network in ("bbox", "segmentation")},
}


def converter(name: str) -> Converter:
    if name not in CONVERTERS:
        raise BrainzooError(f"{name}: no such converter (known: {', '.join(CONVERTERS)})")
    return CONVERTERS[name]


def record_path(dst: str | os.PathLike) -> Path:
    """Where the record goes unless named: beside the model, with a .json suffix."""
    return Path(dst).with_suffix(".json")


def convert(name: str, src: str | os.PathLike | None, dst: str | os.PathLike, options: Mapping | None = None,
            force: bool = False, record_file: str | os.PathLike | None = None, into=None) -> dict:
    """Convert with the converter ``name`` into the Keras HDF5 model ``dst``; return the record (also written).

    ``src``: the checkpoint file (``checkpoint`` converters; None for deepbet's packaged networks). ``options``:
    builder options (checkpoint converters). ``into``: a Keras model built earlier for the same converter and
    options, refilled instead of built (members of an ensemble). A failing self-check is an error; nothing is
    written then.
    """
    conv = converter(name)
    if conv.takes_checkpoint != (src is not None):
        raise BrainzooError(f"--arch {name} takes {'SRC DST' if conv.takes_checkpoint else 'DST only'}")
    dst = Path(dst)
    record_file = Path(record_file) if record_file is not None else record_path(dst)
    if record_file == dst:
        raise BrainzooError(f"{dst}: the converted model and its record need different names (e.g. .h5 and .json)")
    check_writable(dst, force)
    check_writable(record_file, force)
    if conv.takes_checkpoint:
        from brainzoo.convert import state_dict

        options = state_dict.resolved_options(name, options)
        model, source, check = state_dict.convert_checkpoint(name, src, options, into=into)
    else:
        if options:
            raise BrainzooError(f"--arch {name} takes no options (deepbet's networks have one published size)")
        from brainzoo.convert import deepbet

        options = {}
        model, source, check = deepbet.convert_network(name.removeprefix("deepbet-"))
    if check["status"] == "failed":
        raise BrainzooError(f"{src or source['file']}: the converted {name} model disagrees with the original by "
                            f"{check['max_abs_difference']:.3g} (tolerance {check['tolerance']:.3g}); nothing written")
    import numpy as np
    import tensorflow as tf

    record = {
        "converter": name,
        "options": options,
        "source": source,
        "keras_model": {
            "file": dst.name,
            "input_shapes": {n: list(t.shape[1:]) for n, t in zip(model.input_names, model.inputs)},
            "output_shapes": {n: list(t.shape[1:]) for n, t in zip(model.output_names, model.outputs)},
            "parameters": int(sum(np.prod(w.shape) for w in model.trainable_weights)),  # as PyTorch counts them
        },
        "versions": {"brainzoo": brainzoo.__version__, "tensorflow": tf.__version__, "torch": check.get("torch"),
                     "numpy": np.__version__},
        "self_check": check,
    }
    with atomic_output(dst, force) as model_tmp, atomic_output(record_file, force) as record_tmp:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*HDF5 file.*legacy", category=UserWarning)
            model.save(model_tmp, save_format="h5", include_optimizer=False)
        record["keras_model"]["sha256"] = sha256_of(model_tmp)
        record_tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return json.loads(json.dumps(record, default=str))


def record_problems(record: Mapping) -> list[str]:
    """What the ``conversion_record`` schema finds wrong with a record."""
    from brainzoo.validate import definition_problems

    return definition_problems("conversion_record", record)
