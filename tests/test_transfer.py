"""`brainzoo transfer`: fine-tune a converted UK Biobank SFCN onto the FLAIR project's age bins
([42, 82] step 1 -> [15, 95] step 2) and get a version `brainzoo validate` accepts."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import yaml

from conftest import REPO, brainzoo, load_fixture, seeded_state_dict, sh, write_index, write_version

SOURCE = "neuronets/sfcn-ukbiobank-seeded/1.0.0"
DEST = "neuronets/sfcn-flair-bins/1.0.0"
HEAD = "classifier_conv_6"  # SFCN's last 1^3 conv, named after len(channels) in brainzoo.models.sfcn
SHAPE = (32, 32, 32)


def source_version(root, model_file) -> None:
    """The UK Biobank SFCN's catalogue entry, its weights converted from the fixture's seeded state_dict.

    The published layout (40 bins over [42, 82] years), trained here at 32^3 (SFCN is fully convolutional).
    """
    from brainzoo.convert.state_dict import convert_state_dict

    converted = REPO / "neuronets" / "sfcn-ukbiobank" / "1.0.0"
    spec = yaml.safe_load((converted / "spec.yaml").read_text())
    card = yaml.safe_load((converted / "model_card.yaml").read_text())
    spec.update(id=SOURCE, model="sfcn-ukbiobank-seeded")
    spec["inference"]["entry_point"]["options"]["model"]["default"] = SOURCE
    spec["training"]["data"].update(input_shape=list(SHAPE), random_crop=False)
    spec["weights"] = [{"name": "model", "path": "weights/model.h5", "format": "keras-h5",
                        "sources": [{"type": "inrepo-store"}]}]
    model = convert_state_dict("sfcn", seeded_state_dict(load_fixture("sfcn_peng2021")["state_dict"]))
    model.save(model_file, save_format="h5")
    write_version(root, spec, card, weights={"weights/model.h5": model_file.read_bytes()})
    write_index(root)


def regression_records(folder, n_subjects: int, seed: int):
    from brainzoo.training.synthetic import write_synthetic_dataset
    from brainzoo.training.tfrecords import write_tfrecords

    table = write_synthetic_dataset(folder / "heads", n_subjects, shape=SHAPE, seed=seed)
    write_tfrecords(table, folder / "records", kind="regression", progress=False)
    return folder / "records"


def layer_weights(model_file, layer: str) -> list[np.ndarray]:
    with h5py.File(model_file) as f:
        group = f["model_weights"][layer]
        return [group[name][()] for name in group.attrs["weight_names"]]


@pytest.mark.slow
def test_transfer_to_new_bins_writes_a_version_that_validates(toy_dataset, tmp_path):
    root = toy_dataset
    source_file = tmp_path / "source.h5"
    source_version(root, source_file)
    sh("datalad", "save", "-d", ".", "-m", "a converted SFCN", cwd=root)
    train = regression_records(tmp_path / "train", 4, seed=0)
    validation = regression_records(tmp_path / "validation", 2, seed=1)

    result = brainzoo("transfer", SOURCE, DEST, "--train", str(train), "--validation", str(validation),
                      "--bins", "15", "95", "2", "--replace", HEAD, "--freeze-epochs", "1", "--epochs", "2",
                      "--steps-per-epoch", "2", "--batch-size", "2", "--no-progress", "--json", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.splitlines()[-1])
    assert (record["status"], record["path"]) == ("ok", DEST)

    dest = root / DEST
    assert sorted(p.name for p in dest.iterdir()) == ["model_card.yaml", "spec.yaml", "weights"]
    spec = yaml.safe_load((dest / "spec.yaml").read_text())
    bins = {"start": 15.0, "stop": 95.0, "step": 2.0}
    assert spec["inference"]["output"]["bins"] == bins  # the one place: the head and the loss read it
    assert "n_bins" not in spec["architecture"]["options"] and "bins" not in spec["training"]["loss"]
    assert spec["inference"]["entry_point"]["options"]["model"]["default"] == DEST
    # The body starts from the source's weights (a fresh initialisation would be uncorrelated with them)
    # and, after the frozen epoch, learns too.
    for layer in ("conv_0_conv", "conv_5_conv"):
        new, old = (layer_weights(model, layer)[0].ravel() for model in (dest / "weights" / "model.h5", source_file))
        assert np.corrcoef(new, old)[0, 1] > 0.9 and not np.array_equal(new, old), layer
    metric, = yaml.safe_load((dest / "model_card.yaml").read_text())["Metrics"]
    assert (metric["name"], metric["n"], metric["source"]) == ("MAE", 2, "measured")
    assert metric["command"].startswith(f"brainzoo transfer {SOURCE} {DEST} ")

    sh("datalad", "save", "-d", ".", "-m", "fine-tuned", cwd=root)
    assert sh("git", "status", "--porcelain", cwd=root).stdout == ""
    validation_result = brainzoo("validate", "--json", cwd=root)
    assert validation_result.returncode == 0, validation_result.stdout
