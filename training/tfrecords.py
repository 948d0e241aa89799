"""NIfTI volumes with their labels -> sharded TFRecords, and TFRecords -> a ``tf.data.Dataset`` of dicts.

The records keep nobrainer 1.2.1's layout (``feature/value``, ``feature/shape/dim{j}``, ``feature/affine/...``,
``label/value``, ``label/rank``, ...: float32 C-order bytes, volumes reoriented to RAS), so
``nobrainer.tfrecord.parse_example_fn`` reads ours and :func:`read_dataset` reads files written by
``nobrainer.tfrecord.write``. Two kinds of extra features make our records self-describing and are ignored by
nobrainer: ``feature/source_dtype`` / ``label/source_dtype`` (the NIfTI's on-disk dtype) and
``scalars/<name>`` (every scalar column of a brain-age table; the first one is also nobrainer's ``label``).

Conversion is all-or-nothing: shards are written to temporary files and renamed only once every row has been
read and verified, so a corrupt row leaves no shard (and no new folder) behind; every bad row of a table is
reported at once. :func:`check_records` reads every record of a set of shards once before training, so a damaged
shard is named with its record number up front, not in a TensorFlow traceback mid-run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import glob
import math
import os
import threading
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError
from tqdm import tqdm

from brainzoo.errors import BrainzooError
from brainzoo.fileio import atomic_output, output_folder

KINDS = ("segmentation", "regression")
SHARD_GLOB = "shard-*.tfrec*"
_STORED_DTYPE = "float32"  # nobrainer decodes every value as float32
_RESERVED_KEYS = ("volume", "label", "affine")
_SEX_CODES = {"f": 0.0, "female": 0.0, "m": 1.0, "male": 1.0}
_GZIP_MAGIC = b"\x1f\x8b"
_VOLUME_KEYS = ("feature/value", "feature/shape/dim0", "feature/shape/dim1", "feature/shape/dim2",
                "feature/affine/value", "label/value", "label/rank")
AGE_RANGE_YEARS = (0.0, 120.0)
ROW_ERRORS_SHOWN = 20


@dataclass(frozen=True)
class Example:
    """One row to convert: where it came from (for error messages), its volume and its label.

    Segmentation rows have a ``label`` volume; regression rows have ``scalars`` (the first is the target
    that nobrainer sees as ``label``).
    """

    where: str
    volume: Path
    label: Path | None = None
    scalars: Mapping[str, float] = field(default_factory=dict)


def read_table(
    path: str | os.PathLike,
    *,
    kind: str,
    volume_column: str = "path",
    label_column: str = "label",
    scalar_columns: Sequence[str] = ("age", "sex"),
) -> list[Example]:
    """Read a CSV (``.csv``) or TSV (``.tsv``) with one volume per row; relative paths are relative to the table.

    ``label_column`` names the label-volume column (segmentation); ``scalar_columns`` the numeric columns
    (regression), the first being the target. ``sex`` may be written F/M/female/male (coded 0/1).
    """
    path = Path(path)
    _check_kind(kind)
    if kind == "regression":
        _check_scalar_names(path, scalar_columns)
    wanted = [volume_column] + ([label_column] if kind == "segmentation" else list(scalar_columns))

    def example(where: str, row: dict[str, str]) -> Example:
        volume = path.parent / row[volume_column]
        if kind == "segmentation":
            return Example(where, volume, label=path.parent / row[label_column])
        return Example(where, volume, scalars=_parse_scalars(where, row, scalar_columns))

    return _every_row(path, read_rows(path, wanted), example)


def read_bids(root: str | os.PathLike, *, scalar_columns: Sequence[str] = ("age", "sex")) -> list[Example]:
    """Every ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]`` under a BIDS folder, with scalars from ``participants.tsv``.

    Every session of a subject gets the subject's row of ``participants.tsv``.
    """
    root = Path(root)
    participants = root / "participants.tsv"
    if not participants.is_file():
        raise BrainzooError(f"{participants}: not found; a BIDS folder needs participants.tsv for the scalars")
    _check_scalar_names(participants, scalar_columns)
    rows = read_rows(participants, ["participant_id", *scalar_columns])
    by_subject = dict(_every_row(participants, rows, lambda where, row: (
        row["participant_id"], (where, _parse_scalars(where, row, scalar_columns)))))
    images = sorted({*root.glob("sub-*/anat/*_T1w.nii*"), *root.glob("sub-*/ses-*/anat/*_T1w.nii*")})
    images = [image for image in images if image.name.endswith((".nii", ".nii.gz"))]
    if not images:
        raise BrainzooError(f"{root}: no sub-*/[ses-*/]anat/*_T1w.nii[.gz] files")
    examples = []
    for image in images:
        subject = image.relative_to(root).parts[0]
        if subject not in by_subject:
            raise BrainzooError(f"{image}: subject {subject} has no row in {participants}")
        where, scalars = by_subject[subject]
        examples.append(Example(f"{where} ({image.relative_to(root)})", image, scalars=scalars))
    return examples


def write_tfrecords(
    table: str | os.PathLike | Sequence[Example],
    out_dir: str | os.PathLike,
    *,
    kind: str,
    shard_size: int = 32,
    compress: bool = True,
    workers: int | None = None,
    same_shape: bool = True,
    force: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Convert a table (CSV/TSV path, BIDS folder, or :class:`Example` list) to ``out_dir/shard-NNN.tfrec[.gz]``.

    Every volume is checked (readable, 3D, finite; labels the volume's shape and affine, whole and >= 0;
    with ``same_shape`` one shape for all rows, which nobrainer's reader needs). ``workers`` threads write
    shards in parallel. ``force`` replaces the shards of an earlier conversion in ``out_dir``.
    """
    _check_kind(kind)
    if shard_size < 1:
        raise BrainzooError(f"shard_size must be at least 1, got {shard_size}")
    examples = _examples_from(table, kind)
    _check_headers(examples, kind, same_shape)
    _warn_about_duplicates_and_ages(examples)
    out_dir = Path(out_dir)
    earlier = sorted(out_dir.glob(SHARD_GLOB)) if out_dir.is_dir() else []
    if earlier and not force:
        raise BrainzooError(f"{out_dir}: already holds shards ({earlier[0].name}, ...); pass --force to replace them")
    n_shards = math.ceil(len(examples) / shard_size)
    suffix = ".tfrec.gz" if compress else ".tfrec"
    shards = [out_dir / f"shard-{index:03d}{suffix}" for index in range(n_shards)]
    groups = [examples[index * shard_size:(index + 1) * shard_size] for index in range(n_shards)]
    workers = min(workers or os.cpu_count() or 1, n_shards)
    failed = threading.Event()
    with output_folder(out_dir), contextlib.ExitStack() as stack, tqdm(
            total=len(examples), unit="volume", desc="tfrecords", disable=not progress) as bar:
        temporaries = [stack.enter_context(atomic_output(shard, force=True)) for shard in shards]
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(_write_shard, group, temporary, kind, compress, bar, failed)
                       for group, temporary in zip(groups, temporaries)]
            for future in concurrent.futures.as_completed(futures):
                if future.exception() is not None:
                    failed.set()
        for future in futures:
            future.result()  # the first failure, in shard order, aborts and removes every temporary shard
    for stale in set(earlier) - set(shards):
        stale.unlink()
    return shards


def read_dataset(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    num_parallel_reads: int | None = None,
) -> tf.data.Dataset:
    """TFRecords (a folder, a glob pattern, or a list of files; ours or nobrainer's) -> dicts of tensors.

    Each element has ``volume`` (float32, 3D), ``affine`` (float32, 4x4), ``label`` (a float32 volume, or a
    scalar) and, for our regression records, every stored scalar under its column name. The keys and the
    compression are read from the first record, so all files must come from one conversion.
    """
    files = _resolve_files(paths)
    compressions = {_compression_of(file) for file in files}
    if len(compressions) > 1:
        raise BrainzooError(f"{files[0].parent}: mixes gzipped and plain TFRecords; convert them in one go")
    compression = compressions.pop()
    first = _first_record(files[0], compression)
    label_rank = first.features.feature["label/rank"].int64_list.value[0]
    scalar_names = sorted(key.split("/", 1)[1] for key in first.features.feature if key.startswith("scalars/"))
    spec = {
        "feature/value": tf.io.FixedLenFeature([], tf.string),
        "feature/affine/value": tf.io.FixedLenFeature([], tf.string),
        "label/value": tf.io.FixedLenFeature([], tf.string),
        **{f"feature/shape/dim{axis}": tf.io.FixedLenFeature([], tf.int64) for axis in range(3)},
        **{f"scalars/{name}": tf.io.FixedLenFeature([], tf.float32) for name in scalar_names},
    }

    def parse(serialized):
        record = tf.io.parse_single_example(serialized, spec)
        shape = tf.stack([record[f"feature/shape/dim{axis}"] for axis in range(3)])
        volume = tf.reshape(tf.io.decode_raw(record["feature/value"], tf.float32), shape)
        label = tf.io.decode_raw(record["label/value"], tf.float32)
        label = tf.reshape(label, shape if label_rank == 3 else [])
        affine = tf.reshape(tf.io.decode_raw(record["feature/affine/value"], tf.float32), [4, 4])
        return {"volume": volume, "affine": affine, "label": label,
                **{name: record[f"scalars/{name}"] for name in scalar_names}}

    records = tf.data.TFRecordDataset([str(file) for file in files], compression_type=compression,
                                      num_parallel_reads=num_parallel_reads)
    return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def check_records(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> int:
    """Read every record of every file once (CRCs checked, each record parsed and its volume's byte count checked
    against its shape) and return how many there are; a damaged file is a BrainzooError naming it and the record.

    Training calls this before the first step, so a bad shard, a validation shard too, stops the run at once."""
    files = _resolve_files(paths)
    count, first = 0, None
    for file in files:
        compression = _compression_of(file)
        index = 0
        try:
            for index, serialized in enumerate(tf.data.TFRecordDataset(str(file), compression_type=compression), 1):
                features = _volume_record(file, index, serialized.numpy()).features.feature
                # read_dataset takes the label's rank and the scalars from the first record: every record needs them
                layout = (features["label/rank"].int64_list.value[0], sorted(k for k in features if "scalars/" in k))
                first = first or (f"{file}: record {index}", layout)
                if layout != first[1]:
                    raise BrainzooError(f"{file}: record {index} has label rank and scalars {layout}, but {first[0]} "
                                        f"has {first[1]}; records of one training set come from one conversion")
        except tf.errors.OpError as error:
            raise BrainzooError(f"{file}: record {index + 1} is damaged or truncated ({error.message}); "
                                "convert the table again") from None
        if index == 0:
            raise BrainzooError(f"{file}: the TFRecord file is empty")
        count += index
    return count


def _volume_record(file: Path, index: int, serialized: bytes) -> tf.train.Example:
    """One record as a volume example, its byte counts matching its shape, or a BrainzooError naming it."""
    where = f"{file}: record {index}"
    try:
        example = tf.train.Example.FromString(serialized)
    except DecodeError as error:
        raise BrainzooError(f"{where} is not a tf.train.Example ({error})") from None
    features = example.features.feature
    missing = [key for key in _VOLUME_KEYS if key not in features]
    if missing:
        raise BrainzooError(f"{where}: not a volume record (no {', '.join(missing)})")
    shape = [_single(features[f"feature/shape/dim{axis}"].int64_list.value, where) for axis in range(3)]
    if min(shape) < 1:
        raise BrainzooError(f"{where}: the volume's shape {shape} is empty")
    voxels = math.prod(shape)
    label_values = voxels if _single(features["label/rank"].int64_list.value, where) == 3 else 1
    for key, values in {"feature/value": voxels, "feature/affine/value": 16, "label/value": label_values}.items():
        stored = features[key].bytes_list.value
        size = len(stored[0]) if len(stored) == 1 else 0
        if size != 4 * values:
            raise BrainzooError(f"{where}: {key} holds {size} bytes, not the {4 * values} bytes of float32 values "
                                f"that the volume's shape {shape} needs")
    return example


def _single(values: Sequence[int], where: str) -> int:
    if len(values) != 1:
        raise BrainzooError(f"{where}: a shape entry holds {len(values)} values, not 1")
    return int(values[0])


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise BrainzooError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def _check_scalar_names(where: str | Path, names: Sequence[str]) -> None:
    if not names:
        raise BrainzooError(f"{where}: regression needs at least one scalar column (e.g. age)")
    clashes = [name for name in names if name in _RESERVED_KEYS or "/" in name]
    if clashes:
        raise BrainzooError(f"{where}: scalar column {clashes[0]!r} clashes with a dataset key; rename it")


def read_rows(path: Path, wanted: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """Rows of a CSV/TSV as ``(where, row)``, with every wanted cell present and stripped.

    ``where`` is ``"<table> row <n>"``, counting data rows from 1 (the header is not a row).
    """
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            missing = [column for column in wanted if column not in (reader.fieldnames or [])]
            if missing:
                raise BrainzooError(f"{path}: no column {', '.join(map(repr, missing))} "
                                    f"(columns: {', '.join(reader.fieldnames or [])})")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BrainzooError(f"{path}: cannot read table: {error}") from error
    if not rows:
        raise BrainzooError(f"{path}: the table has no rows")
    return [(f"{path} row {number}", {column: (row.get(column) or "").strip() for column in wanted})
            for number, row in enumerate(rows, start=1)]


def _every_row(table: Path, rows: list[tuple[str, dict[str, str]]], convert) -> list:
    """``convert(where, row)`` of every row with no empty cell; every bad row is reported at once, not only the
    first, so a table is fixed in one go."""
    results, errors = [], []
    for where, row in rows:
        try:
            empty = [column for column, text in row.items() if not text]
            if empty:
                raise BrainzooError(f"{where}: column {empty[0]!r} is empty")
            results.append(convert(where, row))
        except BrainzooError as error:
            errors.append(str(error))
    if len(errors) == 1:
        raise BrainzooError(errors[0])
    if errors:
        more = f"\n... and {len(errors) - ROW_ERRORS_SHOWN} more" if len(errors) > ROW_ERRORS_SHOWN else ""
        raise BrainzooError(f"{table}: {len(errors)} of {len(rows)} rows cannot be used:\n"
                            + "\n".join(errors[:ROW_ERRORS_SHOWN]) + more)
    return results


def _warn_about_duplicates_and_ages(examples: list[Example]) -> None:
    """A volume listed twice counts twice in training (and may sit in both training and validation); an age outside
    0-120 years is a typo or another unit. Both are allowed, and said."""
    first_row: dict[Path, str] = {}
    for example in examples:
        volume = example.volume.resolve()
        if volume in first_row:
            warnings.warn(f"{example.where}: volume {example.volume} is also in {first_row[volume]}; "
                          "it is stored twice", stacklevel=3)
        first_row.setdefault(volume, example.where)
        age = example.scalars.get("age")
        if age is not None and not AGE_RANGE_YEARS[0] <= age <= AGE_RANGE_YEARS[1]:
            warnings.warn(f"{example.where}: age {age:g} is outside {AGE_RANGE_YEARS[0]:g}-{AGE_RANGE_YEARS[1]:g} "
                          "years (a typo, or months?)", stacklevel=3)


def _parse_scalars(where: str, row: Mapping[str, str], columns: Sequence[str]) -> dict[str, float]:
    scalars = {}
    for column in columns:
        text = row[column]
        if column == "sex" and text.lower() in _SEX_CODES:
            scalars[column] = _SEX_CODES[text.lower()]
            continue
        try:
            value = float(text)
        except ValueError:
            raise BrainzooError(f"{where}: column {column!r} is {text!r}, not a number") from None
        if not math.isfinite(value):
            raise BrainzooError(f"{where}: column {column!r} is {text!r}, not a finite number")
        scalars[column] = value
    return scalars


def _examples_from(table: str | os.PathLike | Sequence[Example], kind: str) -> list[Example]:
    if isinstance(table, (str, os.PathLike)):
        path = Path(table)
        if path.is_dir():
            if kind != "regression":
                raise BrainzooError(f"{path}: a BIDS folder carries scalars only; use kind='regression'")
            return read_bids(path)
        return read_table(path, kind=kind)
    examples = list(table)
    if not examples:
        raise BrainzooError("the table has no rows")
    segmentation = kind == "segmentation"
    needs = "a label volume and no scalars" if segmentation else "scalars and no label volume"
    for example in examples:
        if (example.label is not None) != segmentation or bool(example.scalars) == segmentation:
            raise BrainzooError(f"{example.where}: a {kind} row needs {needs}")
    if kind == "regression":
        names = list(examples[0].scalars)
        _check_scalar_names(examples[0].where, names)
        for example in examples:
            if list(example.scalars) != names:
                raise BrainzooError(f"{example.where}: scalars {list(example.scalars)} differ from "
                                    f"{names} of {examples[0].where}")
    return examples


def _canonical_header(where: str, path: Path, role: str) -> nib.Nifti1Image:
    """Load the header only (no voxels) and check the file exists, parses and is 3D."""
    if not path.is_file():
        raise BrainzooError(f"{where}: {role} {path} does not exist")
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for a damaged header
        raise BrainzooError(f"{where}: {role} {path} is not a readable image: {error}") from error
    if len(_squeezed_shape(image.shape)) != 3:
        raise BrainzooError(f"{where}: {role} {path} has shape {image.shape}; a 3D volume is needed")
    return image


def _squeezed_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Trailing singleton axes (``(X, Y, Z, 1)``, common for T1w files) do not count."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _ras_shape(image: nib.Nifti1Image) -> tuple[int, ...]:
    """The shape after reorientation to RAS, which is what gets stored."""
    shape = _squeezed_shape(image.shape)
    ornt = nib.io_orientation(image.affine)
    ras = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt):
        ras[int(target)] = shape[axis]
    return tuple(ras)


def _check_headers(examples: list[Example], kind: str, same_shape: bool) -> None:
    """Cheap checks on headers before any shard is opened, so a bad row fails in seconds."""
    first_shape = None
    for example in examples:
        volume = _canonical_header(example.where, example.volume, "volume")
        shape = _ras_shape(volume)
        if kind == "segmentation":
            label = _canonical_header(example.where, example.label, "label")
            if _squeezed_shape(label.shape) != _squeezed_shape(volume.shape):
                raise BrainzooError(f"{example.where}: label {example.label} has shape {label.shape}, "
                                    f"volume {example.volume} has {volume.shape}")
            if not np.allclose(label.affine, volume.affine, atol=1e-3):
                raise BrainzooError(f"{example.where}: label {example.label} and volume {example.volume} "
                                    "have different affines (not the same voxel grid)")
        if first_shape is None:
            first_shape = (example, shape)
        elif same_shape and shape != first_shape[1]:
            raise BrainzooError(f"{example.where}: volume {example.volume} has RAS shape {shape}, but "
                                f"{first_shape[0].where} has {first_shape[1]}; all rows need one shape "
                                "(pass same_shape=False to allow mixed shapes)")


def _read_volume(where: str, path: Path, role: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Voxels (float32, RAS), affine and on-disk dtype; unreadable or non-finite voxels name the row and file."""
    try:
        image = nib.as_closest_canonical(nib.squeeze_image(nib.load(path)))
        data = image.get_fdata(dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise BrainzooError(f"{where}: {role} {path} cannot be read (truncated or corrupt?): {error}") from error
    bad = np.count_nonzero(~np.isfinite(data))
    if bad:
        raise BrainzooError(f"{where}: {role} {path} has {bad} NaN or infinite voxels")
    return data, image.affine, str(image.get_data_dtype())


def _bytes_feature(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64_feature(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def _array_features(prefix: str, array: np.ndarray) -> dict[str, tf.train.Feature]:
    """nobrainer's value/dtype/rank/shape quartet for one array."""
    array = np.asarray(array, dtype=_STORED_DTYPE)
    features = {
        f"{prefix}/value": _bytes_feature(array.tobytes()),
        f"{prefix}/dtype": _bytes_feature(_STORED_DTYPE.encode()),
        f"{prefix}/rank": _int64_feature(array.ndim),
    }
    features.update({f"{prefix}/shape/dim{axis}": _int64_feature(size) for axis, size in enumerate(array.shape)})
    return features


def _volume_features(prefix: str, data: np.ndarray, affine: np.ndarray, source_dtype: str) -> dict:
    features = _array_features(prefix, data)
    features.update(_array_features(f"{prefix}/affine", affine))
    features[f"{prefix}/source_dtype"] = _bytes_feature(source_dtype.encode())
    return features


def _serialize(example: Example, kind: str) -> bytes:
    data, affine, source_dtype = _read_volume(example.where, example.volume, "volume")
    features = _volume_features("feature", data, affine, source_dtype)
    features["feature/shape"] = _bytes_feature(np.array(data.shape, dtype=_STORED_DTYPE).tobytes())
    if kind == "segmentation":
        label, label_affine, label_dtype = _read_volume(example.where, example.label, "label")
        if np.any(label < 0) or np.any(label != np.round(label)):
            raise BrainzooError(f"{example.where}: label {example.label} must hold whole numbers >= 0 (class indices)")
        features.update(_volume_features("label", label, label_affine, label_dtype))
    else:
        features.update(_array_features("label", np.float32(next(iter(example.scalars.values())))))
        features.update({f"scalars/{name}": tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
                         for name, value in example.scalars.items()})
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _write_shard(examples: list[Example], path: Path, kind: str, compress: bool, bar: tqdm,
                 failed: threading.Event) -> None:
    options = tf.io.TFRecordOptions(compression_type="GZIP" if compress else "")
    with tf.io.TFRecordWriter(str(path), options) as writer:
        for example in examples:
            if failed.is_set():  # another shard failed: the conversion is void, stop early
                return
            writer.write(_serialize(example, kind))
            bar.update(1)


def _resolve_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        path = Path(paths)
        if path.is_dir():  # hidden files are conversions in progress (see atomic_output)
            files = sorted(file for file in path.glob("*.tfrec*") if not file.name.startswith("."))
        elif glob.has_magic(str(paths)):
            files = sorted(Path(match) for match in glob.glob(str(paths)))
        else:
            files = [path]
    else:
        files = [Path(path) for path in paths]
    if not files:
        raise BrainzooError(f"{paths}: no TFRecord files found")
    for file in files:
        if not file.is_file():
            raise BrainzooError(f"{file}: TFRecord file does not exist")
    return files


def _compression_of(path: Path) -> str:
    """nobrainer gzips without saying so in the name; the magic bytes decide."""
    with open(path, "rb") as handle:
        return "GZIP" if handle.read(2) == _GZIP_MAGIC else ""


def _first_record(path: Path, compression: str) -> tf.train.Example:
    try:
        serialized = next(iter(tf.data.TFRecordDataset(str(path), compression_type=compression)), None)
    except tf.errors.OpError as error:
        raise BrainzooError(f"{path}: not a readable TFRecord file: {error.message}") from None
    if serialized is None:
        raise BrainzooError(f"{path}: the TFRecord file is empty")
    return _volume_record(path, 1, serialized.numpy())
