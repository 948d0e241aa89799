"""Keras deepbet against the deepbet package on every shared whole-head scan.

For each scan both run deepbet's full brain extraction, ours on the converted ``.h5`` weights and
deepbet 1.0.2 on its TorchScript networks, on the CPU with the same number of threads. Prints, per scan,
the wall time of each (after one untimed warm-up run of both), the largest difference between the
brain-probability maps, the Dice overlap of the final masks, and whether the bounding boxes agree.
Run from the repository root (needs torch and deepbet, env/requirements-dev.in):

    python benchmarks/bench_deepbet.py [--threads 2] [--onednn] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "neuronets" / "deepbet" / "1.0.2" / "weights"
SCANS = ["ixi/t1_2mm/*.nii.gz", "ixi/raw/IXI533-Guys-1066-T1.nii.gz", "studyforrest/studyforrest_sub02_T1w.nii.gz",
         "templates/colin27/ch2.nii.gz", "templates/mni152_fsl_1mm/MNI152_T1.nii.gz"]


def scans(data: Path) -> list[Path]:
    found = [path for pattern in SCANS for path in sorted(data.glob(pattern))]
    if not found:
        raise SystemExit(f"{data}: none of {', '.join(SCANS)} found")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for each framework (default 2)")
    parser.add_argument("--onednn", action="store_true", help="run TensorFlow with its oneDNN kernels")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--bbox-weights", default=str(WEIGHTS / "bbox.h5"))
    parser.add_argument("--segmentation-weights", default=str(WEIGHTS / "segmentation.h5"))
    args = parser.parse_args()

    # oneDNN and the thread pools are fixed when each framework starts, so configure both before any work.
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if args.onednn else "0"
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import nibabel as nib
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    from deepbet import BrainExtraction

    from brainzoo.deepbet_pipeline import DeepbetExtractor

    ours = DeepbetExtractor.from_weights(args.bbox_weights, args.segmentation_weights)
    reference = BrainExtraction(no_gpu=True)
    run_model = reference.run_model
    probabilities = []
    reference.run_model = lambda volume: probabilities.append(run_model(volume)) or probabilities[-1]

    paths = scans(args.data)
    ours.extract(paths[0])
    reference.run(str(paths[0]))

    print(f"threads {args.threads}, oneDNN {'on' if args.onednn else 'off'}")
    header = f"{'scan':<36} {'shape':<15} {'keras s':>8} {'deepbet s':>9} {'max|dp|':>9} {'Dice':>8} {'box':>4}"
    print(header)
    print("-" * len(header))
    totals = [0.0, 0.0]
    for path in paths:
        start = time.perf_counter()
        result = ours.extract(path)
        keras_seconds = time.perf_counter() - start
        start = time.perf_counter()
        _, reference_mask, _ = reference.run(str(path))
        deepbet_seconds = time.perf_counter() - start
        totals[0] += keras_seconds
        totals[1] += deepbet_seconds

        probability = nib.as_closest_canonical(result.probability).get_fdata(dtype=np.float32)
        difference = np.abs(probability - probabilities[-1]).max()
        a = np.asanyarray(result.mask.dataobj).astype(bool)
        b = np.asanyarray(reference_mask.dataobj).astype(bool)
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        shape = "x".join(str(size) for size in nib.load(path).shape)
        print(f"{path.name.removesuffix('.nii.gz'):<36} {shape:<15} {keras_seconds:8.1f} {deepbet_seconds:9.1f} "
              f"{difference:9.1e} {dice:8.5f} {'same' if result.box == reference.bbox else 'DIFF':>4}", flush=True)
    print(f"{'total':<52} {totals[0]:8.1f} {totals[1]:9.1f}")


if __name__ == "__main__":
    main()
