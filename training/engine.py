"""The training loop: spec-driven, checkpointed, exactly resumable, and distributed.

Exact resumption rests on three facts. The data for epoch ``e`` is a pure function of ``(seed, e)``,
so after a restart the loop rebuilds that epoch and skips the batches already consumed. Model,
optimizer, step counter, learning rate, early-stopping state and the history are all in one
``tf.train.Checkpoint``, whose index file TensorFlow replaces atomically, so a ``kill -9`` at any
moment leaves the previous checkpoint usable. Random layers (dropout) draw from ``tf.random.Generator``
objects whose states are in the checkpoint too, so the draws after a restart are the ones an
uninterrupted run would have made.

A run can also be cut into chunks on purpose (a cron job, a cluster array with a wall-time limit): ``max_steps`` and
``time_budget_s`` end this call at the first step past the bound, with a checkpoint of that step, and the same call
again goes on from there; the chunks together give the weights of one uninterrupted run.

With a ``select`` setting the run keeps the weights of the epoch whose validation value was best, not the last (see
:class:`SelectedEpoch`); the best value and a copy of those weights are in the checkpoint too.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from brainzoo.errors import BrainzooError
from brainzoo.fileio import atomic_output
from brainzoo.outputs import AgeBins, OutputDecoding
from brainzoo.training.objectives import Objective, metric_of, optimizer as make_optimizer

CHECKPOINT_DIR = "checkpoints"


@dataclass(frozen=True)
class TrainingPlan:
    """The parts of a spec's ``training`` section that drive the loop, with the age bins (``inference.output.bins``)
    that an ``sfcn-kl`` loss's soft labels lie on."""

    epochs: int
    steps_per_epoch: int
    batch_size: int
    loss: dict
    optimizer: dict
    seed: int = 0
    checkpoint_every_steps: int = 50
    early_stopping: dict | None = None
    select: dict | None = None
    precise_bn_batches: int = 0
    bins: AgeBins | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: dict, **overrides) -> "TrainingPlan":
        """The plan of a whole spec (its ``training`` section and output); ``overrides`` (not None) win."""
        training = spec["training"]
        merged = {**training, **{k: v for k, v in overrides.items() if v is not None}}
        known = {k: v for k, v in merged.items() if k in cls.__dataclass_fields__ and k not in ("bins", "extra")}
        missing = {"epochs", "steps_per_epoch", "batch_size", "loss", "optimizer"} - known.keys()
        if missing:
            raise BrainzooError(f"training: missing {', '.join(sorted(missing))}")
        output = spec.get("inference", {}).get("output")
        bins = OutputDecoding.from_spec(output).bins if output else None
        return cls(**known, bins=bins, extra={k: v for k, v in training.items() if k not in cls.__dataclass_fields__})

    def __post_init__(self):
        problems = monitor_problems({"loss": self.loss, "early_stopping": self.early_stopping, "select": self.select})
        if problems:
            raise BrainzooError("; ".join(problems))

    @property
    def objective(self) -> Objective:
        return Objective(self.loss, self.bins)

    def check_validation(self, validation_data: Callable[[], tf.data.Dataset] | None) -> None:
        """A run that selects its epoch needs validation data; said before the run starts, not after its end."""
        if self.select is not None and validation_data is None:
            raise BrainzooError("training.select: selects the epoch by its validation value, and this run has no "
                                "validation data (brainzoo train --validation RECORDS)")


def monitored(setting: dict | None, loss: dict) -> str:
    """The validation value an ``early_stopping`` or ``select`` setting watches: its ``monitor``, by default the
    loss's metric (``val_mae``, ``val_dice`` or ``val_accuracy``)."""
    return (setting or {}).get("monitor", f"val_{metric_of(loss.get('name'))}")


def monitor_problems(training: dict) -> list[str]:
    """Each monitored value must be one that an epoch's validation reports (``val_loss`` or the loss's metric): a
    misspelt name would never stop the run or select an epoch."""
    loss = training.get("loss") or {}
    values = ("val_loss", monitored(None, loss))
    return [f"training.{key}.monitor: {monitored(training[key], loss)!r} is not a validation value of loss "
            f"{loss.get('name')} ({' or '.join(values)})"
            for key in ("early_stopping", "select")
            if training.get(key) is not None and monitored(training[key], loss) not in values]


def higher_is_better(monitor: str) -> bool:
    return monitor.endswith(("dice", "accuracy"))


class SelectedEpoch(tf.Module):
    """The epoch whose validation ``monitor`` was best so far (the first of equals) and a copy of all the model's
    weights at its end, moving statistics included; the checkpoint holds it, so a resumed or chunked run selects the
    epoch, with the weights bit for bit, that an uninterrupted run would.

    The run's model.h5 then holds these weights, not the last epoch's: ``brainzoo evaluate``, ``transfer``,
    ``--init-weights`` and a catalogue version all read model.h5, and what the validation set selected is the
    model meant for them; the last epoch's validation value stays in metrics.json (``selection``, ``history``).
    """

    def __init__(self, model: tf.keras.Model, monitor: str):
        super().__init__(name="selected_epoch")
        self.monitor = monitor
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.score = tf.Variable(np.inf, dtype=tf.float64, trainable=False)  # the value, negated if higher is better
        self.copies = [tf.Variable(tf.zeros(weight.shape, weight.dtype), trainable=False) for weight in model.weights]

    def update(self, record: dict, model: tf.keras.Model) -> None:
        """Keep this epoch's weights if its value beats the best so far (a NaN never does)."""
        score = record[self.monitor] * (-1 if higher_is_better(self.monitor) else 1)
        if score < float(self.score.numpy()):
            self.epoch.assign(record["epoch"])
            self.score.assign(score)
            for copy, weight in zip(self.copies, model.weights):
                copy.assign(weight)

    def restore(self, model: tf.keras.Model) -> None:
        """Put the selected epoch's weights into the model."""
        if not int(self.epoch.numpy()):
            raise BrainzooError(f"training.select: no epoch's {self.monitor} was a number, so none was selected; the "
                                "run's checkpoints hold its last weights")
        for weight, copy in zip(model.weights, self.copies):
            weight.assign(copy)

    def summary(self, history: list[dict]) -> dict:
        """The selected epoch and its value, with the last epoch's for comparison; empty before any selection."""
        epoch = int(self.epoch.numpy())
        if not epoch:
            return {}
        return {"monitor": self.monitor, "epoch": epoch, "value": history[epoch - 1][self.monitor],
                "last_epoch": history[-1]["epoch"], "last_value": history[-1][self.monitor]}


def strategy_from_environment() -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy when TF_CONFIG names a cluster, else MirroredStrategy on this machine."""
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.MirroredStrategy()


def is_chief() -> bool:
    config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    task = config.get("task", {})
    return task.get("type", "chief") == "chief" or (task.get("type") == "worker" and task.get("index", 0) == 0
                                                     and "chief" not in config.get("cluster", {}))


def worker_dir(out_dir: Path) -> Path:
    """Non-chief workers must write checkpoints too (collectives), but to a private scratch folder."""
    if is_chief():
        return out_dir
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    return out_dir / f".worker-{task['type']}-{task['index']}"


def random_generators(model: tf.keras.Model) -> list[tf.random.Generator]:
    """The generators behind the model's random layers, created now so the checkpoint can hold them."""
    generators = []
    for layer in model.submodules:
        keras_rng = getattr(layer, "_random_generator", None)
        if keras_rng is not None and hasattr(keras_rng, "_maybe_init"):
            keras_rng._maybe_init()
            if getattr(keras_rng, "_generator", None) is not None:
                generators.append(keras_rng._generator)
    return generators


def batch_norm_probe(model: tf.keras.Model) -> tuple[list, tf.keras.Model | None]:
    """The trainable BatchNorm layers of a functional model, and a model that outputs their inputs."""
    layers = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization) and layer.trainable]
    return layers, (tf.keras.Model(model.inputs, [layer.input for layer in layers]) if layers else None)


def fit(build_model: Callable[[], tf.keras.Model], train_data: Callable[[int], tf.data.Dataset],
        validation_data: Callable[[], tf.data.Dataset] | None, plan: TrainingPlan, out_dir: Path,
        strategy: tf.distribute.Strategy | None = None, progress: bool = True, *, max_steps: int | None = None,
        time_budget_s: float | None = None) -> dict:
    """Train (or resume) into ``out_dir``; returns the final metrics record (also in metrics.json).

    ``train_data(epoch)`` yields ``(x, y)`` batches of the *global* batch size for that epoch and must
    be deterministic given the epoch; ``validation_data()`` likewise, or None.

    ``max_steps`` (at least 1) and ``time_budget_s`` (counted from this call, model building included) bound this
    call: after the step that reaches either, it checkpoints (the epoch's end first, when the step ends an epoch) and
    returns a record with ``finished`` false, writing neither model.h5 nor metrics.json. Every call takes at least one
    step. A time budget needs a single worker: workers would stop at different steps.

    With ``plan.select`` the record's ``val_*`` values are those of the selected epoch, whose weights model.h5 holds,
    and ``selection`` names that epoch (see :class:`SelectedEpoch`); otherwise they are the last epoch's.
    """
    entered = time.perf_counter()
    plan.check_validation(validation_data)
    if max_steps is not None and max_steps < 1:
        raise BrainzooError(f"max_steps must be at least 1, got {max_steps}")
    if time_budget_s is not None and (time_budget_s < 0 or os.environ.get("TF_CONFIG")):
        raise BrainzooError("a time budget must be 0 or more seconds, and is for one worker (TF_CONFIG names a "
                            "cluster, whose workers would stop at different steps; use max_steps)")
    strategy = strategy or strategy_from_environment()
    out_dir = Path(out_dir)
    scratch = worker_dir(out_dir)
    scratch.mkdir(parents=True, exist_ok=True)
    objective = plan.objective
    l2 = float(plan.optimizer.get("l2", 0.0))
    total_steps = plan.epochs * plan.steps_per_epoch

    with strategy.scope():
        tf.keras.backend.experimental.enable_tf_random_generator()
        tf.keras.utils.set_random_seed(plan.seed)
        model = build_model()
        generators = random_generators(model)
        opt = make_optimizer(plan.optimizer, plan.epochs, plan.steps_per_epoch)
    # Loop bookkeeping stays outside the strategy: each worker keeps its own (identical) copy.
    state = {
        "step": tf.Variable(0, dtype=tf.int64, trainable=False),
        "best": tf.Variable(np.inf, dtype=tf.float64, trainable=False),
        "epochs_without_improvement": tf.Variable(0, dtype=tf.int64, trainable=False),
        "history": tf.Variable("[]", dtype=tf.string, trainable=False),
    }
    selected = SelectedEpoch(model, monitored(plan.select, plan.loss)) if plan.select is not None else None
    checkpoint = tf.train.Checkpoint(model=model, optimizer=opt, rng=generators, **state,
                                     **({"selected": selected} if selected is not None else {}))
    manager = tf.train.CheckpointManager(checkpoint, scratch / CHECKPOINT_DIR, max_to_keep=2)
    latest = tf.train.latest_checkpoint(out_dir / CHECKPOINT_DIR)  # every worker resumes from the chief's
    if latest:
        checkpoint.restore(latest).expect_partial()
    history = json.loads(state["history"].numpy().decode())

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            per_example = objective.per_example_loss(y, pred)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=plan.batch_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        grads = tape.gradient(loss, model.trainable_variables)
        if l2:  # torch.optim's weight_decay: added to the gradient, so Adam rescales it (Keras's is decoupled)
            grads = [grad + l2 * variable for grad, variable in zip(grads, model.trainable_variables)]
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def distributed_train_step(x, y):
        losses = strategy.run(train_step, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    bn_layers, bn_probe = batch_norm_probe(model) if plan.precise_bn_batches else ([], None)

    @tf.function
    def bn_moments_step(x):
        def replica(x):
            inputs = bn_probe(x, training=True)
            moments = [tf.nn.moments(t, axes=list(range(len(t.shape) - 1))) for t in inputs]
            return [(mean, variance + tf.square(mean)) for mean, variance in moments]
        per_replica = strategy.run(replica, args=(x,))
        return tf.nest.map_structure(lambda t: strategy.reduce(tf.distribute.ReduceOp.MEAN, t, axis=None), per_replica)

    def precise_batch_norm(epoch: int) -> None:
        """Set the moving statistics to those of ``precise_bn_batches`` training batches at the current weights.

        (PreciseBN, Wu & Johnson 2021.) The moving averages mix statistics of weights that have since changed and,
        where a layer normalises few values per batch (SFCN's last block is 1^3 at small inputs, so batch-size
        values per channel), they can be far enough off to make the validation metric and the saved model much
        worse than the weights are.
        """
        batches = strategy.experimental_distribute_dataset(train_data(epoch).take(plan.precise_bn_batches))
        per_batch = [bn_moments_step(x) for x, _ in batches]
        for index, layer in enumerate(bn_layers):
            mean, square = (np.mean([np.asarray(moments[index][k], np.float64) for moments in per_batch], axis=0)
                            for k in (0, 1))
            layer.moving_mean.assign(mean.astype(np.float32))
            layer.moving_variance.assign(np.maximum(square - mean**2, 0.0).astype(np.float32))

    @tf.function
    def eval_step(x, y):
        pred = model(x, training=False)
        return objective.per_example_metric(y, pred), objective.per_example_loss(y, pred)

    def evaluate() -> dict:
        if validation_data is None:
            return {}
        metrics, losses = [], []
        for x, y in validation_data():
            m, l = eval_step(x, y)
            metrics.append(m.numpy())
            losses.append(l.numpy())
        metrics, losses = np.concatenate(metrics), np.concatenate(losses)
        return {f"val_{objective.metric}": float(metrics.mean()), "val_loss": float(losses.mean()), "val_n": int(len(metrics))}

    writer = tf.summary.create_file_writer(str(scratch / "tensorboard"))
    monitor = monitored(plan.early_stopping, plan.loss)
    step = int(state["step"].numpy())
    patience = (plan.early_stopping or {}).get("patience")
    # A run that stopped early stays stopped when called again (a chunked run's next call, say).
    stopped_early = patience is not None and int(state["epochs_without_improvement"].numpy()) >= patience
    steps_this_run, paused = 0, False

    def chunk_over() -> bool:
        return ((max_steps is not None and steps_this_run >= max_steps)
                or (time_budget_s is not None and time.perf_counter() - entered >= time_budget_s))

    bar = tqdm(total=total_steps, initial=step, disable=not progress, desc="train", unit="step")
    started = time.perf_counter()
    while step < total_steps and not stopped_early and not paused:
        epoch, offset = divmod(step, plan.steps_per_epoch)
        batches = train_data(epoch).skip(offset).take(plan.steps_per_epoch - offset)
        for x, y in strategy.experimental_distribute_dataset(batches):
            loss = float(distributed_train_step(x, y))
            step += 1
            steps_this_run += 1
            state["step"].assign(step)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
            with writer.as_default(step=step):
                tf.summary.scalar("loss", loss)
            if step % plan.steps_per_epoch:
                paused = chunk_over()
                if paused or step % plan.checkpoint_every_steps == 0:
                    manager.save(checkpoint_number=step)
                if paused:
                    break
        if paused:
            break
        if step % plan.steps_per_epoch:
            raise BrainzooError(f"training data for epoch {epoch} ended after {step % plan.steps_per_epoch} of "
                                f"{plan.steps_per_epoch} steps; use fewer steps_per_epoch or repeat the data")
        if bn_layers:
            precise_batch_norm(epoch)
        record = {"epoch": epoch + 1, "step": step, "loss": loss, **evaluate()}
        with writer.as_default(step=step):
            for key, value in record.items():
                if key.startswith("val_") and key != "val_n":
                    tf.summary.scalar(key, value)
        history.append(record)
        stopped_early = _early_stopping_and_plateau(record, plan, state, opt, monitor)
        if selected is not None:
            selected.update(record, model)
        state["history"].assign(json.dumps(history))
        manager.save(checkpoint_number=step)
        paused = step < total_steps and not stopped_early and chunk_over()
    bar.close()
    writer.flush()

    selection = selected.summary(history) if selected is not None else {}
    kept = history[selection["epoch"] - 1] if selection else (history[-1] if history else {})
    result = {"steps": step, "planned_steps": total_steps, "epochs": len(history), "stopped_early": stopped_early,
              "finished": not paused, "steps_this_run": steps_this_run,
              "seconds_this_run": round(time.perf_counter() - started, 3), "history": history,
              **{k: v for k, v in kept.items() if k.startswith("val_")},
              **({"selection": selection} if selection else {})}
    if paused:  # a chunk: its checkpoint is the output; the same call again goes on from it
        if not is_chief():
            shutil.rmtree(scratch)
        return result
    if selected is not None:  # after the last checkpoint, which keeps the last weights
        selected.restore(model)
    with atomic_output(scratch / "model.h5", force=True) as tmp:
        model.save(tmp, save_format="h5")  # every worker takes part in reading mirrored variables
    if is_chief():
        with atomic_output(out_dir / "metrics.json", force=True) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
    else:
        shutil.rmtree(scratch)
    return result


def _early_stopping_and_plateau(record: dict, plan: TrainingPlan, state: dict, opt: tf.keras.optimizers.Optimizer,
                                monitor: str) -> bool:
    """Update the best value, halve the learning rate on a plateau, say whether to stop."""
    if monitor not in record:
        return False
    value = record[monitor] * (-1 if higher_is_better(monitor) else 1)
    if value < float(state["best"].numpy()):
        state["best"].assign(value)
        state["epochs_without_improvement"].assign(0)
        return False
    state["epochs_without_improvement"].assign_add(1)
    waited = int(state["epochs_without_improvement"].numpy())
    schedule = plan.optimizer.get("schedule", {})
    if schedule.get("name") == "plateau" and waited % schedule.get("patience", 10) == 0:
        opt.learning_rate.assign(opt.learning_rate * schedule.get("factor", 0.5))
    patience = (plan.early_stopping or {}).get("patience")
    return patience is not None and waited >= patience
