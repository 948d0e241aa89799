"""The 3-D GAN end to end at a small size: adversarial training from real TFRecords of synthetic heads, sampling
(`brainzoo generate`), an encoder trained on the generator's own pairs and scans mapped back to latents
(`brainzoo encode`).

Sizes are the architectures' smallest (16^3 volumes, 4 generator features, 8 latent values) so that each step
takes milliseconds; the full-size networks are checked against the original code in test_convert_gan3d.py.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
import yaml

from brainzoo.cli import main
from brainzoo.errors import BrainzooError
from brainzoo.model_files import load_keras_model
from brainzoo.predict.generative import (CODE_LAYER, LATENTS_NAME, SHEET_NAME, encode, generate,
                                         read_latents)
from brainzoo.training.run import train

SHAPE = [16, 16, 16]
LATENT_SIZE = 8
ADAM = {"name": "adam", "learning_rate": 0.002, "beta_1": 0.5, "beta_2": 0.999}


def write_spec(path, builder: str, options: dict, training: dict):
    """A spec holding what `brainzoo train` reads: the architecture and the training section."""
    path.write_text(yaml.safe_dump({"architecture": {"builder": builder, "options": options}, "training": training}))
    return path


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Twelve synthetic 16^3 heads: their folder of NIfTI files and their TFRecords."""
    from brainzoo.training.synthetic import write_synthetic_dataset
    from brainzoo.training.tfrecords import read_table, write_tfrecords

    root = tmp_path_factory.mktemp("heads")
    table = write_synthetic_dataset(root / "heads", 12, shape=SHAPE, seed=3)
    write_tfrecords(read_table(table, kind="regression"), root / "records", kind="regression", progress=False)
    return root / "heads", root / "records"


@pytest.fixture(scope="module")
def trained_gan(heads, tmp_path_factory):
    """A tiny GAN trained for two epochs on the heads' TFRecords; its run folder and metrics."""
    root = tmp_path_factory.mktemp("gan")
    spec = write_spec(root / "gan.yaml", "gan3d_generator",
                      {"latent_size": LATENT_SIZE, "n_features": 4, "output_shape": SHAPE},
                      {"data": {"kind": "regression", "input_shape": SHAPE, "normalization": "minmax"},
                       "discriminator": {"n_features": 4}, "loss": {"name": "adversarial-bce"}, "optimizer": ADAM,
                       "epochs": 2, "steps_per_epoch": 6, "batch_size": 2, "seed": 0})
    result = train(str(spec), heads[1], None, root / "run", progress=False)
    return root / "run", result


def test_adversarial_training_moves_both_losses(trained_gan):
    run, result = trained_gan
    first, second = result["history"]
    assert (first["generator_steps"], second["generator_steps"]) == (6, 6)
    assert second["discriminator_loss"] < first["discriminator_loss"]
    assert abs(second["generator_loss"] - first["generator_loss"]) > 0.01
    assert json.loads((run / "metrics.json").read_text())["history"] == result["history"]
    assert (run / "discriminator.h5").is_file()


@pytest.mark.parametrize("bound", [{"select": {"monitor": "val_loss"}}, {"max_steps": 3}])
def test_adversarial_training_refuses_epoch_selection_and_chunks(heads, tmp_path, bound):
    """A GAN's loop has no validation value to pick an epoch by, and does not stop mid-run: both are refused before
    any work, naming what to remove."""
    training = {"data": {"kind": "regression", "input_shape": SHAPE, "normalization": "minmax"},
                "loss": {"name": "adversarial-bce"}, "optimizer": ADAM, "epochs": 1, "steps_per_epoch": 1,
                "batch_size": 2, **({"select": bound["select"]} if "select" in bound else {})}
    spec = write_spec(tmp_path / "gan.yaml", "gan3d_generator",
                      {"latent_size": LATENT_SIZE, "n_features": 4, "output_shape": SHAPE}, training)

    with pytest.raises(BrainzooError, match="training.select" if "select" in bound else "--max-steps"):
        train(str(spec), heads[1], None, tmp_path / "run", progress=False, max_steps=bound.get("max_steps"))
    assert not (tmp_path / "run").exists()


def test_an_interrupted_gan_run_resumes_to_the_weights_of_an_uninterrupted_one(trained_gan, heads, tmp_path,
                                                                               monkeypatch):
    """Stopped (as by Ctrl-C) two steps into the second epoch, the run restarts from the first epoch's checkpoint
    and ends with the fixture's uninterrupted run's weights, to the bit."""
    from brainzoo.model_files import load_keras_model
    from brainzoo.training import adversarial

    run, _ = trained_gan

    class StopAfterEightSteps(adversarial.tqdm):
        """The progress bar the loop advances after each step (a disabled tqdm does not count, so this does)."""

        steps = 0

        def update(self, n=1):
            super().update(n)
            StopAfterEightSteps.steps += n
            if StopAfterEightSteps.steps == 8:
                raise KeyboardInterrupt

    monkeypatch.setattr(adversarial, "tqdm", StopAfterEightSteps)
    with pytest.raises(KeyboardInterrupt):
        train(str(run.parent / "gan.yaml"), heads[1], None, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model.h5").exists()
    monkeypatch.undo()
    result = train(str(run.parent / "gan.yaml"), heads[1], None, tmp_path / "run", progress=False)

    assert result["steps"] == 12 and result["seconds_this_run"] > 0
    for name in ("model.h5", "discriminator.h5"):
        resumed, straight = (load_keras_model(folder / name).get_weights() for folder in (tmp_path / "run", run))
        assert all(np.array_equal(a, b) for a, b in zip(resumed, straight, strict=True)), name


def test_generated_samples_have_the_declared_shape_and_range_and_follow_the_seed(trained_gan, tmp_path):
    run, _ = trained_gan
    record = generate(run / "model.h5", tmp_path / "a", n=3, seed=5)
    again = generate(run / "model.h5", tmp_path / "b", n=3, seed=5)

    assert record["shape"] == SHAPE and record["latent_size"] == LATENT_SIZE
    samples = [nib.load(tmp_path / "a" / name) for name in record["samples"]]
    volumes = np.stack([np.asarray(s.dataobj) for s in samples])
    assert volumes.shape == (3, *SHAPE) and 0 < volumes.min() and volumes.max() < 1
    assert np.abs(volumes[0] - volumes[1]).max() > 1e-3  # different latents, different volumes
    np.testing.assert_array_equal(volumes[2], np.asarray(nib.load(tmp_path / "b" / record["samples"][2]).dataobj))
    latents = read_latents(tmp_path / "a" / LATENTS_NAME)
    assert latents.shape == (3, LATENT_SIZE) and 0 <= latents.min() and latents.max() <= 1
    assert (tmp_path / "a" / SHEET_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_refuses_to_overwrite_samples_without_force(trained_gan, tmp_path, capsys):
    run, _ = trained_gan
    (tmp_path / "sample-001.nii.gz").write_bytes(b"earlier")

    assert main(["generate", str(run / "model.h5"), str(tmp_path), "--n", "2"]) == 1

    assert f"{tmp_path / 'sample-001.nii.gz'}: already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample-001.nii.gz"]
    assert (tmp_path / "sample-001.nii.gz").read_bytes() == b"earlier"


@pytest.fixture
def generator_of_two_latents(tmp_path):
    """A small generator whose output visibly depends on its two latent values: freshly initialised, its batch
    norms' statistics taken from its own outputs (as they stand once it has trained); saved as .h5."""
    import tensorflow as tf

    from brainzoo.models.gan3d import gan3d_generator

    tf.keras.utils.set_random_seed(0)
    generator = gan3d_generator(latent_size=2, n_features=4, output_shape=SHAPE)
    latents = np.random.default_rng(5).uniform(0, 1, (64, 2)).astype(np.float32)
    for _ in range(40):  # moving statistics converge at Keras' momentum 0.9
        generator(latents, training=True)
    generator.save(tmp_path / "generator.h5")
    return tmp_path / "generator.h5"


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_the_encoder_recovers_latents_of_generated_volumes_better_than_chance(generator_of_two_latents, tmp_path):
    """Trained on the generator's own (G(z), z) pairs, then run through `encode` on samples `generate` wrote: the
    mean squared error beats predicting the prior's mean (1/12 for U(0, 1) latents)."""
    spec = write_spec(tmp_path / "encoder.yaml", "gan3d_encoder", {"latent_size": 2, "base_channels": 4},
                      {"data": {"kind": "generated-pairs", "input_shape": SHAPE, "pairs": 440,
                                "validation_fraction": 0.05},
                       "loss": {"name": "mse"}, "optimizer": {"name": "adam", "learning_rate": 0.003},
                       "epochs": 1, "steps_per_epoch": 100, "batch_size": 4, "seed": 0})
    result = train(str(spec), str(generator_of_two_latents), None, tmp_path / "run", progress=False)
    generate(generator_of_two_latents, tmp_path / "samples", n=16, seed=11)
    record = encode(tmp_path / "run" / "model.h5", sorted((tmp_path / "samples").glob("sample-*.nii.gz")),
                    tmp_path / "latents.csv", preprocessed=True)

    assert record["scans"] == 16
    error = np.mean((read_latents(tmp_path / "latents.csv") - read_latents(tmp_path / "samples" / LATENTS_NAME))**2)
    assert error < 1 / 12
    assert result["val_mae"] < 0.25  # 1/4 for the prior's mean


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_the_mri_autoencoder_trains_on_reconstruction_and_encodes_to_its_bottleneck(heads, tmp_path):
    """Each volume its own target: two epochs lower the validation loss; `encode` gives the bottleneck's values."""
    folder, records = heads
    spec = write_spec(tmp_path / "autoencoder.yaml", "mri_autoencoder", {"n_features": 2, "bottleneck": 8},
                      {"data": {"kind": "reconstruction", "input_shape": SHAPE, "normalization": "minmax"},
                       "loss": {"name": "mse"}, "optimizer": {"name": "adam", "learning_rate": 0.01},
                       "epochs": 2, "steps_per_epoch": 6, "batch_size": 2, "seed": 0})
    result = train(str(spec), records, records, tmp_path / "run", progress=False)
    first, second = result["history"]
    assert second["val_loss"] < first["val_loss"]

    head = nib.load(folder / "sub-001_T1w.nii.gz")  # 14 mm voxels, which load_volume refuses: given 3 mm ones
    nib.Nifti1Image(np.asarray(head.dataobj), np.diag([3.0, 3.0, 3.0, 1.0])).to_filename(tmp_path / "head.nii.gz")
    record = encode(tmp_path / "run" / "model.h5", [tmp_path / "head.nii.gz"], tmp_path / "codes.csv",
                    preprocessed=True)
    assert record == {"model": str(tmp_path / "run" / "model.h5"), "runtime": record["runtime"], "scans": 1,
                      "latent_size": 8, "out": str(tmp_path / "codes.csv")}
    assert record["runtime"].startswith("onnxruntime ")  # the code layer taken as the ONNX graph's output
    trained = load_keras_model(tmp_path / "run" / "model.h5")
    bottleneck = tf.keras.Model(trained.input, trained.get_layer(CODE_LAYER).output)
    volume = np.asarray(nib.load(tmp_path / "head.nii.gz").dataobj, np.float32)[None, ..., None]
    np.testing.assert_allclose(read_latents(tmp_path / "codes.csv"), bottleneck(volume).numpy(), rtol=1e-4,
                               atol=1e-5)
    nib.Nifti1Image(np.ones((16, 16, 15), np.float32) + np.eye(16)[:, :, None][:, :, :15], np.eye(4)).to_filename(
        tmp_path / "other-grid.nii.gz")
    with pytest.raises(BrainzooError, match=f"{tmp_path / 'other-grid.nii.gz'}: is 16x16x15; without a catalogue "
                                            "version's preprocessing the encoder takes 16x16x16 volumes"):
        encode(tmp_path / "run" / "model.h5", [tmp_path / "other-grid.nii.gz"], tmp_path / "more.csv",
               preprocessed=True)
    assert not (tmp_path / "more.csv").exists()


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_the_sex_classifier_trains_on_the_records_sex_with_a_binary_logit(heads, tmp_path):
    """The sex-classifier version's training section at a small size: bce-logits on the records' sex (F 0, M 1),
    validation accuracy reported as a fraction of the scans."""
    _, records = heads
    spec = write_spec(tmp_path / "classifier.yaml", "gan3d_classifier", {"n_classes": 1},
                      {"data": {"kind": "regression", "input_shape": SHAPE, "targets": ["sex"],
                                "normalization": "minmax"},
                       "loss": {"name": "bce-logits"}, "optimizer": {"name": "adam", "learning_rate": 0.005},
                       "epochs": 2, "steps_per_epoch": 3, "batch_size": 4, "seed": 0})
    result = train(str(spec), records, records, tmp_path / "run", progress=False)

    assert [epoch["val_n"] for epoch in result["history"]] == [12, 12]
    for epoch in result["history"]:  # a whole number of the 12 scans right
        assert epoch["val_accuracy"] * 12 == pytest.approx(round(epoch["val_accuracy"] * 12), abs=1e-5)
    assert result["history"][1]["val_loss"] != result["history"][0]["val_loss"]
