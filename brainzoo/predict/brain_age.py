"""From model outputs to a brain age: decoding, ensemble averaging, and the brain-age gap with bias correction.

Bias correction. Brain-age models regress towards the training mean (young people are predicted older, old
people younger), so the raw gap (predicted - chronological age) correlates with age. The spec's
``output.bias_correction`` gives a linear fit made on held-out healthy people; ``method`` says which fit:

- ``de-lange-cole-2020``: predicted = slope * age + intercept (de Lange & Cole 2020, "Commentary: Correction
  procedures in brain-age prediction", NeuroImage: Clinical 26:102229).
- ``beheshti-2019``: (predicted - age) = slope * age + intercept (Beheshti et al. 2019, "Bias-adjustment in
  neuroimaging-based brain age frameworks: a robust scheme", NeuroImage: Clinical 24:102063).

Either way, the expected prediction for a healthy person of this age is subtracted from the prediction:
corrected gap = predicted - expected(age) and corrected brain age = age + corrected gap. For the same data the
two fits are the same line (the Beheshti slope is the de Lange slope minus 1), so they give the same result.
"""

from __future__ import annotations

import numpy as np

from brainzoo.errors import BrainzooError
from brainzoo.outputs import AgeBins, OutputDecoding

BIAS_CORRECTION_METHODS = {
    "de-lange-cole-2020": lambda age, slope, intercept: slope * age + intercept,
    "beheshti-2019": lambda age, slope, intercept: age + slope * age + intercept,
}


def decode_log_probabilities(output: np.ndarray, bins: AgeBins) -> dict:
    """Expected age and standard deviation of the age distribution a model gives as log-probabilities."""
    log_p = np.asarray(output, dtype=np.float64).reshape(-1)
    centres = bins.centres
    if log_p.size != centres.size:
        raise BrainzooError(f"the model returned {log_p.size} values but output.bins defines {centres.size} bins")
    p = np.exp(log_p)
    total = p.sum()
    if not np.isfinite(total) or abs(total - 1) > 1e-2:
        raise BrainzooError(f"the model's outputs are not log-probabilities (their exponentials sum to {total:.4g})")
    p /= total
    age = float(p @ centres)
    return {"age": age, "sd": float(np.sqrt(p @ (centres - age) ** 2))}


def decode_output(output: np.ndarray, decoding: OutputDecoding) -> dict:
    """The prediction of one model for one scan, decoded as the spec's inference.output says."""
    kind = decoding.type
    if decoding.bins:
        return decode_log_probabilities(output, decoding.bins)
    if kind == "age":
        values = np.asarray(output, dtype=np.float64).reshape(-1)
        if values.size != 1:
            raise BrainzooError(f"the model returned {values.size} values; output type 'age' needs one")
        return {"age": float(values[0])}
    raise BrainzooError(f"output type {kind!r} is not a brain-age output")


def ensemble(ages: list[float]) -> dict:
    """Mean brain age of an ensemble, and the spread between its members (sample SD; 0 for one model)."""
    values = np.asarray(ages, dtype=np.float64)
    return {"brain_age": float(values.mean()), "ensemble_sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "n_models": int(values.size)}


def brain_age_gap(brain_age: float, age: float, bias_correction: dict | None = None) -> dict:
    """The gap (brain age - chronological age) and, with the spec's ``bias_correction``, its corrected form."""
    gap = {"age": float(age), "delta": float(brain_age - age)}
    if bias_correction is None:
        return gap
    method = bias_correction["method"]
    if method not in BIAS_CORRECTION_METHODS:
        raise BrainzooError(f"output.bias_correction.method {method!r} is unknown; "
                            f"known: {', '.join(BIAS_CORRECTION_METHODS)}")
    expected = BIAS_CORRECTION_METHODS[method](age, bias_correction["slope"], bias_correction["intercept"])
    corrected_delta = float(brain_age - expected)
    return gap | {"corrected_delta": corrected_delta, "corrected_brain_age": float(age + corrected_delta),
                  "bias_correction": {key: bias_correction[key] for key in ("method", "slope", "intercept", "citation")
                                      if key in bias_correction}}
