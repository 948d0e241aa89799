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
from brainzoo.training.distill import (CONTRAST, REAL, STUDENT_TABLE, SYNTHETIC_HEAD, TABLE, Teacher, scan_arguments,
                                      write_distillation_set, write_student_set)
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


def _synthetic_heads(folder, n=3):
    """``brainzoo synth-heads``' set of n heads from two tiny label maps (40^3 at 2 mm, RAS), as test_head_synthesis
    writes them."""
    from test_head_synthesis import _write_sources

    from brainzoo.training.head_synthesis import read_sources, write_synthetic_heads

    folder.mkdir()
    return write_synthetic_heads(read_sources(_write_sources(folder)), folder / "heads", n, seed=2)


def test_synthetic_heads_join_the_student_set_with_their_own_masks(heads, tmp_path):
    heads_table = _synthetic_heads(tmp_path / "sources")
    drawn = list(csv.DictReader(heads_table.open()))
    calls = []

    def teacher_mask(image):
        calls.append(image.shape)
        return np.asanyarray(image.dataobj) > np.percentile(np.asanyarray(image.dataobj), 60)

    grid = {"orientation": "RAS", "spacing_mm": [2, 2, 2], "shape": [40, 40, 40]}  # the heads' own grid
    scan = heads[0][0]
    table = write_student_set([scan], tmp_path / "set", grid=grid, teacher=Teacher("a-teacher", teacher_mask),
                              heads=heads_table, real_copies=2, contrasts=1)
    rows = list(csv.DictReader(table.open()))
    assert [row["kind"] for row in rows] == [REAL, REAL, CONTRAST] + [SYNTHETIC_HEAD] * 3
    assert len(calls) == 1  # the teacher draws the real scan's mask only
    assert rows[0]["source"] == str(scan) and rows[0]["label"] == "teacher/scan-001_mask.nii.gz"
    assert [row["source"] for row in rows[3:]] == [row["source"] for row in drawn]  # each head's label map
    for row, head in zip(rows[3:], drawn):
        assert row["path"].startswith("heads/")
        kept = np.asanyarray(nib.load(table.parent / row["label"]).dataobj)
        own = np.asanyarray(nib.load(heads_table.parent / head["label"]).dataobj)
        np.testing.assert_array_equal(kept, own)  # on its own grid, the conformed mask is the head's mask
    assert len(read_table(table, kind="segmentation")) == 6
    with pytest.raises(BrainzooError, match="exists"):
        write_student_set([], tmp_path / "set", grid=grid, heads=heads_table)


def test_a_student_set_of_synthetic_heads_alone_and_bad_requests(tmp_path, capsys):
    heads_table = _synthetic_heads(tmp_path / "sources", n=2)
    student = tmp_path / "student.yaml"
    student.write_text(yaml.safe_dump({"inference": {"input": GRID}}))
    out = tmp_path / "set"
    assert main(["distill", "--heads", str(heads_table), "--student", str(student), "--out", str(out)]) == 0
    assert "2 rows" in capsys.readouterr().out
    rows = list(csv.DictReader((out / STUDENT_TABLE).open()))
    assert [row["kind"] for row in rows] == [SYNTHETIC_HEAD] * 2
    assert nib.load(out / rows[0]["path"]).shape == (48, 48, 48)
    with pytest.raises(BrainzooError, match="no scans and no synthetic heads"):
        write_student_set([], tmp_path / "none", grid=GRID)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nhead.nii.gz,mask.nii.gz\n")
    with pytest.raises(BrainzooError, match="no column 'source'"):
        write_student_set([], tmp_path / "bad", grid=GRID, heads=bad)
    assert not (tmp_path / "bad").exists()


def test_a_table_argument_stands_for_its_scans(tmp_path):
    (tmp_path / "split").mkdir()
    table = tmp_path / "split" / "train.csv"
    table.write_text("id,path,labels\na,../a.nii.gz,x\nb,b.nii.gz,y\n")
    assert scan_arguments([str(table), "c.nii.gz"]) == [str(tmp_path / "split" / "../a.nii.gz"),
                                                        str(tmp_path / "split" / "b.nii.gz"), "c.nii.gz"]
