"""Writing outputs so that a failure never leaves a partial file and nothing is overwritten silently."""

from __future__ import annotations

import contextlib
import contextvars
import csv
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from brainzoo.errors import BrainzooError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# The outputs a command declared (absolute paths) and those of them it has written so far: see all_or_nothing.
_COMMAND_OUTPUTS: contextvars.ContextVar[tuple[set[str], list[Path]] | None] = contextvars.ContextVar(
    "command_outputs", default=None)


class OutputError(BrainzooError, OSError):
    """An output that could not be written (a full disk, no permission), worded for the user; still an OSError, so
    callers that treat a failed cache write as harmless go on doing so."""


def check_writable(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse to clobber an existing output unless ``force``; make sure the folder exists."""
    path = Path(path)
    if path.exists() and not force:
        raise BrainzooError(f"{path}: already exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise BrainzooError(f"{path}: folder {path.parent} does not exist")
    return path


def check_output(path: str | os.PathLike, suffixes: Sequence[str], *, inputs: Iterable[str | os.PathLike] = (),
                 force: bool = False) -> Path:
    """Refuse, before any work, an output that could not be written or must not be: a name without one of
    ``suffixes``, a directory, a folder that is missing or not writable, an existing file without ``force``, and
    any of the command's ``inputs`` (the same path, or the same file through a link), even with ``force``."""
    path = Path(path)
    if path.is_dir():
        raise BrainzooError(f"{path}: is a directory; give the output's file name")
    if not path.name.lower().endswith(tuple(suffixes)) or path.name.lower() in suffixes:
        raise BrainzooError(f"{path}: this output's name must end in {' or '.join(suffixes)}")
    for source in inputs:
        if _same_file(path, Path(source)):
            raise BrainzooError(f"{path}: is the input {source}; an output never replaces an input, "
                                "not even with --force")
    check_writable(path, force)
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise BrainzooError(f"{path}: folder {path.parent} is not writable")
    return path


def _same_file(a: Path, b: Path) -> bool:
    """The same path once links are resolved, or the same file under two names (a hard link)."""
    if a.resolve() == b.resolve():
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


@contextlib.contextmanager
def all_or_nothing(outputs: Iterable[str | os.PathLike | None]) -> Iterator[None]:
    """A command's declared ``outputs`` (None: not asked for): if the block fails, those it has already written
    are removed again, so a failed command leaves none of its outputs (caches written meanwhile stay)."""
    declared = {os.path.abspath(path) for path in outputs if path is not None}
    written: list[Path] = []
    token = _COMMAND_OUTPUTS.set((declared, written))
    try:
        yield
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    finally:
        _COMMAND_OUTPUTS.reset(token)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    The temporary name keeps the final suffix (``.nii.gz``, ``.h5``) so writers that infer the format
    from the name still work. The temporary file is removed however the block ends (an exception, Ctrl-C); an
    OSError while writing (a full disk, no permission) is a BrainzooError naming ``path``.
    """
    path = check_writable(path, force)
    suffix = "".join(path.suffixes)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
        tmp = Path(name)
        os.close(fd)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp, path)
    except OSError as error:
        raise OutputError(f"{path}: cannot be written ({error.strerror or error}); nothing was written there") \
            from error
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    claim = _COMMAND_OUTPUTS.get()
    if claim is not None and os.path.abspath(path) in claim[0]:
        claim[1].append(path)


@contextlib.contextmanager
def output_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Create a command's output folder (and its missing parents); if the block fails, remove again those of them
    it created that are still empty, so a failed command leaves no empty folder behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BrainzooError(f"{path}: is a file; the output here is a folder")
    created = [folder for folder in (path, *path.parents) if not folder.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BrainzooError(f"{path}: cannot create the output folder ({error.strerror or error})") from error
    try:
        yield path
    except BaseException:
        for folder in created:  # deepest first; a folder that holds anything stays
            try:
                folder.rmdir()
            except OSError:
                break
        raise


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
