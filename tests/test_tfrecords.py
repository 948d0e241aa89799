"""NIfTI tables -> TFRecords: round trips, nobrainer interoperability both ways, and bad inputs."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from nobrainer.dataset import Dataset as NobrainerDataset
from nobrainer.tfrecord import parse_example_fn
from nobrainer.tfrecord import write as nobrainer_write

from brainzoo.errors import BrainzooError
from brainzoo.training.tfrecords import Example, read_bids, read_dataset, read_table, write_tfrecords

SHAPE = (12, 14, 16)
LAS = np.diag([-2.0, 2.0, 2.0, 1.0])  # not RAS, so reorientation is exercised


def save(path: Path, data: np.ndarray, affine: np.ndarray = LAS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def ras(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(nib.load(path))
    return image.get_fdata(dtype=np.float32), image.affine.astype(np.float32)


def make_table(folder: Path, n: int = 4, shape=SHAPE, separator: str = ",") -> Path:
    """``n`` volumes (int16 on disk) with binary labels, ages and F/M sexes, listed in a CSV or TSV."""
    rng = np.random.default_rng(0)
    lines = [separator.join(["path", "label", "age", "sex"])]
    for index in range(n):
        save(folder / f"t1_{index}.nii.gz", rng.integers(0, 1000, shape).astype(np.int16))
        save(folder / f"mask_{index}.nii.gz", (rng.random(shape) > 0.5).astype(np.uint8))
        lines.append(separator.join([f"t1_{index}.nii.gz", f"mask_{index}.nii.gz", f"{30 + index}", "FM"[index % 2]]))
    table = folder / ("table.tsv" if separator == "\t" else "table.csv")
    table.write_text("\n".join(lines) + "\n")
    return table


def records(files) -> list[tf.train.Example]:
    return [tf.train.Example.FromString(raw.numpy())
            for raw in tf.data.TFRecordDataset([str(f) for f in files], compression_type="GZIP")]


def test_segmentation_round_trip_is_ras_and_self_describing(tmp_path):
    table = make_table(tmp_path)
    shards = write_tfrecords(table, tmp_path / "out", kind="segmentation", shard_size=3, progress=False)
    assert [s.name for s in shards] == ["shard-000.tfrec.gz", "shard-001.tfrec.gz"]
    elements = list(read_dataset(tmp_path / "out").as_numpy_iterator())
    assert len(elements) == 4
    for index, element in enumerate(elements):
        volume, affine = ras(tmp_path / f"t1_{index}.nii.gz")
        label, _ = ras(tmp_path / f"mask_{index}.nii.gz")
        np.testing.assert_array_equal(element["volume"], volume)
        np.testing.assert_array_equal(element["label"], label)
        np.testing.assert_allclose(element["affine"], affine)
        assert element["volume"].dtype == np.float32
    first = records(shards[:1])[0].features.feature
    assert first["feature/source_dtype"].bytes_list.value == [b"int16"]
    assert first["label/source_dtype"].bytes_list.value == [b"uint8"]
    assert first["feature/dtype"].bytes_list.value == [b"float32"]


def test_regression_round_trip_from_tsv_with_sex_codes(tmp_path):
    table = make_table(tmp_path, separator="\t")
    write_tfrecords(table, tmp_path / "out", kind="regression", shard_size=2, compress=False, progress=False)
    elements = list(read_dataset(sorted((tmp_path / "out").glob("*.tfrec"))).as_numpy_iterator())
    assert [float(e["age"]) for e in elements] == [30.0, 31.0, 32.0, 33.0]
    assert [float(e["label"]) for e in elements] == [30.0, 31.0, 32.0, 33.0]
    assert [float(e["sex"]) for e in elements] == [0.0, 1.0, 0.0, 1.0]  # F -> 0, M -> 1


@pytest.mark.parametrize("compress", [True, False])
def test_nobrainer_parses_our_records(tmp_path, compress):
    table = make_table(tmp_path, n=2, shape=(16, 16, 16))
    seg = write_tfrecords(table, tmp_path / "seg", kind="segmentation", compress=compress, progress=False)
    reg = write_tfrecords(table, tmp_path / "reg", kind="regression", compress=compress, progress=False)
    compression = "GZIP" if compress else None
    parsed = tf.data.TFRecordDataset([str(s) for s in seg], compression_type=compression).map(
        parse_example_fn((16, 16, 16)))
    for index, (volume, label) in enumerate(parsed):
        np.testing.assert_array_equal(volume, ras(tmp_path / f"t1_{index}.nii.gz")[0])
        np.testing.assert_array_equal(label, ras(tmp_path / f"mask_{index}.nii.gz")[0])
    parsed = tf.data.TFRecordDataset([str(s) for s in reg], compression_type=compression).map(
        parse_example_fn((16, 16, 16), scalar_labels=True))
    assert [float(label[0]) for _, label in parsed] == [30.0, 31.0]
    blocks = NobrainerDataset.from_tfrecords(str(tmp_path / "seg" / "shard-*"), 2, (16, 16, 16), block_shape=(8, 8, 8))
    assert sum(1 for _ in blocks.dataset) == 2 * 8


def test_we_read_records_written_by_nobrainer(tmp_path):
    make_table(tmp_path, n=3)
    volumes = [str(tmp_path / f"t1_{i}.nii.gz") for i in range(3)]
    labels = [str(tmp_path / f"mask_{i}.nii.gz") for i in range(3)]
    (tmp_path / "seg").mkdir()  # nobrainer.tfrecord.write does not create the folder
    (tmp_path / "reg").mkdir()
    nobrainer_write(list(zip(volumes, labels)), str(tmp_path / "seg" / "data_shard-{shard:03d}.tfrec"), 2,
                    processes=1, verbose=0)
    nobrainer_write([(v, age) for v, age in zip(volumes, (40, 50, 60))],
                    str(tmp_path / "reg" / "data_shard-{shard:03d}.tfrec"), 2, processes=1, verbose=0)
    segmentation = list(read_dataset(tmp_path / "seg").as_numpy_iterator())
    for index, element in enumerate(segmentation):
        volume, affine = ras(Path(volumes[index]))
        np.testing.assert_array_equal(element["volume"], volume)
        np.testing.assert_array_equal(element["label"], ras(Path(labels[index]))[0])
        np.testing.assert_allclose(element["affine"], affine)
    regression = list(read_dataset(str(tmp_path / "reg" / "*.tfrec")).as_numpy_iterator())
    assert [float(e["label"]) for e in regression] == [40.0, 50.0, 60.0]


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def put_nan(path: Path) -> None:
    data = nib.load(path).get_fdata(dtype=np.float32)
    data[3, 4, 5] = np.nan
    save(path, data)


def shrink_label(path: Path) -> None:
    save(path, np.zeros((12, 14, 15), np.uint8))


def fractional_label(path: Path) -> None:
    save(path, np.full(SHAPE, 0.5, np.float32))


@pytest.mark.parametrize("damage, file, message", [
    (lambda table, folder: (folder / "t1_1.nii.gz").unlink(), "t1_1.nii.gz", "does not exist"),
    (lambda table, folder: truncate(folder / "t1_1.nii.gz"), "t1_1.nii.gz", "cannot be read"),
    (lambda table, folder: put_nan(folder / "t1_1.nii.gz"), "t1_1.nii.gz", "1 NaN or infinite voxels"),
    (lambda table, folder: shrink_label(folder / "mask_1.nii.gz"), "mask_1.nii.gz", "has shape (12, 14, 15)"),
    (lambda table, folder: fractional_label(folder / "mask_1.nii.gz"), "mask_1.nii.gz", "whole numbers"),
    (lambda table, folder: (folder / "t1_1.nii.gz").write_bytes(b"not an image"), "t1_1.nii.gz", "not a readable"),
])
def test_bad_volume_names_row_and_file_and_leaves_no_shard(tmp_path, damage, file, message):
    table = make_table(tmp_path)
    damage(table, tmp_path)
    with pytest.raises(BrainzooError) as error:
        write_tfrecords(table, tmp_path / "out", kind="segmentation", shard_size=1, workers=2, progress=False)
    assert f"{table} row 2" in str(error.value)
    assert file in str(error.value) and message in str(error.value)
    assert not (tmp_path / "out").exists()  # voxel problems show after the folder is made, which goes again


@pytest.mark.parametrize("kind, header, row, message", [
    ("segmentation", "path,mask,age,sex", "t1_0.nii.gz,mask_0.nii.gz,30,F",
     "no column 'label' (columns: path, mask, age, sex)"),
    ("segmentation", "path,label,age,sex", "t1_0.nii.gz,,30,F", "row 1: column 'label' is empty"),
    ("regression", "path,label,age,sex", "t1_0.nii.gz,mask_0.nii.gz,thirty,F",
     "row 1: column 'age' is 'thirty', not a number"),
    ("regression", "path,label,age,sex", "t1_0.nii.gz,mask_0.nii.gz,nan,F",
     "row 1: column 'age' is 'nan', not a finite number"),
])
def test_bad_table_names_the_table_and_the_problem(tmp_path, kind, header, row, message):
    table = tmp_path / "bad.csv"
    table.write_text(f"{header}\n{row}\n")
    with pytest.raises(BrainzooError) as error:
        read_table(table, kind=kind)
    assert str(error.value).startswith(f"{table}") and message in str(error.value)


def test_shapes_must_agree_unless_allowed(tmp_path):
    table = make_table(tmp_path, n=2)
    save(tmp_path / "t1_1.nii.gz", np.zeros((10, 10, 10), np.int16))
    with pytest.raises(BrainzooError, match=r"row 2: volume .*t1_1.nii.gz has RAS shape \(10, 10, 10\)"):
        write_tfrecords(table, tmp_path / "out", kind="regression", progress=False)
    write_tfrecords(table, tmp_path / "out", kind="regression", same_shape=False, progress=False)
    shapes = [e["volume"].shape for e in read_dataset(tmp_path / "out").as_numpy_iterator()]
    assert shapes == [SHAPE, (10, 10, 10)]


def test_existing_shards_need_force_which_removes_stale_ones(tmp_path):
    table = make_table(tmp_path, n=3)
    out = tmp_path / "out"
    write_tfrecords(table, out, kind="regression", shard_size=1, progress=False)
    with pytest.raises(BrainzooError, match="already holds shards"):
        write_tfrecords(table, out, kind="regression", shard_size=3, progress=False)
    write_tfrecords(table, out, kind="regression", shard_size=3, force=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["shard-000.tfrec.gz"]
    assert len(list(read_dataset(out))) == 3


def test_bids_folder_with_sessions(tmp_path):
    rng = np.random.default_rng(1)
    bids = tmp_path / "bids"
    first = save(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz", rng.random(SHAPE).astype(np.float32))
    later = save(bids / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_T1w.nii", rng.random(SHAPE).astype(np.float32))
    save(bids / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_T2w.nii.gz", rng.random(SHAPE).astype(np.float32))
    (bids / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t25\tmale\nsub-02\t71.5\tfemale\n")
    assert [e.volume for e in read_bids(bids)] == [first, later]
    write_tfrecords(bids, tmp_path / "out", kind="regression", progress=False)
    elements = list(read_dataset(tmp_path / "out").as_numpy_iterator())
    assert [(float(e["age"]), float(e["sex"])) for e in elements] == [(25.0, 1.0), (71.5, 0.0)]
    np.testing.assert_array_equal(elements[1]["volume"], ras(later)[0])


def test_bids_subject_missing_from_participants(tmp_path):
    bids = tmp_path / "bids"
    save(bids / "sub-03" / "anat" / "sub-03_T1w.nii.gz", np.zeros(SHAPE, np.float32))
    (bids / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t25\tM\n")
    with pytest.raises(BrainzooError, match="sub-03_T1w.nii.gz: subject sub-03 has no row in .*participants.tsv"):
        read_bids(bids)


def test_example_lists_must_match_the_kind(tmp_path):
    volume = save(tmp_path / "v.nii.gz", np.zeros(SHAPE, np.float32))
    with pytest.raises(BrainzooError, match="my row: a segmentation row needs a label volume"):
        write_tfrecords([Example("my row", volume, scalars={"age": 3.0})], tmp_path / "out", kind="segmentation")


def test_records_that_are_not_volumes_are_refused(tmp_path):
    other = tmp_path / "other.tfrec"
    with tf.io.TFRecordWriter(str(other)) as writer:
        writer.write(tf.train.Example().SerializeToString())
    with pytest.raises(BrainzooError, match="other.tfrec: record 1: not a volume record"):
        read_dataset(other)
    garbage = tmp_path / "garbage.tfrec"
    garbage.write_bytes(gzip.compress(b"this is no TFRecord"))
    with pytest.raises(BrainzooError, match="garbage.tfrec: not a readable TFRecord"):
        read_dataset(garbage)
