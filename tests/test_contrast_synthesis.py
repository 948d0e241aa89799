"""Synthetic contrasts from label maps: the classes, the random images, and a set that TFRecords take."""

import csv

import nibabel as nib
import numpy as np
import pytest

from brainzoo.errors import BrainzooError
from brainzoo.training.contrast_synthesis import (TABLE, intensity_classes, random_contrast, tissue_label_map,
                                                  write_contrast_set)
from brainzoo.training.synthetic import write_synthetic_dataset
from brainzoo.training.tfrecords import read_dataset, read_table, write_tfrecords


def test_intensity_classes_separate_tissues_darkest_first():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 3000)
    values = np.array([10.0, 50.0, 90.0])[truth] + rng.normal(0, 3, truth.size)
    np.testing.assert_array_equal(intensity_classes(values, 3), truth)


def _toy_head():
    """Air, a scalp shell of two intensities, CSF, and a brain of two tissues inside a spherical mask."""
    grid = np.indices((32, 32, 32)).transpose(1, 2, 3, 0) - 15.5
    radius = np.linalg.norm(grid, axis=-1)
    brain = radius < 7
    volume = np.where(radius < 15, np.where(grid[..., 0] > 0, 300.0, 200.0), 5.0)
    volume[radius < 10] = 100.0
    volume[brain] = np.where(radius[brain] < 4, 120.0, 80.0)
    return volume.astype(np.float32), brain


def test_label_map_keeps_brain_and_head_classes_apart():
    volume, brain = _toy_head()
    labels = tissue_label_map(volume, brain, brain_classes=2, head_classes=4)
    assert labels.dtype == np.uint8
    assert set(np.unique(labels[brain])) == {0, 1} and set(np.unique(labels[~brain])) == {2, 3, 4, 5}
    assert labels[15, 15, 15] == 1 and labels[15, 15, 10] == 0  # brighter core, darker rim
    # air, CSF, dim and bright scalp
    assert [labels[0, 0, 0], labels[15, 15, 7], labels[3, 15, 15], labels[28, 15, 15]] == [2, 3, 4, 5]


@pytest.mark.parametrize("mask, message", [
    (np.zeros((32, 32, 32), bool), "not none or all"),
    (np.ones((32, 32, 32), bool), "not none or all"),
    (np.ones((32, 32, 31), bool), "differ in shape"),
])
def test_label_map_rejects_unusable_masks(mask, message):
    with pytest.raises(BrainzooError, match=message):
        tissue_label_map(_toy_head()[0], mask)


def test_random_contrast_draws_one_intensity_per_label():
    volume, brain = _toy_head()
    labels = tissue_label_map(volume, brain, brain_classes=2, head_classes=4)
    flat = random_contrast(labels, np.random.default_rng(3), texture=0.0, blur_voxels=0.0)
    for label in np.unique(labels):
        assert np.ptp(flat[labels == label]) == 0
    assert len(np.unique(flat)) == 6
    first = random_contrast(labels, np.random.default_rng(4))
    np.testing.assert_array_equal(first, random_contrast(labels, np.random.default_rng(4)))
    assert not np.allclose(first, random_contrast(labels, np.random.default_rng(5)))


@pytest.fixture(scope="module")
def segmentation_table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heads")
    rows = list(csv.DictReader(write_synthetic_dataset(folder, 2, shape=(32, 32, 32), seed=2).open()))
    table = folder / "set.csv"
    table.write_text("path,label\n" + "".join(f"{r['path']},{r['mask']}\n" for r in rows))
    return table


def test_contrast_set_becomes_tfrecords_with_the_scans_masks(segmentation_table, tmp_path):
    table = write_contrast_set(segmentation_table, tmp_path / "set", variants=2, seed=7)
    rows = list(csv.DictReader(table.open()))
    assert [r["path"] for r in rows] == [f"scan-00{i}_contrast-0{v}.nii.gz" for i in (1, 2) for v in (1, 2)]
    sources = read_table(segmentation_table, kind="segmentation")
    examples = read_table(table, kind="segmentation")
    write_tfrecords(examples, tmp_path / "records", kind="segmentation", progress=False)
    records = list(read_dataset(tmp_path / "records").as_numpy_iterator())
    assert len(records) == 4
    for record, source in zip(records, [s for s in sources for _ in (1, 2)]):
        np.testing.assert_array_equal(record["label"], np.asarray(nib.load(source.label).dataobj) > 0)
        assert record["volume"].shape == nib.load(source.volume).shape
    assert not np.allclose(records[0]["volume"], records[1]["volume"])
    again = write_contrast_set(segmentation_table, tmp_path / "again", variants=2, seed=7)
    for first, second in zip(examples, read_table(again, kind="segmentation")):
        np.testing.assert_array_equal(nib.load(first.volume).get_fdata(), nib.load(second.volume).get_fdata())


def test_contrast_set_overwrites_nothing_without_force(segmentation_table, tmp_path):
    write_contrast_set(segmentation_table, tmp_path, variants=1)
    before = (tmp_path / TABLE).read_bytes()
    with pytest.raises(BrainzooError, match="exists; pass force"):
        write_contrast_set(segmentation_table, tmp_path, variants=1, seed=1)
    assert (tmp_path / TABLE).read_bytes() == before
    write_contrast_set(segmentation_table, tmp_path, variants=1, seed=1, force=True)
    assert (tmp_path / TABLE).read_bytes() != before  # the seed column changed


def test_contrast_set_names_a_row_whose_mask_does_not_fit(segmentation_table, tmp_path):
    rows = segmentation_table.read_text().splitlines()
    scan, _ = rows[1].split(",")
    small = tmp_path / "small_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), small)
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,label\n{segmentation_table.parent / scan},{small}\n")
    with pytest.raises(BrainzooError, match=r"bad\.csv.*differ in shape"):
        write_contrast_set(bad, tmp_path / "out", variants=1)
    assert not (tmp_path / "out" / TABLE).exists()
