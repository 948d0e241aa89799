"""Synthetic heads: whole heads with binary brain masks, seeded, with an age signal that survives the nuisance."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brainzoo.errors import BrainzooError
from brainzoo.training.synthetic import synthetic_head, write_synthetic_dataset
from brainzoo.training.tfrecords import read_dataset, read_table, write_tfrecords

SHAPE = (32, 32, 32)


def central_csf_fraction(volume: np.ndarray, mask: np.ndarray) -> float:
    """Share of the brain around the ventricles darker than 0.8 x the brain's median: grows with atrophy."""
    centre = tuple(slice(size // 3, 2 * size // 3) for size in volume.shape)
    return float(np.mean(volume[centre][mask[centre] > 0] < 0.8 * np.median(volume[mask > 0])))


def test_a_head_is_a_brain_inside_skull_and_scalp():
    head = synthetic_head(50, shape=SHAPE, seed=0)
    assert head.volume.shape == SHAPE and head.volume.dtype == np.float32
    assert head.mask.dtype == np.uint8 and set(np.unique(head.mask)) == {0, 1}
    assert 0.08 < head.mask.mean() < 0.35
    assert np.all(np.isfinite(head.volume)) and head.volume.min() >= 0
    np.testing.assert_allclose(np.abs(np.diag(head.affine)[:3]), np.abs(head.affine[0, 0]))
    around_brain = ndimage.binary_dilation(head.mask, iterations=4) & ~ndimage.binary_dilation(head.mask)
    assert np.percentile(head.volume[around_brain], 90) > 0.4  # bright scalp around the brain
    assert head.volume[:2].mean() < 0.1  # background at the edge of the grid
    assert ndimage.label(head.mask)[1] == 1


def test_seeds_repeat_and_differ():
    first = synthetic_head(40, shape=SHAPE, seed=1)
    np.testing.assert_array_equal(first.volume, synthetic_head(40, shape=SHAPE, seed=1).volume)
    assert not np.array_equal(first.mask, synthetic_head(40, shape=SHAPE, seed=2).mask)


def test_male_heads_are_larger():
    male, female = (synthetic_head(40, sex=sex, shape=SHAPE, seed=3) for sex in (1, 0))
    assert male.mask.sum() > female.mask.sum()


def test_atrophy_grows_with_age_for_one_subject():
    heads = [synthetic_head(age, shape=SHAPE, seed=4) for age in (20, 45, 70, 90)]
    fractions = [central_csf_fraction(head.volume, head.mask) for head in heads]
    assert fractions == sorted(fractions) and fractions[-1] > fractions[0] + 0.1


def test_age_is_visible_across_different_subjects():
    rng = np.random.default_rng(5)
    ages = rng.uniform(20, 90, 16)
    heads = [synthetic_head(age, sex=index % 2, shape=SHAPE, seed=100 + index) for index, age in enumerate(ages)]
    fractions = [central_csf_fraction(head.volume, head.mask) for head in heads]
    assert np.corrcoef(ages, fractions)[0, 1] > 0.75


def test_written_dataset_converts_to_tfrecords(tmp_path):
    table = write_synthetic_dataset(tmp_path / "synthetic", 3, shape=SHAPE, seed=2)
    lines = table.read_text().splitlines()
    assert lines[0] == "path,mask,age,sex"
    rows = read_table(table, kind="regression")
    assert [row.scalars["sex"] for row in rows] == [float(line.split(",")[3] == "M") for line in lines[1:]]
    assert all(20 <= row.scalars["age"] <= 90 for row in rows)
    image = nib.load(rows[0].volume)
    assert image.shape == SHAPE and image.get_data_dtype() == np.float32
    write_tfrecords(read_table(table, kind="segmentation", label_column="mask"), tmp_path / "seg",
                    kind="segmentation", progress=False)
    element = next(read_dataset(tmp_path / "seg").as_numpy_iterator())
    assert set(np.unique(element["label"])) == {0.0, 1.0}
    again = write_synthetic_dataset(tmp_path / "again", 2, shape=SHAPE, seed=2)
    np.testing.assert_array_equal(nib.load(again.parent / "sub-002_T1w.nii.gz").get_fdata(),
                                  nib.load(table.parent / "sub-002_T1w.nii.gz").get_fdata())


def test_writing_refuses_to_overwrite_without_force(tmp_path):
    write_synthetic_dataset(tmp_path, 1, shape=SHAPE)
    with pytest.raises(BrainzooError, match="sub-001_T1w.nii.gz: already exists"):
        write_synthetic_dataset(tmp_path, 1, shape=SHAPE)
    write_synthetic_dataset(tmp_path, 1, shape=SHAPE, seed=9, force=True)
