"""`brainzoo evaluate brain-mask`: the numbers on a brain-extraction card, measured by one command.

Each scan of a table is masked by the model and compared with a reference mask: a file named in the table
(anatomical labels or a template's mask, voxels > 0, brought onto the scan's grid) or the output of another
catalogue model (deepbet's, say, for a model distilled from it). Per scan: Dice, the 95th-percentile symmetric
Hausdorff distance in mm, both volumes, and the wall time of the model on that scan. The summary holds the
median, mean, min and max of each, and the protocol of the timing: hardware, threads, and what was timed.
With ``update_card`` the summary's figures replace the same metrics on the version's card, each with the exact
command and data that produced it.
"""

from __future__ import annotations

import json
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
from brainzoo.fileio import atomic_output, check_writable, sha256_of, write_csv
from brainzoo.inference import BrainMasker, study_scans
from brainzoo.metrics import dice, hausdorff95
from brainzoo.predict.volumes import load_mask, load_volume

TIMED = ("the model's whole brain extraction of one scan in a warm process: read the file, conform, run the "
         "networks, post-process and resample back to the native grid (not writing outputs); the model was loaded "
         "and run once on the first scan beforehand, untimed, so graph building is excluded")


def summary(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "mean": float(np.mean(values)),
            "min": float(np.min(values)), "max": float(np.max(values))}


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())


def protocol(runtime: str) -> dict:
    """What the timings were taken on; ``runtime`` is the one that ran the model (``Networks.runtime``)."""
    machine = {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "runtime": runtime,
               "python": platform.python_version(), "timed": TIMED}
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


def read_table(data: Path, reference_column: str, need_column: bool) -> list[dict]:
    if data.is_dir():
        raise BrainzooError(f"{data}: evaluation needs a CSV/TSV table with 'path' and reference columns")
    rows = study_scans(data)
    if need_column and reference_column not in rows[0]:
        raise BrainzooError(f"{data}: no column {reference_column!r} of reference masks (use --reference-column "
                            "or --reference-model)")
    for row in rows:
        if row.get(reference_column):
            row[reference_column] = str(data.parent / row[reference_column])
    return rows


def warm_up(masker: BrainMasker, rows: list[dict]) -> float:
    """Load the networks and build their graphs on the first readable scan: not part of a scan's time."""
    started = time.perf_counter()
    for row in rows:
        try:
            scan = load_volume(row["path"])
        except BrainzooError:
            continue  # its row records the error
        masker.run(scan)
        break
    return time.perf_counter() - started


def evaluate_brain_masks(model: str, data: Path, out_dir: Path, *, reference_model: str | None = None,
                         reference_column: str = "mask", dataset: str | None = None, split: str | None = None,
                         update_card: bool = False, command: list[str] | None = None, force: bool = False,
                         progress: bool = True, runtime: str = "auto") -> Iterator[dict]:
    """Write ``out_dir/scans.csv`` (one row per scan; a failing scan's row records its error) and
    ``out_dir/summary.json``; yield a record per scan, then the summary's."""
    if update_card and not split:
        raise BrainzooError("--update-card needs --split: say how these scans relate to the model's training data")
    rows = read_table(data, reference_column, need_column=reference_model is None)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, summary_file = out_dir / "scans.csv", out_dir / "summary.json"
    for path in (table, summary_file):
        check_writable(path, force)
    masker = BrainMasker.load(model, runtime=runtime)
    reference_label, reference_of = reference_reader(reference_model, reference_column)

    warm_up_s = warm_up(masker, rows)

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
        if progress:
            print(f"[{index}/{len(rows)}] {row['id']}: " + (result["error"] or
                  f"Dice {result['dice']:.4f}, HD95 {result['hd95_mm']:.2f} mm, {result['seconds']:.1f} s"),
                  file=sys.stderr, flush=True)
        yield {"action": "evaluate", "path": row["path"], "status": "error" if result["error"] else "ok",
               "message": result["error"] or f"Dice {result['dice']}, HD95 {result['hd95_mm']} mm", **result}

    done = [r for r in results if not r["error"]]
    if not done:
        raise BrainzooError(f"{data}: every scan failed; nothing to summarise")
    command = command or ["brainzoo", "evaluate", "brain-mask", "--model", model, "--data", str(data),
                          "--out", str(out_dir)]
    record = {"model": masker.provenance(), "reference": reference_label,
              "data": {"table": str(data), "sha256": sha256_of(data), "dataset": dataset or str(data), "split": split},
              "n": len(done), "failed": [r["id"] for r in results if r["error"]],
              "summary": {key: summary([r[key] for r in done]) for key in ("dice", "hd95_mm", "seconds")},
              "model_load_and_first_scan_s": round(warm_up_s, 3), "protocol": protocol(masker.networks().runtime),
              "command": shlex.join(command)}
    write_csv(table, results, ["id", "path", "reference", "dice", "hd95_mm", "predicted_ml", "reference_ml",
                               "seconds", "error"], force)
    with atomic_output(summary_file, force=force) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    if update_card and record["failed"]:
        raise BrainzooError(f"{summary_file}: written, but not put on the card: {len(record['failed'])} scan(s) failed "
                            f"({', '.join(record['failed'])}); a card's figures cover every scan of its table")
    if update_card:
        write_card_metrics(masker.version, card_metrics(record))
    dice_summary = record["summary"]["dice"]
    yield {"action": "evaluate", "path": str(summary_file), "status": "ok",
           "message": f"{record['n']} scan(s) against {reference_label}: Dice median {dice_summary['median']:.4f}, "
                      f"min {dice_summary['min']:.4f}" + (f"; {len(record['failed'])} failed" if record["failed"] else "")
                      + ("; card updated" if update_card else ""),
           "summary": record["summary"]}


def card_metrics(record: dict) -> list[dict]:
    """The card entries a summary gives: Dice (median, mean, min), HD95 (median, max), seconds per scan (median)."""
    common = {"dataset": record["data"]["dataset"], "split": record["data"]["split"], "n": record["n"],
              "source": "measured", "command": record["command"]}
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
