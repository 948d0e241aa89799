"""`brainzoo evaluate brain-mask` and `brain-age`: the numbers on a card, measured by one command.

Brain extraction. Each scan of a table is masked by the model and compared with a reference mask: a file named in
the table (anatomical labels or a template's mask, voxels > 0, brought onto the scan's grid) or the output of another
catalogue model (deepbet's, say, for a model distilled from it). Per scan: Dice, the 95th-percentile symmetric
Hausdorff distance in mm, both volumes, and the wall time of the model on that scan. The summary holds the
median, mean, min and max of each, and the protocol of the timing: hardware, threads, and what was timed.
With ``update_card`` the summary's figures replace the same metrics on the version's card, each with the exact
command and data that produced it.

Brain age. Each scan of a table with chronological ages is run through the whole brain-age prediction (the spec's
preprocessing, every network of the ensemble). Per scan: brain age, ensemble spread, the SD of the predicted age
distribution (SFCN), the error (brain age - age, the brain-age gap) and, when the spec carries coefficients, its
bias-corrected form. The summary holds MAE, RMSE, Pearson r, the mean error and the age bias: the least-squares line
(brain age - age) = slope * age + intercept (Beheshti et al. 2019), fitted on this table's own scans.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from brainzoo import catalogue
from brainzoo.errors import BrainzooError
from brainzoo.fileio import all_or_nothing, atomic_output, check_output, output_folder, sha256_of, write_csv
from brainzoo.predict.runners import BrainMasker, load_networks, model_provenance, predict_brain_age_file, study_scans
from brainzoo.metrics import age_bias, dice, hausdorff95, mean_absolute_error, pearson_r, root_mean_squared_error
from brainzoo.predict.volumes import load_mask, load_volume

BRAIN_MASK_TIMED = ("the model's whole brain extraction of one scan in a warm process: read the file, conform, run the "
         "networks, post-process and resample back to the native grid (not writing outputs); the model was loaded "
         "and run once on the first scan beforehand, untimed, so graph building is excluded")
BRAIN_AGE_TIMED = ("the model's whole brain-age prediction of one scan in a warm process: read the file, run the "
                   "spec's preprocessing (with its brain extraction, when it has that step), every network of the "
                   "ensemble and the decoding; the networks were loaded and run once on the first scan beforehand, "
                   "untimed, so graph building is excluded")


def summary(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "mean": float(np.mean(values)),
            "min": float(np.min(values)), "max": float(np.max(values))}


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())


def protocol(runtime: str, timed: str) -> dict:
    """What the timings were taken on; ``runtime`` is the one that ran the model (``Networks.runtime``), ``timed``
    says what one scan's time covers."""
    machine = {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "runtime": runtime,
               "python": platform.python_version(), "timed": timed}
    if not runtime.startswith("tensorflow"):  # ONNX Runtime's CPU execution provider
        return machine | {"gpus": 0, "intra_op_threads": os.environ.get("OMP_NUM_THREADS")
                          or "ONNX Runtime's default (one per physical core)"}
    import tensorflow as tf

    return machine | {"gpus": len(tf.config.list_physical_devices("GPU")),
                      "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()
                      or f"TensorFlow's default (all {os.cpu_count()})",
                      "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "TensorFlow's default")}


def reference_reader(reference_model: str | None, reference_column: str) -> tuple[str, Callable[[dict, object], np.ndarray]]:
    """A label for the reference, and a function giving the reference mask of a table row on its scan's grid."""
    if reference_model:
        masker = BrainMasker.load(reference_model)
        return masker.version.id, lambda row, scan: np.asarray(masker.run(scan)[0].dataobj) > 0

    def from_file(row: dict, scan) -> np.ndarray:
        if not row.get(reference_column):
            raise BrainzooError(f"{row['path']}: no reference mask in column {reference_column!r}")
        return load_mask(row[reference_column], scan)
    return "reference masks", from_file


def table_rows(data: Path, columns: str) -> list[dict]:
    """The rows of an evaluation table; not a BIDS folder, which has no column for what a model is measured against."""
    if data.is_dir():
        raise BrainzooError(f"{data}: evaluation needs a CSV/TSV table with 'path' and {columns} columns")
    return study_scans(data)


def read_table(data: Path, reference_column: str, need_column: bool) -> list[dict]:
    rows = table_rows(data, "reference")
    if need_column and reference_column not in rows[0]:
        raise BrainzooError(f"{data}: no column {reference_column!r} of reference masks (use --reference-column "
                            "or --reference-model)")
    for row in rows:
        if row.get(reference_column):
            row[reference_column] = str(data.parent / row[reference_column])
    return rows


def warm_up(run_scan: Callable[[dict], object], rows: list[dict]) -> float:
    """Load the networks and build their graphs on the first scan that runs: not part of a scan's time."""
    started = time.perf_counter()
    for row in rows:
        try:
            run_scan(row)
        except BrainzooError:
            continue  # its row records the error
        break
    return time.perf_counter() - started


def check_card_request(update_card: bool, split: str | None) -> None:
    if update_card and not split:
        raise BrainzooError("--update-card needs --split: say how these scans relate to the model's training data")


def open_outputs(out_dir: Path, data: Path, force: bool) -> tuple[Path, Path]:
    """``scans.csv`` and ``summary.json`` in ``out_dir``, refused before any work if they exist (without force), cannot
    be written or would replace the table ``data``."""
    table, summary_file = out_dir / "scans.csv", out_dir / "summary.json"
    with output_folder(out_dir):
        check_output(table, (".csv",), inputs=[data], force=force)
        check_output(summary_file, (".json",), inputs=[data], force=force)
    return table, summary_file


def write_outputs(table: Path, results: list[dict], columns: list[str], summary_file: Path, record: dict,
                  force: bool) -> None:
    """The per-scan table and the summary, both or neither."""
    with all_or_nothing([table, summary_file]):
        write_csv(table, results, columns, force)
        with atomic_output(summary_file, force=force) as tmp:
            tmp.write_text(json.dumps(record, indent=2))


def report_progress(progress: bool, index: int, total: int, scan_id: str, text: str) -> None:
    if progress:
        print(f"[{index}/{total}] {scan_id}: {text}", file=sys.stderr, flush=True)


def table_provenance(data: Path, dataset: str | None, split: str | None) -> dict:
    return {"table": str(data), "sha256": sha256_of(data), "dataset": dataset or str(data), "split": split}


def put_on_card(version: catalogue.Version, record: dict, summary_file: Path, entries: list[dict]) -> None:
    """The summary's figures onto the card, only if every scan of the table was measured."""
    if record["failed"]:
        raise BrainzooError(f"{summary_file}: written, but not put on the card: {len(record['failed'])} scan(s) failed "
                            f"({', '.join(record['failed'])}); a card's figures cover every scan of its table")
    write_card_metrics(version, entries)


def evaluate_brain_masks(model: str, data: Path, out_dir: Path, *, reference_model: str | None = None,
                         reference_column: str = "mask", dataset: str | None = None, split: str | None = None,
                         update_card: bool = False, command: list[str] | None = None, force: bool = False,
                         progress: bool = True, runtime: str = "auto") -> Iterator[dict]:
    """Write ``out_dir/scans.csv`` (one row per scan; a failing scan's row records its error) and
    ``out_dir/summary.json``; yield a record per scan, then the summary's."""
    check_card_request(update_card, split)
    rows = read_table(data, reference_column, need_column=reference_model is None)
    table, summary_file = open_outputs(out_dir, data, force)
    masker = BrainMasker.load(model, runtime=runtime)
    reference_label, reference_of = reference_reader(reference_model, reference_column)

    warm_up_s = warm_up(lambda row: masker.run(load_volume(row["path"])), rows)

    results = []
    for index, row in enumerate(rows, 1):
        result = {"id": row["id"], "path": row["path"], "reference": row.get(reference_column) or reference_label}
        try:
            scan = load_volume(row["path"])
            reference = reference_of(row, scan)
            started = time.perf_counter()
            mask = np.asarray(masker.run(Path(row["path"]))[0].dataobj) > 0
            seconds = time.perf_counter() - started
            voxel_ml = float(np.prod(scan.header.get_zooms()[:3])) / 1000
            result.update(dice=round(dice(mask, reference), 5),
                          hd95_mm=round(hausdorff95(mask, reference, scan.header.get_zooms()[:3]), 3),
                          predicted_ml=round(mask.sum() * voxel_ml, 2), reference_ml=round(reference.sum() * voxel_ml, 2),
                          seconds=round(seconds, 3), error="")
        except BrainzooError as err:
            result["error"] = str(err)
        results.append(result)
        report_progress(progress, index, len(rows), row["id"], result["error"] or
                        f"Dice {result['dice']:.4f}, HD95 {result['hd95_mm']:.2f} mm, {result['seconds']:.1f} s")
        yield {"action": "evaluate", "path": row["path"], "status": "error" if result["error"] else "ok",
               "message": result["error"] or f"Dice {result['dice']}, HD95 {result['hd95_mm']} mm", **result}

    done = [r for r in results if not r["error"]]
    if not done:
        raise BrainzooError(f"{data}: every scan failed; nothing to summarise")
    command = command or ["brainzoo", "evaluate", "brain-mask", "--model", model, "--data", str(data),
                          "--out", str(out_dir)]
    record = {"model": masker.provenance(), "reference": reference_label,
              "data": table_provenance(data, dataset, split),
              "n": len(done), "failed": [r["id"] for r in results if r["error"]],
              "summary": {key: summary([r[key] for r in done]) for key in ("dice", "hd95_mm", "seconds")},
              "model_load_and_first_scan_s": round(warm_up_s, 3),
              "protocol": protocol(masker.networks().runtime, BRAIN_MASK_TIMED),
              "command": shlex.join(command)}
    write_outputs(table, results, ["id", "path", "reference", "dice", "hd95_mm", "predicted_ml", "reference_ml",
                                   "seconds", "error"], summary_file, record, force)
    if update_card:
        put_on_card(masker.version, record, summary_file, card_metrics(record))
    dice_summary = record["summary"]["dice"]
    yield {"action": "evaluate", "path": str(summary_file), "status": "ok",
           "message": f"{record['n']} scan(s) against {reference_label}: Dice median {dice_summary['median']:.4f}, "
                      f"min {dice_summary['min']:.4f}" + (f"; {len(record['failed'])} failed" if record["failed"] else "")
                      + ("; card updated" if update_card else ""),
           "summary": record["summary"]}


def measured_by(record: dict) -> dict:
    """What every card entry from a summary carries: the data, how many scans, and the command that measured it."""
    return {"dataset": record["data"]["dataset"], "split": record["data"]["split"], "n": record["n"],
            "source": "measured", "command": record["command"]}


def card_metrics(record: dict) -> list[dict]:
    """The card entries a summary gives: Dice (median, mean, min), HD95 (median, max), seconds per scan (median)."""
    common = measured_by(record)
    against = f"vs {record['reference']}"
    chosen = [("Dice", "dice", "", ("median", "mean", "min")), ("Hausdorff-95", "hd95_mm", "mm", ("median", "max")),
              ("wall time per scan", "seconds", "s", ("median",))]
    entries = []
    for name, key, unit, statistics in chosen:
        for statistic in statistics:
            entry = {"name": f"{name} {against}" if key != "seconds" else name,
                     "value": round(record["summary"][key][statistic], 4 if key == "dice" else 2),
                     **({"unit": unit} if unit else {}), "statistic": statistic, **common}
            if key == "seconds":
                protocol_ = record["protocol"]
                entry["note"] = (f"{protocol_['cpu']}, {protocol_['logical_cpus']} logical CPUs, "
                                 f"{protocol_['gpus']} GPU(s), {protocol_['runtime']} with "
                                 f"{protocol_['intra_op_threads']} threads; timed: {protocol_['timed']}")
            entries.append(entry)
    return entries


def write_card_metrics(version: catalogue.Version, entries: list[dict]) -> None:
    """Replace the card's metrics of the same name, statistic and dataset; keep every other metric."""
    card_file = version.path / catalogue.CARD_FILE
    card = catalogue.read_yaml(card_file)
    keys = {(e["name"], e["statistic"], e["dataset"]) for e in entries}
    kept = [m for m in card.get("Metrics", []) if (m.get("name"), m.get("statistic"), m.get("dataset")) not in keys]
    card["Metrics"] = kept + entries
    catalogue.write_yaml(card_file, card)


BIAS_LINE = ("(brain age - age) = slope * age + intercept, least squares (Beheshti et al. 2019, NeuroImage: Clinical "
             "24:102063)")


def chronological_age(row: dict) -> float:
    """The row's age in years; a missing, non-numeric, negative or infinite one makes the row an error row."""
    try:
        age = float(row.get("age") or "nan")
    except ValueError:
        age = math.nan
    if not (math.isfinite(age) and age >= 0):
        raise BrainzooError(f"{row['path']}: age {row.get('age')!r} is not a non-negative number of years")
    return age


def defined_or_none(compute: Callable[[], object], undefined: list[str]) -> object:
    """A figure that few or constant values leave undefined: None, and the reason added to ``undefined``."""
    try:
        return compute()
    except BrainzooError as err:
        undefined.append(str(err))
        return None


def measure_brain_age(row: dict, predict: Callable[[dict, float], dict], with_spec_correction: bool) -> dict:
    """One scans.csv row: the prediction against the row's age, or the reason there is none."""
    result = {"id": row["id"], "path": row["path"], "age": row.get("age"), "status": "ok", "error": ""}
    try:
        age = chronological_age(row)
        started = time.perf_counter()
        record = predict(row, age)
        seconds = time.perf_counter() - started
    except BrainzooError as err:
        return result | {"status": "error", "error": str(err)}
    # Rounded first, so that every figure of the summary follows from scans.csv as written.
    brain_age = round(record["result"]["brain_age"], 4)
    distribution_sds = [p["sd"] for p in record["predictions"] if "sd" in p]
    result.update(age=age, brain_age=brain_age, ensemble_sd=round(record["result"]["ensemble_sd"], 4),
                  distribution_sd=round(float(np.mean(distribution_sds)), 4) if distribution_sds else "",
                  delta=round(brain_age - age, 4), seconds=round(seconds, 3))
    if with_spec_correction:
        result["corrected_delta"] = round(record["result"]["corrected_delta"], 4)
    return result


def age_figures(done: list[dict]) -> tuple[dict, dict | None, list[str]]:
    """MAE, RMSE, Pearson r and mean error of the measured rows, and their age bias fitted in-sample (each row gets
    its ``in_sample_corrected_delta``); what few or constant values leave undefined is None, with the reason."""
    ages, brain_ages, deltas = ([r[key] for r in done] for key in ("age", "brain_age", "delta"))
    undefined = []
    metrics = {"mae_years": mean_absolute_error(brain_ages, ages),
               "rmse_years": root_mean_squared_error(brain_ages, ages),
               "pearson_r": defined_or_none(lambda: pearson_r(brain_ages, ages), undefined),
               "mean_error_years": float(np.mean(deltas))}
    fit = defined_or_none(lambda: age_bias(ages, brain_ages), undefined)
    if fit is None:
        return metrics, None, undefined
    slope, intercept = fit
    for r in done:  # the residuals of the fit on these very scans
        r["in_sample_corrected_delta"] = round(r["delta"] - (slope * r["age"] + intercept), 4)
    in_sample = np.array([r["in_sample_corrected_delta"] for r in done])
    bias = {"slope": slope, "intercept_years": intercept, "line": BIAS_LINE,
            "fitted_on": f"in-sample: these {len(done)} scans; the corrected deltas (scans.csv "
                         "in_sample_corrected_delta) are the fit's residuals on the same scans, so their mean is 0 by "
                         "construction: a description of this table, not a correction tested on unseen data",
            "corrected_delta": {"mean_absolute": float(np.mean(np.abs(in_sample))), "sd": float(np.std(in_sample))}}
    return metrics, bias, undefined


def evaluate_brain_ages(model: str, data: Path, out_dir: Path, *, dataset: str | None = None, split: str | None = None,
                        update_card: bool = False, command: list[str] | None = None, force: bool = False,
                        progress: bool = True) -> Iterator[dict]:
    """Write ``out_dir/scans.csv`` (one row per scan; a row without a usable age or whose scan fails records its
    error) and ``out_dir/summary.json``; yield a record per scan, then the summary's."""
    check_card_request(update_card, split)
    rows = table_rows(data, "'age'")
    if "age" not in rows[0]:
        raise BrainzooError(f"{data}: no 'age' column (chronological age in years)")
    table, summary_file = open_outputs(out_dir, data, force)
    version = catalogue.find_version(model)
    if version.task != "brain-age":
        raise BrainzooError(f"{version.id}: is a {version.task} model, not a brain-age model")
    networks = load_networks(version)
    masker = (BrainMasker.load(catalogue.DEFAULT_BRAIN_MASK_MODEL)
              if version.inference.has_step("brain-extraction") else None)
    spec_correction = version.inference.output.bias_correction

    def predict(row: dict, age: float | None = None) -> dict:
        return predict_brain_age_file(version.id, Path(row["path"]), age=age, masker=masker, networks=networks,
                                      contrast=row.get("contrast"))

    warm_up_s = warm_up(predict, rows)

    results = []
    for index, row in enumerate(rows, 1):
        result = measure_brain_age(row, predict, with_spec_correction=spec_correction is not None)
        results.append(result)
        report_progress(progress, index, len(rows), row["id"], result["error"] or
                        f"brain age {result['brain_age']:.2f}, age {result['age']:g}, {result['seconds']:.1f} s")
        yield {"action": "evaluate", "path": row["path"], "status": result["status"],
               "message": result["error"] or f"brain age {result['brain_age']}, delta {result['delta']:+}", **result}

    done = [r for r in results if r["status"] == "ok"]
    if not done:
        raise BrainzooError(f"{data}: every scan failed; nothing to summarise")
    metrics, bias, undefined = age_figures(done)
    command = command or ["brainzoo", "evaluate", "brain-age", "--model", model, "--data", str(data),
                          "--out", str(out_dir)]
    record = {"model": model_provenance(version, networks.runtime),
              "brain_extraction": masker.provenance() if masker else None,
              "data": table_provenance(data, dataset, split), "n": len(done),
              "failed": [r["id"] for r in results if r["status"] == "error"],
              "metrics": metrics, "age_bias": bias, "undefined": undefined,
              "spec_bias_correction": spec_correction,
              "per_scan_corrected_delta": ("scans.csv corrected_delta uses the spec's own output.bias_correction "
                                           "coefficients (fitted by their authors, not on this table)"
                                           if spec_correction else "none: the spec carries no output.bias_correction"),
              "summary": {key: summary([r[key] for r in done]) for key in ("age", "brain_age", "delta", "seconds")},
              "model_load_and_first_scan_s": round(warm_up_s, 3),
              "protocol": protocol(networks.runtime, BRAIN_AGE_TIMED),
              "command": shlex.join(command)}
    columns = ["id", "path", "age", "brain_age", "ensemble_sd", "distribution_sd", "delta",
               *(["corrected_delta"] if spec_correction else []), "in_sample_corrected_delta", "seconds", "status",
               "error"]
    write_outputs(table, results, columns, summary_file, record, force)
    if update_card:
        put_on_card(version, record, summary_file, brain_age_card_metrics(record))
    figures = [f"MAE {metrics['mae_years']:.2f} years", f"mean error {metrics['mean_error_years']:+.2f} years",
               *([f"r {metrics['pearson_r']:.3f}"] if metrics["pearson_r"] is not None else []),
               *([f"age-bias slope {bias['slope']:.3f}"] if bias else [])]
    yield {"action": "evaluate", "path": str(summary_file), "status": "ok",
           "message": f"{record['n']} scan(s): {', '.join(figures)}"
                      + (f"; {len(record['failed'])} failed" if record["failed"] else "")
                      + ("; card updated" if update_card else ""),
           "metrics": metrics, "age_bias": bias}


def brain_age_card_metrics(record: dict) -> list[dict]:
    """The card entries a brain-age summary gives: MAE, mean error, Pearson r and the age-bias slope (if defined)."""
    common = measured_by(record)
    metrics, bias = record["metrics"], record["age_bias"]
    entries = [{"name": "MAE", "value": round(metrics["mae_years"], 2), "unit": "years", "statistic": "mean"},
               {"name": "mean error (brain age - age)", "value": round(metrics["mean_error_years"], 2),
                "unit": "years", "statistic": "mean"}]
    if metrics["pearson_r"] is not None:
        entries.append({"name": "Pearson r, brain age vs age", "value": round(metrics["pearson_r"], 3),
                        "statistic": "correlation"})
    if bias:
        entries.append({"name": "age-bias slope", "value": round(bias["slope"], 3), "statistic": "least-squares slope",
                        "note": f"{bias['line']}, fitted in-sample on these scans; intercept "
                                f"{bias['intercept_years']:.2f} years"})
    return [entry | common for entry in entries]
