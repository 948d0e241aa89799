"""Writing outputs so that a failure never leaves a partial file and nothing is overwritten silently."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from brainzoo.errors import BrainzooError


def check_writable(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse to clobber an existing output unless ``force``; make sure the folder exists."""
    path = Path(path)
    if path.exists() and not force:
        raise BrainzooError(f"{path}: already exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise BrainzooError(f"{path}: folder {path.parent} does not exist")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    The temporary name keeps the final suffix (``.nii.gz``, ``.h5``) so writers that infer the format
    from the name still work.
    """
    path = check_writable(path, force)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping], columns: Sequence[str], force: bool = False) -> Path:
    """A CSV table with a header row, written atomically (``\\n`` line ends; missing values left empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_output(path, force) as tmp:
        tmp.write_text(buffer.getvalue())
    return Path(path)


def save_nifti(image, path: str | os.PathLike, force: bool = False) -> Path:
    """Write a nibabel image atomically (its format from the suffix, ``.nii.gz`` compressed)."""
    with atomic_output(path, force) as tmp:
        image.to_filename(tmp)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_of(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 1 MiB blocks (weights can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
