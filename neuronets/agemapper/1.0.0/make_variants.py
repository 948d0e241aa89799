"""Write neuronets/agemapper/1.0.0/<contrast>-<sex>/{spec,model_card}.yaml from contrasts.yaml (run from anywhere).

One variant per contrast and sex: the upstream trained separate networks per sex, three per contrast and sex, and
advises averaging the three per subject; `brainzoo predict brain-age` averages every weights entry of a version, so
a version holding both sexes would average male and female networks together. The 25 rsfMRI contrasts are the
volumes 0-24 of one 4D file (fMRI/rfMRI_25.dr/dr_stage2.nii.gz): their specs start with a ``volume`` step naming
the component, as the upstream's data_utils.py indexes the series before it crops. Rerun after editing
contrasts.yaml; variants of this version and their index entries are rewritten, nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))
from brainzoo.catalogue import INDEX_FILE, INDEX_HEADER, read_yaml, write_yaml  # noqa: E402

VERSION = "1.0.0"
UPSTREAM_URL = "https://github.com/AndreiRoibu/AgeMapper#network-architecture--pre-trained-networks"
# What `brainzoo get` tells a user: the README's link to the trained networks is empty ("not yet added").
UNPUBLISHED = ("the upstream has not published its trained networks (its README's link is empty): ask the "
               "authors (andrei-claudiu.roibu@dtc.ox.ac.uk) for the checkpoint")
GRID = {"1mm": {"spacing": 1, "shape": [160, 192, 160], "start": [10, 12, 0], "full": "182x218x182"},
        "2mm": {"spacing": 2, "shape": [80, 96, 80], "start": [5, 6, 0], "full": "91x109x91"}}
SEXES = ("female", "male")
PAPER = ("Roibu A-C, Adaszewski S, Schindler T, Smith SM, Namburete AIL, Lange FJ. Brain Ages Derived from Different "
         "MRI Modalities are Associated with Distinct Biological Phenotypes. 2023 10th IEEE Swiss Conference on Data "
         "Science (SDS), pp. 17-25, 2023. doi:10.1109/SDS57534.2023.00010")
NOTEBOOK = {"female": ("AndreiRoibu/AgeMapper-Analysis@cfb8952, 'Analsysis Female New/1. MAEs, MSEs, PR + Saving "
                       "Pandas Dataframes.ipynb', output of cell 13"),
            "male": ("AndreiRoibu/AgeMapper-Analysis@cfb8952, 'Analysis Male New/1. MAEs, MSEs, PR + Saving Pandas "
                     "Dataframes.ipynb', output of cell 7")}
TEST_N = {"female": 5022, "male": 4365}  # rows of the notebooks' test tables
LISTS = {"female": (9412, 1255, 5020), "male": (8184, 1091, 4364)}  # IDs in datasets/<sex>_{train,validation,test}.txt


def slug(name: str) -> str:
    return name.lower().replace("_", "-")


def preprocessing(contrast: dict) -> list[dict]:
    grid = GRID[contrast["resolution"]]
    steps = [{"step": "volume", "index": contrast["volume"]}] if "volume" in contrast else []
    steps.append({"step": "crop", "shape": list(grid["shape"]), "start": list(grid["start"])})
    if contrast["divide_by_mean"]:
        steps.append({"step": "divide-by-mean"})
    steps.append({"step": "scale", "factor": 1 / contrast["scale_factor"]})
    return steps


def series_note(contrast: dict) -> str:
    """For an rsfMRI component: which volume of the 4D file the network takes."""
    if "volume" not in contrast:
        return ""
    return f"; a 4D series, of which volume {contrast['volume']} (counted from 0) is used"


def spec(contrast: dict, sex: str) -> dict:
    res = contrast["resolution"]
    grid = GRID[res]
    variant = f"{slug(contrast['name'])}-{sex}"
    version_id = f"neuronets/agemapper/{VERSION}/{variant}"
    members = [{
        "name": f"{sex}-{run}",
        "path": f"weights/{sex}-{run}.h5",
        "format": "keras-h5",
        "upstream": {"url": UPSTREAM_URL, "license": "BSD-3-Clause", "obtain": UNPUBLISHED},
        "recipe": {
            "argv": ["brainzoo", "convert", "--arch", f"agemapper-{res}", "{checkpoint}", f"weights/{sex}-{run}.h5"],
            "options": {"checkpoint": {
                "type": "path",
                "help": (f"the upstream's trained network {run} of 3 for {contrast['name']}, {sex} subjects "
                         "(saved_models/<experiment>.pth.tar, a plain state_dict); run from the version folder")}},
        },
    } for run in (1, 2, 3)]
    return {
        "schema_version": 1,
        "id": version_id,
        "model": "agemapper",
        "version": VERSION,
        "variant": variant,
        "task": "brain-age",
        "framework": {"name": "tf.keras", "version": "2.15.1"},
        "architecture": {"builder": "agemapper", "options": {"resolution": res}, "parameters": 1313345},
        "inference": {
            "entry_point": {
                "argv": ["brainzoo", "predict", "brain-age", "{infile}", "--model", "{model}", "--contrast",
                         contrast["bids_contrast"], "--out", "{outfile}"],
                "options": {
                    "infile": {"type": "path", "required": True,
                               "help": f"the subject's UK Biobank {contrast['ukb_file']} ({grid['full']}, MNI152 "
                                       f"{res}, FSL grid), as the UK Biobank pipeline wrote it"
                                       + series_note(contrast)},
                    "model": {"type": "str", "default": version_id, "help": "catalogue id"},
                    "outfile": {"type": "path", "required": True, "help": "JSON record of the prediction"},
                },
            },
            "method": "whole-volume",
            "input": {"contrast": [contrast["bids_contrast"]], "orientation": "LAS",
                      "spacing_mm": [grid["spacing"]] * 3, "shape": list(grid["shape"]), "channels": 1,
                      "template": f"MNI152 {res}, FSL grid: UK Biobank pipeline output {contrast['ukb_file']}"},
            "preprocessing": preprocessing(contrast),
            "output": {"type": "age", "ensemble": "mean"},
        },
        "explain": {"layer": "conv_4_relu"},
        "training_data_info": {
            "data_number": {"train": LISTS[sex][0], "validation": LISTS[sex][1], "test": LISTS[sex][2]},
            "imaging_contrast_info": f"UK Biobank {contrast['name']}: {contrast['ukb_file']}",
            "dataset_sources": f"UK Biobank imaging, {sex} subjects (AndreiRoibu/AgeMapper datasets/{sex}_*.txt)",
        },
        "weights": members,
    }


SPEC_HEADER = """\
# AgeMapper {name}, {sex} subjects: the upstream's three identical networks for this contrast and sex, averaged per
# subject (its advice). The upstream has NOT published its trained networks (its README's link is empty, "not yet
# added"), so no file name, size or checksum is known: a checkpoint obtained from the authors converts with
# `brainzoo get {id} --allow-unverified --upstream {sex}-1=A.pth.tar {sex}-2=B.pth.tar {sex}-3=C.pth.tar`.
# Input: the UK Biobank pipeline's file, already in MNI space; no registration here. Sex is chosen by the variant:
# predict cannot select ensemble members by sex. Written by make_variants.py from contrasts.yaml.
"""


def card(contrast: dict, sex: str) -> dict:
    res = contrast["resolution"]
    grid = GRID[res]
    name = contrast["name"]
    published = contrast["published"][sex]
    mean_step = ", divided by its mean" if contrast["divide_by_mean"] else ""
    preprocessing = (f"UK Biobank pipeline output {contrast['ukb_file']} in MNI152 space ({grid['full']} at {res})"
                     f"{series_note(contrast)}, cropped to voxels [{grid['start'][0]}:{grid['start'][0] + grid['shape'][0]}, "
                     f"{grid['start'][1]}:{grid['start'][1] + grid['shape'][1]}, 0:{grid['shape'][2]}]{mean_step}, "
                     f"divided by the contrast's scale factor {contrast['scale_factor']!r}"
                     + (" (the 2 mm network upsamples x2 itself)" if res == "2mm" else "") + ".")
    citation = f"{NOTEBOOK[sex]} (the authors' analysis for {PAPER})"
    common = {"dataset": f"UK Biobank, {sex} test subjects (AgeMapper datasets/{sex}_test.txt)", "split": "test",
              "n": TEST_N[sex], "source": "published", "citation": citation}
    metrics = [
        {"name": "MAE", "value": published["mae"], "unit": "years",
         "statistic": f"mean of the 3 networks, no bias correction (SEM {published['mae_sem']})", **common},
        {"name": "RMSE", "value": published["rmse"], "unit": "years", "statistic": "mean of the 3 networks",
         **common},
        {"name": "Pearson r", "value": published["r"], "statistic": "predicted vs chronological age, mean of the "
         "3 networks", **common},
    ]
    return {
        "schema_version": 1,
        "Model_details": {
            "Organization": "University of Oxford (Roibu et al.); brainzoo reimplementation in tf.keras",
            "Model_date": "2023",
            "Model_version": VERSION,
            "Model_type": (f"AgeMapper / HGL 3D CNN at {res} (5 conv blocks, 3 dense layers, 1,313,345 parameters), "
                           f"ensemble of the 3 networks trained on {name} of {sex} subjects"),
            "More_information": ("https://github.com/AndreiRoibu/AgeMapper. Variants: one per contrast and sex "
                                 "(this is one); contrasts.yaml in the version folder lists all 57 contrasts with "
                                 "their files, resolutions, scale factors and published figures."),
            "Contact_info": "andrei-claudiu.roibu@dtc.ox.ac.uk (upstream README)",
        },
        "Intended_use": {
            "Primary_intended_uses": (f"Research brain-age estimates from the UK Biobank {name} map of adults "
                                      f"aged about 45-82 ({sex}), e.g. comparing brain-age deltas across contrasts."),
            "Primary_intended_users": "Neuroimaging researchers with UK Biobank-processed data.",
            "Out_of_scope_use_cases": ("Clinical use; raw scans or maps not made by the UK Biobank pipeline "
                                       "(there is no registration step here); the other sex's subjects; other "
                                       "contrasts than this one."),
        },
        "Factors": {
            "Relevant_factors": "Sex (separate networks), contrast, UK Biobank processing pipeline version, age range.",
            "Evaluation_factors": "Chronological age of held-out UK Biobank subjects of this sex.",
        },
        "Metrics": metrics,
        "Evaluation_data": {
            "Datasets": f"UK Biobank {sex} test subjects listed in AgeMapper datasets/{sex}_test.txt.",
            "Motivation": "Held-out test set of the original work.",
            "Preprocessing": preprocessing,
        },
        "Training_data": {
            "Datasets": (f"UK Biobank {sex} subjects: {LISTS[sex][0]} training and {LISTS[sex][1]} validation IDs "
                         f"(AgeMapper datasets/{sex}_train.txt, {sex}_validation.txt)."),
            "Motivation": "Large single-protocol cohort with many MRI contrasts per subject.",
            "Preprocessing": preprocessing + (" Training: MSE on age in years, Adam lr 5e-3, batch 12, "
                                              "ReduceLROnPlateau (x0.5, patience 15), early stopping (patience 40), "
                                              "random shifts of up to 2 voxels (settings.ini)."),
        },
        "Ethical_considerations": ("UK Biobank is older, healthier and less ethnically diverse than the general "
                                   "population; brain-age deltas are biased towards the mean age and are not a "
                                   "diagnosis."),
        "Caveats_and_recommendations": (
            "No weights yet: the upstream README lists the pre-trained networks but its link is empty and says the "
            "data has not been added (AndreiRoibu/AgeMapper@1d75ee8), so the weights entries record no file name, "
            "size or checksum and conversion needs --allow-unverified. The converter is exact (the fixtures "
            "reproduce the original PyTorch outputs). The input must be the UK Biobank pipeline's file: brainzoo "
            "does not reproduce that pipeline. Why one variant per contrast and sex: each contrast has its own "
            "scaling, and brainzoo predict averages every member of a version and cannot yet pick members by sex, "
            "so a variant holds exactly the three networks the upstream averages. The published figures come from the "
            "authors' analysis notebooks; the SDS 2023 paper itself was not read here. Apply an age-bias "
            "correction fitted on your own data before interpreting deltas."),
        "License": {"weights": "BSD-3-Clause (upstream repository licence)",
                    "code": "BSD-3-Clause (original); Apache-2.0 (brainzoo reimplementation)"},
        "Citation": [PAPER],
    }


def list_in_index(version_ids: list[str]) -> None:
    """The top-level index lists exactly these variants of this version (each recommended: each is the only
    network set for its contrast and sex), sorted like the rest."""
    index = read_yaml(ROOT / INDEX_FILE)
    prefix = f"neuronets/agemapper/{VERSION}/"
    entries = [e for e in index["catalogue"] if not e["path"].startswith(prefix)]
    entries += [{"id": v, "path": v, "task": "brain-age", "recommended": True} for v in version_ids]
    index["catalogue"] = sorted(entries, key=lambda e: e["path"])
    write_yaml(ROOT / INDEX_FILE, index, header=INDEX_HEADER)


def main() -> None:
    contrasts = yaml.safe_load((HERE / "contrasts.yaml").read_text())["contrasts"]
    written = []
    for contrast in contrasts:
        for sex in SEXES:
            data = spec(contrast, sex)
            folder = HERE / data["variant"]
            folder.mkdir(exist_ok=True)
            header = SPEC_HEADER.format(name=contrast["name"], sex=sex, id=data["id"])
            write_yaml(folder / "spec.yaml", data, header=header)
            write_yaml(folder / "model_card.yaml", card(contrast, sex))
            written.append(data["id"])
    list_in_index(written)


if __name__ == "__main__":
    main()
