"""`brainzoo explain`: Grad-CAM where the right answer is known, against PyTorch, and through the CLI.

(a) Networks that read one octant of their input by construction: the map must sit on that octant of the scan,
after the preprocessing's axis swaps, flips, crop and resize are undone. (b) A fixture network whose Grad-CAM was
computed in PyTorch (tests/fixtures/gradcam/make_reference.py): its Keras twin must give the same maps. (c) The
age-group CNN end to end, from a seeded upstream-format checkpoint to the map on the scan's grid, and the
command's refusals of bad input.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from conftest import FIXTURES, REPO, brainzoo
from scipy import ndimage
# Fixtures: the whole head with its brain mask, and a clone whose 2-class CNN get --upstream made from seeded weights.
from test_predict_classification import TWO_CLASS, converted_clone, head_and_mask  # noqa: F401

from brainzoo import catalogue
from brainzoo.errors import BrainzooError
from brainzoo.explain import (class_index, explain_problems, explain_scan, explain_settings, grad_cam,
                              on_input_grid)
from brainzoo.models.layers import batch_norm, conv3d
from brainzoo.outputs import OutputDecoding
from brainzoo.spec import Inference

layers = tf.keras.layers

GRID = (16, 16, 16)
OCTANT_LAYER = "octant_features"
CLASSES = [{"label": "young"}, {"label": "middle"}, {"label": "old"}]
BINS = {"start": 20, "stop": 60, "step": 5}
AGE = OutputDecoding("age")
# The scan's voxel axes are (posterior, left, superior): the RAS network grid swaps its first two axes and flips them.
SCAN_AFFINE = np.array([[0, -1, 0, 10], [-1, 0, 0, 12], [0, 0, 1, -11], [0, 0, 0, 1]], dtype=float)
SCAN_SHAPE = (22, 26, 24)
OCTANT_PREPROCESSING = [{"step": "reorient"}, {"step": "crop", "shape": [20, 20, 20]},
                        {"step": "resize", "shape": list(GRID)}, {"step": "minmax"}]


def octant_network(head: str, n_outputs: int, with_sex: bool = False) -> tf.keras.Model:
    """A network whose output depends on the (right, anterior, superior) octant of its RAS input only.

    Positive convolution weights on a positive input, a 2x max pool to 8^3, then everything outside the upper
    4^3 corner is cut away and zero-padded back: the explained features are zero elsewhere. The head's weights
    make the score rise with those features (``head``: ``age``, ``bins`` with log-softmax, or ``logits``).
    """
    volume = tf.keras.Input((*GRID, 1), name="volume")
    x = layers.Conv3D(4, 3, padding="same", use_bias=False, name="conv",
                      kernel_initializer=tf.keras.initializers.RandomUniform(0.0, 1.0, seed=1))(volume)
    x = layers.MaxPool3D(2, name="pool")(layers.ReLU(name="relu")(x))
    x = layers.Cropping3D(((4, 0), (4, 0), (4, 0)), name="octant")(x)
    x = layers.ZeroPadding3D(((4, 0), (4, 0), (4, 0)), name=OCTANT_LAYER)(x)
    x = layers.GlobalAveragePooling3D(name="mean")(x)
    inputs = [volume]
    if with_sex:
        sex = tf.keras.Input((1,), name="sex")
        inputs.append(sex)
        x = layers.Concatenate(name="features_and_sex")([x, sex])
    # The last output rises most with the features (a single output rises with them).
    rising = np.linspace(-1, 1, n_outputs) if n_outputs > 1 else np.ones(1)
    kernel = np.tile(rising, (x.shape[-1], 1))
    outputs = layers.Dense(n_outputs, name="head", kernel_initializer=tf.keras.initializers.Constant(kernel))(x)
    if head == "bins":
        outputs = layers.Activation("log_softmax", name="log_probabilities")(outputs)
    return tf.keras.Model(inputs, outputs)


def octant_scan() -> nib.Nifti1Image:
    smooth = ndimage.gaussian_filter(np.random.default_rng(0).random(SCAN_SHAPE), 2)
    return nib.Nifti1Image((1 + smooth).astype(np.float32), SCAN_AFFINE)


def from_centre_mm(image: nib.Nifti1Image) -> np.ndarray:
    """Each voxel's world position (RAS mm) relative to the centre of the field of view."""
    indices = np.stack(np.meshgrid(*(np.arange(n) for n in image.shape), indexing="ij"), axis=-1)
    centre = nib.affines.apply_affine(image.affine, (np.asarray(image.shape) - 1) / 2)
    return nib.affines.apply_affine(image.affine, indices) - centre


@pytest.mark.parametrize("head, output, covariates, target, class_index", [
    ("age", {"type": "age"}, (), "predicted", None),
    ("bins", {"type": "age-log-probabilities", "bins": BINS}, (), "predicted", None),
    ("logits", {"type": "age-group-logits", "classes": CLASSES}, (1.0,), "predicted", 2),
    ("logits", {"type": "age-group-logits", "classes": CLASSES}, (0.0,), "old", 2),
])
def test_the_map_sits_on_the_octant_the_network_reads(head, output, covariates, target, class_index):
    n_outputs = {"age": 1, "bins": 8, "logits": len(CLASSES)}[head]
    model = octant_network(head, n_outputs, with_sex=bool(covariates))
    spec_inference = {"input": {"contrast": ["T1w"], "orientation": "RAS", "spacing_mm": [1, 1, 1],
                                "shape": list(GRID)},
                      "preprocessing": OCTANT_PREPROCESSING, "output": output}
    scan = octant_scan()
    native, model_grid, record = explain_scan(scan, [model], inference=Inference.from_spec(spec_inference),
                                              layer=OCTANT_LAYER, target=target, covariates=covariates)
    assert native.shape == scan.shape and np.array_equal(native.affine, scan.affine)
    values = native.get_fdata()
    position = from_centre_mm(scan)
    octant = np.all(position > 0, axis=-1)  # right of, anterior to and above the centre
    assert values.max() == pytest.approx(1, abs=0.05) and octant[np.unravel_index(values.argmax(), values.shape)]
    assert values[octant].sum() > 0.85 * values.sum()  # 1/8 if the map ignored where the network reads
    assert values[np.any(position < -3, axis=-1)].max() == 0  # 3 mm beyond the octant's faces
    on_grid = model_grid.get_fdata()
    assert on_grid.shape == GRID and on_grid[8:, 8:, 8:].sum() > 0.85 * on_grid.sum()
    explained = record["explanation"]
    assert explained["layer"] == OCTANT_LAYER and explained["layer_grid"] == [8, 8, 8]
    assert explained["target"].get("class_index") == class_index


def test_a_class_no_feature_raises_gives_an_empty_map_and_says_so():
    model = octant_network("logits", len(CLASSES), with_sex=True)
    batch = octant_scan().get_fdata(dtype=np.float32)[:16, :16, :16][np.newaxis, ..., np.newaxis]
    result = grad_cam([model], [batch, np.ones((1, 1), np.float32)], layer=OCTANT_LAYER,
                      decoding=OutputDecoding.from_spec({"type": "age-group-logits", "classes": CLASSES}), target="young")
    assert result.class_index == 0 and result.map.max() == 0


def test_an_ensemble_map_is_the_mean_of_its_members_maps():
    first, second = octant_network("age", 1), octant_network("age", 1)
    second.get_layer("conv").set_weights([w[..., ::-1] * 0.5 for w in second.get_layer("conv").get_weights()])
    batch = octant_scan().get_fdata(dtype=np.float32)[:16, :16, :16][np.newaxis, ..., np.newaxis]
    maps = [grad_cam([m], batch, layer=OCTANT_LAYER, decoding=AGE).map for m in (first, second)]
    both = grad_cam([first, second], batch, layer=OCTANT_LAYER, decoding=AGE)
    assert not np.allclose(maps[0], maps[1])
    np.testing.assert_allclose(both.map, (maps[0] + maps[1]) / 2, rtol=1e-6)
    assert len(both.scores) == 2


def test_the_map_comes_back_through_the_registration_s_recorded_map(monkeypatch):
    """A spec that registers (as the brain-age models do): a known rigid move stands in for the fit, and the map must
    land on the octant the network reads, carried into the scan's world by the recorded template-to-scan map."""
    from brainzoo.predict import registration

    turn_z, turn_x = np.deg2rad(10), np.deg2rad(5)
    template_to_scan = np.array([[np.cos(turn_z), -np.sin(turn_z), 0, 4], [np.sin(turn_z), np.cos(turn_z), 0, -6],
                                 [0, 0, 1, 3], [0, 0, 0, 1]]) @ np.array([
        [1, 0, 0, 0], [0, np.cos(turn_x), -np.sin(turn_x), 0], [0, np.sin(turn_x), np.cos(turn_x), 0], [0, 0, 0, 1]])

    def known_fit(data, affine, *, template):
        registered = registration.resample_to_template(data, affine, template_to_scan)
        return registered, template_to_scan, {"template": template, "axis_scales": [1.0, 1.0, 1.0]}

    monkeypatch.setattr(registration, "register_to_mni152", known_fit)
    shape = (121, 146, 121)  # the template's field of view in 1.5 mm voxels, moved by the known map
    scan_affine = template_to_scan @ np.array([[1.5, 0, 0, -90], [0, 1.5, 0, -126], [0, 0, 1.5, -72], [0, 0, 0, 1]])
    smooth = ndimage.gaussian_filter(np.random.default_rng(1).random(shape), 2)
    scan = nib.Nifti1Image((1 + smooth).astype(np.float32), scan_affine)
    spec_inference = {"input": {"contrast": ["T1w"], "orientation": "LAS", "spacing_mm": [6, 7, 6],
                                "shape": list(GRID)},
                      "preprocessing": [{"step": "register", "template": "mni152-brain"},
                                        {"step": "crop", "shape": [96, 112, 96]},
                                        {"step": "resize", "shape": list(GRID)}, {"step": "minmax"}],
                      "output": {"type": "age"}}
    native, model_grid, record = explain_scan(scan, [octant_network("age", 1)], inference=Inference.from_spec(spec_inference),
                                              layer=OCTANT_LAYER)
    recorded = np.array(record["registration"]["template_to_input_world"])
    np.testing.assert_allclose(recorded, template_to_scan, atol=1e-6)

    # The octant the network reads: its grid is LAS on the template grid, centre-cropped, so the upper corner is
    # left of, anterior to and above the crop's centre, template voxel (90.5, 108.5, 90.5).
    indices = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    in_template = nib.affines.apply_affine(np.linalg.inv(template_to_scan) @ scan_affine, indices)
    crop_centre = nib.affines.apply_affine(registration.FSL_MNI152_AFFINE, [90.5, 108.5, 90.5])
    octant = np.all((in_template - crop_centre) * [-1, 1, 1] > 0, axis=-1)
    values = native.get_fdata()
    assert values[octant].sum() > 0.85 * values.sum()

    # And the scan-grid map is the model-grid map resampled into the scan's world through the recorded map.
    to_model_grid = np.linalg.inv(model_grid.affine) @ np.linalg.inv(recorded) @ scan_affine
    coordinates = np.moveaxis(nib.affines.apply_affine(to_model_grid, indices), -1, 0)
    expected = ndimage.map_coordinates(model_grid.get_fdata(), coordinates, order=1)
    np.testing.assert_allclose(values, expected, atol=1e-4)


def keras_twin(state: dict[str, np.ndarray]) -> tf.keras.Model:
    """The fixture network of make_reference.py in Keras (channels last), holding its PyTorch weights."""
    volume = tf.keras.Input((*GRID, 1), name="volume")
    x = conv3d(volume, 4, 3, padding=1, name="conv1")
    x = layers.ReLU(name="relu1")(batch_norm(x, name="bn1"))
    x = layers.MaxPool3D(2, name="pool1")(x)
    x = layers.ReLU(name="features")(conv3d(x, 8, 3, padding=1, name="conv2"))
    x = layers.GlobalAveragePooling3D(name="mean")(x)
    model = tf.keras.Model(volume, layers.Dense(3, name="logits")(x))
    to_channels_last = (2, 3, 4, 1, 0)  # PyTorch (out, in, D, H, W) -> Keras (D, H, W, in, out)
    for name in ("conv1", "conv2"):
        model.get_layer(name).set_weights([state[f"{name}.weight"].transpose(to_channels_last), state[f"{name}.bias"]])
    model.get_layer("bn1").set_weights([state[f"bn1.{key}"] for key in ("weight", "bias", "running_mean",
                                                                        "running_var")])
    model.get_layer("logits").set_weights([state["logits.weight"].T, state["logits.bias"]])
    return model


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "gradcam" / "reference.npz") as arrays:
        return dict(arrays)


def test_the_keras_twin_of_the_fixture_network_gives_pytorch_s_logits(reference):
    state = {key.removeprefix("state/"): value for key, value in reference.items() if key.startswith("state/")}
    model = keras_twin(state)
    logits = model(reference["input"][np.newaxis, ..., np.newaxis], training=False).numpy()[0]
    np.testing.assert_allclose(logits, reference["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("class_index", [0, 1, 2])
def test_grad_cam_matches_the_pytorch_reference(reference, class_index):
    state = {key.removeprefix("state/"): value for key, value in reference.items() if key.startswith("state/")}
    model = keras_twin(state)
    decoding = OutputDecoding.from_spec({"type": "age-group-logits", "classes": [{"label": f"class-{i}"} for i in range(3)]})
    result = grad_cam([model], reference["input"][np.newaxis, ..., np.newaxis], layer="features",
                      decoding=decoding, target=str(class_index))
    expected_layer_map = reference[f"layer_map/{class_index}"]
    np.testing.assert_allclose(result.map, expected_layer_map, rtol=1e-4, atol=1e-4 * expected_layer_map.max())
    input_map, _ = on_input_grid(result.map, GRID)
    np.testing.assert_allclose(input_map, reference[f"input_map/{class_index}"], rtol=1e-4, atol=1e-5)
    assert result.class_index == class_index


def test_the_predicted_class_is_the_default_target(reference):
    state = {key.removeprefix("state/"): value for key, value in reference.items() if key.startswith("state/")}
    decoding = OutputDecoding.from_spec({"type": "age-group-logits", "classes": [{"label": f"class-{i}"} for i in range(3)]})
    result = grad_cam([keras_twin(state)], reference["input"][np.newaxis, ..., np.newaxis], layer="features",
                      decoding=decoding)
    assert result.class_index == int(np.argmax(reference["logits"]))


def test_the_layer_and_target_default_to_the_spec_s_and_what_cannot_be_explained_is_refused():
    classifier = catalogue.find_version(TWO_CLASS, REPO).spec
    assert explain_settings(classifier) == ("block_3_relu_2", "predicted")
    assert explain_settings(classifier, "block_2_relu_2", "31+") == ("block_2_relu_2", "31+")
    regressor = catalogue.find_version("neuronets/sfcn-ukbiobank/1.0.0", REPO).spec
    with pytest.raises(BrainzooError, match="map explains its age; a target is for classifiers"):
        explain_settings(regressor, target="1")
    unexplained = {key: value for key, value in regressor.items() if key != "explain"}
    with pytest.raises(BrainzooError, match="names no layer to explain .*; pass --layer"):
        explain_settings(unexplained)
    assert explain_settings(unexplained, "conv_4_relu") == ("conv_4_relu", "predicted")
    with pytest.raises(BrainzooError, match="is a brain-extraction model; Grad-CAM explains the brain-age and"):
        explain_settings(catalogue.find_version("neuronets/brainzoo-unet/0.5.0", REPO).spec)


def test_validate_checks_the_explain_section():
    spec = catalogue.find_version("neuronets/sfcn-ukbiobank/1.0.0", REPO).spec
    assert list(explain_problems(spec)) == []
    assert any("explain.layer: 'conv_9_relu' is not a layer" in p
               for p in explain_problems({**spec, "explain": {"layer": "conv_9_relu"}}))
    assert any("does not give a 3D feature map" in p
               for p in explain_problems({**spec, "explain": {"layer": "classifier_flatten"}}))
    assert any("a target is for classifiers" in p
               for p in explain_problems({**spec, "explain": {"layer": "conv_5_relu", "target": 1}}))
    assert any("explain: missing" in p for p in explain_problems({k: v for k, v in spec.items() if k != "explain"}))
    with pytest.raises(BrainzooError, match="target 'elderly' is neither 'predicted', a class label"):
        class_index("elderly", OutputDecoding.from_spec({"type": "age-group-logits", "classes": CLASSES}))


def test_explain_writes_the_map_on_the_scan_s_grid(converted_clone, head_and_mask, tmp_path):
    scan, mask = head_and_mask
    out, on_grid, record, picture = (tmp_path / name for name in ("map.nii.gz", "grid.nii.gz", "r.json", "q.png"))
    proc = brainzoo("explain", TWO_CLASS, str(scan), str(out), "--sex", "F", "--mask", str(mask), "--model-grid",
                    str(on_grid), "--record", str(record), "--qc", str(picture), cwd=converted_clone)
    assert proc.returncode == 0, proc.stderr
    scan_image, saliency = nib.load(scan), nib.load(out)
    assert saliency.shape == scan_image.shape and np.allclose(saliency.affine, scan_image.affine)
    values = saliency.get_fdata()
    assert 0.5 < values.max() <= 1 and values.min() >= 0
    # The network sees the brain's bounding box only (brain extraction, then bounds-crop): so does the map.
    brain = np.argwhere(nib.load(mask).get_fdata() > 0)
    box = tuple(slice(max(low - 1, 0), high + 2) for low, high in zip(brain.min(axis=0), brain.max(axis=0)))
    outside = np.ones(values.shape, bool)
    outside[box] = False
    assert values[outside].max() == 0
    assert nib.load(on_grid).shape == (128, 128, 128)
    written = json.loads(record.read_text())
    explained = written["explanation"]
    assert explained["layer"] == "block_3_relu_2" and explained["layer_grid"] == [8, 8, 8]
    assert explained["target"]["chosen"] == "predicted" and explained["target"]["label"] in ("22-30", "31+")
    assert written["model"]["id"] == TWO_CLASS and picture.stat().st_size > 0

    before = out.read_bytes()
    new = str(tmp_path / "new.nii.gz")
    refusals = [
        ((str(tmp_path / "absent.nii.gz"), new, "--sex", "F"), "absent.nii.gz: no such file"),
        ((str(scan), str(out), "--sex", "F"), "map.nii.gz: already exists; pass --force"),
        ((str(scan), str(tmp_path / "new.txt"), "--sex", "F"), "new.txt: this output's name must end in .nii"),
        ((str(scan), new), f"{TWO_CLASS}: takes the sex as an input beside the scan: pass --sex M or F"),
        ((str(scan), new, "--sex", "F", "--target", "elderly"), "target 'elderly' is neither 'predicted', a class"),
        ((str(scan), new, "--sex", "F", "--layer", "block_9_relu_2"), "has no layer 'block_9_relu_2'"),
    ]
    for args, message in refusals:
        proc = brainzoo("explain", TWO_CLASS, *args, "--mask", str(mask), cwd=converted_clone)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    proc = brainzoo("explain", "neuronets/brainzoo-unet/0.5.0", str(scan), new, cwd=converted_clone)
    assert proc.returncode == 1 and "Grad-CAM explains the brain-age and age-group models" in proc.stderr
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.nii.gz", "map.nii.gz", "q.png", "r.json"]
