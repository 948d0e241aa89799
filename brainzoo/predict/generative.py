"""Sampling a GAN generator (``brainzoo generate``) and mapping scans back to its latent space (``brainzoo encode``).

A model is named by a catalogue id (its weights checked against the spec, the sample grid's voxel size and, for
``encode``, the preprocessing taken from the spec) or by a saved Keras model file, such as a training run's
``model.h5`` (then the voxel size is 1 mm and ``encode`` takes only scans already on the network's grid). Either
runs in ONNX Runtime where every layer maps, as predictions do (:mod:`brainzoo.predict.runners`). Every output is
written atomically and all or none; nothing existing is replaced without ``force``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from brainzoo import catalogue
from brainzoo.errors import BrainzooError
from brainzoo.fileio import all_or_nothing, atomic_output, check_output, output_folder, save_nifti, write_csv

SHEET_NAME = "samples.png"
LATENTS_NAME = "latents.csv"
RECORD_NAME = "generate.json"
SHEET_ROWS = 16  # samples drawn on the picture sheet at most
BATCH_SIZE = 4
DEFAULT_SPACING_MM = (1.0, 1.0, 1.0)
CODE_LAYER = "bottleneck"  # an autoencoder's code (brainzoo.models.gan3d.mri_autoencoder)


def latent_prior(n: int, latent_size: int, seed: int) -> np.ndarray:
    """``n`` latents from the upstream GAN's prior, U(0, 1)^latent_size (numpy's generator seeded with ``seed``)."""
    return np.random.default_rng(seed).uniform(0, 1, (n, latent_size)).astype(np.float32)


def _load(ref: str | os.PathLike, command: str,
          outputs: Sequence[str] | None = None) -> tuple[object, str, catalogue.Version | None]:
    """The network ``brainzoo COMMAND`` runs, named by a catalogue id (its weights checked against the spec) or a
    model file, run by ONNX Runtime where every layer maps (else Keras); its runtime; and the catalogue version
    (None for a file). ``outputs``: as :func:`~brainzoo.predict.runners.load_networks`'s."""
    from brainzoo.predict.runners import load_network_file, load_networks, runnable_version

    if Path(ref).is_file():
        networks, version = load_network_file(Path(ref), outputs=outputs), None
    else:
        version, _ = runnable_version(str(ref), command)
        networks = load_networks(version, outputs=outputs)
    (network,) = networks.models.values()
    return network, networks.runtime, version


def _architecture(ref: str | os.PathLike, command: str) -> dict:
    """The Keras functional config of a model file or of the one weights file of a catalogue id that ``brainzoo
    COMMAND`` runs (checked, not built)."""
    from brainzoo.model_files import open_model_file, verified_weights_path
    from brainzoo.predict.runners import runnable_version

    path = Path(ref) if Path(ref).is_file() else verified_weights_path(runnable_version(str(ref), command)[0].id)
    with open_model_file(path) as file:
        return json.loads(file.attrs["model_config"])["config"]


def _centred_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS voxel-to-world matrix with ``spacing`` and the grid's centre at the origin."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.asarray(shape[:3]) - 1) / 2 * np.asarray(spacing, dtype=float)
    return affine


def _run_batches(model, inputs: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(model(inputs[i:i + BATCH_SIZE])) for i in range(0, len(inputs), BATCH_SIZE)])


def sample_sheet(volumes: Sequence[np.ndarray], path: Path, *, title: str, force: bool = False) -> Path:
    """One row per sample (the first ``SHEET_ROWS``): its three central slices, on a fixed 0-1 grey scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = volumes[:SHEET_ROWS]
    figure = Figure(figsize=(6, 2 * len(shown) + 0.4), facecolor="black")
    FigureCanvasAgg(figure)
    for row, volume in zip(figure.subplots(len(shown), 3, squeeze=False), shown):
        centre = np.array(volume.shape) // 2
        for axes, section in zip(row, (volume[centre[0]], volume[:, centre[1]], volume[:, :, centre[2]])):
            axes.imshow(section.T, cmap="gray", vmin=0, vmax=1, origin="lower")
            axes.axis("off")
    figure.suptitle(title, color="white", fontsize=9)
    with atomic_output(path, force) as tmp:
        figure.savefig(tmp, format="png", dpi=80, facecolor="black")
    return path


def generate(ref: str | os.PathLike, out_dir: str | os.PathLike, *, n: int, seed: int, force: bool = False) -> dict:
    """Draw ``n`` latents with ``seed``, write each generated volume as ``sample-NNN.nii.gz``, the latents
    (``latents.csv``), a picture sheet (``samples.png``) and the record (``generate.json``) in ``out_dir``."""
    if n < 1:
        raise BrainzooError(f"--n must be at least 1, got {n}")
    out_dir = Path(out_dir)
    names = [f"sample-{i:03d}.nii.gz" for i in range(n)] + [LATENTS_NAME, SHEET_NAME, RECORD_NAME]
    if not force:
        existing = [name for name in names if (out_dir / name).exists()]
        if existing:
            raise BrainzooError(f"{out_dir / existing[0]}: already exists; pass --force to overwrite it")
    generator, runtime, version = _load(ref, "generate")
    latents = latent_prior(n, generator.input_shape[-1], seed)
    images = _run_batches(generator, latents)[..., 0]
    spacing = version.inference.input.spacing_mm if version else DEFAULT_SPACING_MM
    affine = _centred_affine(images.shape[1:], spacing)
    with output_folder(out_dir), all_or_nothing([out_dir / name for name in names]):
        for name, image in zip(names[:n], images):
            save_nifti(nib.Nifti1Image(image.astype(np.float32), affine), out_dir / name, force=True)
        rows = [{"sample": name, **{f"z_{j:03d}": f"{value:.9g}" for j, value in enumerate(z)}}
                for name, z in zip(names, latents)]
        write_csv(out_dir / LATENTS_NAME, rows, list(rows[0]), force=True)
        sample_sheet(images, out_dir / SHEET_NAME, title=f"{ref}: seed {seed}, {n} samples", force=True)
        record = {"model": str(ref), "runtime": runtime, "n": n, "seed": seed, "latent_prior": "uniform(0, 1)",
                  "latent_size": int(latents.shape[1]), "shape": list(images.shape[1:]), "spacing_mm": list(spacing),
                  "range": [float(images.min()), float(images.max())], "samples": names[:n],
                  "latents": LATENTS_NAME, "sheet": SHEET_NAME}
        with atomic_output(out_dir / RECORD_NAME, force=True) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _network_inputs(scans: Sequence[Path], version: catalogue.Version | None, input_shape: Sequence[int],
                    preprocessed: bool) -> np.ndarray:
    """The volumes the encoder sees: each scan through the version's preprocessing (its brain mask drawn by the
    default brain-extraction model where a step needs one), or (``preprocessed``, or a model file without a
    spec) the scans as they are, which must then be on the network's grid."""
    from brainzoo.predict import preprocess_scan
    from brainzoo.predict.volumes import load_volume

    if version is not None and not preprocessed:
        from brainzoo.predict.runners import BrainMasker, spec_brain_mask

        needs_mask = version.inference.has_step("brain-extraction")
        masker = BrainMasker.load(catalogue.DEFAULT_BRAIN_MASK_MODEL) if needs_mask else None
        volumes = []
        for scan in scans:
            brain_mask, _ = spec_brain_mask(version, scan, masker, None)
            image, _ = preprocess_scan(scan, inference=version.inference, brain_mask=brain_mask)
            volumes.append(np.asarray(image.dataobj, dtype=np.float32))
        return np.stack(volumes)
    volumes = [np.asarray(load_volume(scan).dataobj, dtype=np.float32) for scan in scans]
    for scan, data in zip(scans, volumes):
        if tuple(data.shape) != tuple(input_shape):
            raise BrainzooError(f"{scan}: is {'x'.join(map(str, data.shape))}; without a catalogue version's "
                                f"preprocessing the encoder takes {'x'.join(map(str, input_shape))} volumes")
    return np.stack(volumes)


def encode(ref: str | os.PathLike, scans: Sequence[str | os.PathLike], out_csv: str | os.PathLike, *,
           preprocessed: bool = False, force: bool = False) -> dict:
    """The encoder's latent vector of each scan, one CSV row each (``scan``, ``z_000``...); of an autoencoder, its
    bottleneck code.

    ``preprocessed``: the scans are already the network's input (``brainzoo preprocess`` output, or generated
    samples); otherwise a catalogue version's preprocessing runs first.
    """
    scans = [Path(scan) for scan in scans]
    out_csv = check_output(out_csv, (".csv",), inputs=scans, force=force)
    for scan in scans:
        if not scan.is_file():
            raise BrainzooError(f"{scan}: no such scan")
    architecture = _architecture(ref, "encode")
    layers = {layer["name"]: layer["config"] for layer in architecture["layers"]}
    code = [CODE_LAYER] if CODE_LAYER in layers else None  # an autoencoder: its code, not its reconstruction
    encoder, runtime, version = _load(ref, "encode", code)
    input_shape = layers[architecture["input_layers"][0][0]]["batch_input_shape"][1:4]
    volumes = _network_inputs(scans, version, input_shape, preprocessed)
    latents = _run_batches(encoder, volumes[..., None])
    columns = [f"z_{j:03d}" for j in range(latents.shape[1])]
    rows = [{"scan": str(scan), **{c: f"{v:.9g}" for c, v in zip(columns, z)}} for scan, z in zip(scans, latents)]
    write_csv(out_csv, rows, ["scan", *columns], force=force)
    return {"model": str(ref), "runtime": runtime, "scans": len(scans), "latent_size": len(columns),
            "out": str(out_csv)}


def read_latents(path: str | os.PathLike) -> np.ndarray:
    """The latent vectors of a ``latents.csv`` or an ``encode`` CSV, one row per sample or scan."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise BrainzooError(f"{path}: holds no latent vectors")
    columns = [key for key in rows[0] if key.startswith("z_")]
    return np.array([[float(row[c]) for c in columns] for row in rows], np.float32)
