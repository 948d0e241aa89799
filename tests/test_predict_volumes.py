"""Loading and checking input scans, and the round trip between native and model grids."""

import gzip
import warnings

import nibabel as nib
import numpy as np
import pytest

from brainzoo.errors import BrainzooError
from brainzoo.predict.volumes import (GriddedVolume, conform, load_mask, load_volume, native_like, reorient,
                                      resample, resample_indices)

# A voxel-to-world affine whose axes run left, inferior, anterior (LIA, as FreeSurfer's conformed images).
LIA = np.array([[-1.0, 0, 0, 20], [0, 0, 1, -30], [0, -1, 0, 40], [0, 0, 0, 1]])


def _noise(shape, seed=0):
    return np.random.default_rng(seed).normal(100, 10, shape).astype(np.float32)


def _write(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _truncated(tmp_path):
    whole = _write(tmp_path / "whole.nii.gz", _noise((20, 20, 20)))
    content = whole.read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(content[: len(content) // 2])
    return path


def _not_nifti(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"these are not voxels" * 50))
    return path


def _mgh(tmp_path):
    path = tmp_path / "scan.mgz"
    nib.save(nib.MGHImage(_noise((10, 10, 10)), np.eye(4)), path)
    return path


def _singular_sform(tmp_path):
    header = nib.Nifti1Header()
    header.set_sform(np.diag([1.0, 1, 0, 1]), code=2)
    path = tmp_path / "flat_sform.nii.gz"
    nib.save(nib.Nifti1Image(_noise((10, 10, 10)), None, header), path)
    return path


def _with_value(value):
    data = _noise((10, 11, 12))
    data[3, 4, 5] = value
    return data


BAD_INPUTS = {
    "missing file": (lambda tmp: tmp / "absent.nii.gz", "no such file"),
    "not an image": (_not_nifti, "not a NIfTI"),
    "other format": (_mgh, "not a NIfTI"),
    "truncated gzip": (_truncated, "truncated"),
    "2D image": (lambda tmp: _write(tmp / "slice.nii.gz", _noise((30, 30))), "2D"),
    "single slice": (lambda tmp: _write(tmp / "slab.nii.gz", _noise((30, 30, 1))), "2D"),
    "5D image": (lambda tmp: _write(tmp / "vector.nii.gz", _noise((8, 8, 8, 1, 3))), "5 dimensions"),
    "all zero": (lambda tmp: _write(tmp / "zero.nii.gz", np.zeros((10, 10, 10), np.float32)), "constant"),
    "constant": (lambda tmp: _write(tmp / "flat.nii.gz", np.full((10, 10, 10), 7, np.int16)), "every voxel is 7"),
    "NaN voxel": (lambda tmp: _write(tmp / "nan.nii.gz", _with_value(np.nan)), "NaN"),
    "Inf voxel": (lambda tmp: _write(tmp / "inf.nii.gz", _with_value(np.inf)), "infinite"),
    "tiny voxels": (lambda tmp: _write(tmp / "tiny.nii.gz", _noise((10, 10, 10)), np.diag([0.05, 1, 1, 1])),
                    "voxel size"),
    "huge voxels": (lambda tmp: _write(tmp / "huge.nii.gz", _noise((10, 10, 10)), np.diag([1, 12, 1, 1])),
                    "voxel size"),
    "singular affine": (_singular_sform, "affine"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise_an_error_naming_the_file(tmp_path, case):
    make, problem = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(BrainzooError) as error:
        load_volume(path)
    assert str(path) in str(error.value)
    assert problem in str(error.value)


def test_memory_guard_refuses_large_volumes_before_reading_them(tmp_path):
    path = _write(tmp_path / "big.nii.gz", _noise((20, 20, 20)))
    with pytest.raises(BrainzooError, match="8000 voxels, more than the limit of 7999"):
        load_volume(path, max_voxels=7999)
    assert load_volume(path, max_voxels=8000).shape == (20, 20, 20)


def test_4d_series_gives_its_first_volume_with_a_warning(tmp_path):
    series = np.stack([_noise((9, 10, 11), seed) for seed in range(3)], axis=-1)
    path = _write(tmp_path / "series.nii.gz", series, np.diag([2.0, 2, 2, 1]))
    with pytest.warns(UserWarning, match="4D series of 3 volumes"):
        img = load_volume(path)
    assert img.shape == (9, 10, 11)
    np.testing.assert_array_equal(img.get_fdata(), series[..., 0])
    np.testing.assert_array_equal(img.affine, np.diag([2.0, 2, 2, 1]))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_named_volume_of_a_series_is_read_without_a_warning(tmp_path, suffix):
    """``volume``: that volume (the last too, whose bytes end the gzip stream), not the first; silently."""
    series = np.stack([_noise((9, 10, 11), seed) for seed in range(3)], axis=-1)
    path = _write(tmp_path / f"series{suffix}", series, np.diag([2.0, 2, 2, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for index in range(3):
            np.testing.assert_array_equal(load_volume(path, volume=index).get_fdata(), series[..., index])
    with pytest.raises(BrainzooError, match=r"is a 4D series of 3 volumes; this model takes volume 3 \(counted"):
        load_volume(path, volume=3)


def test_loaded_volume_keeps_values_affine_and_header(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    original = nib.Nifti1Image(data, LIA)
    original.header.set_slope_inter(0.5, 10)
    original.header.set_qform(LIA, code=1)
    path = tmp_path / "scaled.nii.gz"
    nib.save(original, path)
    img = load_volume(path)
    assert np.asarray(img.dataobj).dtype == np.float32
    np.testing.assert_allclose(np.asarray(img.dataobj), data * 0.5 + 10)
    np.testing.assert_array_equal(img.affine, LIA)
    assert int(img.header["qform_code"]) == 1


def test_conform_and_back_is_exact_for_odd_non_cubic_shapes():
    data = _noise((37, 50, 23))
    native = GriddedVolume.native(nib.Nifti1Image(data, LIA))
    for shape in ([48, 32, 64], [38, 24, 51], [37, 23, 50]):
        conformed = conform(native, "RAS", [1, 1, 1], shape)
        assert nib.aff2axcodes(conformed.affine) == ("R", "A", "S")
        np.testing.assert_array_equal(conformed.to_native_grid(conformed.data), data)


def test_conform_crops_symmetrically_and_the_way_back_fills_zeros():
    data = _noise((40, 40, 40))
    conformed = conform(GriddedVolume.native(nib.Nifti1Image(data, np.eye(4))), "RAS", [1, 1, 1], [30, 40, 50])
    np.testing.assert_array_equal(conformed.data[:, :, 5:45], data[5:35])
    back = conformed.to_native_grid(conformed.data)
    np.testing.assert_array_equal(back[5:35], data[5:35])
    assert not back[:5].any() and not back[35:].any()


def test_resampling_keeps_world_positions():
    """A bright voxel on a 1.5x1x3 mm grid lands at the same world position on a 1 mm grid."""
    data = np.zeros((31, 40, 17), np.float32)
    data[10, 21, 7] = 1000
    affine = np.array([[1.5, 0, 0, -20], [0, 1, 0, -15], [0, 0, 3, -25], [0, 0, 0, 1]])
    conformed = conform(GriddedVolume.native(nib.Nifti1Image(data, affine)), "RAS", [1, 1, 1], [64, 64, 64])
    centre = np.average(np.argwhere(conformed.data > 0), axis=0, weights=conformed.data[conformed.data > 0])
    world = conformed.affine @ np.append(centre, 1)
    np.testing.assert_allclose(world[:3], (affine @ [10, 21, 7, 1])[:3], atol=1e-6)


def _oblique(rng) -> np.ndarray:
    """A voxel map with rotation, anisotropic scaling and a shift."""
    new_to_old = np.eye(4)
    new_to_old[:3, :3] = np.linalg.qr(rng.normal(size=(3, 3)))[0] * rng.uniform(0.4, 2.5, 3)
    new_to_old[:3, 3] = rng.uniform(-5, 10, 3)
    return new_to_old


@pytest.mark.parametrize("order", [0, 1])
def test_fortran_order_arrays_resample_exactly_as_c_order_ones(order):
    """nibabel hands out Fortran-order arrays; they take a transposed, faster path to the same values."""
    rng = np.random.default_rng(1)
    data = np.asfortranarray(rng.random((20, 23, 17), dtype=np.float32))
    for out_to_in in (_oblique(rng), np.diag([1.7, 0.6, 2.0, 1.0])):
        fortran = resample_indices(data, out_to_in, (15, 19, 21), order=order)
        c_order = resample_indices(np.ascontiguousarray(data), out_to_in, (15, 19, 21), order=order)
        np.testing.assert_allclose(fortran, c_order, rtol=0, atol=1e-6)  # the 8 neighbours summed in another order


@pytest.mark.parametrize("order", [0, 1])
def test_the_way_back_samples_only_near_non_zero_values_and_gets_the_same_result(order):
    """A block of values in a grid of zeros (a brain-centred block's output) under oblique maps."""
    rng = np.random.default_rng(0)
    for trial in range(10):
        new_to_old = _oblique(rng)
        volume = GriddedVolume(np.zeros((30, 31, 32), np.float32), new_to_old, np.eye(4), (40, 37, 45))
        block = np.zeros((30, 31, 32), np.float32)
        low = rng.integers(0, 20, 3)
        block[low[0]:low[0] + 8, low[1]:low[1] + 9, low[2]:low[2] + 7] = rng.random((8, 9, 7))
        whole = resample_indices(block, np.linalg.inv(new_to_old), (40, 37, 45), order=order)
        np.testing.assert_allclose(volume.to_native_grid(block, order=order), whole, rtol=0, atol=1e-6)
    assert not volume.to_native_grid(np.zeros((30, 31, 32), np.float32)).any()


def test_spacing_within_header_rounding_counts_as_equal():
    data = _noise((20, 21, 22))
    affine = np.diag([0.9375, 0.9375, 1.2000022, 1])
    resampled = resample(GriddedVolume.native(nib.Nifti1Image(data, affine)), [0.9375, 0.9375, 1.2], [20, 21, 22])
    np.testing.assert_array_equal(resampled.data, data)


def test_reorient_to_lps_flips_without_interpolation():
    data = _noise((5, 6, 7))
    lps = reorient(GriddedVolume.native(nib.Nifti1Image(data, np.eye(4))), "LPS")
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    np.testing.assert_array_equal(lps.data, data[::-1, ::-1, :])
    np.testing.assert_array_equal(lps.to_native_grid(lps.data), data)


def test_native_like_keeps_header_and_sets_the_type(tmp_path):
    source = nib.Nifti1Image(np.arange(120, dtype=np.int16).reshape(4, 5, 6), LIA)
    source.header.set_qform(LIA, code=1)
    source.header.set_sform(LIA, code=4)
    source.header.set_xyzt_units("mm", "sec")
    source.header["cal_max"] = 4000
    path = tmp_path / "source.nii.gz"
    nib.save(source, path)
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3, 2:4, 3:5] = True
    out = native_like(load_volume(path), mask, np.uint8)
    nib.save(out, tmp_path / "mask.nii.gz")
    written = nib.load(tmp_path / "mask.nii.gz")
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask)
    for form in ("qform", "sform"):
        matrix, code = getattr(written.header, f"get_{form}")(coded=True)
        expected, expected_code = getattr(source.header, f"get_{form}")(coded=True)
        np.testing.assert_allclose(matrix, expected)
        assert code == expected_code
    assert written.header.get_xyzt_units() == ("mm", "sec")
    assert float(written.header["cal_max"]) == 0


def test_mask_on_another_grid_is_brought_onto_the_image_grid(tmp_path):
    image = nib.Nifti1Image(_noise((12, 13, 14)), np.eye(4))
    mask = np.zeros((12, 13, 14), np.uint8)
    mask[2:7, 3:9, 4:12] = 1
    to_lps = nib.orientations.inv_ornt_aff([[0, -1], [1, -1], [2, 1]], mask.shape)
    flipped = nib.Nifti1Image(mask[::-1, ::-1].copy(), to_lps)
    np.testing.assert_array_equal(load_mask(flipped, image), mask.astype(bool))
    far_away = np.eye(4)
    far_away[0, 3] = 100
    with pytest.raises(BrainzooError, match="does not overlap"):
        load_mask(nib.Nifti1Image(mask, far_away), image)


def test_in_memory_images_are_checked_too():
    with pytest.raises(BrainzooError, match="in-memory image.*NaN"):
        load_volume(nib.Nifti1Image(_with_value(np.nan), np.eye(4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_volume(nib.Nifti1Image(_noise((5, 6, 7)), np.eye(4))).shape == (5, 6, 7)
