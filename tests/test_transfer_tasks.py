"""`brainzoo transfer` to new tasks: a brain-extraction U-Net moved to a new label set (a synthetic two-class lesion
task), its head re-initialised and its encoder frozen; a FLAIR-Brain-Age SFCN fine-tuned on a new cohort with its
age-bias correction fitted on held-out scans. Each new version folder's spec and card pass the schemas."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import REPO, load_fixture, seeded_state_dict, write_index, write_version

from brainzoo import validate
from brainzoo.errors import BrainzooError
from brainzoo.spec import Inference, Training
from brainzoo.training import run

SOURCE = "neuronets/unet-student/0.1.0"
DEST = "neuronets/unet-lesions/1.0.0"
FLAIR_SFCN = "neuronets/flair-brainage-sfcn/1.0.0/flair"
COHORT = "neuronets/flair-brainage-sfcn-cohort/1.0.0"
SHAPE = (24, 24, 24)
SPACING = 2.0
# The stand-in student is random, its encoder frozen: 5 of the 6 seeds tried (0-5) learn the lesions past the
# bar below, seed 4 does not; the seed is fixed so the test asks one question every run.
STUDENT_SEED = 0


def student_version(root: Path, model_file: Path) -> None:
    """brainzoo-unet 0.5.0's spec at a reduced size (8 base filters -> 4; batch normalisation, since instance
    normalisation's graph alone takes 10 s to build; 96^3 blocks -> 16^3 tiles of a 24^3 grid), its weights a
    freshly built student's."""
    import tensorflow as tf

    from brainzoo.models.unet import unet

    spec = yaml.safe_load((REPO / "neuronets" / "brainzoo-unet" / "0.5.0" / "spec.yaml").read_text())
    card = yaml.safe_load((REPO / "neuronets" / "brainzoo-unet" / "0.5.0" / "model_card.yaml").read_text())
    spec.update(id=SOURCE, model="unet-student", version="0.1.0")
    spec["architecture"]["options"] = {"base_filters": 4, "norm": "batch"}
    spec["inference"]["entry_point"]["options"]["model"]["default"] = SOURCE
    spec["inference"]["input"] = {"contrast": ["T1w"], "orientation": "RAS", "spacing_mm": [SPACING] * 3,
                                  "shape": list(SHAPE), "block_shape": [16, 16, 16], "channels": 1}
    spec["training"].pop("stages")
    spec["training"]["data"].update(block_shape=[16, 16, 16], sampling="random", augmentation=None, shuffle_buffer=0)
    spec["training"]["optimizer"] = {"name": "adam", "learning_rate": 0.01}
    spec["weights"] = [{"name": "model", "path": "weights/model.h5", "format": "keras-h5",
                        "sources": [{"type": "inrepo-store"}]}]
    card["Model_details"]["Model_version"] = "0.1.0"
    tf.keras.utils.set_random_seed(STUDENT_SEED)  # the same student every run: what it learns must not be luck
    unet(input_shape=(16, 16, 16, 1), **spec["architecture"]["options"]).save(model_file, save_format="h5")
    write_version(root, spec, card, weights={"weights/model.h5": model_file.read_bytes()})


def lesion_scan(rng) -> tuple[np.ndarray, np.ndarray]:
    """A textured head-like volume with two bright spherical lesions and their label volume (1 inside)."""
    grid = np.indices(SHAPE)
    label = np.zeros(SHAPE, np.uint8)
    for _ in range(2):
        centre = rng.uniform(6, 18, 3)[:, None, None, None]
        label[np.sqrt(((grid - centre) ** 2).sum(axis=0)) < rng.uniform(4, 6)] = 1
    volume = rng.normal(100, 10, SHAPE) + 120 * label
    return volume.astype(np.float32), label


def lesion_records(folder: Path, n: int, seed: int) -> Path:
    from brainzoo.training.tfrecords import write_tfrecords

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = ["path,label,age,sex"]
    for index in range(n):
        volume, label = lesion_scan(rng)
        affine = np.diag([SPACING] * 3 + [1.0])
        nib.save(nib.Nifti1Image(volume, affine), folder / f"scan-{index}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / f"lesions-{index}.nii.gz")
        lines.append(f"scan-{index}.nii.gz,lesions-{index}.nii.gz,50,0")
    (folder / "table.csv").write_text("\n".join(lines) + "\n")
    write_tfrecords(folder / "table.csv", folder / "records", kind="segmentation", progress=False)
    return folder / "records"


def layer_weights(model_file: Path, layer: str) -> list[np.ndarray]:
    with h5py.File(model_file) as f:
        group = f["model_weights"][layer]
        return [group[name][()] for name in group.attrs["weight_names"]]


def catalogue_of(write_source, tmp_path: Path, monkeypatch) -> Path:
    """A catalogue folder (plain files, the current one for brainzoo) holding the version ``write_source`` writes,
    its weights also saved at ``tmp_path/source.h5``."""
    root = tmp_path / "zoo"
    (root / "neuronets").mkdir(parents=True)
    write_source(root, tmp_path / "source.h5")
    write_index(root)
    monkeypatch.setenv("BRAINZOO_ROOT", str(root))
    return root


def test_a_student_moves_to_a_lesion_label_set(tmp_path, monkeypatch):
    root = catalogue_of(student_version, tmp_path, monkeypatch)
    train = lesion_records(tmp_path / "train", 4, seed=0)
    validation = lesion_records(tmp_path / "validation", 2, seed=1)
    labels = tmp_path / "labels.csv"
    labels.write_text("value,label\n0,background\n1,lesion\n")
    names = run.label_names(2, str(labels))

    record = run.transfer(SOURCE, train, validation, DEST, options={"labels": names, "label_table": str(labels)},
                          freeze_epochs=2, trainable=["dec*", "head_*"], root=root, progress=False, epochs=2,
                          steps_per_epoch=10, batch_size=2)
    assert (record["status"], record["path"]) == ("ok", DEST)

    dest = root / DEST
    spec = yaml.safe_load((dest / "spec.yaml").read_text())
    card = yaml.safe_load((dest / "model_card.yaml").read_text())
    assert spec["task"] == "segmentation" and spec["architecture"]["options"]["n_classes"] == 2
    assert spec["inference"]["output"] == {"type": "label-map", "classes": [{"label": "background"},
                                                                            {"label": "lesion"}]}
    assert spec["training"]["loss"]["classes"] == 2 and spec["training"]["transferred_from"]["id"] == SOURCE
    assert not list(validate.spec_problems(spec, Path("spec.yaml"), dest))
    assert not list(validate.schema_problems("card", card, Path("model_card.yaml")))
    assert f"--labels {labels}" in card["Metrics"][0]["command"]

    new, old = dest / "weights" / "model.h5", tmp_path / "source.h5"
    assert layer_weights(new, "head_conv")[0].shape[-1] == 2  # a new two-class head
    for layer in ("enc1_1_conv", "bottom_2_conv"):  # the encoder stayed frozen for every (frozen) epoch
        for a, b in zip(layer_weights(new, layer), layer_weights(old, layer)):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(layer_weights(new, "dec1_1_conv")[0], layer_weights(old, "dec1_1_conv")[0])
    # Learned: all background scores 0, all lesion about 0.15 (lesions are about 8% of the voxels).
    assert card["Metrics"][0]["name"] == "Dice" and card["Metrics"][0]["value"] > 0.35

    from brainzoo.model_files import load_keras_model
    from brainzoo.predict import predict_label_map

    volume, truth = lesion_scan(np.random.default_rng(7))
    scan = nib.Nifti1Image(volume, np.diag([SPACING] * 3 + [1.0]))
    label_map, prediction = predict_label_map(scan, load_keras_model(new),
                                              inference=Inference.from_spec(spec["inference"]))
    assert label_map.get_fdata().dtype and np.asarray(label_map.dataobj).dtype == np.uint8
    assert set(np.unique(np.asarray(label_map.dataobj))) <= {0, 1}
    assert prediction["prediction"]["classes"] == ["background", "lesion"]


def test_label_tables_are_checked(tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text("value,label\n1,lesion\n")
    with pytest.raises(BrainzooError, match="values must be 0, 1, ... in order"):
        run.label_names(None, str(table))
    assert run.label_names(3) == ["background", "class-1", "class-2"]
    with pytest.raises(BrainzooError, match="--classes must be at least 1"):
        run.label_names(0)


def flair_sfcn_version(root: Path, model_file: Path) -> None:
    """The FLAIR-Brain-Age SFCN's spec and recipe at 32^3 (its random crops within a 34^3 window), its weights
    converted from the fixture's seeded state_dict (the published layout, 40 bins)."""
    from brainzoo.convert.state_dict import convert_state_dict

    folder = REPO / FLAIR_SFCN
    spec = yaml.safe_load((folder / "spec.yaml").read_text())
    card = yaml.safe_load((folder / "model_card.yaml").read_text())
    spec["training"]["data"].update(input_shape=[32, 32, 32], random_crop_within=[34, 34, 34])
    spec["weights"] = [{"name": "model", "path": "weights/model.h5", "format": "keras-h5",
                        "sources": [{"type": "inrepo-store"}]}]
    convert_state_dict("sfcn", seeded_state_dict(load_fixture("sfcn_peng2021")["state_dict"])).save(
        model_file, save_format="h5")
    write_version(root, spec, card, weights={"weights/model.h5": model_file.read_bytes()})


def test_a_flair_sfcn_fine_tuned_on_a_cohort_fits_its_bias_correction(tmp_path, monkeypatch):
    from brainzoo.models import BUILDERS
    from brainzoo.predict.brain_age import brain_age_gap
    from brainzoo.training.engine import TrainingPlan
    from brainzoo.outputs import builder_options
    from brainzoo.training.synthetic import write_synthetic_dataset
    from brainzoo.training.tfrecords import write_tfrecords

    root = catalogue_of(flair_sfcn_version, tmp_path, monkeypatch)
    records = {}
    for part, n, seed in (("train", 4, 0), ("held-out", 4, 1)):
        table = write_synthetic_dataset(tmp_path / part, n, shape=(36, 36, 36), seed=seed)
        write_tfrecords(table, tmp_path / part / "records", kind="regression", progress=False)
        records[part] = tmp_path / part / "records"

    record = run.transfer(FLAIR_SFCN, records["train"], records["held-out"], COHORT, fit_bias_correction=True,
                          root=root, progress=False, epochs=1, steps_per_epoch=2, batch_size=2)
    assert record["status"] == "ok"
    dest = root / COHORT
    spec = yaml.safe_load((dest / "spec.yaml").read_text())
    card = yaml.safe_load((dest / "model_card.yaml").read_text())
    assert not list(validate.spec_problems(spec, Path("spec.yaml"), dest))
    assert not list(validate.schema_problems("card", card, Path("model_card.yaml")))
    assert "--fit-bias-correction" in card["Metrics"][0]["command"]

    # The line is the least-squares fit of the new network's predictions on the held-out scans.
    correction = spec["inference"]["output"]["bias_correction"]
    assert correction["method"] == "de-lange-cole-2020" and "n=4" in correction["citation"]
    training = spec["training"]
    model = BUILDERS["sfcn"](input_shape=(32, 32, 32, 1), **builder_options(spec))
    model.load_weights(dest / "weights" / "model.h5")
    plan = TrainingPlan.from_spec(spec, batch_size=2)
    _, held_out = run.datasets(Training.from_spec(training).data, plan, records["held-out"], records["held-out"],
                               Inference.from_spec(spec["inference"]).input.orientation)
    objective = plan.objective
    predicted = np.concatenate([objective.predicted_age(model(x)).numpy() for x, _ in held_out()])
    ages = np.concatenate([y.numpy()[:, 0] for _, y in held_out()])
    np.testing.assert_allclose(np.polyfit(ages, predicted, 1), [correction["slope"], correction["intercept"]],
                               atol=1e-4)
    gap = brain_age_gap(float(predicted[0]), float(ages[0]), correction)
    assert abs(gap["corrected_delta"] - (predicted[0] - correction["slope"] * ages[0] - correction["intercept"])) < 1e-6
