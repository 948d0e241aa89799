"""End-to-end brain age of one raw T1 to a JSON record with the UK Biobank SFCN, timed step by step.

The target (issue): raw T1 to JSON with SFCN in under 30 s on 2 cores, with per-step timings and peak memory.
What runs is what ``brainzoo predict brain-age`` runs (``inference.predict_brain_age_file``), through public
functions: our deepbet port masks the raw scan (``inference.BrainMasker``), then
``brainzoo.predict.predict_brain_age`` preprocesses it as neuronets/sfcn-ukbiobank/1.0.0's spec says (brain
extraction, affine registration to MNI152, crop, divide by the mean), runs the SFCN and decodes its age bins;
the record is written as JSON.

No SFCN weights can be had offline, so the network has the UK Biobank layout with weights converted
(``brainzoo.convert``) from the conversion fixture's seeded state_dict: the predicted age means nothing, only
the timings count. The weights are converted first, untimed, in another process. The CLI takes catalogue
versions, not a model file, so the pipeline runs in this process: "cold" is from the process's start (imports,
loading the SFCN .h5 and deepbet, first use of the MNI template) to the first JSON; "warm" is the same scan
again. Prints the per-step timings of the records, the totals and the process's peak RSS. Run from the
repository root:

    nice python benchmarks/bench_brain_age.py [--threads 2] [--scan PATH] [--keep FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_brain_mask import IXI533, REPO, python_call

SFCN = "neuronets/sfcn-ukbiobank/1.0.0"
TARGET_SECONDS = 30


def seconds_since_process_start() -> float:
    """Linux: the process's start in /proc/self/stat (clock ticks since boot) against the boot-time clock."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


def brain_age_json(scan: Path, masker, model, spec_inference: dict, out: Path) -> dict:
    """Raw scan to JSON as ``predict_brain_age_file`` does it: our brain mask, then the brain-age predictor."""
    from brainzoo.predict import predict_brain_age

    mask, _, mask_record = masker.run(scan)
    record = predict_brain_age(scan, [model], spec_inference=spec_inference, brain_mask=mask)
    record["brain_extraction"] = mask_record
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def seeded_sfcn(path: Path) -> None:
    """The UK Biobank SFCN with the conversion fixture's seeded weights, saved as the catalogue would hold it."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import load_fixture, seeded_state_dict

    from brainzoo.convert import convert_state_dict

    convert_state_dict("sfcn", seeded_state_dict(load_fixture("sfcn_peng2021")["state_dict"])).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads (default 2)")
    parser.add_argument("--scan", type=Path, default=IXI533, help="raw whole-head T1 (default: IXI533 raw)")
    parser.add_argument("--keep", type=Path, help="write the SFCN .h5 and the JSON records here (default: a temp dir)")
    args = parser.parse_args()

    before_main = seconds_since_process_start()  # the interpreter's start and this module's imports
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_brain_age."))
    folder.mkdir(parents=True, exist_ok=True)
    model_file = folder / "sfcn.h5"
    start = time.perf_counter()
    # In another process, so that this one stays cold: nothing of TensorFlow or Keras is loaded or built yet.
    subprocess.run(python_call("bench_brain_age", "seeded_sfcn", str(model_file)), check=True)
    untimed = time.perf_counter() - start

    start = time.perf_counter()
    from brainzoo import catalogue  # first, as in the CLI: it turns TensorFlow's oneDNN kernels on
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from brainzoo.inference import BrainMasker
    from brainzoo.model_files import load_keras_model
    imported = before_main + time.perf_counter() - start

    start = time.perf_counter()
    model = load_keras_model(model_file)
    masker = BrainMasker.load(catalogue.DEFAULT_BRAIN_MASK_MODEL)  # its networks load at the first scan
    spec_inference = catalogue.find_version(SFCN).spec["inference"]
    loaded = time.perf_counter() - start
    records, totals = [], []
    for run in ("cold", "warm"):
        start = time.perf_counter()
        records.append(brain_age_json(args.scan, masker, model, spec_inference, folder / f"{run}.json"))
        totals.append(time.perf_counter() - start)
    cold_total = imported + loaded + totals[0]

    print(f"{args.scan.name} -> JSON with {SFCN} (seeded weights: the age is meaningless, only timings count); "
          f"brain extraction {catalogue.DEFAULT_BRAIN_MASK_MODEL}; TensorFlow {tf.__version__}, {args.threads} "
          f"threads, TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')}")
    print(f"{'step':<46}{'cold s':>8}{'warm s':>8}")
    rows = [("start Python, import TensorFlow and brainzoo", imported, None),
            ("load the SFCN .h5, read its spec", loaded, None),
            ("mask the scan (deepbet port; cold: + its load)",
             *(r["brain_extraction"]["timings_s"]["total"] for r in records))]
    rows += [(f"predict_brain_age: {step}", *(r["timings_s"][step] for r in records))
             for step in records[0]["timings_s"]]
    rows += [("raw T1 to JSON written (both above + JSON)", *totals),
             ("end to end, from the process's start", cold_total, None)]
    for name, cold, warm in rows:
        print(f"{name:<46}{cold:>8.2f}{'' if warm is None else f'{warm:.2f}':>8}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    verdict = "under" if cold_total < TARGET_SECONDS else "OVER"
    print(f"cold end to end {cold_total:.1f} s: {verdict} the {TARGET_SECONDS} s target; warm {totals[1]:.1f} s; "
          f"peak RSS of this process {peak:.2f} GiB (untimed: converting the seeded weights, {untimed:.1f} s)")
    print(f"predicted age {records[0]['result']['brain_age']:.1f} (meaningless); records in {folder}")


if __name__ == "__main__":
    main()
