"""The 3-D DCGAN's adversarial training, and the (generated volume, latent) pairs its encoder is trained on.

The loop is the upstream's (GAN_experiment_part1): for every batch of real volumes, z ~ U(0, 1)^latent_size; the
generator makes G(z) and, unless skipped (with ``loss.generator_skip_probability``, the upstream's threshold p that
keeps the discriminator from outrunning the generator), takes an Adam step on BCE(D(G(z)), 1); then the
discriminator takes one on (BCE(D(real), 1) + BCE(D(G(z)), 0)) / 2 with the same generated batch. Both networks use
the spec's optimizer settings.

A run resumes exactly: the real batches of epoch e are a function of (seed, e), and each step's latents and skip
draw are functions of (seed, step), so after a restart from the checkpoint (both networks, both optimisers, the
step and the history) the run makes the draws an uninterrupted one would have made.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from brainzoo.errors import BrainzooError
from brainzoo.fileio import atomic_output
from brainzoo.models.gan3d import gan3d_discriminator, gan3d_generator
from brainzoo.spec import Training, TrainingData
from brainzoo.training.engine import CHECKPOINT_DIR, TrainingPlan
from brainzoo.training.objectives import optimizer as make_optimizer
from brainzoo.training.pipeline import regression_volumes
from brainzoo.training.tfrecords import read_dataset

DISCRIMINATOR_FILE = "discriminator.h5"


def real_volumes(records, input_shape, plan: TrainingPlan, data: TrainingData, epoch: int) -> tf.data.Dataset:
    """Batches of real volumes for epoch ``epoch``: each scaled to [0, 1] by its own range (the upstream's
    ``MRIData``), centred on ``input_shape``; the records' targets are not used."""
    batches = regression_volumes(read_dataset(records), input_shape, targets=["label"],
                                 normalization=data.normalization, batch_size=plan.batch_size,
                                 shuffle_buffer=data.shuffle_buffer, seed=plan.seed + epoch,
                                 drop_remainder=True)
    return batches.map(lambda volume, _: volume).repeat()


def generated_pairs(generator: tf.keras.Model, first: int, count: int, *, batch_size: int, seed: int,
                    shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Batches ``(G(z_i), z_i)`` for pair indices ``first`` .. ``first + count - 1``, z_i ~ U(0, 1) seeded by
    (seed, i): a fixed set of pairs, as the upstream's 2000 saved ones, without holding the volumes in memory.
    ``shuffle_seed``: shuffle the pairs with it and drop a last partial batch (training)."""
    latent_size = generator.input_shape[-1]
    indices = tf.data.Dataset.range(first, first + count)
    if shuffle_seed is not None:
        indices = indices.shuffle(count, seed=shuffle_seed)
    latent_seed = tf.constant(seed, tf.int64)
    latents = indices.map(lambda i: tf.random.stateless_uniform([latent_size], tf.stack([latent_seed, i])))
    return (latents.batch(batch_size, drop_remainder=shuffle_seed is not None)
            .map(lambda z: (generator(z, training=False), z)).prefetch(tf.data.AUTOTUNE))


def train_gan(spec: dict, training: Training, train_records, out_dir: Path, plan: TrainingPlan,
              progress: bool = True) -> dict:
    """Train the generator a spec describes against a discriminator (``training.discriminator``: its options) on
    real volumes; write the generator (``model.h5``), the discriminator (``discriminator.h5``) and ``metrics.json``
    (mean losses per epoch) in ``out_dir``."""
    options = spec["architecture"].get("options", {})
    input_shape = list(training.data.input_shape)
    output_shape = list(options.get("output_shape", input_shape))
    if output_shape != input_shape:
        raise BrainzooError(f"training.data.input_shape {input_shape} differs from the generator's output_shape "
                            f"{output_shape}")
    skip_probability = float(plan.loss.get("generator_skip_probability", 0.0))
    tf.keras.utils.set_random_seed(plan.seed)
    generator = gan3d_generator(**{**options, "output_shape": input_shape})
    discriminator = gan3d_discriminator(input_shape=(*input_shape, 1), **training.discriminator)
    generator_optimizer = make_optimizer(plan.optimizer, plan.epochs, plan.steps_per_epoch)
    discriminator_optimizer = make_optimizer(plan.optimizer, plan.epochs, plan.steps_per_epoch)
    step_counter = tf.Variable(0, dtype=tf.int64, trainable=False)
    history_text = tf.Variable("[]", dtype=tf.string, trainable=False)
    checkpoint = tf.train.Checkpoint(generator=generator, discriminator=discriminator,
                                     generator_optimizer=generator_optimizer,
                                     discriminator_optimizer=discriminator_optimizer, step=step_counter,
                                     history=history_text)
    manager = tf.train.CheckpointManager(checkpoint, out_dir / CHECKPOINT_DIR, max_to_keep=2)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint)
    bce = tf.keras.losses.BinaryCrossentropy()
    latent_size = generator.input_shape[-1]

    @tf.function
    def train_step(real, step, update_generator: bool):
        z = tf.random.stateless_uniform([plan.batch_size, latent_size], tf.stack([tf.constant(plan.seed, tf.int64),
                                                                                  step]))
        with tf.GradientTape() as tape:
            fake = generator(z, training=True)
            generator_loss = bce(tf.ones([plan.batch_size, 1]), discriminator(fake, training=True))
        if update_generator:
            gradients = tape.gradient(generator_loss, generator.trainable_variables)
            generator_optimizer.apply_gradients(zip(gradients, generator.trainable_variables))
        with tf.GradientTape() as tape:
            real_loss = bce(tf.ones([plan.batch_size, 1]), discriminator(real, training=True))
            fake_loss = bce(tf.zeros([plan.batch_size, 1]), discriminator(tf.stop_gradient(fake), training=True))
            discriminator_loss = (real_loss + fake_loss) / 2
        gradients = tape.gradient(discriminator_loss, discriminator.trainable_variables)
        discriminator_optimizer.apply_gradients(zip(gradients, discriminator.trainable_variables))
        return discriminator_loss, generator_loss

    def generator_steps_at(step: int) -> bool:
        """The upstream's ``p > threshold`` draw, a function of (seed, step)."""
        return bool(np.random.default_rng([plan.seed, step]).uniform() >= skip_probability)

    history = json.loads(history_text.numpy().decode())
    step, total = int(step_counter.numpy()), plan.epochs * plan.steps_per_epoch
    started = time.perf_counter()
    bar = tqdm(total=total, initial=step, disable=not progress, desc="train GAN", unit="step")
    while step < total:
        epoch, offset = divmod(step, plan.steps_per_epoch)
        losses = []
        for real in real_volumes(train_records, input_shape, plan, training.data, epoch).skip(offset).take(
                plan.steps_per_epoch - offset):
            updated = generator_steps_at(step)
            d_loss, g_loss = train_step(real, tf.constant(step, tf.int64), updated)
            losses.append((float(d_loss), float(g_loss) if updated else np.nan))
            step += 1
            step_counter.assign(step)
            bar.update(1)
            if step % plan.checkpoint_every_steps == 0 and step % plan.steps_per_epoch:
                manager.save(checkpoint_number=step)
        d_losses, g_losses = np.array(losses).T
        history.append({"epoch": epoch + 1, "step": step, "discriminator_loss": float(d_losses.mean()),
                        "generator_loss": float(np.nanmean(g_losses)) if np.isfinite(g_losses).any() else None,
                        "generator_steps": int(np.isfinite(g_losses).sum())})
        history_text.assign(json.dumps(history))
        manager.save(checkpoint_number=step)
    bar.close()
    result = {"steps": step, "epochs": len(history), "seconds_this_run": round(time.perf_counter() - started, 3),
              "history": history}
    with atomic_output(out_dir / "model.h5", force=True) as tmp:
        generator.save(tmp, save_format="h5")
    with atomic_output(out_dir / DISCRIMINATOR_FILE, force=True) as tmp:
        discriminator.save(tmp, save_format="h5")
    with atomic_output(out_dir / "metrics.json", force=True) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    return result
