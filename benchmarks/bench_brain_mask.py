"""Brain extraction of one 256^3 1 mm T1, whole process: ours against deepbet and nobrainer, one after another.

The scan (IXI533 raw by default) is conformed once with our library (RAS, 1 mm, 256^3, trilinear) and written
to a file; each tool then runs on that file as a fresh child process, so its wall time, CPU time and peak RSS
cover interpreter start, imports, model loading, prediction and writing the mask:

- ours, deepbet port: ``brainzoo predict brain-mask IN OUT`` (catalogue version neuronets/deepbet/1.0.2);
- ours, the student distilled from it: ``brainzoo predict brain-mask IN OUT --model`` neuronets/brainzoo-unet/0.5.0
  (a U-Net on one 96^3 block centred 80 mm below the top of the head at 2 mm; its weights are trained, so its Dice
  against deepbet means something), run as by default by ONNX Runtime (no TensorFlow in the process), and
  again with ``--runtime keras``, which shows what the runtime accounts for;
- deepbet 1.0.2 from PyPI (TorchScript on the CPU, ``torch.set_num_threads(--threads)``);
- nobrainer 1.2.1: ``nobrainer predict -b 128 128 128 -l`` on a brainy U-Net .h5 (``brainzoo.models.unet``,
  nobrainer's exact topology), which runs eight non-overlapping 128^3 blocks;
- ours on that same .h5: ``brainzoo.predict.predict_brain_mask`` in 128^3 blocks, z-scored, thresholded at 0.3
  and kept to the largest component as by nobrainer (ours also fills holes), with no overlap by default so both
  run eight blocks (our usual overlap, 0.5, runs 27: ``--overlap 0.5`` times that).

Every process gets ``--threads`` threads (TF_NUM_INTRAOP_THREADS, OMP_NUM_THREADS, which ONNX Runtime and PyTorch
follow) and TensorFlow's oneDNN kernels, so the ratio of our blocks pipeline to nobrainer compares pipelines,
not kernels. An untimed import of every framework first
warms the page cache, so that no tool pays for reading the libraries from disk. The U-Net has seeded random
weights (none are trained yet): its masks mean nothing, only its time and memory are compared. Run from the
repository root (needs torch, deepbet and nobrainer, env/requirements-dev.in):

    nice python benchmarks/bench_brain_mask.py [--threads 2] [--scan PATH] [--keep FOLDER] [--overlap 0] [--rounds 3]

Each round runs the four tools one after another; the table shows each tool's median over the rounds and
the ratios compare those medians (the ours/deepbet range over rounds is printed too, since a few seconds'
process is at the mercy of anything else the machine does).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

from bench_deepbet import REPO

BENCHMARKS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
IXI533 = REPO.parent / "shared" / "data" / "ixi" / "raw" / "IXI533-Guys-1066-T1.nii.gz"
GRID = {"orientation": "RAS", "spacing_mm": [1, 1, 1], "shape": [256, 256, 256]}
STUDENT = "neuronets/brainzoo-unet/0.5.0"
BLOCK = [128, 128, 128]
# The U-Net run as `nobrainer predict` runs it: the whole volume z-scored, 128^3 blocks, its default threshold 0.3.
UNET_INFERENCE = {"input": {"contrast": ["T1w"], **GRID, "block_shape": BLOCK},
                  "preprocessing": [{"step": "conform"}, {"step": "zscore"}],
                  "output": {"type": "probability-mask", "threshold": 0.3}}


def run_deepbet(infile: str, outfile: str, threads: int) -> None:
    """deepbet's own pipeline, with as many PyTorch threads as TensorFlow gets elsewhere."""
    import torch
    torch.set_num_threads(threads)
    from deepbet import BrainExtraction

    BrainExtraction(no_gpu=True).run(infile, mask_path=outfile)


def run_unet_blocks(infile: str, outfile: str, model_file: str, overlap: float) -> None:
    """Our blocks pipeline on a model file (the CLI takes catalogue versions only)."""
    import nibabel as nib

    from brainzoo.model_files import load_keras_model
    from brainzoo.predict import predict_brain_mask
    from brainzoo.spec import Inference

    model = load_keras_model(model_file)
    mask, _, _ = predict_brain_mask(infile, model, inference=Inference.from_spec(UNET_INFERENCE), overlap=overlap)
    nib.save(mask, outfile)


def python_call(module: str, function: str, *arguments) -> list[str]:
    """A fresh interpreter that calls one function of a benchmark module."""
    call = f"{function}({', '.join(map(repr, arguments))})"
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); "
                                  f"from {module} import {function}; {call}"]


def measure(argv: list, log: Path, env: dict, cwd: Path = REPO,
            watch: Callable[[float, int], None] | None = None) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (GiB) of one command run to completion (wait4: this child's own).

    CPU time is the figure that other work on a shared machine disturbs least. ``watch``, if given, is called with
    the seconds since the start and the child's pid every 50 ms while it runs (to note when its outputs appear).
    """
    with log.open("w") as output:
        start = time.perf_counter()
        child = subprocess.Popen([str(a) for a in argv], stdout=output, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        pid, status, usage = os.wait4(child.pid, 0 if watch is None else os.WNOHANG)
        while pid == 0:
            watch(time.perf_counter() - start, child.pid)
            time.sleep(0.05)
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{' '.join(map(str, argv))[:200]} failed ({child.returncode}):\n{log.read_text()[-3000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for each framework (default 2)")
    parser.add_argument("--scan", type=Path, default=IXI533, help="whole-head T1 (default: IXI533 raw)")
    parser.add_argument("--keep", type=Path, help="write the input, U-Net, masks and logs here (default: a temp dir)")
    parser.add_argument("--overlap", type=float, default=0.0, help="our U-Net block overlap (default 0, as nobrainer)")
    parser.add_argument("--rounds", type=int, default=3, help="times each tool runs, alternating (default 3)")
    args = parser.parse_args()
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "1",
           "TF_NUM_INTRAOP_THREADS": str(args.threads), "TF_NUM_INTEROP_THREADS": "1",
           "OMP_NUM_THREADS": str(args.threads), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    os.environ.update(env)  # before TensorFlow starts here too

    import nibabel as nib
    import numpy as np
    import tensorflow as tf

    from brainzoo.metrics import dice
    from brainzoo.models.unet import unet
    from brainzoo.predict.volumes import GriddedVolume, conform, load_volume

    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_brain_mask."))
    folder.mkdir(parents=True, exist_ok=True)
    scan, model_file = folder / "t1_256.nii.gz", folder / "unet.h5"
    conformed = conform(GriddedVolume.native(load_volume(args.scan)), GRID["orientation"], GRID["spacing_mm"],
                        GRID["shape"])
    nib.save(nib.Nifti1Image(conformed.data, conformed.affine), scan)
    tf.keras.utils.set_random_seed(0)
    unet((*BLOCK, 1)).save(model_file)
    masks = {name: folder / f"{name}_mask.nii.gz"
             for name in ("ours-deepbet", "ours-student", "ours-student-keras", "deepbet", "nobrainer", "ours-unet")}
    runs = {
        "ours-deepbet": ("ours: brainzoo predict brain-mask (deepbet port)",
                         [BIN / "brainzoo", "predict", "brain-mask", scan, masks["ours-deepbet"]]),
        "ours-student": ("ours: brainzoo predict brain-mask (student U-Net)",
                         [BIN / "brainzoo", "predict", "brain-mask", scan, masks["ours-student"], "--model", STUDENT]),
        "ours-student-keras": ("ours: the same with --runtime keras",
                               [BIN / "brainzoo", "predict", "brain-mask", scan, masks["ours-student-keras"],
                                "--model", STUDENT, "--runtime", "keras"]),
        "deepbet": ("deepbet 1.0.2 BrainExtraction.run (PyTorch)",
                    python_call("bench_brain_mask", "run_deepbet", str(scan), str(masks["deepbet"]), args.threads)),
        "nobrainer": ("nobrainer predict (U-Net .h5, 8 blocks)",
                      [BIN / "nobrainer", "predict", "-m", model_file, "-b", *BLOCK, "-l", scan, masks["nobrainer"]]),
        "ours-unet": (f"ours: predict_brain_mask (same .h5, overlap {args.overlap:g})",
                      python_call("bench_brain_mask", "run_unet_blocks", str(scan), str(masks["ours-unet"]),
                                  str(model_file), args.overlap)),
    }
    measure([sys.executable, "-c", "import tensorflow, torch, deepbet, nobrainer.cli.main, onnx, onnxruntime, brainzoo.predict.runners"],
            folder / "warm-up.log", env)

    print(f"{args.scan.name} conformed to 256^3 1 mm RAS; {args.threads} threads, oneDNN on; TensorFlow "
          f"{tf.__version__}, PyTorch {version('torch')}, deepbet {version('deepbet')}, "
          f"nobrainer {version('nobrainer')}")
    print(f"timed: each tool's whole process (start, imports, model load, predict, write the mask), median of "
          f"{args.rounds} rounds, after an untimed import of every framework")
    rounds = []
    for _ in range(args.rounds):
        for mask in masks.values():
            mask.unlink(missing_ok=True)  # neither nobrainer nor we overwrite
        rounds.append({name: measure(argv, folder / f"{name}.log", env) for name, (_, argv) in runs.items()})
    results = {name: tuple(np.median([r[name] for r in rounds], axis=0)) for name in runs}
    print(f"{'tool':<52}{'wall s':>8}{'CPU s':>8}{'peak RSS GiB':>14}")
    for name, (label, _) in runs.items():
        wall, cpu, rss = results[name]
        print(f"{label:<52}{wall:>8.1f}{cpu:>8.1f}{rss:>14.2f}")
    for ours, peer in (("ours-deepbet", "deepbet"), ("ours-student", "deepbet"), ("ours-student", "nobrainer")):
        per_round = [r[ours][0] / r[peer][0] for r in rounds]
        print(f"{ours}/{peer} wall per round: {', '.join(f'{x:.2f}' for x in per_round)}")

    def ratios(ours: str, peer: str) -> str:
        return f"{ours}/{peer}: " + ", ".join(f"{what} {mine / theirs:.2f}" for what, mine, theirs
                                             in zip(("wall", "CPU", "peak RSS"), results[ours], results[peer]))

    ours, student, theirs = (np.asanyarray(nib.load(masks[name]).dataobj) > 0
                             for name in ("ours-deepbet", "ours-student", "deepbet"))
    print(f"{ratios('ours-deepbet', 'deepbet')}; Dice of the masks {dice(ours, theirs):.5f}")
    print(f"{ratios('ours-student', 'deepbet')}; Dice of the masks {dice(student, theirs):.4f}")
    print(f"{ratios('ours-student', 'ours-student-keras')}")
    print(f"{ratios('ours-student', 'nobrainer')} (nobrainer's U-Net has random weights: time and memory only)")
    print(f"{ratios('ours-unet', 'nobrainer')} (the same U-Net .h5; it has seeded random weights, so its masks "
          "and any Dice of them are meaningless: only time and memory are compared)")
    print(f"files in {folder}")


if __name__ == "__main__":
    main()
