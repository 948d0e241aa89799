"""A whole training and a whole transfer from a table of scans, as a user runs them, with the seconds per epoch.

From the ten 2 mm IXI T1s of ``../shared/data/ixi/t1_2mm`` (``ages.csv``; the last ``--heldout`` by ID held out),
each step is one fresh ``brainzoo`` process in a clone of this repository, with the UK Biobank SFCN's recipe:

1. ``brainzoo preprocess neuronets/sfcn-ukbiobank/1.0.0 TABLE ready/SPLIT --training`` (brain extraction,
   registration to MNI152, the 160x192x160 crop, as predict does them; the training pipeline divides by the mean);
2. ``brainzoo tfrecords ready/SPLIT/results.csv records/SPLIT --kind regression``;
3. ``brainzoo train neuronets/sfcn-ukbiobank/1.0.0 --train records/train --validation records/heldout --epochs E
   --steps-per-epoch S``: the SFCN at full size from a random start, S batches of the spec's 3 scans (one pass);
4. ``brainzoo transfer neuronets/sfcn-ukbiobank/1.0.0 neuronets/sfcn-ixi-bench/1.0.0 --bins 15 65 2 --replace
   'classifier_conv_*' --fit-bias-correction`` with the same records, epochs and steps: fine-tuned from the UK
   Biobank weights to new age bins, the age-bias line fitted on the held-out scans.

Untimed set-up, as in bench_brain_age.py: the clone, ``brainzoo bootstrap``, the deepbet port, and the SFCN made by
``brainzoo get --upstream`` from an upstream-format checkpoint of seeded tensors (no real SFCN weights can be had
offline): the MAEs mean nothing, only the times count. Train and transfer checkpoint at the end of each epoch only
(``--checkpoint-every-steps`` beyond the run); an epoch's wall and CPU seconds (the process's, from /proc) run
from the previous epoch's checkpoint, the first epoch's from the process start, so it includes importing TensorFlow,
building the model and tracing the training step. CPU seconds are what other work on shared cores disturbs least.
Run from the repository root (needs torch to write the checkpoint):

    nice python benchmarks/bench_training.py [--epochs 2] [--heldout 3] [--threads 2] [--keep FOLDER]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from pathlib import Path

from bench_brain_age import SFCN, child_environment, set_up
from bench_brain_mask import BIN, REPO, measure

IXI_2MM = REPO.parent / "shared" / "data" / "ixi" / "t1_2mm"
DEST = "neuronets/sfcn-ixi-bench/1.0.0"
BATCH_SIZE = 3  # the spec's training.batch_size


def write_tables(folder: Path, heldout: int) -> dict[str, Path]:
    """``train.csv`` and ``heldout.csv`` (path, age, sex) from ages.csv, the last ``heldout`` IDs held out."""
    with open(IXI_2MM / "ages.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda row: row["MRID"])
    tables = {}
    for split, subset in (("train", rows[:-heldout]), ("heldout", rows[-heldout:])):
        tables[split] = folder / f"{split}.csv"
        with open(tables[split], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "age", "sex"])
            writer.writerows([IXI_2MM / f"{row['MRID']}-T1_ds.nii.gz", row["Age"], row["Sex"]] for row in subset)
    return tables


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a running process, all its threads (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_epochs(argv: list, log: Path, env: dict, cwd: Path, checkpoints: Path, epochs: int,
                 steps_per_epoch: int) -> tuple[tuple[float, float, float], list[tuple[float, float]]]:
    """``measure``'s figures for a train or transfer process, and the wall and CPU seconds of each of its epochs."""
    ends = {}

    def note_checkpoints(seconds: float, pid: int) -> None:
        for epoch in range(1, epochs + 1):
            if epoch not in ends and (checkpoints / f"ckpt-{epoch * steps_per_epoch}.index").exists():
                ends[epoch] = (seconds, cpu_seconds(pid))

    figures = measure(argv, log, env, cwd=cwd, watch=note_checkpoints)
    if sorted(ends) != list(range(1, epochs + 1)):
        raise SystemExit(f"{log}: saw the checkpoints of epochs {sorted(ends)} only, not all {epochs}")
    times = [ends[epoch] for epoch in range(1, epochs + 1)]
    return figures, [(wall - earlier_wall, cpu - earlier_cpu)
                     for (earlier_wall, earlier_cpu), (wall, cpu) in zip([(0.0, 0.0), *times], times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of train and of transfer (default 2)")
    parser.add_argument("--heldout", type=int, default=3, help="scans held out for validation (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads (default 2)")
    parser.add_argument("--keep", type=Path, help="keep the clone, records and logs here (default: a temp dir)")
    args = parser.parse_args()
    if not IXI_2MM.is_dir():
        raise SystemExit(f"{IXI_2MM} is absent: the scans come from ../shared/data beside the repository")
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_training."))
    folder.mkdir(parents=True, exist_ok=True)
    env = child_environment(folder, args.threads)
    clone = set_up(folder, env)
    tables = write_tables(folder, args.heldout)
    scans = {split: len(table.read_text().splitlines()) - 1 for split, table in tables.items()}
    steps = scans["train"] // BATCH_SIZE
    brainzoo = BIN / "brainzoo"

    rows = []
    for split, table in tables.items():
        rows.append((f"preprocess {split} ({scans[split]} scans)",
                     measure([brainzoo, "preprocess", SFCN, table, folder / "ready" / split, "--training",
                              "--no-progress"], folder / f"preprocess-{split}.log", env, cwd=clone)))
    for split in tables:
        rows.append((f"tfrecords {split}",
                     measure([brainzoo, "tfrecords", folder / "ready" / split / "results.csv", folder / "records" / split,
                              "--kind", "regression"], folder / f"tfrecords-{split}.log", env, cwd=clone)))
    training = ["--train", folder / "records" / "train", "--validation", folder / "records" / "heldout",
                "--epochs", args.epochs, "--steps-per-epoch", steps, "--checkpoint-every-steps", args.epochs * steps + 1,
                "--no-progress"]
    epoch_seconds = {}
    train_figures, epoch_seconds["train"] = timed_epochs(
        [brainzoo, "train", SFCN, *training, "--out", folder / "runs" / "train"], folder / "train.log", env, clone,
        folder / "runs" / "train" / "checkpoints", args.epochs, steps)
    transfer_figures, epoch_seconds["transfer"] = timed_epochs(
        [brainzoo, "transfer", SFCN, DEST, "--bins", 15, 65, 2, "--replace", "classifier_conv_*",
         "--fit-bias-correction", *training, "--json"], folder / "transfer.log", env, clone,
        clone / DEST / ".transfer" / "all" / "checkpoints", args.epochs, steps)
    rows += [(f"train ({args.epochs} epochs)", train_figures), (f"transfer ({args.epochs} epochs)", transfer_figures)]

    print(f"{SFCN} recipe on {scans['train']} IXI 2 mm T1s (+{scans['heldout']} held out), "
          f"{args.threads} threads; {steps} steps of {BATCH_SIZE} an epoch at 160x192x160 (seeded weights: "
          "MAEs meaningless, only timings count)")
    print(f"{'whole process':<28}{'wall s':>8}{'CPU s':>8}{'peak RSS GiB':>14}")
    for name, (wall, cpu, rss) in rows:
        print(f"{name:<28}{wall:>8.1f}{cpu:>8.1f}{rss:>14.2f}")
    print("seconds per epoch, wall / CPU (the first includes the process start: imports, model build, tracing)")
    print(f"{'':<28}" + "".join(f"{f'epoch {e}':>16}" for e in range(1, args.epochs + 1)))
    for name, seconds in epoch_seconds.items():
        print(f"{name:<28}" + "".join(f"{f'{wall:.1f} / {cpu:.1f}':>16}" for wall, cpu in seconds))
    trained = json.loads((folder / "runs" / "train" / "metrics.json").read_text())
    transferred = json.loads([line for line in (folder / "transfer.log").read_text().splitlines()
                              if line.startswith("{")][-1])
    print(f"val MAE: train {trained['val_mae']:.2f} years, transfer {transferred['metrics']['val_mae']:.2f} years; "
          f"logs in {folder}")
    print(f"load average over the last 15 minutes: {os.getloadavg()[2]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
