"""deepbet in Keras: the layer semantics the port relies on, the builders, the pipeline's arithmetic, and
parity with deepbet itself.

Parity tests need torch and deepbet (env/requirements-dev.in) and skip without them; the real-scan test
also needs ../shared/data.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from brainzoo.convert import convert, record_problems
from brainzoo.convert import deepbet as deepbet_convert
from brainzoo.errors import BrainzooError
from brainzoo.models.deepbet import InstanceNormalization, conv_transpose3d, deepbet_bbox, deepbet_segmentation
from brainzoo.models.layers import conv3d, max_pool_after_relu
from brainzoo.predict import deepbet as pipeline

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_SCAN = SHARED_DATA / "ixi" / "t1_2mm" / "IXI012-HH-1211-T1_ds.nii.gz"
SETTINGS = pipeline.catalogue_settings()  # deepbet/1.0.2's spec
MEAN_SD = (SETTINGS.standardised_mean, SETTINGS.standardised_sd)
BOX_NUMBERS = (SETTINGS.bbox_margin, SETTINGS.bbox_slice_fraction)

# Every parameter of deepbet 1.0.2's two TorchScript networks (named_parameters(); they have no buffers).
DEEPBET_TENSORS = """
init.0.weight down0.block1.double_conv.0.weight down0.block1.double_conv.3.weight
down0.block2.double_conv.0.weight down0.block2.double_conv.3.weight down1.block1.double_conv.0.weight
down1.block1.double_conv.3.weight down1.block1.downsample.0.weight down1.block2.double_conv.0.weight
down1.block2.double_conv.3.weight down2.block1.double_conv.0.weight down2.block1.double_conv.3.weight
down2.block1.downsample.0.weight down2.block2.double_conv.0.weight down2.block2.double_conv.3.weight
down3.block1.double_conv.0.weight down3.block1.double_conv.3.weight down3.block1.downsample.0.weight
down3.block2.double_conv.0.weight down3.block2.double_conv.3.weight up0.conv1.0.weight up0.tp_conv.0.weight
up0.conv2.0.weight up1.conv1.0.weight up1.tp_conv.0.weight up1.conv2.0.weight up2.conv1.0.weight
up2.tp_conv.0.weight up2.conv2.0.weight up3.conv1.0.weight up3.tp_conv.0.weight up3.conv2.0.weight
tp_conv1.0.weight tp_conv1.0.bias conv.0.weight conv.0.bias tp_conv2.weight tp_conv2.bias
""".split()


def run_layer(build, x: np.ndarray) -> np.ndarray:
    """Output of ``build(input_tensor)`` for one channels-last volume (no batch axis)."""
    inputs = tf.keras.Input(x.shape)
    model = tf.keras.Model(inputs, build(inputs))
    return model(x[None], training=False).numpy()[0]


def keras_kernel(weight: np.ndarray) -> np.ndarray:
    """Keras kernel from a PyTorch (out, in, d, h, w) or transposed (in, out, d, h, w) weight."""
    return weight.transpose(2, 3, 4, 1, 0)


def reference_conv(x: np.ndarray, weight: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """PyTorch Conv3d by its definition: zero padding, then output o = sum_k x[stride * o + k] w[k]."""
    x = np.pad(x, [(padding, padding)] * 3 + [(0, 0)])
    kernel = weight.shape[2]
    size = (x.shape[0] - kernel) // stride + 1
    out = np.zeros((size,) * 3 + (weight.shape[0],))
    for a, b, c in itertools.product(range(kernel), repeat=3):
        window = x[a:a + stride * size:stride, b:b + stride * size:stride, c:c + stride * size:stride]
        out += window @ weight[:, :, a, b, c].T
    return out


def reference_conv_transpose(x: np.ndarray, weight: np.ndarray, stride: int, padding: int,
                             output_padding: int) -> np.ndarray:
    """PyTorch ConvTranspose3d by its definition: input voxel i adds x[i] w[k] to output
    stride * i + k - padding; the output has (n - 1) stride - 2 padding + kernel + output_padding voxels."""
    n, kernel = x.shape[0], weight.shape[2]
    size = (n - 1) * stride - 2 * padding + kernel + output_padding
    full = np.zeros(((n - 1) * stride + kernel + output_padding,) * 3 + (weight.shape[1],))
    for a, b, c in itertools.product(range(kernel), repeat=3):
        full[a:a + stride * n:stride, b:b + stride * n:stride, c:c + stride * n:stride] += x @ weight[:, :, a, b, c]
    return full[padding:padding + size, padding:padding + size, padding:padding + size]


@pytest.mark.parametrize("kernel, stride, padding, output_padding", [(3, 2, 1, 1), (3, 1, 1, 0), (2, 2, 0, 0)])
def test_conv_transpose3d_is_pytorchs(kernel, stride, padding, output_padding):
    """Cropping and weight layout of every transposed convolution in deepbet (decoder, up3, heads)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 5, 5, 3)).astype(np.float32)
    weight = rng.normal(size=(3, 4, kernel, kernel, kernel)).astype(np.float32)
    inputs = tf.keras.Input(x.shape)
    model = tf.keras.Model(inputs, conv_transpose3d(inputs, 4, kernel, strides=stride, padding=padding,
                                                    output_padding=output_padding, use_bias=False, name="t"))
    model.get_layer("t").kernel.assign(keras_kernel(weight))
    ours = model(x[None]).numpy()[0]
    expected = reference_conv_transpose(x, weight, stride, padding, output_padding)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-4)


@pytest.mark.parametrize("kernel, stride, padding", [(7, 2, 3), (3, 2, 1), (1, 2, 0), (3, 1, 1)])
def test_convolutions_are_pytorchs(kernel, stride, padding):
    """The stem, strided block, shortcut and ordinary convolutions as deepbet's graph specifies them."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 8, 8, 2)).astype(np.float32)
    weight = rng.normal(size=(3, 2, kernel, kernel, kernel)).astype(np.float32)
    inputs = tf.keras.Input(x.shape)
    model = tf.keras.Model(inputs, conv3d(inputs, 3, kernel, strides=stride, padding=padding, use_bias=False,
                                          name="c"))
    model.get_layer("c").kernel.assign(keras_kernel(weight))
    np.testing.assert_allclose(model(x[None]).numpy()[0], reference_conv(x, weight, stride, padding), atol=1e-4)


def test_stem_pooling_is_pytorchs_on_relu_output():
    """MaxPool3d(3, stride 2, padding 1) pads with -inf; after a ReLU zero padding gives the same maxima."""
    x = np.maximum(np.random.default_rng(2).normal(size=(8, 8, 8, 2)), 0).astype(np.float32)
    padded = np.pad(x, [(1, 1)] * 3 + [(0, 0)], constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3, 3), axis=(0, 1, 2))[::2, ::2, ::2]
    expected = windows.max(axis=(-3, -2, -1))
    ours = run_layer(lambda t: max_pool_after_relu(t, 3, strides=2, padding=1, name="p"), x)
    np.testing.assert_array_equal(ours, expected)


def test_instance_norm_sums_in_double_precision():
    """Per-channel standardisation with biased variance; on a 64^3 volume far from zero, float32 sums (as in
    Keras' GroupNormalization) would be off by more than the tolerance."""
    rng = np.random.default_rng(3)
    x = (1000 + rng.normal(size=(64, 64, 64, 2))).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(axis=(0, 1, 2))) / np.sqrt(x64.var(axis=(0, 1, 2)) + 1e-5)
    ours = run_layer(lambda t: InstanceNormalization(name="n")(t), x)
    np.testing.assert_allclose(ours, expected, atol=2e-4)


@pytest.mark.parametrize("builder, input_shape", [(deepbet_bbox, (32, 32, 32, 1)),
                                                  (deepbet_segmentation, (64, 32, 96, 1))])
def test_builders_give_probabilities_on_the_input_grid(builder, input_shape):
    model = builder(input_shape)
    x = np.random.default_rng(4).normal(0.449, 0.226, size=(1, *input_shape)).astype(np.float32)
    out = model(x).numpy()
    assert out.shape == (1, *input_shape[:3], 2)
    np.testing.assert_allclose(out.sum(axis=-1), 1, atol=1e-5)


def test_layer_names_map_every_deepbet_tensor():
    """The Keras convolutions are exactly deepbet's parameterised modules, named for the converter."""
    model = deepbet_bbox((32, 32, 32, 1))
    keras_weights = {f"{layer.name}.{'kernel' if 'kernel' in w.name else 'bias'}"
                     for layer in model.layers for w in layer.weights}
    torch_weights = {f"{deepbet_convert.keras_layer_name(name.rpartition('.')[0])}."
                     f"{'kernel' if name.endswith('.weight') else 'bias'}" for name in DEEPBET_TENSORS}
    assert keras_weights == torch_weights


@pytest.mark.parametrize("input_shape", [(48, 48, 48, 1), (32, 32, 1), (16, 32, 32, 1)])
def test_unusable_input_shape_is_a_clean_error(input_shape):
    with pytest.raises(BrainzooError, match="deepbet_bbox: input_shape"):
        deepbet_bbox(input_shape)


def test_h5_round_trip(tmp_path):
    model = deepbet_bbox((32, 32, 32, 1))
    rng = np.random.default_rng(5)
    model.set_weights([rng.normal(0, 0.1, size=w.shape).astype(np.float32) for w in model.get_weights()])
    path = tmp_path / "bbox.h5"
    model.save(path, save_format="h5")
    x = rng.normal(0.449, 0.226, size=(1, 32, 32, 32, 1)).astype(np.float32)
    expected = model(x).numpy()
    np.testing.assert_array_equal(tf.keras.models.load_model(path, compile=False)(x).numpy(), expected)
    np.testing.assert_array_equal(deepbet_bbox((32, 32, 32, 1), weights=path)(x).numpy(), expected)


def test_unknown_weights_are_a_clean_error():
    with pytest.raises(BrainzooError, match="no/such"):
        deepbet_segmentation((32, 32, 32, 1), weights="no/such/version")


def test_the_pipeline_numbers_are_the_spec_values_and_are_checked():
    assert SETTINGS == pipeline.DeepbetSettings((128, 128, 128), (256, 256, 256), (0.005, 0.995), 0.449, 0.226, 0.5,
                                                0.02, 0.1)  # deepbet 1.0.2's BrainExtraction
    values = {"bbox_grid": [128, 128, 128], "segmentation_grid": [256, 256, 256], "window_quantiles": [0.005, 0.995],
              "standardised_mean": 0.449, "standardised_sd": 0.226, "bbox_threshold": 0.5,
              "bbox_slice_fraction": 0.02, "bbox_margin": 0.1}
    assert pipeline.DeepbetSettings.from_spec(values) == SETTINGS
    for change, message in [({"window_quantiles": [0.995, 0.005]}, "window_quantiles are two quantiles"),
                            ({"bbox_grid": [128, 128]}, "bbox_grid and segmentation_grid are three"),
                            ({"bbox_threshold": 1.5}, "bbox_threshold is in"), ({"extra": 1}, "needs exactly"),
                            ({"bbox_margin": None}, "bbox_margin is in"), ({"segmentation_grid": None}, "bbox_grid and"),
                            ({"window_quantiles": [None, "high"]}, "window_quantiles are")]:
        with pytest.raises(BrainzooError, match=f"spec.yaml: inference.deepbet: .*{message}"):
            pipeline.DeepbetSettings.from_spec({**values, **change}, "spec.yaml: inference.deepbet")


def test_nearest_exact_indices():
    np.testing.assert_array_equal(pipeline.nearest_exact_indices(7, 7), np.arange(7))
    np.testing.assert_array_equal(pipeline.nearest_exact_indices(256, 128), 2 * np.arange(128) + 1)
    # (48 + 0.5) * 2 / 97 is 1 exactly, but float32 makes it 0.99999997 and ATen's second rounding makes it 1.
    assert pipeline.nearest_exact_indices(2, 97)[48] == 1


def test_quantile_and_normalize():
    x = np.random.default_rng(6).gamma(2, 100, size=(40, 40, 40)).astype(np.float32)
    for q in SETTINGS.window_quantiles:
        assert pipeline.quantile(x, q) == pytest.approx(np.quantile(x, q), rel=1e-6)
    y = pipeline.normalize(x, *(pipeline.quantile(x, q) for q in SETTINGS.window_quantiles), MEAN_SD)
    assert y.dtype == np.float32
    assert (y.mean(), y.std(ddof=1)) == pytest.approx((0.449, 0.226), abs=1e-5)


def test_bounding_box_of_a_centred_cube():
    mask = np.zeros((128, 128, 128), dtype=bool)
    mask[32:96, 32:96, 32:96] = True
    # Centre 64 -> 128 on the 256 grid; extent 64 -> 128, grown by 20 % to 153.6, rounded to 154.
    assert pipeline.bounding_box(mask, (256, 256, 256), *BOX_NUMBERS) == (slice(51, 205, 1),) * 3
    # Clipped at the grid: extent 64 -> 32 -> 38.4 -> 38 around centre 32 of a 64 grid gives 13..51.
    assert pipeline.bounding_box(mask, (64, 256, 20), *BOX_NUMBERS)[0] == slice(13, 51, 1)


def test_fill_holes_fills_cavities_and_fill_voids_unseeded_border_pockets():
    shell = np.ones((5, 5, 5), dtype=bool)
    shell[1:4, 1:4, 1:4] = False
    assert pipeline.fill_holes(shell).all()
    # Voxel (0, 0, 1) touches faces x=0 and y=0, but in fill_voids' scan of both faces it continues a
    # background run from the row before ((2, 0, 0) and (0, 2, 0)), so it is never seeded and gets filled.
    mask = np.ones((3, 3, 3), dtype=bool)
    mask[2, 0, 0] = mask[0, 2, 0] = mask[0, 0, 1] = False
    filled = pipeline.fill_holes(mask)
    assert filled[0, 0, 1] and not filled[2, 0, 0] and not filled[0, 2, 0]


def test_largest_component_and_dilate():
    mask = np.zeros((12, 12, 12), dtype=bool)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels
    mask[5:8, 5:8, 5:8] = True  # 27 voxels
    mask[9, 9, 9] = mask[10, 10, 10] = True  # diagonal neighbours: one 26-connected component
    np.testing.assert_array_equal(pipeline.largest_component(mask), np.pad(np.ones((3, 3, 3), bool), ((5, 4),) * 3))
    single = np.zeros((5, 5, 5), dtype=bool)
    single[2, 2, 2] = True
    assert pipeline.dilate(single, 1).sum() == 7
    assert pipeline.dilate(np.ones((3, 3, 3), dtype=bool), -1).all()  # the array border is not eroded


def brightness_network(input_shape):
    """A real Keras network standing in for deepbet's: brain probability sigmoid(20 (x - 0.55)) of the
    normalised intensity, so bright voxels are brain; a per-voxel Dense layer and a softmax."""
    inputs = tf.keras.Input(input_shape)
    logits = tf.keras.layers.Dense(2)
    outputs = tf.keras.layers.Softmax()(logits(inputs))
    logits.set_weights([np.array([[-10.0, 10.0]], np.float32), np.array([5.5, -5.5], np.float32)])
    return tf.keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def brightness_extractor():
    return pipeline.DeepbetExtractor(brightness_network(SETTINGS.bbox_grid + (1,)),
                                     brightness_network(SETTINGS.segmentation_grid + (1,)), SETTINGS)


def phantom_head(affine: np.ndarray) -> nib.Nifti1Image:
    """A bright off-centre ellipsoid 'brain' on a dark background, in a 60 x 70 x 50 grid."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in (60, 70, 50)], indexing="ij")
    radius = np.sqrt(((grid[0] - 0.1) / 0.45) ** 2 + (grid[1] / 0.5) ** 2 + ((grid[2] + 0.2) / 0.5) ** 2)
    return nib.Nifti1Image(np.where(radius < 1, 100.0, 0.0).astype(np.float32), affine)


def test_extract_on_a_phantom_returns_native_space_images(brightness_extractor):
    # Voxel axes stored as (A->P, S->I, L->R): nothing like RAS, so every axis is reordered and flipped back.
    affine = np.array([[0, 0, 2.0, -50], [-2.0, 0, 0, 60], [0, -1.5, 0, 40], [0, 0, 0, 1]])
    image = phantom_head(affine)
    result = brightness_extractor.extract(image)
    brain = image.get_fdata() == 100
    assert result.mask.shape == image.shape and np.array_equal(result.mask.affine, affine)
    assert result.mask.get_data_dtype() == np.uint8 and result.probability.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asanyarray(result.mask.dataobj).astype(bool), brain)
    assert result.tiv_cm3 == pytest.approx(brain.sum() * 2 * 2 * 1.5 / 1000)
    canonical = brightness_extractor.extract(nib.as_closest_canonical(image))
    np.testing.assert_array_equal(nib.as_closest_canonical(result.probability).get_fdata(),
                                  canonical.probability.get_fdata())
    stacked = nib.Nifti1Image(image.get_fdata(dtype=np.float32)[..., None], affine)
    np.testing.assert_array_equal(brightness_extractor.extract(stacked).mask.get_fdata()[..., 0],
                                  result.mask.get_fdata())


def test_extract_errors_name_the_input(brightness_extractor, tmp_path):
    with pytest.raises(BrainzooError, match="missing.nii.gz"):
        brightness_extractor.extract(tmp_path / "missing.nii.gz")
    empty = tmp_path / "empty.nii.gz"
    nib.Nifti1Image(np.zeros((40, 40, 40), np.float32), np.eye(4)).to_filename(empty)
    with np.errstate(invalid="ignore"), pytest.raises(BrainzooError, match="empty.nii.gz: .*no head"):
        brightness_extractor.extract(empty)


# ---- parity with deepbet itself (torch and deepbet needed) ---------------------------------------------


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch", reason="parity with deepbet needs torch (env/requirements-dev.in)")
    pytest.importorskip("deepbet", reason="parity with deepbet needs deepbet (env/requirements-dev.in)")
    torch.set_num_threads(2)
    return torch


@pytest.fixture(scope="module")
def converted(torch):
    """Both networks converted in memory, with their TorchScript originals."""
    return {name: deepbet_convert.keras_from_torchscript(network)
            for name, network in deepbet_convert.NETWORKS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(deepbet_convert.NETWORKS))
def test_keras_network_matches_torchscript(converted, name):
    model, module, _ = converted[name]
    volume = deepbet_convert.self_check_input(model.input_shape[1:])
    assert deepbet_convert.max_abs_difference(module, model, volume) < 1e-3


def test_weights_have_no_subnormal_floats(converted):
    for model, module, _ in converted.values():
        assert deepbet_convert.subnormal_fraction([p.detach().numpy() for p in module.parameters()]) == 0
        assert deepbet_convert.subnormal_fraction(model.get_weights()) == 0


def test_convert_writes_a_loadable_model_and_its_record(converted, tmp_path):
    """Through the registry, as `brainzoo convert --arch deepbet-bbox DST --record R` runs it."""
    weights, record_file = tmp_path / "bbox.h5", tmp_path / "conversion" / "bbox.json"
    record_file.parent.mkdir()
    record = convert("deepbet-bbox", None, weights, record_file=record_file)
    assert record == json.loads(record_file.read_text()) and record_problems(record) == []
    assert record["self_check"]["status"] == "passed" and record["self_check"]["max_abs_difference"] < 1e-3
    assert record["self_check"]["subnormal_fraction"] == {"torchscript": 0.0, "keras": 0.0}
    assert record["source"]["package"] == "deepbet 1.0.2" and record["source"]["file"] == "data/models/bbox_model.pt"
    assert record["keras_model"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    loaded = tf.keras.models.load_model(weights, compile=False)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in converted["bbox"][0].layers]
    for ours, expected in zip(loaded.get_weights(), converted["bbox"][0].get_weights(), strict=True):
        np.testing.assert_array_equal(ours, expected)
    with pytest.raises(BrainzooError, match="already exists"):
        convert("deepbet-bbox", None, weights, record_file=record_file)
    with pytest.raises(BrainzooError, match="deepbet-bbox takes DST only"):
        convert("deepbet-bbox", weights, tmp_path / "other.h5")


def test_a_different_architecture_is_refused(converted):
    _, module, source = converted["bbox"]
    inputs = tf.keras.Input((32, 32, 32, 1))
    stem_only = tf.keras.Model(inputs, conv3d(inputs, 16, 7, strides=2, padding=1, use_bias=False, name="init_0"))
    with pytest.raises(BrainzooError, match=r"init_0: TorchScript .*'padding': \(3, 3, 3\)") as error:
        deepbet_convert.check_architecture(module, stem_only, source)
    assert "down0_block1_double_conv_0: no Keras layer" in str(error.value)
    with pytest.raises(BrainzooError, match="no Keras weight: down0.block1.double_conv.0.weight"):
        deepbet_convert.keras_arrays(module, stem_only, source)


def test_resampling_and_window_match_pytorch(torch):
    import torch.nn.functional as F
    from deepbet.utils import normalize
    for size_in, size_out in itertools.product(range(1, 260), (97, 128, 141, 218, 246, 256)):
        for a, b in ((size_in, size_out), (size_out, size_in)):
            line = torch.arange(a, dtype=torch.float32).reshape(1, 1, a, 1, 1)
            expected = F.interpolate(line, size=(b, 1, 1), mode="nearest-exact").flatten().long().numpy()
            np.testing.assert_array_equal(pipeline.nearest_exact_indices(a, b), expected, err_msg=f"{a} -> {b}")
    x = np.random.default_rng(7).gamma(2, 100, size=(128, 128, 128)).astype(np.float32)
    low, high = (pipeline.quantile(x, q) for q in SETTINGS.window_quantiles)
    assert (low, high) == tuple(torch.quantile(torch.from_numpy(x), q).item() for q in SETTINGS.window_quantiles)
    expected = normalize(torch.from_numpy(x), torch.tensor(low), torch.tensor(high)).numpy()
    np.testing.assert_allclose(pipeline.normalize(x, low, high, MEAN_SD), expected, atol=1e-6)


def random_masks(count: int, seed: int):
    """Blobby binary masks of assorted shapes, with holes, pockets on the border and several components."""
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    for _ in range(count):
        shape = tuple(rng.integers(6, 40, 3))
        yield ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.5, 2)) > 0.5 + 0.03 * rng.standard_normal()


def test_postprocessing_matches_cc3d_and_fill_voids(torch):
    import fill_voids
    from deepbet.utils import dilate, keep_largest_connected_component
    for mask in random_masks(150, seed=8):
        np.testing.assert_array_equal(pipeline.largest_component(mask), keep_largest_connected_component(mask.copy()))
        np.testing.assert_array_equal(pipeline.fill_holes(mask), fill_voids.fill(mask))
        for layers in (-2, -1, 1, 2):
            np.testing.assert_array_equal(pipeline.dilate(mask, layers), dilate(mask.copy(), layers))


def test_bounding_box_matches_deepbet(torch):
    from deepbet import BrainExtraction
    box_of = object.__new__(BrainExtraction).get_bbox_with_margin  # needs no networks
    for mask in random_masks(40, seed=9):
        if not mask.any():
            continue
        for shape in [(80, 88, 72), (181, 217, 181), (61, 95, 33)]:
            assert pipeline.bounding_box(mask, shape, *BOX_NUMBERS) == box_of(torch.from_numpy(mask.astype(np.float32)), shape, 0.1)


@pytest.mark.slow
@pytest.mark.skipif(not REAL_SCAN.is_file(), reason=f"{REAL_SCAN} is absent (real MRI lives in ../shared/data)")
def test_pipeline_matches_deepbet_on_a_real_scan(converted):
    from deepbet import BrainExtraction
    reference = BrainExtraction(no_gpu=True)
    probabilities = []
    run_model = reference.run_model
    reference.run_model = lambda volume: probabilities.append(run_model(volume)) or probabilities[-1]
    _, reference_mask, reference_tiv = reference.run(str(REAL_SCAN))

    ours = pipeline.DeepbetExtractor(converted["bbox"][0], converted["segmentation"][0], SETTINGS).extract(REAL_SCAN)
    assert ours.box == reference.bbox
    ours_probability = nib.as_closest_canonical(ours.probability).get_fdata(dtype=np.float32)
    assert np.abs(ours_probability - probabilities[0]).max() <= 1e-3
    a, b = np.asanyarray(ours.mask.dataobj).astype(bool), np.asanyarray(reference_mask.dataobj).astype(bool)
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.999
    assert ours.tiv_cm3 == pytest.approx(reference_tiv, rel=1e-3)


def test_a_torchscript_file_other_than_the_release_s_is_never_loaded(tmp_path, monkeypatch):
    """TorchScript deserialises code: a model.pt one byte off deepbet 1.0.2's is refused before torch reads it."""
    utils = pytest.importorskip("deepbet.utils", reason="needs deepbet (env/requirements-dev.in)")
    network = deepbet_convert.NETWORKS["segmentation"]
    (tmp_path / "models").mkdir()
    original = (Path(utils.DATA_PATH) / "models" / network.torchscript_file).read_bytes()
    (tmp_path / "models" / network.torchscript_file).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    monkeypatch.setattr(utils, "DATA_PATH", tmp_path)
    monkeypatch.setattr(deepbet_convert, "load_torchscript", lambda path: pytest.fail("a foreign file was loaded"))
    with pytest.raises(BrainzooError, match="model.pt: not deepbet 1.0.2's model.pt .*it is not loaded"):
        deepbet_convert.keras_from_torchscript(network)
