"""Damaged and malformed scans: a flipped bit, no usable orientation, or any header value stops the load with a
BrainzooError naming the file, never a traceback and never a quietly wrong volume."""

from __future__ import annotations

import gzip
import warnings

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brainzoo.errors import BrainzooError
from brainzoo.predict.volumes import load_mask, load_volume
from conftest import SHARED_DATA, needs_shared_data

SHAPE = (12, 10, 8)


def _head(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, SHAPE).astype(np.int16)


def _write(path, data=None, affine=np.diag([2.0, 2, 2, 1])):
    nib.save(nib.Nifti1Image(_head() if data is None else data, affine), path)
    return path


def _flip_bit(path, position: int, bit: int = 0) -> None:
    content = bytearray(path.read_bytes())
    content[position] ^= 1 << bit
    path.write_bytes(bytes(content))


def _deflate_start(content: bytes) -> int:
    """Where a gzip member's compressed data starts: after its 10 fixed bytes and the file name nibabel writes."""
    fname_flag = 0x08
    return content.index(b"\0", 10) + 1 if content[3] & fname_flag else 10


def test_a_flipped_bit_in_the_compressed_stream_is_refused(tmp_path):
    """Some flips break the deflate stream, others decode to different voxels that only the CRC catches."""
    pristine = _write(tmp_path / "pristine.nii.gz").read_bytes()
    for position in range(_deflate_start(pristine), len(pristine), max(1, len(pristine) // 25)):
        damaged = tmp_path / f"damaged-{position}.nii.gz"
        damaged.write_bytes(pristine)
        _flip_bit(damaged, position, bit=position % 8)
        with pytest.raises(BrainzooError, match=rf"{damaged.name}: "):
            load_volume(damaged)


def test_a_damaged_crc_or_length_is_refused_even_when_every_voxel_decodes(tmp_path):
    path = _write(tmp_path / "scan.nii.gz")
    for position, what in ((-8, "CRC"), (-4, "length")):
        damaged = tmp_path / f"bad-{what}.nii.gz"
        damaged.write_bytes(path.read_bytes())
        _flip_bit(damaged, position)
        with pytest.raises(BrainzooError, match=rf"bad-{what}\.nii\.gz: the compressed data is damaged"):
            load_volume(damaged)
    with pytest.raises(BrainzooError, match=r"bad-CRC\.nii\.gz: the compressed data is damaged"):
        load_volume(nib.load(tmp_path / "bad-CRC.nii.gz"))  # an image read lazily elsewhere is checked too
    reference = load_volume(_write(tmp_path / "reference.nii.gz"))
    with pytest.raises(BrainzooError, match=r"bad-CRC\.nii\.gz: the compressed data is damaged"):
        load_mask(tmp_path / "bad-CRC.nii.gz", reference)


def test_a_checked_gzip_scan_has_the_values_nibabel_reads(tmp_path):
    data = _head(3)
    path = tmp_path / "scaled.nii.gz"
    image = nib.Nifti1Image(data, np.diag([1.5, 1.5, 3, 1]))
    image.header.set_slope_inter(0.5, -3)
    nib.save(image, path)
    np.testing.assert_array_equal(load_volume(path).get_fdata(), data * 0.5 - 3)
    series = np.stack([data, data + 1], axis=-1)
    nib.save(nib.Nifti1Image(series, np.eye(4)), tmp_path / "series.nii.gz")
    with pytest.warns(UserWarning, match="4D series"):
        np.testing.assert_array_equal(load_volume(tmp_path / "series.nii.gz").get_fdata(), data)


@needs_shared_data
def test_a_real_scan_loads_as_nibabel_reads_it_and_its_damaged_copy_does_not(tmp_path):
    scan = SHARED_DATA / "ixi" / "raw" / "IXI533-Guys-1066-T1.nii.gz"
    np.testing.assert_array_equal(load_volume(scan).get_fdata(), nib.load(scan).get_fdata(dtype=np.float32))
    content = bytearray(scan.read_bytes())
    content[len(content) // 2] ^= 0x10
    damaged = tmp_path / scan.name
    damaged.write_bytes(bytes(content))
    with pytest.raises(BrainzooError, match=rf"{damaged}: the compressed data is damaged"):
        load_volume(damaged)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("pixdim,qform_code", [((0, 0, 0), 0), ((-1, -1, -1), 0), ((1, 0, 1), 0), ((1, 1, -2), 1)])
def test_no_usable_orientation_is_refused_with_what_to_fix(tmp_path, suffix, pixdim, qform_code):
    header = nib.Nifti1Header()
    image = nib.Nifti1Image(_head(), None, header)
    image.header.set_sform(None, code=0)
    image.header.set_qform(np.eye(4) if qform_code else None, code=qform_code)
    image.header["pixdim"][1:4] = pixdim
    path = tmp_path / f"nowhere{suffix}"
    image.to_filename(path)
    with open(path, "rb") as stream:  # what nibabel would otherwise silently change to 1 mm
        stored = nib.Nifti1Header.from_fileobj(gzip.open(stream) if suffix.endswith(".gz") else stream, check=False)
        assert list(stored["pixdim"][1:4]) == list(pixdim)
    with pytest.raises(BrainzooError, match=rf"nowhere{suffix}: no usable orientation: .*set a qform/sform, or fix "
                                            "pixdim"):
        load_volume(path)


def test_positive_pixdim_without_sform_or_qform_still_loads(tmp_path):
    image = nib.Nifti1Image(_head(), None)
    image.header.set_sform(None, code=0)
    image.header.set_qform(None, code=0)
    image.header.set_zooms((1.2, 1.2, 1.5))
    image.to_filename(tmp_path / "analyze-style.nii.gz")
    assert load_volume(tmp_path / "analyze-style.nii.gz").header.get_zooms() == pytest.approx((1.2, 1.2, 1.5))


def test_an_sform_makes_pixdim_irrelevant(tmp_path):
    image = nib.Nifti1Image(_head(), np.diag([2.0, 2, 2, 1]))
    image.header["pixdim"][1:4] = 0
    image.to_filename(tmp_path / "sform.nii")
    assert load_volume(tmp_path / "sform.nii").shape == SHAPE


# Header fields, each with an index into it when it is an array (dim, pixdim, srow_*...).
HEADER_DTYPE = nib.nifti1.header_dtype
FIELDS = [(name, index) for name in HEADER_DTYPE.names
          for index in range(int(np.prod(HEADER_DTYPE[name].shape, dtype=int)) or 1)]
EXTREMES = [0, 1, -1, 2, 3, 4, 7, 8, 16, 64, 348, 352, 540, 1000, 2**15 - 1, -2**15, 2**31 - 1, -2**31,
            float("nan"), float("inf"), float("-inf"), 1e-40, 1e30, -1e30, 0.5]
mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 351), st.integers(0, 255)),
    st.tuples(st.just("byte"), st.integers(0, 352 + 2 * int(np.prod(SHAPE)) - 1), st.integers(0, 255)),
    st.tuples(st.just("field"), st.sampled_from(FIELDS), st.one_of(st.sampled_from(EXTREMES),
                                                                  st.integers(-2**31, 2**31 - 1))),
    st.tuples(st.just("truncate"), st.integers(0, 352 + 2 * int(np.prod(SHAPE))), st.just(0)),
)


def _mutated(pristine: bytes, mutations) -> bytes:
    content = bytearray(pristine)
    for kind, where, value in mutations:
        if kind == "byte" and where < len(content):
            content[where] = value
        elif kind == "truncate":
            del content[where:]
        elif kind == "field" and len(content) >= HEADER_DTYPE.itemsize:
            (name, index), header = where, np.frombuffer(bytes(content[:HEADER_DTYPE.itemsize]), HEADER_DTYPE).copy()
            field = header[name].reshape(-1) if HEADER_DTYPE[name].shape else header[name]
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # out-of-range values wrap, as a damaged byte would
                field[index] = np.array(value).astype(HEADER_DTYPE[name].base)
            if HEADER_DTYPE[name].shape:
                header[name] = field.reshape(HEADER_DTYPE[name].shape)
            content[:HEADER_DTYPE.itemsize] = header.tobytes()
    return bytes(content)


@pytest.fixture(scope="module")
def pristine_nifti(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("pristine") / "scan.nii"
    return _write(path).read_bytes()


@settings(max_examples=200, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation, min_size=1, max_size=4), compressed=st.booleans())
def test_any_malformed_header_or_stream_is_a_brainzoo_error(tmp_path, pristine_nifti, mutations, compressed):
    content = _mutated(pristine_nifti, mutations)
    path = tmp_path / ("fuzzed.nii.gz" if compressed else "fuzzed.nii")
    path.write_bytes(gzip.compress(content) if compressed else content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 4D series' warning, nibabel's complaints
        try:
            image = load_volume(path)
        except BrainzooError as error:
            assert str(path) in str(error)
            return
    assert image.shape[:3] == image.get_fdata().shape and np.all(np.isfinite(image.get_fdata()))
