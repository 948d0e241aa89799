"""Brain age of one raw T1 to a JSON record with the UK Biobank SFCN, as a user runs it: one whole process.

The target (issue #16): raw T1 to brain-age JSON with SFCN in under 30 s, whole process, on 2 cores.
Untimed set-up, as a new user would do it: a clone of this repository, ``brainzoo bootstrap``, ``brainzoo get``
of the deepbet port, and ``brainzoo get neuronets/sfcn-ukbiobank/1.0.0 --upstream FILE --allow-unverified`` on
a checkpoint in the upstream format (legacy pickle, ``module.`` keys) holding the conversion fixture's seeded
tensors: no real SFCN weights can be had offline, so the predicted age means nothing; only the time counts.
Then ``brainzoo predict brain-age SCAN --model ... --out age.json`` runs as a fresh child process, twice: "cold"
with an empty template cache (``BRAINZOO_CACHE``), then "warm" (cache filled, files in the page cache). Prints
wall and CPU time and peak RSS of each process, and the per-step timings of the JSON records. Run from the
repository root (needs torch to write the checkpoint):

    nice python benchmarks/bench_brain_age.py [--threads 2] [--scan PATH] [--keep FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_brain_mask import BIN, IXI533, REPO, measure

SFCN = "neuronets/sfcn-ukbiobank/1.0.0"
UPSTREAM_FILE = "run_20190719_00_epoch_best_mae.p"
TARGET_SECONDS = 30


def seeded_upstream_checkpoint(path: Path) -> None:
    """The UK Biobank release's on-disk format (legacy pickle saved from nn.DataParallel), seeded tensors."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import load_fixture, seeded_state_dict

    state = seeded_state_dict(load_fixture("sfcn_peng2021")["state_dict"])
    torch.save({f"module.{key}": torch.from_numpy(value) for key, value in state.items()}, path,
               _use_new_zipfile_serialization=False)


def set_up(folder: Path, env: dict) -> Path:
    """A user's clone with the SFCN converted from the checkpoint and the brain-extraction model fetched."""
    clone = folder / "brainzoo"
    subprocess.run(["git", "clone", "-q", "--single-branch", "--branch", "main", str(REPO), str(clone)], check=True)
    seeded_upstream_checkpoint(folder / UPSTREAM_FILE)
    for command in (["bootstrap"], ["get", "neuronets/deepbet/1.0.2"],
                    ["get", SFCN, "--upstream", str(folder / UPSTREAM_FILE), "--allow-unverified"]):
        subprocess.run([BIN / "brainzoo", *command], cwd=clone, env=env, check=True, capture_output=True)
    return clone


def child_environment(folder: Path, threads: int) -> dict[str, str]:
    """The environment of each timed ``brainzoo`` process: the venv's ``bin/`` on PATH (git-annex), ``threads``
    for TensorFlow and ONNX Runtime, and a template cache of its own in ``folder`` (so the first run is cold)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TF_NUM_INTRAOP_THREADS": str(threads),
            "OMP_NUM_THREADS": str(threads), "TF_CPP_MIN_LOG_LEVEL": "1", "BRAINZOO_CACHE": str(folder / "cache")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads (default 2)")
    parser.add_argument("--scan", type=Path, default=IXI533, help="raw whole-head T1 (default: IXI533 raw)")
    parser.add_argument("--keep", type=Path, help="keep the clone, records and logs here (default: a temp dir)")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_brain_age."))
    folder.mkdir(parents=True, exist_ok=True)
    env = child_environment(folder, args.threads)
    clone = set_up(folder, env)

    rows, records = [], []
    for run in ("cold", "warm"):
        out = folder / f"{run}.json"
        wall, cpu, rss = measure([BIN / "brainzoo", "predict", "brain-age", args.scan.resolve(), "--model", SFCN,
                                  "--out", out, "--force"], folder / f"{run}.log", env, cwd=clone)
        rows.append((run, wall, cpu, rss))
        records.append(json.loads(out.read_text()))

    print(f"{args.scan.name} -> JSON: `brainzoo predict brain-age` with {SFCN} (seeded weights made by get --upstream: "
          f"the age is meaningless, only timings count), {args.threads} threads")
    print(f"{'whole process':<16}{'wall s':>8}{'CPU s':>8}{'peak RSS GiB':>14}")
    for run, wall, cpu, rss in rows:
        print(f"{run:<16}{wall:>8.1f}{cpu:>8.1f}{rss:>14.2f}")
    print(f"{'step (record)':<34}{'cold s':>8}{'warm s':>8}")
    steps = [("brain extraction (deepbet port)", [r["brain_extraction"]["timings_s"]["total"] for r in records])]
    steps += [(f"brain age: {step}", [r["timings_s"][step] for r in records]) for step in records[0]["timings_s"]]
    for name, (cold, warm) in steps:
        print(f"{name:<34}{cold:>8.2f}{warm:>8.2f}")
    verdict = "under" if rows[0][1] < TARGET_SECONDS else "OVER"
    print(f"cold whole process {rows[0][1]:.1f} s: {verdict} the {TARGET_SECONDS} s target; warm {rows[1][1]:.1f} s; "
          f"records and logs in {folder}")


if __name__ == "__main__":
    main()
