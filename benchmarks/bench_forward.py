"""Time one forward pass of each Keras port against the PyTorch reference, on the CPU, in one process.

Both frameworks get the same number of threads and the same weights (random, converted from the
PyTorch reference), and run one volume at the published input size. Prints the seconds per forward
pass (best of ``--repeats`` after a warm-up call), the Keras/PyTorch ratio, and the largest output
difference next to the largest output. Run from the repository root:

    python benchmarks/bench_forward.py [--threads 2] [--repeats 3] [--arch sfcn densenet169 ...]
"""

from __future__ import annotations

import argparse
import os
import time

# Architecture -> published input (depth, height, width), as in docs/architectures.md.
PUBLISHED_SIZES = {
    "sfcn": (160, 192, 160),
    "densenet169": (118, 142, 118),
    "inception-resnet-v2": (118, 142, 118),
}


def randomise(reference) -> None:
    """Kaiming-normal kernels: activations keep their scale through the depth, so the outputs depend on
    the whole network (with PyTorch's default initialisation they shrink to the biases and agree trivially)."""
    import torch

    torch.manual_seed(0)
    for module in reference.modules():
        if isinstance(module, (torch.nn.Conv3d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight)


def best_time(forward, repeats: int) -> float:
    forward()  # the first call builds graphs and allocates
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for each framework (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per model after one warm-up (default 3)")
    parser.add_argument("--arch", nargs="+", choices=PUBLISHED_SIZES, default=list(PUBLISHED_SIZES))
    args = parser.parse_args()

    # Thread pools are fixed when each framework starts, so configure both before any work.
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)

    from brainzoo.convert.names import ARCHITECTURES
    from brainzoo.convert.state_dict import convert_state_dict
    from brainzoo.models.torch_reference import REFERENCES

    # TensorFlow uses oneDNN kernels on this CPU only when asked; that changes its timings severalfold.
    print(f"TensorFlow {tf.__version__} (TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}), "
          f"PyTorch {torch.__version__}, {args.threads} threads each, best of {args.repeats}")
    print(f"{'architecture':<22}{'input':>14}{'Keras s':>10}{'PyTorch s':>11}{'ratio':>8}{'max |diff|':>12}"
          f"{'max |out|':>11}")
    for arch in args.arch:
        spec = ARCHITECTURES[arch]
        reference = REFERENCES[spec.builder](**spec.fixed_options).eval()
        randomise(reference)
        model = convert_state_dict(arch, {key: value.numpy() for key, value in reference.state_dict().items()})
        size = PUBLISHED_SIZES[arch]
        volume = np.random.default_rng(0).standard_normal((1, *size, 1)).astype(np.float32)
        volume_torch = torch.from_numpy(volume.transpose(0, 4, 1, 2, 3))

        def torch_forward():
            with torch.no_grad():
                return reference(volume_torch).numpy()

        keras_seconds = best_time(lambda: model.predict_on_batch(volume), args.repeats)
        torch_seconds = best_time(torch_forward, args.repeats)
        expected = torch_forward()
        difference = np.abs(model.predict_on_batch(volume) - expected).max()
        print(f"{arch:<22}{'x'.join(map(str, size)):>14}{keras_seconds:>10.2f}{torch_seconds:>11.2f}"
              f"{keras_seconds / torch_seconds:>8.2f}{difference:>12.2g}{np.abs(expected).max():>11.3g}", flush=True)


if __name__ == "__main__":
    main()
