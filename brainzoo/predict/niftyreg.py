"""A register step fitted by NiftyReg's ``reg_aladin``, the tool the FLAIR-Brain-Age models were trained with.

The upstream's call is ``reg_aladin -ref template -flo scan`` with default options (symmetric block matching,
rigid then 12-parameter affine, three levels). reg_aladin writes a matrix that maps reference world points to
floating world points, both in the images' NIfTI (RAS mm) world: with the template as reference that is
directly our template-to-scan map (checked in tests against a known transform).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from brainzoo.errors import BrainzooError
from brainzoo.predict.registration import (FSL_MNI152_AFFINE, describe_fit, head_threshold, resample_to_template,
                                           template_image)

INSTALL = "CMAKE_POLICY_VERSION_MINIMUM=3.5 pip install niftyreg==1.5.70rc1"


def reg_aladin_binary() -> str:
    """reg_aladin on PATH, else in the installed ``niftyreg`` package's ``bin/``."""
    found = shutil.which("reg_aladin")
    if found:
        return found
    package = importlib.util.find_spec("niftyreg")
    for folder in (package.submodule_search_locations or []) if package else []:
        candidate = Path(folder) / "bin" / "reg_aladin"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise BrainzooError("registration with niftyreg needs NiftyReg's reg_aladin on PATH or the niftyreg package: "
                        + INSTALL)


def reg_aladin(reference: Path, floating: Path) -> np.ndarray:
    """The 4x4 map from reference world to floating world (RAS mm) that ``reg_aladin -ref reference -flo
    floating`` fits with its default options."""
    with tempfile.TemporaryDirectory(prefix="brainzoo-reg-aladin-") as tmp:
        affine_file = Path(tmp) / "affine.txt"
        command = [reg_aladin_binary(), "-ref", str(reference), "-flo", str(floating), "-aff", str(affine_file),
                   "-res", str(Path(tmp) / "resampled.nii.gz"), "-voff"]
        run = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        if run.returncode != 0 or not affine_file.is_file():
            raise BrainzooError(f"reg_aladin failed on {floating} (exit status {run.returncode}): "
                                f"{(run.stderr or run.stdout).strip()[-500:]}")
        return np.loadtxt(affine_file).reshape(4, 4)


def register_with_reg_aladin(data: np.ndarray, affine: np.ndarray, *,
                             template: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """What ``registration.register_to_mni152`` returns, fitted by reg_aladin: the scan resampled trilinearly
    onto the template grid, the 4x4 map from template world (RAS mm) to scan world, and a summary."""
    reference_image = template_image(template)
    with tempfile.TemporaryDirectory(prefix="brainzoo-niftyreg-") as tmp:
        reference, floating = Path(tmp) / "template.nii.gz", Path(tmp) / "scan.nii.gz"
        nib.save(nib.Nifti1Image(reference_image.astype(np.float32), FSL_MNI152_AFFINE), reference)
        nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), floating)
        template_to_scan = reg_aladin(reference, floating)
    registered = resample_to_template(data, affine, template_to_scan)
    summary = {"metric": "NiftyReg reg_aladin (block matching, default options)",
               **describe_fit(registered, template_to_scan, template, head_threshold(data))}
    return registered, template_to_scan, summary
