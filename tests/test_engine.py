"""The training loop: it learns, checkpoints, resumes exactly after kill -9, and runs multi-worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

# A driver that trains a tiny SFCN (dropout on) on fixed random data; the test runs it as a process
# so that it can be killed. argv: out_dir epochs
DRIVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    import tensorflow as tf
    from brainzoo.models import sfcn
    from brainzoo.outputs import AgeBins
    from brainzoo.training.engine import TrainingPlan, fit

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 32, 32, 32, 1)).astype("float32")
    ages = rng.uniform(20, 60, 8).astype("float32")

    def train_data(epoch):
        order = np.random.default_rng(100 + epoch).permutation(8)
        return tf.data.Dataset.from_tensor_slices((x[order], ages[order])).batch(2)

    def validation_data():
        return tf.data.Dataset.from_tensor_slices((x[:4], ages[:4])).batch(2)

    plan = TrainingPlan(epochs=int(sys.argv[2]), steps_per_epoch=4, batch_size=2, seed=3, checkpoint_every_steps=1,
                        loss={"name": "sfcn-kl"}, bins=AgeBins(15, 65, 5),
                        optimizer={"name": "sgd", "learning_rate": 0.01, "momentum": 0.9})
    build = lambda: sfcn((32, 32, 32, 1), channels=(4, 4, 4, 4, 4, 4), n_bins=10, dropout=0.5)
    fit(build, train_data, validation_data, plan, Path(sys.argv[1]), progress=False)
""")


def run_driver(tmp_path, out, epochs, env=None, log="driver.log"):
    """Start the driver; its output goes to a file (a full pipe would stall a worker mid-collective)."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    with open(tmp_path / log, "w") as output:
        return subprocess.Popen([sys.executable, str(script), str(out), str(epochs)], env=env,
                                stdout=output, stderr=subprocess.STDOUT, text=True)


def finished(process, tmp_path, log="driver.log") -> None:
    assert process.wait(timeout=600) == 0, (tmp_path / log).read_text()[-3000:]


def final_weights(out) -> dict[str, np.ndarray]:
    weights = {}
    with h5py.File(out / "model.h5") as f:
        f["model_weights"].visititems(lambda name, obj: weights.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return weights


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    finished(run_driver(tmp_path, tmp_path / "straight", epochs=3), tmp_path)

    interrupted = run_driver(tmp_path, tmp_path / "interrupted", epochs=3)
    checkpoints = tmp_path / "interrupted" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoints.glob("ckpt-6.index")):
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()
    assert not (tmp_path / "interrupted" / "model.h5").exists()
    finished(run_driver(tmp_path, tmp_path / "interrupted", epochs=3), tmp_path)

    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "interrupted")
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    metrics = json.loads((tmp_path / "interrupted" / "metrics.json").read_text())
    assert metrics["steps"] == 12 and [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert all(np.isfinite([h["loss"], h["val_loss"], h["val_mae"]]).all() for h in metrics["history"])
    assert all(np.isfinite(w).all() for w in a.values())
    assert (tmp_path / "straight" / "tensorboard").is_dir()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_workers_on_loopback_train_with_multiworker_mirrored_strategy(tmp_path):
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        workers.append(run_driver(tmp_path, tmp_path / "cluster", epochs=1, env=env, log=f"worker{index}.log"))
    for index, worker in enumerate(workers):
        finished(worker, tmp_path, log=f"worker{index}.log")
    metrics = json.loads((tmp_path / "cluster" / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert (tmp_path / "cluster" / "model.h5").is_file()


def _chunked_fit(out, learning_rate=1e-3, early_stopping=None, select=None, epochs=3, **bounds) -> dict:
    """A tiny regression network with dropout, 3 epochs of 4 steps, trained in this process (named layers, so that
    model.h5 of two runs compares by name)."""
    import tensorflow as tf
    from brainzoo.training.engine import TrainingPlan, fit

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 8, 8, 8, 1)).astype("float32")
    y = rng.uniform(20, 60, (8, 1)).astype("float32")

    def train_data(epoch):
        order = np.random.default_rng(100 + epoch).permutation(8)
        return tf.data.Dataset.from_tensor_slices((x[order], y[order])).batch(2)

    def build():
        inputs = tf.keras.Input((8, 8, 8, 1), name="volume")
        h = tf.keras.layers.Conv3D(4, 3, strides=2, activation="relu", name="conv")(inputs)
        h = tf.keras.layers.Dropout(0.5, name="dropout")(tf.keras.layers.GlobalAveragePooling3D(name="pool")(h))
        return tf.keras.Model(inputs, tf.keras.layers.Dense(1, name="dense")(h), name="tiny")

    plan = TrainingPlan(epochs=epochs, steps_per_epoch=4, batch_size=2, seed=3, checkpoint_every_steps=100,
                        loss={"name": "mse"}, early_stopping=early_stopping, select=select,
                        optimizer={"name": "sgd", "learning_rate": learning_rate, "momentum": 0.9})
    validation = lambda: tf.data.Dataset.from_tensor_slices((x[:4], y[:4])).batch(2)
    return fit(build, train_data, validation, plan, out, tf.distribute.get_strategy(), progress=False, **bounds)


def test_a_run_in_chunks_of_steps_or_time_ends_with_the_weights_of_one_uninterrupted_run(tmp_path):
    straight = _chunked_fit(tmp_path / "straight")
    assert straight["finished"] and straight["steps"] == 12
    chunks = []
    while not (tmp_path / "chunked" / "model.h5").exists() and len(chunks) < 10:
        chunks.append(_chunked_fit(tmp_path / "chunked", max_steps=5))
        if not chunks[-1]["finished"]:
            assert not (tmp_path / "chunked" / "metrics.json").exists()
    # 5 steps (mid epoch 2, checkpointed there although checkpoint_every_steps is 100), 10 (mid epoch 3), 12: done.
    assert [(c["steps"], c["steps_this_run"], c["finished"]) for c in chunks] == [(5, 5, False), (10, 5, False),
                                                                              (12, 2, True)]
    assert [h["step"] for h in chunks[1]["history"]] == [4, 8]
    expected, chunked = final_weights(tmp_path / "straight"), final_weights(tmp_path / "chunked")
    assert expected.keys() == chunked.keys() and len(expected) == 4
    for name in expected:
        np.testing.assert_array_equal(expected[name], chunked[name], err_msg=name)
    assert json.loads((tmp_path / "chunked" / "metrics.json").read_text())["history"] == straight["history"]

    # A time budget of 0 s: each call takes one step; an epoch's last step ends it after the epoch's checkpoint.
    timed = [_chunked_fit(tmp_path / "timed", time_budget_s=0) for _ in range(4)]
    assert [(t["steps"], len(t["history"]), t["finished"]) for t in timed] == [(1, 0, False), (2, 0, False),
                                                                              (3, 0, False), (4, 1, False)]
    again = _chunked_fit(tmp_path / "chunked", max_steps=5)  # a finished run called again: nothing more to train
    assert again["finished"] and again["steps"] == 12 and again["steps_this_run"] == 0
    np.testing.assert_array_equal(final_weights(tmp_path / "chunked")["dense/dense/kernel:0"],
                                  expected["dense/dense/kernel:0"])
    with pytest.raises(Exception, match="at least 1"):
        _chunked_fit(tmp_path / "bad", max_steps=0)


def test_a_run_that_stopped_early_stays_stopped_when_called_again(tmp_path):
    """Learning rate 0: the validation loss of epoch 2 is no better than epoch 1's, so patience 1 stops the run at
    step 8 of 12; a cron job's next call must not train a third epoch."""
    stop = {"patience": 1}
    first = _chunked_fit(tmp_path, learning_rate=0.0, early_stopping=stop)
    assert first["stopped_early"] and first["finished"] and first["steps"] == 8
    again = _chunked_fit(tmp_path, learning_rate=0.0, early_stopping=stop, max_steps=1)
    assert again["stopped_early"] and again["steps"] == 8 and again["steps_this_run"] == 0
    assert again["history"] == first["history"]


def test_select_keeps_the_best_validation_epochs_weights_also_when_run_in_chunks(tmp_path):
    """Learning rate 5e-3 over 5 epochs: the validation MAE is best after epoch 2, worse after each later epoch.
    model.h5 must hold the weights at the end of epoch 2 (those of a 2-epoch run, bit for bit, since the learning rate
    is constant), not the last epoch's; a run in chunks of 7 steps (cut mid epoch 2 and mid epoch 4, so the copy
    of epoch 2's weights crosses a restart) must select the same epoch with the same weights."""
    select = {"monitor": "val_mae"}
    straight = _chunked_fit(tmp_path / "straight", learning_rate=5e-3, select=select, epochs=5)
    history = straight["history"]
    assert min(history, key=lambda epoch: epoch["val_mae"])["epoch"] == 2 and len(history) == 5
    expected = {"monitor": "val_mae", "epoch": 2, "value": history[1]["val_mae"], "last_epoch": 5,
                "last_value": history[4]["val_mae"]}
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert straight["selection"] == metrics["selection"] == expected
    assert (metrics["val_mae"], metrics["val_loss"]) == (history[1]["val_mae"], history[1]["val_loss"])

    _chunked_fit(tmp_path / "two-epochs", learning_rate=5e-3, epochs=2)
    selected, two_epochs = final_weights(tmp_path / "straight"), final_weights(tmp_path / "two-epochs")
    assert selected.keys() == two_epochs.keys() and len(selected) == 4
    for name in selected:
        np.testing.assert_array_equal(selected[name], two_epochs[name], err_msg=name)

    chunks = []
    while not (tmp_path / "chunked" / "model.h5").exists() and len(chunks) < 5:
        chunks.append(_chunked_fit(tmp_path / "chunked", learning_rate=5e-3, select=select, epochs=5, max_steps=7))
    assert [(chunk["steps"], chunk.get("selection", {}).get("epoch")) for chunk in chunks] == [(7, 1), (14, 2),
                                                                                            (20, 2)]
    chunked = final_weights(tmp_path / "chunked")
    for name in selected:
        np.testing.assert_array_equal(selected[name], chunked[name], err_msg=name)
    chunked_metrics = json.loads((tmp_path / "chunked" / "metrics.json").read_text())
    assert (chunked_metrics["selection"], chunked_metrics["history"]) == (expected, history)


def test_select_needs_validation_data_and_a_monitor_that_validation_reports():
    import tensorflow as tf
    from brainzoo.errors import BrainzooError
    from brainzoo.training.engine import TrainingPlan, fit

    with pytest.raises(BrainzooError, match=r"training.select.monitor: 'val_dice' is not a validation value of loss "
                                            r"mse \(val_loss or val_mae\)"):
        TrainingPlan(epochs=1, steps_per_epoch=1, batch_size=1, loss={"name": "mse"}, optimizer={"name": "sgd"},
                     select={"monitor": "val_dice"})
    plan = TrainingPlan(epochs=1, steps_per_epoch=1, batch_size=1, loss={"name": "dice"}, optimizer={"name": "sgd"},
                        select={"monitor": "val_dice"})
    with pytest.raises(BrainzooError, match="no validation data .*--validation"):
        fit(lambda: None, lambda epoch: tf.data.Dataset.range(1), None, plan, "unused")
