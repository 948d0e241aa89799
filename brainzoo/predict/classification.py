"""From a classifier's logits to class probabilities and a label, and the covariates it takes beside the scan.

The spec says it all: ``inference.output.classes`` lists the classes in the network's output order (a label and,
for an age group, its age range in years), and ``inference.input.covariates`` the network's inputs after the
volume, each with the number the network takes for each value a user may give (``sex: {M: 0, F: 1}``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from brainzoo.errors import BrainzooError

if TYPE_CHECKING:
    from brainzoo.spec import ModelInput

# age-group-logits: one logit per class; binary-logit: one logit, of the second of two classes against the first.
CLASS_OUTPUTS = {"age-group-logits", "binary-logit"}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits, computed stably (the largest logit subtracted first)."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum()


def decode_class_logits(output: np.ndarray, classes: Sequence[dict]) -> dict:
    """Each class's probability (by label) and the most probable class, from one sample's logits.

    A single logit for two classes is the second's against the first (a sigmoid), that is the logits (0, logit).
    """
    logits = np.asarray(output, dtype=np.float64).reshape(-1)
    per_class = np.array([0.0, logits[0]]) if logits.size == 1 and len(classes) == 2 else logits
    if per_class.size != len(classes):
        raise BrainzooError(f"the model returned {logits.size} values but output.classes lists {len(classes)} classes")
    if not np.all(np.isfinite(logits)):
        raise BrainzooError("the model returned logits that are not finite numbers")
    probabilities = softmax(per_class)
    return {"logits": logits.tolist(),
            "probabilities": {c["label"]: float(p) for c, p in zip(classes, probabilities)}}


def class_result(probabilities: list[dict[str, float]], classes: Sequence[dict]) -> dict:
    """The models' mean probability per class, the most probable class with its age range, and how many models."""
    mean = {c["label"]: float(np.mean([p[c["label"]] for p in probabilities])) for c in classes}
    best = max(classes, key=lambda c: mean[c["label"]])
    age_range = {key: best[key] for key in ("min_age", "max_age") if key in best}
    return {"label": best["label"], "class_index": classes.index(best), "probability": mean[best["label"]],
            "probabilities": mean, **({"age_range": age_range} if age_range else {}), "n_models": len(probabilities)}


def covariate_values(model_input: ModelInput, given: dict[str, str | None], model_id: str) -> list[float]:
    """The numbers the network takes after the volume, from the values given by name (``{"sex": "F"}``).

    Every covariate the spec declares must be given as one of its coded values; one it does not declare must not.
    """
    declared = {c.name: c.coding for c in model_input.covariates}
    for name, value in given.items():
        if value is not None and name not in declared:
            raise BrainzooError(f"{model_id}: takes no {name} input (it takes the scan"
                                f"{''.join(', ' + n for n in declared)}); leave --{name} out")
    values = []
    for name, coding in declared.items():
        value = given.get(name)
        allowed = " or ".join(coding)
        if value is None or str(value).strip() == "":
            raise BrainzooError(f"{model_id}: takes the {name} as an input beside the scan: pass --{name} "
                                f"{allowed} (a study table: a '{name}' column)")
        if str(value) not in coding:
            raise BrainzooError(f"{model_id}: {name} {value!r} is not one of {allowed}")
        values.append(float(coding[str(value)]))
    return values
