"""Distillation sets: teacher masks (the deepbet port) and given masks, conformed to a student grid, as TFRecords."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import yaml

from brainzoo.cli import main
from brainzoo.errors import BrainzooError
from brainzoo.predict.runners import BrainMasker
from brainzoo.metrics import dice
from brainzoo.training.distill import STUDENT_TABLE, TABLE, Teacher, write_distillation_set
from brainzoo.training.synthetic import write_synthetic_dataset
from brainzoo.training.tfrecords import read_dataset, read_table, write_tfrecords

GRID = {"orientation": "RAS", "spacing_mm": [4, 4, 4], "shape": [48, 48, 48]}


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Two synthetic heads; the second reoriented to LPS, which the set must undo."""
    folder = tmp_path_factory.mktemp("heads")
    rows = list(csv.DictReader(write_synthetic_dataset(folder, 2, shape=(64, 64, 64), seed=5).open()))
    scan, mask = folder / rows[1]["path"], folder / rows[1]["mask"]
    for path in (scan, mask):
        img = nib.load(path)
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = np.array(img.shape[:2]) - 1  # new voxel i is old voxel n - 1 - i
        flipped = np.ascontiguousarray(np.asanyarray(img.dataobj)[::-1, ::-1])
        nib.save(nib.Nifti1Image(flipped, img.affine @ flip, img.header), path)
    return [(folder / r["path"], folder / r["mask"]) for r in rows]


def test_teacher_and_given_masks_land_on_the_student_grid(deepbet_weights, heads, tmp_path):
    (teacher_scan, _), given = heads
    masker = BrainMasker.load(deepbet_weights)
    table = write_distillation_set([teacher_scan, given], tmp_path / "set", grid=GRID,
                                   teacher=Teacher(masker.version.id, masker.brain))
    rows = list(csv.DictReader(table.open()))
    assert [r["mask_from"] for r in rows] == [masker.version.id, str(given[1])]
    teacher_mask = masker.run(teacher_scan)[0]
    for row, source in zip(rows, [teacher_mask, nib.load(given[1])]):
        image, label = nib.load(table.parent / row["path"]), nib.load(table.parent / row["label"])
        assert image.shape == label.shape == (48, 48, 48)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        np.testing.assert_allclose(nib.affines.voxel_sizes(image.affine), 4)
        # Back in world space, the student's mask voxels fall in the source mask: the teacher's or the given one.
        back = nib.affines.apply_affine(np.linalg.inv(source.affine) @ label.affine,
                                        np.argwhere(np.asanyarray(label.dataobj) > 0))
        assert (np.asanyarray(source.dataobj)[tuple(np.round(back).astype(int).T)] > 0).mean() > 0.97

    examples = read_table(table, kind="segmentation")
    write_tfrecords(examples, tmp_path / "records", kind="segmentation", progress=False)
    volume, label = next(iter(read_dataset(sorted((tmp_path / "records").glob("*.tfrec*"))).map(
        lambda e: (e["volume"], e["label"]))))
    assert volume.shape == label.shape == (48, 48, 48)
    given_label = np.asanyarray(nib.load(table.parent / rows[0]["label"]).dataobj)
    assert dice(label.numpy() > 0, given_label > 0) == 1.0


def test_bad_requests_are_refused(heads, tmp_path):
    scan, mask = heads[0]
    with pytest.raises(BrainzooError, match="lacks shape"):
        write_distillation_set([(scan, mask)], tmp_path, grid={"orientation": "RAS", "spacing_mm": [2, 2, 2]})
    with pytest.raises(BrainzooError, match=f"{scan}: has no mask, and no teacher"):
        write_distillation_set([(scan, mask), scan], tmp_path, grid=GRID)
    write_distillation_set([(scan, mask)], tmp_path, grid=GRID)
    with pytest.raises(BrainzooError, match=f"{TABLE}: exists"):
        write_distillation_set([(scan, mask)], tmp_path, grid=GRID)
    far = {**GRID, "spacing_mm": [1, 1, 1], "shape": [8, 8, 8]}
    empty = tmp_path / "empty-mask.nii.gz"
    img = nib.load(mask)
    data = np.zeros(img.shape, np.uint8)
    data[0, 0, 0] = 1  # a mask in a corner, outside a small grid at the centre
    nib.save(nib.Nifti1Image(data, img.affine), empty)
    with pytest.raises(BrainzooError, match="falls outside the student grid"):
        write_distillation_set([(scan, empty)], tmp_path / "far", grid=far)


def test_distill_command_lists_real_heads_and_their_synthetic_contrasts(deepbet_weights, heads, tmp_path, capsys):
    student = tmp_path / "student.yaml"
    student.write_text(yaml.safe_dump({"inference": {"input": GRID}}))
    scans = [str(scan) for scan, _ in heads]
    out = tmp_path / "set"
    argv = ["distill", *scans, "--student", str(student), "--teacher", deepbet_weights, "--contrasts", "2",
            "--real-copies", "3", "--out", str(out), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["message"].startswith("10 rows")
    rows = list(csv.DictReader((out / STUDENT_TABLE).open()))
    assert [r["path"] for r in rows[:3]] == ["teacher/scan-001_T1w.nii.gz", "teacher/scan-002_T1w.nii.gz",
                                             "teacher/scan-001_T1w.nii.gz"]
    assert [r["label"] for r in rows[6:]] == ["contrasts/scan-001_mask.nii.gz"] * 2 + ["contrasts/scan-002_mask.nii.gz"] * 2
    teacher_masks = [np.asarray(nib.load(out / "teacher" / f"scan-00{i}_mask.nii.gz").dataobj) for i in (1, 2)]
    for i, mask in enumerate(teacher_masks, start=1):
        np.testing.assert_array_equal(np.asarray(nib.load(out / "contrasts" / f"scan-00{i}_mask.nii.gz").dataobj), mask)
    assert main(["tfrecords", str(out / STUDENT_TABLE), str(tmp_path / "records"), "--kind", "segmentation"]) == 0
    assert sum(1 for _ in read_dataset(tmp_path / "records")) == 10
    assert main(argv) == 1  # the set exists: nothing is rewritten without --force
    assert "exists; pass force" in capsys.readouterr().err


def test_distill_command_needs_a_student_grid(heads, tmp_path, capsys):
    student = tmp_path / "student.yaml"
    student.write_text(yaml.safe_dump({"training": {"epochs": 1}}))
    assert main(["distill", str(heads[0][0]), "--student", str(student), "--out", str(tmp_path / "set")]) == 1
    assert "has no inference.input" in capsys.readouterr().err
    assert not (tmp_path / "set").exists()
