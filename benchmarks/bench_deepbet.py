"""The deepbet port against the deepbet package: masks and times per scan, and whole processes side by side.

First, in one process, for each shared whole-head scan both run deepbet's full brain extraction, ours on the
converted ``.h5`` weights (run by ONNX Runtime, as ``brainzoo predict`` runs them, or with ``--runtime keras`` by
TensorFlow) and deepbet 1.0.2 on its TorchScript networks, on the CPU with the same number of threads. Prints, per
scan, the wall time of each (after one untimed warm-up run of both), the largest difference between the
brain-probability maps, the Dice overlap of the final masks, and whether the bounding boxes agree.

Then the whole-process comparison (what a user waits for): on each ``--process-scan`` (default: a 2 mm IXI head and
IXI533 raw), ``brainzoo predict brain-mask SCAN MASK`` (the deepbet port, its default runtime) and deepbet's own
``BrainExtraction.run`` each as a fresh child process, alternating, ``--rounds`` times; wall and CPU time are the
medians, as in ``bench_brain_mask.py``, whose process helpers this uses. Run from the repository root (needs torch
and deepbet, env/requirements-dev.in):

    nice python benchmarks/bench_deepbet.py [--threads 2] [--runtime onnxruntime|keras] [--onednn]
        [--data ../shared/data] [--process-scan SCAN ...] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "neuronets" / "deepbet" / "1.0.2" / "weights"
SCANS = ["ixi/t1_2mm/*.nii.gz", "ixi/raw/IXI533-Guys-1066-T1.nii.gz", "studyforrest/studyforrest_sub02_T1w.nii.gz",
         "templates/colin27/ch2.nii.gz", "templates/mni152_fsl_1mm/MNI152_T1.nii.gz"]
PROCESS_SCANS = ["ixi/t1_2mm/IXI012-HH-1211-T1_ds.nii.gz", "ixi/raw/IXI533-Guys-1066-T1.nii.gz"]


def scans(data: Path) -> list[Path]:
    found = [path for pattern in SCANS for path in sorted(data.glob(pattern))]
    if not found:
        raise SystemExit(f"{data}: none of {', '.join(SCANS)} found")
    return found


def compare_in_process(args, paths: list[Path]) -> None:
    """Both pipelines loaded once here; per scan: times, probability difference, Dice, box."""
    if args.runtime == "keras":  # oneDNN and the thread pools are fixed when TensorFlow starts
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    import nibabel as nib
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    from deepbet import BrainExtraction

    from brainzoo.predict.deepbet import DeepbetExtractor

    ours = DeepbetExtractor.from_weights(args.bbox_weights, args.segmentation_weights, runtime=args.runtime)
    reference = BrainExtraction(no_gpu=True)
    run_model = reference.run_model
    probabilities = []
    reference.run_model = lambda volume: probabilities.append(run_model(volume)) or probabilities[-1]

    ours.extract(paths[0])
    reference.run(str(paths[0]))

    print(f"in one process: ours run by {args.runtime}; threads {args.threads}, "
          f"oneDNN {'on' if args.onednn else 'off'}")
    header = f"{'scan':<36} {'shape':<15} {'ours s':>8} {'deepbet s':>9} {'max|dp|':>9} {'Dice':>8} {'box':>4}"
    print(header)
    print("-" * len(header))
    totals = [0.0, 0.0]
    for path in paths:
        start = time.perf_counter()
        result = ours.extract(path)
        our_seconds = time.perf_counter() - start
        start = time.perf_counter()
        _, reference_mask, _ = reference.run(str(path))
        deepbet_seconds = time.perf_counter() - start
        totals[0] += our_seconds
        totals[1] += deepbet_seconds

        probability = nib.as_closest_canonical(result.probability).get_fdata(dtype=np.float32)
        difference = np.abs(probability - probabilities[-1]).max()
        a = np.asanyarray(result.mask.dataobj).astype(bool)
        b = np.asanyarray(reference_mask.dataobj).astype(bool)
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        shape = "x".join(str(size) for size in nib.load(path).shape)
        print(f"{path.name.removesuffix('.nii.gz'):<36} {shape:<15} {our_seconds:8.1f} {deepbet_seconds:9.1f} "
              f"{difference:9.1e} {dice:8.5f} {'same' if result.box == reference.bbox else 'DIFF':>4}", flush=True)
    print(f"{'total':<52} {totals[0]:8.1f} {totals[1]:9.1f} ({totals[0] / totals[1]:.2f})")


def compare_processes(args, paths: list[Path]) -> None:
    """``brainzoo predict brain-mask`` and deepbet's own run, each a fresh process, alternating."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_brain_mask import BIN, measure, python_call

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TF_NUM_INTRAOP_THREADS": str(args.threads),
           "TF_NUM_INTEROP_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    folder = Path(tempfile.mkdtemp(prefix="bench_deepbet."))
    measure([sys.executable, "-c", "import torch, deepbet, onnx, onnxruntime, brainzoo.cli"], folder / "warm.log", env)
    print(f"\nwhole processes (start, imports, model load, extraction, writing the mask), median of {args.rounds} "
          f"rounds; {args.threads} threads")
    print(f"{'scan':<36}{'ours s':>8}{'deepbet s':>10}{'wall':>7}{'CPU':>7}  wall per round")
    for path in paths:
        runs = {"ours": [BIN / "brainzoo", "predict", "brain-mask", path, folder / "ours.nii.gz", "--force"],
                "deepbet": python_call("bench_brain_mask", "run_deepbet", str(path), str(folder / "deepbet.nii.gz"),
                                       args.threads)}
        rounds = [{name: measure(argv, folder / f"{name}.log", env) for name, argv in runs.items()}
                  for _ in range(args.rounds)]
        (ours_wall, ours_cpu, _), (deepbet_wall, deepbet_cpu, _) = (np.median([r[name] for r in rounds], axis=0)
                                                                    for name in runs)
        per_round = ", ".join(f"{r['ours'][0] / r['deepbet'][0]:.2f}" for r in rounds)
        print(f"{path.name.removesuffix('.nii.gz'):<36}{ours_wall:8.1f}{deepbet_wall:10.1f}"
              f"{ours_wall / deepbet_wall:7.2f}{ours_cpu / deepbet_cpu:7.2f}  {per_round}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for each framework (default 2)")
    parser.add_argument("--runtime", choices=("onnxruntime", "keras"), default="onnxruntime",
                        help="what runs our networks in the one-process comparison (default onnxruntime)")
    parser.add_argument("--onednn", action="store_true", help="run TensorFlow with its oneDNN kernels")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--bbox-weights", default=str(WEIGHTS / "bbox.h5"))
    parser.add_argument("--segmentation-weights", default=str(WEIGHTS / "segmentation.h5"))
    parser.add_argument("--process-scan", type=Path, nargs="*",
                        help=f"scans for the whole-process comparison (default: {', '.join(PROCESS_SCANS)} in --data)")
    parser.add_argument("--rounds", type=int, default=3, help="whole-process runs of each, alternating (default 3)")
    args = parser.parse_args()
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if args.onednn else "0"
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # ONNX Runtime's threads (brainzoo.predict.onnx_runtime)

    compare_in_process(args, scans(args.data))
    compare_processes(args, args.process_scan or [args.data / scan for scan in PROCESS_SCANS])


if __name__ == "__main__":
    main()
