"""Hostile and damaged weights: a model file that would run code is refused before anything builds it, and a
weights file whose bytes differ from its spec is refused before anything runs it (brainzoo.model_files)."""

from __future__ import annotations

import hashlib
import json
import os

import h5py
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from brainzoo import catalogue, model_files
from brainzoo.errors import BrainzooError
from brainzoo.model_files import (BRAINZOO_LAYERS, check_model_config, load_keras_model, verified_sha256,
                                  verified_weights_path)
from brainzoo.models import agemapper, sfcn, unet
from brainzoo.models.deepbet import deepbet_bbox
from brainzoo.predict import runners
from conftest import REPO, brainzoo, clone_main, fixture_card, fixture_spec, write_index, write_version

pytestmark = pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")

TOY = "neuronets/toy/0.1.0"
TOY_WEIGHTS = "weights/model.h5"


def _payload(marker) -> tf.keras.layers.Lambda:
    """A Lambda whose stored bytecode writes ``marker`` whenever Keras rebuilds the layer from a file."""
    code = f"lambda t: (__import__('pathlib').Path({str(marker)!r}).write_text('ran'), t)[1]"
    return tf.keras.layers.Lambda(eval(code), name="payload")


def _hostile_model(path, marker, where: str):
    """A small segmentation network saved as .h5 with the payload at the top level or inside a nested model."""
    inputs = tf.keras.Input((16, 16, 16, 1), name="image")
    x = tf.keras.layers.Conv3D(2, 3, padding="same", name="conv")(inputs)
    if where == "top":
        x = _payload(marker)(x)
    elif where == "functional":
        inner_input = tf.keras.Input((16, 16, 16, 2))
        x = tf.keras.Model(inner_input, _payload(marker)(inner_input), name="inner")(x)
    else:
        x = tf.keras.Sequential([tf.keras.layers.Input((16, 16, 16, 2)), _payload(marker)], name="inner")(x)
    outputs = tf.keras.layers.Conv3D(1, 1, activation="sigmoid", name="head")(x)
    tf.keras.Model(inputs, outputs).save(path, save_format="h5")
    marker.unlink()  # building the model above ran the function once, here, on purpose
    return path


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "payload-ran"


def _catalogue_root(tmp_path, weights: bytes, spec: dict | None = None):
    """A catalogue with one brain-extraction version whose spec carries these weights' true size and sha256."""
    root = tmp_path / "catalogue"
    write_version(root, spec or fixture_spec(), fixture_card(), weights={TOY_WEIGHTS: weights})
    write_index(root)
    return root


def _scan(path):
    head = np.random.default_rng(0).normal(100, 10, (40, 40, 40)).astype(np.float32)
    nib.save(nib.Nifti1Image(head, np.diag([2.0, 2, 2, 1])), path)
    return path


@pytest.mark.parametrize("where", ["top", "functional", "sequential"])
def test_a_lambda_anywhere_in_the_model_is_refused_and_never_runs(tmp_path, marker, where):
    path = _hostile_model(tmp_path / f"{where}.h5", marker, where)
    with pytest.raises(BrainzooError, match=rf"{path}: layer 'payload': Lambda is neither a Keras built-in"):
        load_keras_model(path)
    assert not marker.exists()


def test_the_payload_runs_under_a_plain_load_model(tmp_path, marker):
    """The hostile file is real: Keras' own loader runs the stored function, which is what brainzoo refuses."""
    path = _hostile_model(tmp_path / "top.h5", marker, "top")
    tf.keras.models.load_model(path, compile=False)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("runtime", ["auto", "keras", "onnxruntime"])
def test_predict_refuses_a_model_file_that_would_run_code(tmp_path, marker, runtime):
    root = _catalogue_root(tmp_path, _hostile_model(tmp_path / "hostile.h5", marker, "top").read_bytes())
    out = tmp_path / "mask.nii.gz"
    proc = brainzoo("predict", "brain-mask", str(_scan(tmp_path / "head.nii.gz")), str(out), "--model", TOY,
                    "--runtime", runtime, "--contrast", "T1w", cwd=root)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"{root / TOY / TOY_WEIGHTS}: layer 'payload': Lambda" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists() and not out.exists()


def test_the_library_loaders_refuse_it_too(tmp_path, marker, monkeypatch):
    root = _catalogue_root(tmp_path, _hostile_model(tmp_path / "hostile.h5", marker, "functional").read_bytes())
    monkeypatch.setenv("BRAINZOO_ROOT", str(root))
    version = catalogue.find_version(TOY)
    for runtime in runners.RUNTIMES:
        with pytest.raises(BrainzooError, match="layer 'payload': Lambda"):
            runners.load_networks(version, runtime)
    with pytest.raises(BrainzooError, match="layer 'payload': Lambda"):
        runners.BrainMasker.load(TOY, runtime="keras").run(_scan(tmp_path / "head.nii.gz"))
    assert not marker.exists()


def test_training_refuses_to_start_from_it(tmp_path, marker):
    from brainzoo.training.run import train

    hostile = _hostile_model(tmp_path / "hostile.h5", marker, "sequential")
    spec = {"architecture": {"builder": "unet", "options": {"base_filters": 2}},
            "training": {"data": {"kind": "segmentation", "block_shape": [16, 16, 16]}, "loss": {"name": "dice"},
                         "optimizer": {"name": "adam", "learning_rate": 0.01}, "epochs": 1, "batch_size": 1}}
    (tmp_path / "stage2.yaml").write_text(json.dumps(spec))
    with pytest.raises(BrainzooError, match=rf"{hostile}: layer 'payload': Lambda"):
        train(str(tmp_path / "stage2.yaml"), tmp_path / "records", None, tmp_path / "run", init_weights=hostile)
    assert not marker.exists() and not (tmp_path / "run").exists()


def _edited(tmp_path, edit) -> str:
    """A clean small U-Net saved as .h5, its model_config changed by ``edit``."""
    path = tmp_path / "edited.h5"
    unet((16, 16, 16, 1), base_filters=2).save(path, save_format="h5")
    with h5py.File(path, "r+") as file:
        config = json.loads(file.attrs["model_config"])
        edit({layer["name"]: layer for layer in config["config"]["layers"]})
        file.attrs["model_config"] = json.dumps(config)
    return path


REFUSED_EDITS = {
    "a TensorFlow function named in the file": (lambda layers: layers["head_probability"].update(
        class_name="TFOpLambda", config={"name": "head_probability", "function": "io.write_file"}), "TFOpLambda"),
    "a class another package registered": (lambda layers: layers["head_probability"].update(
        class_name="DistributionLambda"), "DistributionLambda"),
    "an unknown custom object": (lambda layers: layers["head_probability"].update(
        class_name="evil>Payload"), "evil>Payload"),
    "an object inside a layer's settings": (lambda layers: layers["head_conv"]["config"].update(
        kernel_initializer={"class_name": "DistributionLambda", "config": {}}), "DistributionLambda object"),
    "an activation by another name": (lambda layers: layers["head_probability"]["config"].update(
        activation="DistributionLambda"), "activation 'DistributionLambda'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_EDITS))
def test_anything_not_allow_listed_is_refused(tmp_path, case):
    edit, named = REFUSED_EDITS[case]
    path = _edited(tmp_path, edit)
    with h5py.File(path) as file, pytest.raises(BrainzooError, match=rf"{path}: layer '\w+': .*{named}"):
        check_model_config(file, path)


def test_files_that_are_not_whole_keras_models_are_refused(tmp_path):
    model = unet((16, 16, 16, 1), base_filters=2)
    model.save_weights(tmp_path / "weights-only.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(BrainzooError, match=r"weights-only\.h5: has no model_config"):
        load_keras_model(tmp_path / "weights-only.h5")
    with pytest.raises(BrainzooError, match=r"text\.h5: not a Keras \.h5 model file"):
        load_keras_model(tmp_path / "text.h5")
    not_models = [("nested", "[" * 100_000, "the model_config is not a Keras model architecture"),
                  ("layer", '{"class_name": "Dense", "config": {}}', "holds a Dense, not a Keras model")]
    for name, config, problem in not_models:
        with h5py.File(tmp_path / f"{name}.h5", "w") as file:
            file.attrs["model_config"] = config
        with pytest.raises(BrainzooError, match=rf"{name}\.h5: {problem}"):
            load_keras_model(tmp_path / f"{name}.h5")


def test_the_allow_list_names_every_layer_brainzoo_registers():
    import brainzoo.training.objectives  # noqa: F401  registers a loss, which is no layer

    registered = {name for name, registered in tf.keras.utils.get_custom_objects().items()
                  if name.startswith("brainzoo>") and isinstance(registered, type)
                  and issubclass(registered, tf.keras.layers.Layer)}
    assert registered == BRAINZOO_LAYERS


def test_brainzoos_own_architectures_load(tmp_path):
    models = [unet((16, 16, 16, 1), base_filters=2, norm=norm) for norm in ("batch", "instance")]
    models += [sfcn((32, 32, 32, 1), channels=(2, 2, 2, 2, 2, 2)), agemapper(), deepbet_bbox((32, 32, 32, 1))]
    for index, model in enumerate(models):
        path = tmp_path / f"{model.name}-{index}.h5"
        model.save(path, save_format="h5")
        loaded = load_keras_model(path)
        assert [layer.__class__ for layer in loaded.layers] == [layer.__class__ for layer in model.layers]
        np.testing.assert_array_equal(loaded.get_weights()[-1], model.get_weights()[-1])
    for weights in catalogue.find_version("neuronets/deepbet/1.0.2", REPO).weights:
        if weights.present:
            with h5py.File(weights.path) as file:
                check_model_config(file, weights.path)


def test_ensemble_members_share_one_graph_and_give_their_own_outputs(tmp_path):
    """Members with one architecture are built once; each call runs that member's own weights."""
    paths, expected = {}, {}
    batch = np.random.default_rng(0).standard_normal((1, 32, 32, 32, 1)).astype(np.float32)
    for index in range(3):
        tf.keras.utils.set_random_seed(index)
        model = sfcn((32, 32, 32, 1), channels=(2, 2, 2, 2, 2, 2))
        paths[f"member-{index}"] = tmp_path / f"member-{index}.h5"
        model.save(paths[f"member-{index}"], save_format="h5")
        expected[f"member-{index}"] = model(batch, training=False).numpy()
    alone = tmp_path / "other.h5"
    unet((16, 16, 16, 1), base_filters=2).save(alone, save_format="h5")
    models = model_files.load_keras_models({**paths, "other": alone})
    members = [models[name] for name in paths]
    assert len({member.graph for member in members}) == 1 and isinstance(models["other"], tf.keras.Model)
    for name in [*paths, *reversed(paths)]:
        np.testing.assert_allclose(np.asarray(models[name](batch)), expected[name], rtol=1e-6)
    assert len({float(np.asarray(m(batch)).sum()) for m in members}) == 3


@pytest.fixture
def toy_unet(tmp_path) -> bytes:
    path = tmp_path / "unet.h5"
    tf.keras.utils.set_random_seed(0)
    unet((32, 32, 32, 1), base_filters=2).save(path, save_format="h5")
    return path.read_bytes()


def _flip_last_bit(path) -> None:
    """One flipped bit, in the weights at the end of the file; the same size, inode and modification time."""
    stat = path.stat()
    with open(path, "r+b") as stream:
        stream.seek(-1, os.SEEK_END)
        last = stream.read(1)[0]
        stream.seek(-1, os.SEEK_END)
        stream.write(bytes([last ^ 1]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_damaged_weights_are_refused_with_both_checksums_and_the_repair(tmp_path, toy_unet, monkeypatch):
    root = _catalogue_root(tmp_path, toy_unet)
    monkeypatch.setenv("BRAINZOO_ROOT", str(root))
    version = catalogue.find_version(TOY)
    assert runners.model_provenance(version, "any")["weights"] == {"model": hashlib.sha256(toy_unet).hexdigest()}
    weights_path = root / TOY / TOY_WEIGHTS
    _flip_last_bit(weights_path)  # after a verdict was cached: the file's change time still tells
    damaged = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    for runtime in runners.RUNTIMES:
        with pytest.raises(BrainzooError) as error:
            runners.load_networks(version, runtime)
        message = str(error.value)
        assert message.startswith(f"{weights_path}: sha256 {damaged} differs from the spec's "
                                  f"{hashlib.sha256(toy_unet).hexdigest()}")
        assert f"git annex fsck {weights_path}" in message and f"brainzoo get {TOY}" in message
    with pytest.raises(BrainzooError, match="differs from the spec"):
        verified_weights_path(TOY)  # the one way from a catalogue id to a file a builder loads
    out = tmp_path / "mask.nii.gz"
    proc = brainzoo("predict", "brain-mask", str(_scan(tmp_path / "head.nii.gz")), str(out), "--model", TOY,
                    "--contrast", "T1w", cwd=root)
    assert proc.returncode == 1 and f"sha256 {damaged} differs" in proc.stderr and not out.exists()
    weights_path.write_bytes(toy_unet + b"\0")
    with pytest.raises(BrainzooError, match=rf"{weights_path}: {len(toy_unet) + 1} bytes, but the spec .* says "
                                            rf"{len(toy_unet)}"):
        runners.load_networks(version, "auto")


def test_a_warm_run_does_not_hash_again(tmp_path, toy_unet, monkeypatch):
    monkeypatch.setenv("BRAINZOO_CACHE", str(tmp_path / "cache"))
    version = catalogue.find_version(TOY, _catalogue_root(tmp_path, toy_unet))
    [weights] = version.weights
    hashed = []
    monkeypatch.setattr(model_files, "sha256_of", lambda path: hashed.append(path) or hashlib.sha256(
        open(path, "rb").read()).hexdigest())
    assert verified_sha256(weights) == weights.sha256 and len(hashed) == 1
    assert verified_sha256(weights) == weights.sha256 and len(hashed) == 1
    cache = tmp_path / "cache" / model_files.VERIFIED_CACHE_NAME
    cache.write_text("{not json")
    assert verified_sha256(weights) == weights.sha256 and len(hashed) == 2
    assert json.loads(cache.read_text())[os.path.realpath(weights.path)]["sha256"] == weights.sha256
    os.chmod(tmp_path / "cache", 0o500)  # a cache that cannot be written only means hashing again
    try:
        weights.path.touch()
        assert verified_sha256(weights) == weights.sha256 and len(hashed) == 3
    finally:
        os.chmod(tmp_path / "cache", 0o700)


def test_the_deepbet_ports_networks_are_checked_too(tmp_path, monkeypatch):
    deepbet = catalogue.find_version("neuronets/deepbet/1.0.2", REPO)
    spec = json.loads(json.dumps(deepbet.spec))
    spec["id"] = TOY
    root = tmp_path / "catalogue"
    write_version(root, spec, deepbet.card, weights={w.entry["path"]: b"stand-in weights" for w in deepbet.weights})
    write_index(root)
    (root / TOY / "weights" / "bbox.h5").write_bytes(b"stand-in weightz")
    monkeypatch.setenv("BRAINZOO_ROOT", str(root))
    masker = runners.BrainMasker.load(TOY)
    with pytest.raises(BrainzooError, match=r"bbox\.h5: sha256 \w+ differs from the spec's"):
        masker.networks()


def _verify_records(root) -> tuple[int, list[dict], str]:
    proc = brainzoo("verify", "--json", cwd=root)
    found = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, [r for r in found if r["action"] == "verify"], proc.stderr


def test_verify_reports_bit_rot_on_the_run_that_finds_it_and_every_later_run(toy_dataset, tmp_path):
    clone = clone_main(toy_dataset, tmp_path / "clone")
    assert brainzoo("bootstrap", cwd=clone).returncode == 0
    assert brainzoo("get", TOY, cwd=clone).returncode == 0
    weights = clone / TOY / TOY_WEIGHTS
    content = weights.resolve()
    os.chmod(content.parent, 0o755)
    os.chmod(content, 0o644)
    _flip_last_bit(content)

    code, [found], stderr = _verify_records(clone)
    assert code == 1 and "Traceback" not in stderr
    assert found["status"] == "error" and "moved to .git/annex/bad/" in found["message"]
    assert "differs from the spec's" in found["message"] and f"run `brainzoo get {TOY}`" in found["message"]
    for _ in range(2):  # fsck has moved the content aside: the file now looks merely absent
        code, [later], stderr = _verify_records(clone)
        assert code == 1 and "Traceback" not in stderr
        assert later["status"] == "error" and later["message"].startswith("damaged: git-annex fsck found")
        assert f".git/annex/bad/{content.name}" in later["message"] and f"brainzoo get {TOY}" in later["message"]

    assert brainzoo("get", TOY, cwd=clone).returncode == 0
    code, [repaired], _ = _verify_records(clone)
    assert code == 0 and repaired["status"] == "ok"
