"""Damaged training data and specs: TFRecord shards checked before training, tables with every bad row reported,
and fuzz tests over the spec parser and the TFRecord reader (derandomised, a few seconds each)."""

from __future__ import annotations

import gzip
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brainzoo import catalogue
from brainzoo.errors import BrainzooError
from brainzoo.training.tfrecords import check_records, read_dataset, read_table, write_tfrecords
from conftest import REPO, brainzoo

SHAPE = (6, 5, 4)
FUZZ = settings(max_examples=80, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def write_table(folder, ages) -> object:
    """One small int16 volume per age, listed with its age and sex in ``folder/table.csv``."""
    rng = np.random.default_rng(0)
    lines = ["path,age,sex"]
    for index, age in enumerate(ages):
        nib.save(nib.Nifti1Image(rng.integers(0, 500, SHAPE).astype(np.int16), np.eye(4)), folder / f"v{index}.nii.gz")
        lines.append(f"v{index}.nii.gz,{age},{'FM'[index % 2]}")
    (folder / "table.csv").write_text("\n".join(lines) + "\n")
    return folder / "table.csv"


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> bytes:
    """The bytes of a real uncompressed shard of three regression records."""
    folder = tmp_path_factory.mktemp("shard")
    [path] = write_tfrecords(write_table(folder, [30, 41, 52]), folder / "out", kind="regression", compress=False,
                             progress=False)
    return path.read_bytes()


def test_a_damaged_shard_is_named_with_its_record_before_training(shard, tmp_path):
    good, bad = tmp_path / "shard-000.tfrec", tmp_path / "shard-001.tfrec"
    good.write_bytes(shard)
    damaged = bytearray(shard)
    damaged[-100] ^= 0xFF  # in the last record's data: its CRC no longer matches
    bad.write_bytes(bytes(damaged))
    assert check_records(good) == 3
    with pytest.raises(BrainzooError, match=r"shard-001.tfrec: record 3 is damaged or truncated .*corrupted record"):
        check_records(tmp_path)
    bad.write_bytes(gzip.compress(shard)[:-20])
    with pytest.raises(BrainzooError, match=r"shard-001.tfrec: record \d is damaged or truncated"):
        check_records(bad)


def test_records_of_two_conversions_do_not_mix(shard, tmp_path):
    folder = tmp_path / "table"
    folder.mkdir()
    table = write_table(folder, [30, 41])
    table.write_text(table.read_text().replace("age,sex", "age,weight").replace(",F", ",70").replace(",M", ",80"))
    [other] = write_tfrecords(read_table(table, kind="regression", scalar_columns=["age", "weight"]),
                              tmp_path / "other", kind="regression", compress=False, progress=False)
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "shard-000.tfrec").write_bytes(shard)
    (tmp_path / "mixed" / "shard-001.tfrec").write_bytes(other.read_bytes())
    with pytest.raises(BrainzooError, match=r"shard-001.tfrec: record 1 has label rank and scalars .*scalars/weight"):
        check_records(tmp_path / "mixed")


def test_train_refuses_a_damaged_validation_shard_before_it_starts(shard, tmp_path):
    train, validation = tmp_path / "train", tmp_path / "validation"
    train.mkdir()
    validation.mkdir()
    (train / "shard-000.tfrec").write_bytes(shard)
    (validation / "shard-000.tfrec").write_bytes(shard[: len(shard) // 2])
    proc = brainzoo("train", "neuronets/sfcn-ukbiobank/1.0.0", "--train", str(train), "--validation", str(validation),
                    "--out", str(tmp_path / "run"), cwd=REPO)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{validation / 'shard-000.tfrec'}: record 2 is damaged or truncated" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_every_bad_row_of_a_table_is_reported_at_once(tmp_path):
    table = write_table(tmp_path, [30, 40, 50, 60])
    table.write_text(table.read_text().replace(",40,", ",forty,").replace(",60,", ",,"))
    with pytest.raises(BrainzooError) as error:
        read_table(table, kind="regression")
    assert str(error.value).splitlines() == [
        f"{table}: 2 of 4 rows cannot be used:",
        f"{table} row 2: column 'age' is 'forty', not a number",
        f"{table} row 4: column 'age' is empty"]


def test_duplicates_and_ages_out_of_range_are_said_and_a_failure_leaves_no_folder(tmp_path):
    table = write_table(tmp_path, [30, -4, 130])
    table.write_text(table.read_text() + "v0.nii.gz,30,F\n")
    out = tmp_path / "records" / "train"
    with pytest.warns(UserWarning) as said:
        write_tfrecords(table, out, kind="regression", progress=False)
    messages = [str(warning.message) for warning in said]
    assert any("row 4: volume" in m and "v0.nii.gz is also in" in m and "row 1" in m for m in messages)
    assert any("row 2: age -4 is outside 0-120 years" in m for m in messages)
    assert any("row 3: age 130 is outside 0-120 years" in m for m in messages)
    shutil.rmtree(tmp_path / "records")
    (tmp_path / "v2.nii.gz").write_bytes(b"not an image")  # a header fault: refused before any folder is made
    nib.save(nib.Nifti1Image(np.full(SHAPE, np.nan, np.float32), np.eye(4)), tmp_path / "v1.nii.gz")
    with warnings.catch_warnings(), pytest.raises(BrainzooError, match="v2.nii.gz is not a readable image"):
        warnings.simplefilter("ignore")
        write_tfrecords(table, out, kind="regression", progress=False)
    (tmp_path / "v2.nii.gz").unlink()
    table.write_text(table.read_text().replace("v2.nii.gz", "v1.nii.gz"))
    with warnings.catch_warnings(), pytest.raises(BrainzooError, match="v1.nii.gz has 120 NaN"):
        warnings.simplefilter("ignore")  # a voxel fault: found while writing, after the folder was made
        write_tfrecords(table, out, kind="regression", progress=False)
    assert not (tmp_path / "records").exists()


shard_mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
)


def mutate(pristine: bytes, mutations) -> bytes:
    content = bytearray(pristine)
    for kind, where, value in mutations:
        where %= max(len(content), 1)
        if kind == "byte" and content:
            content[where] = value
        elif kind == "truncate":
            del content[where:]
        elif kind == "insert":
            content.insert(where, value)
    return bytes(content)


@FUZZ
@given(mutations=st.lists(shard_mutation, min_size=1, max_size=3), compressed=st.booleans())
def test_any_damaged_shard_is_a_brainzoo_error_naming_it(tmp_path, shard, mutations, compressed):
    content = mutate(gzip.compress(shard) if compressed else shard, mutations)
    path = tmp_path / "shard-000.tfrec"
    path.write_bytes(content)
    try:
        count = check_records(path)
    except BrainzooError as error:
        assert str(error).startswith(f"{path}: ")
        return
    # What passes the check reads in full.
    assert len(list(read_dataset(path).as_numpy_iterator())) == count


SPEC = REPO / "neuronets" / "deepbet" / "1.0.2"
HOSTILE_VALUES = ["", "~", "[]", "{}", "-1", "1e999", ".nan", "'", '"', ": :", "\t", "9" * 400, "!!binary AAAA",
                  "!!python/object/apply:os.system ['echo owned']", "*missing", "&a [*a]", "[[[[[[[[[[", "\x00", "yes"]
spec_mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("drop-line"), st.integers(0, 10**6), st.just("")),
    st.tuples(st.just("value"), st.integers(0, 10**6), st.sampled_from(HOSTILE_VALUES)),
)


def mutate_spec(text: bytes, mutations) -> bytes:
    lines = text.split(b"\n")
    for kind, where, value in mutations:
        index = where % len(lines)
        if kind == "byte":
            content = bytearray(b"\n".join(lines))
            content[where % len(content)] = value
            lines = bytes(content).split(b"\n")
        elif kind == "drop-line":
            del lines[index]
        elif b":" in lines[index]:  # a key's value replaced
            key = lines[index].split(b":", 1)[0]
            lines[index] = key + b": " + value.encode()
    return b"\n".join(lines)


@pytest.fixture(scope="module")
def pristine_spec() -> tuple[bytes, bytes]:
    return (SPEC / "spec.yaml").read_bytes(), (SPEC / "model_card.yaml").read_bytes()


@FUZZ
@given(mutations=st.lists(spec_mutation, min_size=1, max_size=3))
def test_any_damaged_spec_is_a_brainzoo_error(tmp_path, pristine_spec, mutations):
    folder = tmp_path / "neuronets" / "deepbet" / "1.0.2"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.yaml").write_bytes(mutate_spec(pristine_spec[0], mutations))
    (folder / "model_card.yaml").write_bytes(pristine_spec[1])
    try:
        version = catalogue.load_version(folder, tmp_path)
    except BrainzooError:
        return
    assert version.id == "neuronets/deepbet/1.0.2" and isinstance(version.spec, dict)
