"""Blocks per second of our segmentation input pipeline against nobrainer's, on the same TFRecords.

Writes synthetic heads and their brain masks to TFRecords once (with our writer), then times one pass over
the blocks of every volume, best of ``--repeats`` (taking turns) after a warm-up pass that builds graphs:

- nobrainer: ``nobrainer.dataset.Dataset.from_tfrecords(..., block_shape=...)`` (what ``from_files`` calls
  after writing its own records), non-overlapping blocks, binarised labels, rebatched to ``--batch``;
- ours, like for like: ``segmentation_blocks(sampling="grid")`` with no overlap, normalisation or augmentation;
- ours as used for training: random blocks (as many per volume), z-scored, with the default augmentation.

The ratio printed is ours / nobrainer's blocks per second; CPU ms per block is printed too.
Run from the repository root:

    python benchmarks/bench_pipeline.py [--subjects 16] [--shape 64] [--block 32] [--batch 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def blocks_per_second(pipelines: dict, repeats: int) -> dict[str, tuple[int, float, float]]:
    """Blocks, best blocks/s and least CPU ms per block of each pipeline over ``repeats`` full passes.

    One pass first builds the graphs. The pipelines take turns, so a machine busy with other work slows them
    alike; CPU time (all of this process's threads) is the figure that such work disturbs least.
    """
    counts = {name: sum(int(x.shape[0]) for x, _ in dataset) for name, dataset in pipelines.items()}
    rates, cpu = dict.fromkeys(pipelines, 0.0), dict.fromkeys(pipelines, float("inf"))
    for _ in range(repeats):
        for name, dataset in pipelines.items():
            wall, used = time.perf_counter(), time.process_time()
            for _ in dataset:
                pass
            rates[name] = max(rates[name], counts[name] / (time.perf_counter() - wall))
            cpu[name] = min(cpu[name], 1000 * (time.process_time() - used) / counts[name])
    return {name: (counts[name], rates[name], cpu[name]) for name in pipelines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=16, help="synthetic volumes (default 16)")
    parser.add_argument("--shape", type=int, default=64, help="cubic volume size (default 64)")
    parser.add_argument("--block", type=int, default=32, help="cubic block size; must divide --shape (default 32)")
    parser.add_argument("--batch", type=int, default=8, help="blocks per batch (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after one warm-up (default 3)")
    args = parser.parse_args()
    if args.shape % args.block:
        parser.error("nobrainer cuts non-overlapping blocks only: --block must divide --shape")

    import tensorflow as tf
    from nobrainer.dataset import Dataset

    from brainzoo.training.pipeline import Augmentation, segmentation_blocks
    from brainzoo.training.synthetic import write_synthetic_dataset
    from brainzoo.training.tfrecords import read_dataset, read_table, write_tfrecords

    shape, block = (args.shape,) * 3, (args.block,) * 3
    per_volume = (args.shape // args.block) ** 3
    with tempfile.TemporaryDirectory(prefix="bench_pipeline.") as folder:
        folder = Path(folder)
        start = time.perf_counter()
        table = write_synthetic_dataset(folder / "heads", args.subjects, shape=shape)
        made = time.perf_counter() - start
        start = time.perf_counter()
        shards = write_tfrecords(read_table(table, kind="segmentation", label_column="mask"), folder / "records",
                                 kind="segmentation", shard_size=4, progress=False)
        converted = time.perf_counter() - start
        print(f"TensorFlow {tf.__version__}; {args.subjects} synthetic heads {shape} in {made:.1f} s, "
              f"TFRecords ({len(shards)} gzipped shards) in {converted:.1f} s")

        nobrainer = Dataset.from_tfrecords(str(folder / "records" / "shard-*"), args.subjects, shape,
                                           block_shape=block, n_classes=1, num_parallel_calls=tf.data.AUTOTUNE)
        nobrainer.batch(args.batch)
        like_for_like = segmentation_blocks(read_dataset(shards), block, sampling="grid", batch_size=args.batch,
                                            normalization=None)
        training = segmentation_blocks(read_dataset(shards), block, blocks_per_volume=per_volume,
                                       batch_size=args.batch, augmentation=Augmentation(), shuffle_buffer=64)
        results = blocks_per_second({
            "nobrainer from_tfrecords(block_shape)": nobrainer.dataset,
            "ours, grid, no normalisation/augmentation": like_for_like,
            "ours, random + z-score + augmentation": training,
        }, args.repeats)
        baseline = results["nobrainer from_tfrecords(block_shape)"][1]
        print(f"{'pipeline':<44}{'blocks':>8}{'blocks/s':>10}{'ratio':>8}{'CPU ms/block':>14}")
        for name, (count, rate, cpu_ms) in results.items():
            print(f"{name:<44}{count:>8}{rate:>10.1f}{rate / baseline:>8.2f}{cpu_ms:>14.2f}")
        consumed = model_blocks_per_second(block, args.batch, args.repeats)
        fed = results["ours, random + z-score + augmentation"][1]
        print(f"training U-Net (base 4, batchnorm) consumes {consumed:.1f} blocks/s; the training pipeline feeds "
              f"{fed:.1f}: ratio {fed / consumed:.2f} (> 1: the pipeline never starves the model)")


def model_blocks_per_second(block: tuple[int, ...], batch: int, repeats: int) -> float:
    """Blocks per second that one training step of the light brain-extraction U-Net consumes (fed from memory)."""
    import numpy as np
    import tensorflow as tf

    from brainzoo.models.unet import unet
    from brainzoo.training.objectives import Objective

    model = unet((*block, 1), base_filters=4, norm="batch")
    objective = Objective({"name": "dice"})
    optimizer = tf.keras.optimizers.Adam(1e-3)
    x = tf.constant(np.random.default_rng(0).standard_normal((batch, *block, 1)), tf.float32)
    y = tf.cast(x > 0, tf.float32)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(objective.per_example_loss(y, model(x, training=True)))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

    step()  # build the graph
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(5):
            step()
        best = max(best, 5 * batch / (time.perf_counter() - start))
    return best


if __name__ == "__main__":
    main()
