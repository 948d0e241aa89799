"""Bad outputs and implausible inputs through the real CLI: each stops with exit status 1, a message naming the
file, no traceback and nothing left behind (no output, no ``.partial`` file), and an input is never overwritten.

The brain-extraction cases run the student U-Net (`brainzoo-unet/0.5.0`, ONNX Runtime, weights in the in-repo
store) on a synthetic 3 mm head, so the one case that runs the model takes a few seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainzoo import fileio
from brainzoo.errors import BrainzooError
from brainzoo.predict import qc
from conftest import REPO, brainzoo

STUDENT = "neuronets/brainzoo-unet/0.5.0"
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# The CLI with every atomic write of a JSON file failing as on a full disk: the mask is written first, then this.
FULL_DISK = """
import errno, pathlib, sys
from brainzoo import cli
real_write_text = pathlib.Path.write_text
def full_disk(self, *args, **kwargs):
    if ".partial" in self.name and self.name.endswith(".json"):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))
    return real_write_text(self, *args, **kwargs)
pathlib.Path.write_text = full_disk
sys.exit(cli.main(sys.argv[1:]))
"""

# The CLI with the JSON record's write hanging half-way, as on a stalled file system, until it is killed.
STALLED_WRITE = """
import pathlib, sys, time
from brainzoo import cli
real_write_text = pathlib.Path.write_text
def stalled(self, text, *args, **kwargs):
    if not self.name.startswith(".mask.json."):
        return real_write_text(self, text, *args, **kwargs)
    real_write_text(self, text[:10])
    time.sleep(120)
pathlib.Path.write_text = stalled
sys.argv[0] = "brainzoo"
cli.entry()
"""


def head(data_shape=(64, 72, 64), voxel_mm=3.0, inverted=False) -> nib.Nifti1Image:
    """A bright ellipsoid in dark noise, 192x216x192 mm: what the input checks take for a head."""
    index = np.indices(data_shape, dtype=np.float32)
    centre = (np.asarray(data_shape, dtype=np.float32) - 1)[:, None, None, None] / 2
    radius = np.sqrt((((index - centre) / (0.4 * np.asarray(data_shape))[:, None, None, None]) ** 2).sum(axis=0))
    data = np.where(radius < 1, 300.0, 5.0) + np.random.default_rng(0).normal(0, 3, radius.shape)
    affine = np.diag([voxel_mm] * 3 + [1.0])
    return nib.Nifti1Image((data.max() - data if inverted else data).astype(np.float32), affine)


@pytest.fixture(scope="module")
def student() -> str:
    """The student's id, its weights fetched from the in-repo store if this clone lacks them (a fresh clone does)."""
    from brainzoo import sources

    failed = [r for r in sources.get(REPO, STUDENT) if r["status"] == "error"]
    assert not failed, failed
    return STUDENT


@pytest.fixture
def scan(tmp_path) -> Path:
    path = tmp_path / "scan.nii.gz"
    nib.save(head(), path)
    return path


def cli(*args: str, full_disk: bool = False) -> subprocess.CompletedProcess:
    if not full_disk:
        return brainzoo(*args, cwd=REPO)
    return subprocess.run([sys.executable, "-P", "-c", FULL_DISK, *args], cwd=REPO, capture_output=True, text=True)


def leftovers(folder: Path, keep: set[Path]) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path not in keep)


def mask_command(scan: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "brain-mask", str(scan), str(out), "--model", STUDENT, *extra]


def read_only_folder(tmp_path: Path) -> Path:
    if AS_ROOT:
        pytest.skip("running as root, where a read-only folder is still writable (chmod does not stop root)")
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    return folder


# Each case: the command's arguments (from the scan and tmp_path), and the file its message must name.
CASES = {
    "output without a NIfTI suffix": lambda s, t: (mask_command(s, t / "mask.txt"), t / "mask.txt"),
    "output is a directory": lambda s, t: (mask_command(s, t), t),
    "QC picture not a PNG": lambda s, t: (mask_command(s, t / "m.nii.gz", "--qc", str(t / "qc.jpg")), t / "qc.jpg"),
    "record not JSON": lambda s, t: (mask_command(s, t / "m.nii.gz", "--record", str(t / "r.yaml")), t / "r.yaml"),
    "output in a missing folder": lambda s, t: (mask_command(s, t / "no" / "m.nii.gz"), t / "no" / "m.nii.gz"),
    "output in a read-only folder": lambda s, t: (mask_command(s, read_only_folder(t) / "m.nii.gz"),
                                                  t / "read-only" / "m.nii.gz"),
    "output is the input, with --force": lambda s, t: (mask_command(s, s, "--force"), s),
    "output is a hard link to the input": lambda s, t: (
        mask_command(s, t / "link.nii.gz", "--force"), os.link(s, t / "link.nii.gz") or t / "link.nii.gz"),
    "two outputs at one path": lambda s, t: (mask_command(s, t / "m.nii.gz", "--brain", str(t / "m.nii.gz")),
                                             t / "m.nii.gz"),
    "input is a directory": lambda s, t: (mask_command(t, t / "m.nii.gz"), t),
    "input is /dev/null": lambda s, t: (mask_command(Path("/dev/null"), t / "m.nii.gz"), Path("/dev/null")),
    "a 16 mm field of view": lambda s, t: (
        mask_command(save(head((64, 72, 8), 2.0), t / "slab.nii.gz"), t / "m.nii.gz"), t / "slab.nii.gz"),
    "inverted intensities, no contrast declared": lambda s, t: (
        mask_command(save(head(inverted=True), t / "inverted.nii.gz"), t / "m.nii.gz"), t / "inverted.nii.gz"),
    "preprocess: output without a NIfTI suffix": lambda s, t: (
        ["preprocess", "neuronets/sfcn-ukbiobank/1.0.0", str(s), str(t / "volume.npy")], t / "volume.npy"),
    "preprocess: output is the input": lambda s, t: (
        ["preprocess", "neuronets/sfcn-ukbiobank/1.0.0", str(s), str(s), "--force"], s),
    "study: output folder is a file": lambda s, t: (
        ["predict", "study", "brain-mask", str(table(t, s)), str(s), "--model", STUDENT], s),
    "study: the table would be overwritten": lambda s, t: (
        ["predict", "study", "brain-mask", str(table(t, s, "results.csv")), str(t), "--model", STUDENT, "--force"],
        t / "results.csv"),
    "evaluate: output folder is a file": lambda s, t: (
        ["evaluate", "brain-mask", "--model", STUDENT, "--data", str(table(t, s)), "--out", str(s)], s),
}


def save(image: nib.Nifti1Image, path: Path) -> Path:
    nib.save(image, path)
    return path


def table(folder: Path, scan: Path, name: str = "study.csv") -> Path:
    path = folder / name
    path.write_text(f"path,mask\n{scan.name},{scan.name}\n")
    return path


@pytest.mark.parametrize("case", CASES)
def test_bad_outputs_and_inputs_stop_cleanly_before_any_work(case, scan, tmp_path):
    args, named = CASES[case](scan, tmp_path)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    proc = cli(*args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert str(named) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert leftovers(tmp_path, set(before) | {tmp_path / "read-only"}) == []
    assert {path: path.read_bytes() for path in before} == before  # the inputs are untouched


def test_a_full_disk_at_the_last_output_removes_the_earlier_ones(student, scan, tmp_path):
    mask, brain, record = tmp_path / "mask.nii.gz", tmp_path / "brain.nii.gz", tmp_path / "mask.json"
    proc = cli(*mask_command(scan, mask, "--brain", str(brain), "--record", str(record)), full_disk=True)
    assert proc.returncode == 1, proc.stderr
    assert f"{record}: cannot be written (No space left on device)" in proc.stderr and "Traceback" not in proc.stderr
    assert leftovers(tmp_path, {scan}) == []  # the mask and brain written before it are gone again


def test_a_killed_command_leaves_neither_outputs_nor_partial_files(student, scan, tmp_path):
    mask, record = tmp_path / "mask.nii.gz", tmp_path / "mask.json"
    command = [sys.executable, "-P", "-c", STALLED_WRITE, *mask_command(scan, mask, "--record", str(record))]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".mask.json.*.partial.json")) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1]
            time.sleep(0.1)
        assert mask.exists()  # written before the record
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    assert leftovers(tmp_path, {scan}) == []


def test_the_checks_give_way_to_force_where_the_user_knows_better(student, tmp_path):
    inverted = save(head(inverted=True), tmp_path / "inverted.nii.gz")
    proc = cli(*mask_command(inverted, tmp_path / "m.nii.gz", "--force"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.nii.gz").is_file()


def test_real_scans_pass_the_intensity_check():
    """The contrast-free check keeps quiet on real heads of every contrast at hand, and catches their inversions."""
    from brainzoo.predict.volumes import check_intensity_profile

    scans = sorted((REPO.parent / "shared" / "data").glob("**/*.nii.gz"))
    scans = [path for path in scans if "mask" not in path.name and "dlmuse" not in str(path)]
    if not scans:
        pytest.skip("../shared/data is absent (real MRI lives there)")
    for path in scans:
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(image.shape[:3])
        check_intensity_profile(nib.Nifti1Image(data, image.affine), str(path))
        with pytest.raises(BrainzooError, match="look inverted"):
            check_intensity_profile(nib.Nifti1Image(data.max() - data, image.affine), str(path))


def test_all_or_nothing_removes_only_the_declared_outputs_written(tmp_path):
    written, cache, kept = tmp_path / "a.json", tmp_path / "cache.json", tmp_path / "b.json"
    kept.write_text("from before")
    with pytest.raises(BrainzooError, match="b.json: cannot be written"):
        with fileio.all_or_nothing([written, kept]):
            with fileio.atomic_output(written) as tmp:
                tmp.write_text("{}")
            with fileio.atomic_output(cache) as tmp:  # not declared: a cache, which stays
                tmp.write_text("{}")
            with fileio.atomic_output(kept, force=True) as tmp:
                raise OSError(28, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "cache.json"]
    assert kept.read_text() == "from before"


def test_an_interrupted_qc_picture_leaves_no_partial_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def interrupted(self, target, **kwargs):
        Path(target).write_bytes(b"half a PNG")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    image = head((16, 16, 16))
    with pytest.raises(KeyboardInterrupt):
        qc.save_mask_qc(tmp_path / "qc.png", image, nib.Nifti1Image((image.get_fdata() > 100).astype(np.uint8),
                                                                    image.affine))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_command_leaves_no_folder_it_made(tmp_path):
    out = tmp_path / "new" / "deeper"
    with pytest.raises(RuntimeError):
        with fileio.output_folder(out):
            raise RuntimeError("the command failed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BrainzooError, match="is a file; the output here is a folder"):
        with fileio.output_folder(save(head((8, 8, 8)), tmp_path / "file.nii.gz")):
            pass
