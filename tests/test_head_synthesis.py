"""Synthetic heads from label maps: the mask follows the head, atrophy, resolution, determinism, the written set."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brainzoo.cli import main
from brainzoo.errors import BrainzooError
from brainzoo.training import head_synthesis
from brainzoo.training.head_synthesis import (TABLE, HeadSource, SynthesisRanges, age_weights, grow_csf,
                                              load_source, lower_resolution, read_sources, synthesize_head,
                                              write_synthetic_heads)
from brainzoo.training.distill import Teacher
from brainzoo.training.synthetic import write_synthetic_dataset
from brainzoo.training.tfrecords import read_table

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi"
SCALP, VENTRICLE, SULCAL_CSF, GREY, WHITE = 1000, 51, 1, 3, 2
BRAIN_LABELS = (SULCAL_CSF, WHITE, GREY, VENTRICLE)


def _toy_labels(size: int = 40) -> np.ndarray:
    """Air (0), a scalp shell, and a brain: sulcal CSF rim, grey matter, white matter and a ventricle."""
    radius = np.linalg.norm(np.indices((size,) * 3) - (size - 1) / 2, axis=0)
    labels = np.zeros((size,) * 3, np.int32)
    labels[radius < 0.45 * size] = SCALP
    labels[radius < 0.35 * size] = SULCAL_CSF
    labels[radius < 0.32 * size] = GREY
    labels[radius < 0.24 * size] = WHITE
    labels[radius < 0.08 * size] = VENTRICLE
    return labels


def _brain(labels: np.ndarray) -> np.ndarray:
    return np.isin(labels, BRAIN_LABELS)


def _head(index: int = 1, seed: int = 0, **options):
    labels = _toy_labels()
    return synthesize_head(labels, _brain(labels), seed=seed, index=index, ventricle_labels=(VENTRICLE,),
                           sulcal_labels=(SULCAL_CSF,), **options)


@pytest.mark.parametrize("crop", [0.0, 1.0])
def test_mask_follows_the_deformed_label_map_exactly(crop):
    labels = _toy_labels()
    for index in range(1, 4):
        head = _head(index, ranges=SynthesisRanges(crop_probability=crop))
        np.testing.assert_array_equal(head.mask.astype(bool), _brain(head.labels))
        assert not np.array_equal(head.labels, labels)  # it was deformed (and atrophied)
        assert head.mask.dtype == np.uint8 and head.image.dtype == np.float32 and head.image.shape == labels.shape
        if crop:
            assert (head.labels == head_synthesis.OUTSIDE_FOV).any() and (head.image[head.labels < 0] == 0).all()


def test_atrophy_enlarges_csf_monotonically_and_keeps_the_mask():
    volumes, masks = [], []
    for level in (0.0, 0.25, 0.5, 0.75, 1.0):
        head = _head(atrophy=level, ranges=SynthesisRanges(crop_probability=0.0))
        volumes.append([int(np.isin(head.labels, label).sum()) for label in (VENTRICLE, SULCAL_CSF)])
        masks.append(int(head.mask.sum()))
    ventricles, sulci = np.array(volumes).T
    assert np.all(np.diff(ventricles) >= 0) and ventricles[-1] > 2 * ventricles[0]
    assert np.all(np.diff(sulci) >= 0) and sulci[-1] > sulci[0]
    assert len(set(masks)) == 1  # CSF inside the mask stays inside it


def test_grow_csf_takes_only_brain_tissue_within_reach():
    labels = _toy_labels()
    grown = grow_csf(labels, _brain(labels), (VENTRICLE,), 4.0, (2.0, 2.0, 2.0))
    changed = grown != labels
    assert changed.any() and np.all(grown[changed] == VENTRICLE) and np.all(labels[changed] == WHITE)
    np.testing.assert_array_equal(grow_csf(labels, _brain(labels), (VENTRICLE,), 0.0, (2, 2, 2)), labels)


def _high_frequency_power(image: np.ndarray) -> float:
    spectrum = np.abs(np.fft.fftn(image - image.mean())) ** 2
    frequency = np.sqrt(sum(f ** 2 for f in np.meshgrid(*[np.fft.fftfreq(n) for n in image.shape], indexing="ij")))
    return float(spectrum[frequency > 0.25].sum())


def test_lower_resolution_removes_high_frequencies():
    image = np.random.default_rng(0).standard_normal((32, 32, 32)).astype(np.float32)
    base = _high_frequency_power(image)
    thick = lower_resolution(image, (1, 1, 1), (1.0, 1.0, 4.0))
    coarse = lower_resolution(image, (1, 1, 1), (3.0, 3.0, 3.0))
    assert thick.shape == coarse.shape == image.shape
    assert _high_frequency_power(coarse) < _high_frequency_power(thick) < 0.5 * base
    np.testing.assert_array_equal(lower_resolution(image, (2, 2, 2), (1.5, 2.0, 1.0)), image)


def test_same_seed_and_index_repeat_and_others_differ():
    first, again = _head(3, seed=7), _head(3, seed=7)
    for field in ("image", "mask", "labels"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    assert first.draws == again.draws
    for other in (_head(4, seed=7), _head(3, seed=8)):
        assert not np.array_equal(first.image, other.image)


def test_age_weights_favour_older_subjects():
    np.testing.assert_allclose(age_weights([20.0, 30.0, 40.0]), np.array([1, 2, 4]) / 7)
    np.testing.assert_allclose(age_weights([20.0, None]), [0.5, 0.5])


def _write_source(folder: Path, name: str, labels: np.ndarray, age: float) -> dict:
    """A label map (brain labels only, as DLMUSE's) and a scan whose intensities tell the head's classes."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    brain_labels = np.where(labels == SCALP, 0, labels).astype(np.uint8)
    scan = np.select([labels == SCALP, labels == WHITE, labels == GREY, labels > 0], [300.0, 120.0, 80.0, 30.0], 5.0)
    nib.save(nib.Nifti1Image(brain_labels, affine), folder / f"{name}_labels.nii.gz")
    nib.save(nib.Nifti1Image(scan.astype(np.float32), affine), folder / f"{name}_T1w.nii.gz")
    return {"labels": f"{name}_labels.nii.gz", "path": f"{name}_T1w.nii.gz", "age": age}


def _write_sources(folder: Path) -> Path:
    rows = [_write_source(folder, "young", _toy_labels(), 20.0), _write_source(folder, "old", _toy_labels(), 60.0)]
    with open(folder / "sources.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["labels", "path", "age"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "sources.csv"


def test_written_set_is_read_as_segmentation_and_draws_older_heads_more(tmp_path):
    sources = read_sources(_write_sources(tmp_path))
    assert [source.age for source in sources] == [20.0, 60.0] and sources[0].scan.name == "young_T1w.nii.gz"
    table = write_synthetic_heads(sources, tmp_path / "heads", 12, seed=1)
    examples = read_table(table, kind="segmentation")
    assert len(examples) == 12
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sum(row["age"] == "60.0" for row in rows) > 8  # weights 1 : 16
    first = nib.load(examples[0].volume).get_fdata()
    mask = nib.load(examples[0].label).get_fdata()
    assert first.shape == mask.shape == (40, 40, 40) and 0 < mask.sum() < mask.size and first.max() <= 1.0
    with pytest.raises(BrainzooError, match="exists"):
        write_synthetic_heads(sources, tmp_path / "heads", 2)


def test_label_map_of_head_classes_keeps_brain_labels(tmp_path):
    _write_sources(tmp_path)
    labels, brain, _ = load_source(HeadSource("row", tmp_path / "old_labels.nii.gz", tmp_path / "old_T1w.nii.gz"))
    toy = _toy_labels()
    np.testing.assert_array_equal(brain, _brain(toy))
    np.testing.assert_array_equal(labels[brain], toy[brain])
    assert (labels[~brain] >= head_synthesis.HEAD_LABEL_OFFSET).all() and len(np.unique(labels[~brain])) > 1


@pytest.mark.parametrize("data, message", [
    (np.full((40, 40, 40), 0.5, np.float32), "integer labels"),
    (np.ones((40, 40, 40, 2), np.uint8), "must be 3D"),
    (np.ones((40, 40, 39), np.uint8), "has shape"),
])
def test_bad_label_map_is_named_and_nothing_is_written(tmp_path, data, message):
    table = _write_sources(tmp_path)
    bad = tmp_path / "old_labels.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), bad)
    with pytest.raises(BrainzooError, match=message) as error:
        write_synthetic_heads(read_sources(table), tmp_path / "heads", 3)
    assert str(bad) in str(error.value)
    assert not (tmp_path / "heads").exists()


def test_failure_midway_removes_the_heads_already_written(tmp_path, monkeypatch):
    sources = read_sources(_write_sources(tmp_path))
    real = head_synthesis.synthesize_head

    def failing(*args, index, **kwargs):
        if index == 3:
            raise BrainzooError("drawing failed")
        return real(*args, index=index, **kwargs)

    monkeypatch.setattr(head_synthesis, "synthesize_head", failing)
    with pytest.raises(BrainzooError, match="drawing failed"):
        write_synthetic_heads(sources, tmp_path / "heads", 4)
    assert not (tmp_path / "heads").exists()


def test_cli_writes_the_set(tmp_path, capsys):
    table = _write_sources(tmp_path)
    assert main(["synth-heads", str(table), "--out", str(tmp_path / "out"), "--n", "2", "--seed", "3"]) == 0
    assert "2 heads from 2 label map(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "head-0001_T1w.nii.gz", "head-0001_mask.nii.gz", "head-0002_T1w.nii.gz", "head-0002_mask.nii.gz", TABLE]
    assert main(["synth-heads", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x"), "--n", "1"]) == 1


@pytest.mark.skipif(not (SHARED / "dlmuse_2mm").is_dir(), reason="needs ../shared/data/ixi (IXI DLMUSE label maps)")
def test_ixi_dlmuse_head_mask_is_its_brain_labels():
    name = "IXI012-HH-1211-T1_ds"
    labels, brain, image = load_source(HeadSource("ixi", SHARED / "dlmuse_2mm" / f"{name}_DLMUSE.nii.gz",
                                                  SHARED / "t1_2mm" / f"{name}.nii.gz"))
    head = synthesize_head(labels, brain, seed=0, index=1, spacing_mm=image.header.get_zooms()[:3], atrophy=1.0)
    inside = (head.labels > 0) & (head.labels < head_synthesis.HEAD_LABEL_OFFSET)
    np.testing.assert_array_equal(head.mask.astype(bool), inside)
    ventricles = np.isin(head.labels, head_synthesis.DLMUSE_VENTRICLES).sum()
    assert ventricles > 1.5 * np.isin(labels, head_synthesis.DLMUSE_VENTRICLES).sum()


def _ball_scan(shape=(40, 40, 42), spacing=(2.0, 2.0, 2.0)) -> nib.Nifti1Image:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-30.0, 12.0, 5.0]
    centre = np.array([17.0, 22.0, 19.0])
    data = (np.linalg.norm(np.indices(shape) - centre[:, None, None, None], axis=0) < 9) * 100.0 + 10.0
    return nib.Nifti1Image(data.astype(np.float32), affine)


def _world_centre(image: nib.Nifti1Image) -> np.ndarray:
    data = np.asarray(image.dataobj) - np.asarray(image.dataobj).min()
    return nib.affines.apply_affine(image.affine, np.array(ndimage.center_of_mass(data)))


def test_a_coarser_scan_keeps_the_field_of_view_and_the_anatomy_in_place():
    scan = _ball_scan()
    for target, shape in (((2.0, 2.0, 6.0), (40, 40, 14)), ((3.0, 3.0, 3.0), (27, 27, 28)), ((1, 1, 1), (40, 40, 42))):
        coarse = head_synthesis.coarser_scan(scan, target)
        assert coarse.shape == shape
        np.testing.assert_allclose(nib.affines.voxel_sizes(coarse.affine), np.maximum(target, 2.0))
        np.testing.assert_allclose(_world_centre(coarse), _world_centre(scan), atol=0.3)
        # the first and last coarse voxels' outer faces are the fine grid's: the same field of view
        for corner in (np.zeros(3), np.array(shape) - 1):
            outer = nib.affines.apply_affine(coarse.affine, corner + np.sign(corner - 0.1) * 0.5)
            fine_corner = np.where(corner > 0, np.array(scan.shape) - 1, 0) + np.sign(corner - 0.1) * 0.5
            np.testing.assert_allclose(outer, nib.affines.apply_affine(scan.affine, fine_corner),
                                       atol=np.max(target))  # rounding of the voxel count: within one voxel
    thick = np.asarray(head_synthesis.coarser_scan(scan, (2, 2, 6)).dataobj)
    assert _high_frequency_power(thick[:, :, 7]) < _high_frequency_power(np.asarray(scan.dataobj)[:, :, 22])
    constant = nib.Nifti1Image(np.full((12, 12, 12), 7.0, np.float32), np.eye(4))
    np.testing.assert_allclose(np.asarray(head_synthesis.coarser_scan(constant, (2, 3, 4)).dataobj), 7.0, rtol=1e-6)


def test_lower_resolution_command_writes_coarse_scans_whose_label_maps_follow(tmp_path, capsys):
    from brainzoo.predict.volumes import load_mask

    (tmp_path / "in").mkdir()
    scan = _ball_scan()
    nib.save(scan, tmp_path / "in" / "a.nii.gz")
    labels = (np.asarray(scan.dataobj) > 50).astype(np.uint8) * 3
    nib.save(nib.Nifti1Image(labels, scan.affine), tmp_path / "in" / "a_labels.nii.gz")
    table = tmp_path / "in" / "test.csv"
    table.write_text("id,path,labels,age\nsubject-a,a.nii.gz,a_labels.nii.gz,46.7\n")
    out = tmp_path / "out" / "thick"
    argv = ["lower-resolution", str(table), "--spacing", "2", "2", "6", "--spacing", "2", "2", "2", "--out", str(out)]
    assert main(argv) == 0
    assert "2 scan(s) at 2 x 2 x 6, 2 x 2 x 2 mm" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "scans.csv").open()))
    assert rows == [{"id": f"subject-a_{tag}", "path": f"subject-a_{tag}.nii.gz", "labels": "../../in/a_labels.nii.gz",
                     "age": "46.7", "source_id": "subject-a", "spacing_mm": spacing}
                    for tag, spacing in (("2x2x6mm", "2 2 6"), ("2x2x2mm", "2 2 2"))]
    np.testing.assert_array_equal(np.asarray(nib.load(out / rows[1]["path"]).dataobj), np.asarray(scan.dataobj))
    coarse = nib.load(out / rows[0]["path"])
    assert coarse.shape == (40, 40, 14)
    # what evaluate brain-mask --reference-column labels compares with: the label map (> 0) on the coarse grid
    reference = load_mask(out / rows[0]["labels"], coarse)
    np.testing.assert_array_equal(reference, np.asarray(scan.dataobj)[:, :, 1::3][..., :14] > 50)
    assert main(argv) == 1 and "exists" in capsys.readouterr().err


def _shell_teacher(calls: list):
    """A stand-in teacher whose mask is the scan's brain (brighter than air, darker than the scalp) grown by a
    voxel, a looser boundary than the label maps' brain labels, so a test can tell whose mask a head carries."""
    def mask(image):
        calls.append(image.get_filename())
        return _grown_brain(np.asarray(image.dataobj))
    return Teacher("a-teacher", mask)


def _grown_brain(scan: np.ndarray) -> np.ndarray:
    return ndimage.binary_dilation((scan > 5.0) & (scan < 300.0))


def test_heads_carry_the_teachers_masks_of_their_sources(tmp_path):
    sources = read_sources(_write_sources(tmp_path))
    calls = []
    teacher = _shell_teacher(calls)
    labels, brain, _ = load_source(sources[1], teacher=teacher)
    scan = np.asarray(nib.load(sources[1].scan).dataobj)
    np.testing.assert_array_equal(brain, _grown_brain(scan))
    calls.clear()
    table = write_synthetic_heads(sources, tmp_path / "heads", 3, seed=1, teacher=teacher)
    assert len(calls) == 2  # once per source, not per head
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["mask_from"] for row in rows} == {"a-teacher"}
    plain = write_synthetic_heads(sources, tmp_path / "plain", 3, seed=1)
    with open(plain, newline="") as handle:
        assert {row["mask_from"] for row in csv.DictReader(handle)} == {"labels > 0"}
    for row in rows:  # same draws: the teacher's masks hold the label masks and more
        teacher_mask = np.asarray(nib.load(tmp_path / "heads" / row["label"]).dataobj).astype(bool)
        label_mask = np.asarray(nib.load(tmp_path / "plain" / row["label"]).dataobj).astype(bool)
        assert (label_mask <= teacher_mask).all() and teacher_mask.sum() > label_mask.sum()


def test_teacher_needs_each_source_scan_on_the_label_maps_grid(tmp_path):
    table = _write_sources(tmp_path)
    teacher = _shell_teacher([])
    with pytest.raises(BrainzooError, match="no scan .path column. for the teacher a-teacher"):
        write_synthetic_heads(read_sources(table, scan_column=None), tmp_path / "heads", 2, teacher=teacher)
    scan = tmp_path / "old_T1w.nii.gz"
    shifted = nib.load(scan)
    moved = shifted.affine.copy()
    moved[:3, 3] += 10.0
    nib.save(nib.Nifti1Image(np.asarray(shifted.dataobj), moved), scan)
    with pytest.raises(BrainzooError, match=f"{scan}: the scan is not on its label map"):
        write_synthetic_heads(read_sources(table), tmp_path / "heads", 2, teacher=teacher)
    nib.save(nib.Nifti1Image(np.zeros(shifted.shape, np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), scan)
    with pytest.raises(BrainzooError, match=f"{scan}: the teacher a-teacher found no brain"):
        write_synthetic_heads(read_sources(table), tmp_path / "heads", 2, teacher=teacher)
    assert not (tmp_path / "heads").exists()


def test_cli_draws_the_teachers_masks(deepbet_weights, tmp_path, capsys):
    """``synth-heads --teacher``: the catalogue's deepbet masks a synthetic scan whose label map is its own mask."""
    rows = list(csv.DictReader(write_synthetic_dataset(tmp_path, 1, shape=(64, 64, 64), seed=5).open()))
    with open(tmp_path / "sources.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["labels", "path"], [rows[0]["mask"], rows[0]["path"]]])
    argv = ["synth-heads", str(tmp_path / "sources.csv"), "--out", str(tmp_path / "out"), "--n", "1"]
    assert main([*argv, "--teacher", deepbet_weights, "--json"]) == 0
    with open(tmp_path / "out" / TABLE, newline="") as handle:
        assert [row["mask_from"] for row in csv.DictReader(handle)] == [deepbet_weights]
    with pytest.raises(SystemExit):
        main([*argv, "--teacher", deepbet_weights, "--mask-column", "mask"])
    assert "not allowed with argument" in capsys.readouterr().err
