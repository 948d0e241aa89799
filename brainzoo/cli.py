"""The ``brainzoo`` command: a thin argparse layer that renders the library's result records."""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

import yaml

from brainzoo import __version__, catalogue, mirror, publish, sources, validate, zoo
from brainzoo.predict import runners
from brainzoo.convert import CONVERTERS
from brainzoo.errors import BrainzooError
from brainzoo.predict import REGISTRATIONS


def render_table(records: list[dict], columns: list[str]) -> str:
    rows = [[str(r.get(c, "")) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def render_text(record: dict) -> str:
    where = record.get("path") or record.get("id") or ""
    message = record.get("message") or ""
    return f"{record['action']}({record['status']}): {where}" + (f"\n  {message.replace(chr(10), chr(10) + '  ')}" if message else "")


def list_text(records: list[dict]) -> str:
    for r in records:
        if r["status"] == "error":
            r["task"], r["weights"] = "unusable", "see `brainzoo validate`"
            continue
        r["weights"] = f"{r['weights_present']}/{r['weights_published']} present" + (
            f", {r['weights_files'] - r['weights_published']} to convert" if r["weights_files"] > r["weights_published"] else "")
        r["size"] = f"{r['weights_bytes'] / 1e6:.1f} MB"
        r["recommended"] = "yes" if r["recommended"] else ""
    return render_table(records, ["id", "task", "contrast", "weights", "size", "recommended"])


def info_text(records: list[dict]) -> str:
    return "\n".join(json.dumps(r, indent=2, default=str) for r in records)


def emit(records: Iterable[dict], as_json: bool, table: Callable[[list[dict]], str] | None = None) -> int:
    """Print records as they come (or as one table); exit status 1 if any is an error."""
    failed = False
    collected = []
    for record in records:
        failed |= record["status"] == "error"
        if as_json:
            print(json.dumps(record, default=str), flush=True)
        elif table:
            collected.append(record)
        else:
            print(render_text(record), flush=True)
    if table and not as_json:
        print(table(collected) if collected else "(nothing)")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON record per line")
    parser = argparse.ArgumentParser(prog="brainzoo", description=__doc__)
    parser.add_argument("--version", action="version", version=f"brainzoo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("bootstrap", parents=[common], help="set up git-annex, the in-repo store and sources in this clone")
    sub.add_parser("list", parents=[common], help="the catalogue as a table")
    p = sub.add_parser("info", parents=[common], help="spec and card of one version")
    p.add_argument("model", help="catalogue id, e.g. neuronets/deepbet/1.0.2 (a bare model name: its recommended "
                                 "version)")
    p = sub.add_parser("get", parents=[common], help="fetch a version's weights (datalad get), checksummed")
    p.add_argument("model")
    p.add_argument("--source", help="git-annex remote to fetch from (default: cheapest reachable)")
    p.add_argument("--upstream", nargs="+", metavar="CHECKPOINT",
                   help="make the weights by converting these downloaded upstream checkpoint files")
    p.add_argument("--allow-unverified", action="store_true",
                   help="with --upstream: convert files whose identity the spec cannot confirm (recorded as such)")
    p = sub.add_parser("verify", parents=[common], help="fsck present weights and compare sha256 with the specs")
    p.add_argument("--remote", help="instead check that this remote holds every published weights file")
    sub.add_parser("validate", parents=[common], help="check specs, cards and the index against the schemas")
    p = sub.add_parser("predict", parents=[common], help="run a model on a scan or a whole study")
    predict_sub = p.add_subparsers(dest="predict_command", required=True)
    scan_options = argparse.ArgumentParser(add_help=False)
    scan_options.add_argument("--contrast", help="the scan's contrast (default: from a BIDS suffix such as _T1w)")
    scan_options.add_argument("--force", action="store_true", help="overwrite outputs; run on another contrast")
    runtime_option = argparse.ArgumentParser(add_help=False)
    runtime_option.add_argument("--runtime", choices=runners.RUNTIMES, default="auto",
                                help="what runs the networks: onnxruntime (no TensorFlow import) or keras; "
                                     "auto: onnxruntime where every layer maps, else keras (default)")
    q = predict_sub.add_parser("brain-mask", parents=[common, scan_options, runtime_option],
                               help="brain extraction of one scan")
    q.add_argument("infile")
    q.add_argument("outfile", help="uint8 mask with the input's affine and header")
    q.add_argument("--model", default=catalogue.DEFAULT_BRAIN_MASK_MODEL)
    q.add_argument("--threshold", type=float, help="probability threshold (default: the spec's)")
    q.add_argument("--brain", help="also write the masked brain here")
    q.add_argument("--probability", help="also write the probability map here")
    q.add_argument("--qc", help="also write a QC picture (PNG) here")
    q.add_argument("--record", help="also write the JSON record here")
    brain_age_options = argparse.ArgumentParser(add_help=False)
    brain_age_options.add_argument("--mask", help="your brain mask for the spec's brain-extraction step "
                                                 "(default: our brain-extraction model draws it)")
    brain_age_options.add_argument("--registration", choices=REGISTRATIONS, default="brainzoo",
                                   help="what fits the register step: brainzoo (default) or niftyreg (reg_aladin, "
                                        "the upstream's tool; pip install 'brainzoo[niftyreg]')")
    q = predict_sub.add_parser("segment", parents=[common, scan_options, runtime_option],
                               help="label map of one scan from a segmentation model (brainzoo transfer --classes)")
    q.add_argument("infile")
    q.add_argument("outfile", help="uint8 label map (0 the background) with the input's affine")
    q.add_argument("--model", required=True, help="segmentation catalogue id")
    q.add_argument("--record", help="also write the JSON record here")
    q = predict_sub.add_parser("brain-age", parents=[common, scan_options, brain_age_options],
                               help="brain age of one raw scan")
    q.add_argument("infile")
    q.add_argument("--model", required=True, help="brain-age catalogue id")
    q.add_argument("--age", type=float, help="chronological age (years): adds the brain-age gap")
    q.add_argument("--out", help="JSON record of the prediction")
    q.add_argument("--flair-outputs", help="folder for brainAge.txt and results.json as the FLAIR container writes")
    q.add_argument("--qc", help="QC picture (PNG) of the registration")
    q = predict_sub.add_parser("classify", parents=[common, scan_options],
                               help="class probabilities and label of one raw scan (an age group) from a classifier")
    q.add_argument("infile")
    q.add_argument("--model", required=True, help="catalogue id of a classifier (its spec gives classes and inputs)")
    q.add_argument("--sex", help="the scan's sex, as the model's spec codes it (M or F), where the model takes it")
    q.add_argument("--mask", help="your brain mask for the spec's brain-extraction step "
                                  "(default: our brain-extraction model draws it)")
    q.add_argument("--out", help="JSON record of the prediction")
    q = predict_sub.add_parser("study", parents=[common, runtime_option], help="every scan of a CSV/TSV or BIDS folder")
    q.add_argument("--registration", choices=REGISTRATIONS, default="brainzoo",
                   help="brain-age: as for predict brain-age")
    q.add_argument("task", choices=["brain-mask", "brain-age", "classify"])
    q.add_argument("source", help="CSV/TSV with a path column (optional age, contrast; sex for classify) or a BIDS "
                                  "folder")
    q.add_argument("out_dir")
    q.add_argument("--model", help="catalogue id (brain-mask default: deepbet)")
    q.add_argument("--shard", help="K/N: only every N-th scan from the K-th (cluster array jobs)")
    q.add_argument("--force", action="store_true")
    q.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("preprocess", parents=[common, brain_age_options],
                       help="the model-ready volume of a scan (or of every scan of a study), as predict makes it")
    p.add_argument("model", help="catalogue id")
    p.add_argument("source", help="a NIfTI scan, or a CSV/TSV table / BIDS folder of scans")
    p.add_argument("out", help="the output .nii[.gz] for one scan; a folder for a study")
    p.add_argument("--contrast", help="the scan's contrast (default: from a BIDS suffix such as _T1w)")
    p.add_argument("--record", help="one scan: also write the JSON record (registration map, steps, timings)")
    p.add_argument("--qc", help="one scan: also write a QC picture (PNG) of the registration")
    p.add_argument("--shard", help="a study: K/N, only every N-th scan from the K-th")
    p.add_argument("--training", action="store_true",
                   help="the volume a training record holds: the steps up to the spec's "
                        "training.data.preprocessed_until (then brainzoo tfrecords)")
    p.add_argument("--force", action="store_true", help="overwrite outputs; run on another contrast")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("explain", parents=[common, brain_age_options],
                       help="Grad-CAM map of a brain-age or age-group model on one scan, on the scan's grid")
    p.add_argument("model", help="catalogue id")
    p.add_argument("infile", help="the scan (NIfTI)")
    p.add_argument("outfile", help="the map on the scan's grid, 0 to 1 (.nii or .nii.gz)")
    p.add_argument("--layer", help="the convolutional layer explained (default: the spec's explain.layer)")
    p.add_argument("--target", help="a classifier's class, by label or index (default: the predicted class)")
    p.add_argument("--sex", help="the scan's sex, as the model's spec codes it (M or F), where the model takes it")
    p.add_argument("--model-grid", help="also write the map on the model's input grid here (.nii or .nii.gz)")
    p.add_argument("--contrast", help="the scan's contrast (default: from a BIDS suffix such as _T1w)")
    p.add_argument("--qc", help="also write a picture (PNG) of the map over the scan")
    p.add_argument("--record", help="also write the JSON record")
    p.add_argument("--force", action="store_true", help="overwrite outputs; run on another contrast")

    p = sub.add_parser("generate", parents=[common],
                       help="volumes from a GAN generator: NIfTI samples, their latents and a picture sheet")
    p.add_argument("model", help="catalogue id of a generator, or a saved generator model (.h5)")
    p.add_argument("out_dir", help="folder for sample-NNN.nii.gz, latents.csv, samples.png and generate.json")
    p.add_argument("--n", type=int, default=8, help="how many samples (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent draws (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite earlier samples")
    p = sub.add_parser("encode", parents=[common], help="latent vectors of scans from a GAN encoder")
    p.add_argument("model", help="catalogue id of an encoder, or a saved encoder model (.h5)")
    p.add_argument("scans", nargs="+", metavar="SCAN", help="NIfTI scans")
    p.add_argument("--out", required=True, help="CSV: one row per scan (scan, z_000, ...)")
    p.add_argument("--preprocessed", action="store_true",
                   help="the scans are already the network's input (generated samples, brainzoo preprocess output)")
    p.add_argument("--force", action="store_true", help="overwrite the CSV")

    p = sub.add_parser("evaluate", parents=[common], help="measure a model on a table of scans (card metrics)")
    evaluate_sub = p.add_subparsers(dest="evaluate_command", required=True)
    evaluation_options = argparse.ArgumentParser(add_help=False)
    evaluation_options.add_argument("--out", required=True, help="folder for scans.csv and summary.json")
    evaluation_options.add_argument("--dataset", help="how the card names the data (default: the table's path)")
    evaluation_options.add_argument("--split",
                                    help="how the scans relate to the model's training (needed by --update-card)")
    evaluation_options.add_argument("--update-card", action="store_true",
                                    help="write the summary's metrics into the model's card")
    evaluation_options.add_argument("--force", action="store_true", help="overwrite scans.csv and summary.json")
    evaluation_options.add_argument("--no-progress", action="store_true")
    q = evaluate_sub.add_parser("brain-mask", parents=[common, runtime_option, evaluation_options],
                                help="Dice, Hausdorff-95 and wall time per scan of a brain-extraction model")
    q.add_argument("--model", required=True, help="brain-extraction catalogue id")
    q.add_argument("--data", required=True, help="CSV/TSV: a path column and a reference-mask column (paths relative to it)")
    q.add_argument("--reference-column", default="mask", help="column of reference masks (voxels > 0 are brain)")
    q.add_argument("--reference-model", help="instead, compare with this catalogue model's masks (e.g. deepbet)")
    q = evaluate_sub.add_parser("brain-age", parents=[common, evaluation_options],
                                help="MAE, Pearson r, mean error and age bias of a brain-age model")
    q.add_argument("--model", required=True, help="brain-age catalogue id")
    q.add_argument("--data", required=True,
                   help="CSV/TSV: path and age (years) columns, optional contrast and id (paths relative to it)")

    p = sub.add_parser("publish", parents=[common], help="save a version and push its weights to the OSF sibling")
    p.add_argument("model", help="catalogue id")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--osf-project", help="existing OSF project id (5 characters)")
    where.add_argument("--new-osf-project", metavar="TITLE", help="create a new public OSF project")
    p.add_argument("--dry-run", action="store_true", help="show every step without network or changes")
    p = sub.add_parser("mirror", parents=[common], help="offline mirrors for air-gapped sites")
    mirror_sub = p.add_subparsers(dest="mirror_command", required=True)
    q = mirror_sub.add_parser("export", parents=[common], help="write weights into a git-annex store in DIR")
    q.add_argument("dir")
    q.add_argument("models", nargs="*", help="catalogue ids (default: every version whose weights are here)")
    q = mirror_sub.add_parser("add", parents=[common], help="register a mirror folder in this clone")
    q.add_argument("dir")
    q.add_argument("--name", help="remote name (default: the one recorded in the mirror)")

    p = sub.add_parser("tfrecords", parents=[common], help="convert a CSV/TSV table or a BIDS folder to TFRecords")
    p.add_argument("table", help="CSV/TSV with a path column (and label or scalar columns), or a BIDS folder")
    p.add_argument("out", help="output folder for shard-NNN.tfrec[.gz]")
    p.add_argument("--kind", required=True, choices=["segmentation", "regression"])
    p.add_argument("--label-column", default="label", help="label-volume column (segmentation)")
    p.add_argument("--scalars", nargs="+", default=["age", "sex"], help="scalar columns, target first (regression)")
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--no-gzip", action="store_true")
    p.add_argument("--force", action="store_true", help="replace shards already in OUT")

    p = sub.add_parser("distill", parents=[common],
                       help="a brain-extraction student's training table: teacher masks, synthetic contrasts "
                            "and synthetic heads")
    p.add_argument("scans", nargs="*", metavar="SCAN",
                   help="whole-head NIfTI scans, or CSV/TSV tables of them (a path column, relative to the table)")
    p.add_argument("--heads", help="a brainzoo synth-heads table (heads.csv): synthetic heads that keep their masks")
    p.add_argument("--student", required=True, help="the student's version or spec.yaml: its inference grid")
    p.add_argument("--teacher", default=catalogue.DEFAULT_BRAIN_MASK_MODEL, help="brain-extraction version")
    p.add_argument("--contrasts", type=int, default=0, help="synthetic contrasts of each scan")
    p.add_argument("--real-copies", type=int, default=1, help="times each real scan is listed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder: teacher/, contrasts/ and student.csv")
    p.add_argument("--force", action="store_true", help="rewrite an existing set")

    p = sub.add_parser("synth-heads", parents=[common],
                       help="synthetic whole heads and brain masks drawn from label maps (SynthSeg-style)")
    p.add_argument("table", help="CSV/TSV: a labels column (label maps, > 0 brain), optional path (the scan whose "
                                 "intensity classes label the head), mask (the teacher's mask) and age columns")
    p.add_argument("--out", required=True, help="output folder: head-NNNN_T1w/_mask.nii.gz and heads.csv")
    p.add_argument("--n", type=int, required=True, help="how many heads")
    p.add_argument("--seed", type=int, default=0)
    masks = p.add_mutually_exclusive_group()
    masks.add_argument("--mask-column", help="column of brain masks (default: the label map's labels > 0)")
    masks.add_argument("--teacher", metavar="MODEL",
                       help="brain-extraction version whose masks of the scans (path column) the heads carry")
    p.add_argument("--age-doubling", type=float, default=10.0,
                   help="years over which a subject's chance to be drawn doubles (default 10)")
    p.add_argument("--force", action="store_true", help="rewrite an existing set")

    p = sub.add_parser("lower-resolution", parents=[common],
                       help="scans of a table as a scanner with coarser voxels or thicker slices would record them")
    p.add_argument("table", help="CSV/TSV: a path column (optional id; cells naming NIfTI files, such as reference "
                                 "label maps, are carried over)")
    p.add_argument("--spacing", type=float, nargs=3, required=True, action="append", metavar=("X", "Y", "Z"),
                   help="voxel size in mm along the scans' voxel axes (e.g. 2 2 6: 6 mm slices on the third); "
                        "repeat for several versions of each scan")
    p.add_argument("--out", required=True, help="output folder: <id>_<X>x<Y>x<Z>mm.nii.gz and scans.csv")
    p.add_argument("--force", action="store_true", help="rewrite an existing set")

    p = sub.add_parser("convert", parents=[common], help="convert a published PyTorch checkpoint to a Keras .h5 model")
    p.add_argument("--arch", required=True, choices=list(CONVERTERS),
                   help="architecture of the checkpoint (deepbet-*: read from the installed deepbet package)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="SRC DST: checkpoint and output .h5 (deepbet-*: DST only)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="builder option (YAML value)")
    p.add_argument("--record", metavar="JSON", help="where the conversion record goes (default: DST with .json)")
    p.add_argument("--force", action="store_true", help="overwrite DST and the record")

    training_options = argparse.ArgumentParser(add_help=False)
    training_options.add_argument("--train", required=True, help="training TFRecords (folder, glob or file)")
    training_options.add_argument("--validation",
                                  help="held-out TFRecords for the metrics, early stopping and training.select")
    for option in ("epochs", "steps-per-epoch", "batch-size", "seed", "checkpoint-every-steps"):
        training_options.add_argument(f"--{option}", type=int, help="override the spec's training value")
    training_options.add_argument("--force", action="store_true", help="replace an earlier, different run or version")
    training_options.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("train", parents=[common, training_options], help="train a version's model as its spec says")
    p.add_argument("spec", help="catalogue id, version folder or spec.yaml")
    p.add_argument("--out", required=True, help="run folder: checkpoints, TensorBoard logs, model.h5, metrics.json")
    p.add_argument("--init-weights", help="start from this saved model's weights (matched by layer name)")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="stop after N steps at a checkpoint; the same command again goes on (a chunk of the run)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop at a checkpoint after the first step past SECONDS (counted from the model's build); "
                        "the same command again goes on; leave a step's time and a checkpoint's below a job's limit")
    p = sub.add_parser("transfer", parents=[common, training_options],
                       help="fine-tune a catalogue version and write a new version folder")
    p.add_argument("source", help="catalogue id to start from")
    p.add_argument("dest", help="new version id, e.g. neuronets/sfcn-flair-ft/1.0.0")
    p.add_argument("--bins", nargs=3, type=float, metavar=("START", "STOP", "STEP"), help="new age bins (SFCN)")
    p.add_argument("--classes", type=int, help="a U-Net's new number of output classes (1: a mask; 2 or more: "
                                               "softmax classes, 0 the background); the head is re-initialised")
    p.add_argument("--labels", help="a U-Net's new label set: CSV/TSV with value (0, 1, ...) and label columns")
    p.add_argument("--replace", action="append", default=[], help="layer name pattern to re-initialise (the head)")
    p.add_argument("--fit-bias-correction", action="store_true",
                   help="brain age: fit the age-bias line (de Lange & Cole 2020) on the --validation records with "
                        "the fine-tuned network and write it to the new spec")
    p.add_argument("--freeze-epochs", type=int, default=0, help="epochs during which only --trainable layers learn")
    p.add_argument("--trainable", action="append", default=[], help="layer name pattern trainable while frozen")
    return parser


def convert_records(args: argparse.Namespace) -> Iterator[dict]:
    """`brainzoo convert`: the record written beside the model, as a result record."""
    from brainzoo import convert

    expected = 2 if CONVERTERS[args.arch].takes_checkpoint else 1
    if len(args.paths) != expected:
        raise BrainzooError(f"--arch {args.arch} takes {'DST' if expected == 1 else 'SRC DST'}, got {len(args.paths)} path(s)")
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise BrainzooError(f"--option {item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    src, dst = (args.paths[0] if expected == 2 else None), Path(args.paths[-1])
    record = convert.convert(args.arch, src, dst, options, force=args.force, record_file=args.record)
    check = record["self_check"]
    checked = (f"self-check max abs difference {check['max_abs_difference']:.3g}" if check["status"] == "passed"
               else f"self-check skipped: {check['reason']}")
    yield {"action": "convert", "path": str(dst), "status": "ok",
           "message": f"written with {args.record or convert.record_path(dst)}; {checked}", "record": record}


def predict_records(args: argparse.Namespace) -> Iterator[dict]:
    optional = (lambda value: Path(value) if value else None)
    if args.predict_command == "study":
        model = args.model or (catalogue.DEFAULT_BRAIN_MASK_MODEL if args.task == "brain-mask" else None)
        if model is None:
            raise BrainzooError(f"predict study {args.task}: --model is required (a catalogue id)")
        yield from runners.run_study(args.task, Path(args.source), Path(args.out_dir), model=model, shard=args.shard,
                                       force=args.force, progress=not args.no_progress, runtime=args.runtime,
                                       registration=args.registration)
        return
    if args.predict_command == "brain-mask":
        masker = runners.BrainMasker.load(args.model, threshold=args.threshold, runtime=args.runtime)
        record = runners.predict_brain_mask_file(
            masker, Path(args.infile), Path(args.outfile), brain=optional(args.brain),
            probability=optional(args.probability), qc_png=optional(args.qc), record_json=optional(args.record),
            contrast=args.contrast, force=args.force)
        message = f"brain volume {record['prediction']['brain_volume_ml']} ml"
    elif args.predict_command == "segment":
        record = runners.predict_label_map_file(args.model, Path(args.infile), Path(args.outfile),
                                                record_json=optional(args.record), contrast=args.contrast,
                                                runtime=args.runtime, force=args.force)
        message = ", ".join(f"{name} {count} voxels" for name, count in record["prediction"]["voxels"].items())
    elif args.predict_command == "classify":
        record = runners.predict_classification_file(
            args.model, Path(args.infile), covariates={"sex": args.sex}, out_json=optional(args.out),
            contrast=args.contrast, mask=optional(args.mask), force=args.force)
        result = record["result"]
        message = f"{result['label']} (probability {result['probability']:.3f})"
    else:
        record = runners.predict_brain_age_file(
            args.model, Path(args.infile), age=args.age, out_json=optional(args.out),
            flair_outputs=optional(args.flair_outputs), qc_png=optional(args.qc), contrast=args.contrast,
            mask=optional(args.mask), registration=args.registration, force=args.force)
        message = ", ".join(f"{k} {v}" for k, v in record["result"].items() if not isinstance(v, (list, dict)))
    yield {"action": f"predict-{args.predict_command}", "path": args.infile, "status": "ok", "message": message,
           "record": record}


def preprocess_records(args: argparse.Namespace) -> Iterator[dict]:
    """`brainzoo preprocess`: one scan to one volume, or a study table / BIDS folder to a folder of them."""
    source = Path(args.source)
    if source.is_dir() or source.suffix in (".csv", ".tsv"):
        if args.record or args.qc or args.mask:
            raise BrainzooError("--record, --qc and --mask are for one scan; a study writes a record per scan")
        yield from runners.run_study("preprocess", source, Path(args.out), model=args.model, shard=args.shard,
                                       force=args.force, progress=not args.no_progress,
                                       registration=args.registration, training=args.training)
        return
    optional = (lambda value: Path(value) if value else None)
    record = runners.preprocess_file(args.model, source, Path(args.out), record_json=optional(args.record),
                                       qc_png=optional(args.qc), contrast=args.contrast, mask=optional(args.mask),
                                       registration=args.registration, training=args.training, force=args.force)
    shape = "x".join(map(str, record["volume"]["shape"]))
    yield {"action": "preprocess", "path": args.out, "status": "ok", "message": f"{shape} volume for {args.model}",
           "record": record}


def explain_records(args: argparse.Namespace) -> Iterator[dict]:
    """`brainzoo explain`: the map written, and what it explains."""
    from brainzoo import explain

    optional = (lambda value: Path(value) if value else None)
    record = explain.explain_file(args.model, Path(args.infile), Path(args.outfile), layer=args.layer,
                                  target=args.target, sex=args.sex, model_grid=optional(args.model_grid),
                                  qc_png=optional(args.qc), record_json=optional(args.record), contrast=args.contrast,
                                  mask=optional(args.mask), registration=args.registration, force=args.force)
    explained = record["explanation"]
    yield {"action": "explain", "path": args.outfile, "status": "ok",
           "message": f"Grad-CAM of the {explained['target']['score']} on layer {explained['layer']}", "record": record}


def generative_records(args: argparse.Namespace) -> Iterator[dict]:
    """`brainzoo generate` and `brainzoo encode`."""
    from brainzoo.predict import generative

    if args.command == "generate":
        record = generative.generate(args.model, args.out_dir, n=args.n, seed=args.seed, force=args.force)
        yield {"action": "generate", "path": args.out_dir, "status": "ok", "record": record,
               "message": f"{args.n} samples of {'x'.join(map(str, record['shape']))}, values in "
                          f"[{record['range'][0]:.3f}, {record['range'][1]:.3f}]"}
    else:
        record = generative.encode(args.model, args.scans, args.out, preprocessed=args.preprocessed,
                                   force=args.force)
        yield {"action": "encode", "path": args.out, "status": "ok", "record": record,
               "message": f"{record['scans']} scan(s), {record['latent_size']} latent values each"}


def training_overrides(args: argparse.Namespace) -> dict:
    return {"epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch, "batch_size": args.batch_size,
            "seed": args.seed, "checkpoint_every_steps": args.checkpoint_every_steps}


def _teacher(ref: str):
    """A brain-extraction version as the Teacher that masks distillation scans and synthetic heads' sources (its
    networks load at the first scan it masks, so bad inputs fail first)."""
    from brainzoo.predict.runners import BrainMasker
    from brainzoo.training.distill import Teacher

    masker = BrainMasker.load(ref)
    return Teacher(masker.version.id, masker.brain)


def training_records(args: argparse.Namespace) -> Iterator[dict]:
    from brainzoo.training import run as training_run
    from brainzoo.training.tfrecords import read_bids, read_table, write_tfrecords

    if args.command == "tfrecords":
        table = read_bids(args.table, scalar_columns=args.scalars) if os.path.isdir(args.table) else read_table(
            args.table, kind=args.kind, label_column=args.label_column, scalar_columns=args.scalars)
        shards = write_tfrecords(table, args.out, kind=args.kind, shard_size=args.shard_size,
                                 compress=not args.no_gzip, force=args.force, progress=not args.json)
        yield {"action": "tfrecords", "path": args.out, "status": "ok", "message": f"{len(shards)} shard(s)",
               "shards": [str(s) for s in shards]}
    elif args.command == "distill":
        from brainzoo.training.distill import scan_arguments, write_student_set

        grid = training_run.resolve_spec(args.student)[0].get("inference", {}).get("input")
        if not grid:
            raise BrainzooError(f"{args.student}: its spec has no inference.input to take the student grid from")
        table = write_student_set(scan_arguments(args.scans), args.out, grid=grid,
                                  teacher=_teacher(args.teacher), heads=args.heads,
                                  contrasts=args.contrasts, real_copies=args.real_copies, seed=args.seed,
                                  force=args.force)
        with table.open() as handle:
            rows = sum(1 for _ in handle) - 1
        yield {"action": "distill", "path": str(table), "status": "ok",
               "message": f"{rows} rows; next: brainzoo tfrecords {table} RECORDS --kind segmentation"}
    elif args.command == "synth-heads":
        from brainzoo.training.head_synthesis import read_sources, write_synthetic_heads

        sources = read_sources(args.table, mask_column=args.mask_column)
        table = write_synthetic_heads(sources, args.out, args.n, seed=args.seed, doubling_years=args.age_doubling,
                                      teacher=_teacher(args.teacher) if args.teacher else None, force=args.force)
        yield {"action": "synth-heads", "path": str(table), "status": "ok",
               "message": f"{args.n} heads from {len(sources)} label map(s); "
                          f"next: brainzoo tfrecords {table} RECORDS --kind segmentation"}
    elif args.command == "lower-resolution":
        from brainzoo.training.head_synthesis import write_coarser_scans

        table = write_coarser_scans(args.table, args.out, args.spacing, force=args.force)
        with table.open() as handle:
            rows = sum(1 for _ in handle) - 1
        yield {"action": "lower-resolution", "path": str(table), "status": "ok",
               "message": f"{rows} scan(s) at " + ", ".join(" x ".join(f"{size:g}" for size in spacing)
                                                            for spacing in args.spacing) + " mm"}
    elif args.command == "train":
        result = training_run.train(args.spec, args.train, args.validation, args.out,
                                    init_weights=args.init_weights, force=args.force,
                                    progress=not args.no_progress, max_steps=args.max_steps,
                                    time_budget_s=args.time_budget, **training_overrides(args))
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith("val_") and k != "val_n")
        selection = result.get("selection")
        if selection:
            metrics += (f" of epoch {selection['epoch']}, selected by {selection['monitor']} (last epoch "
                        f"{selection['last_epoch']}: {selection['last_value']:.4f})")
        if not result["finished"]:
            metrics = (f"stopped at step {result['steps']} of {result['planned_steps']} ({result['steps_this_run']} "
                       f"this run); run the same command again to go on"
                       + (f"; {'so far' if selection else 'last epoch'} {metrics}" if metrics else ""))
        yield {"action": "train", "path": args.out, "status": "ok", "message": metrics,
               **{k: v for k, v in result.items() if k != "history"}}
    else:
        options = {"bins": args.bins} if args.bins else {}
        if args.classes is not None or args.labels:
            options |= {"labels": training_run.label_names(args.classes, args.labels), "label_table": args.labels}
        yield training_run.transfer(args.source, args.train, args.validation, args.dest,
                                    options=options or None, replace=args.replace,
                                    freeze_epochs=args.freeze_epochs, trainable=args.trainable,
                                    fit_bias_correction=args.fit_bias_correction, force=args.force,
                                    progress=not args.no_progress, **training_overrides(args))


def run_command(args: argparse.Namespace) -> int:
    if args.command in ("tfrecords", "distill", "synth-heads", "lower-resolution", "train", "transfer"):
        return emit(training_records(args), args.json)
    if args.command == "convert":
        return emit(convert_records(args), args.json)
    if args.command in ("generate", "encode"):
        return emit(generative_records(args), args.json)
    if args.command == "predict":
        return emit(predict_records(args), args.json)
    if args.command == "preprocess":
        return emit(preprocess_records(args), args.json)
    if args.command == "explain":
        return emit(explain_records(args), args.json)
    if args.command == "evaluate":
        from brainzoo import evaluate

        shared = {"dataset": args.dataset, "split": args.split, "update_card": args.update_card,
                  "command": ["brainzoo", *args.argv], "force": args.force, "progress": not args.no_progress}
        if args.evaluate_command == "brain-age":
            return emit(evaluate.evaluate_brain_ages(args.model, Path(args.data), Path(args.out), **shared), args.json)
        return emit(evaluate.evaluate_brain_masks(
            args.model, Path(args.data), Path(args.out), reference_model=args.reference_model,
            reference_column=args.reference_column, runtime=args.runtime, **shared), args.json)
    root = catalogue.repo_root()
    if args.command == "bootstrap":
        return emit(zoo.bootstrap(root), args.json)
    if args.command == "list":
        return emit(zoo.list_versions(root), args.json, table=list_text)
    if args.command == "info":
        return emit(zoo.info(args.model, root), args.json, table=info_text)
    if args.command == "get" and args.upstream:
        from brainzoo import upstream

        return emit(upstream.get_upstream(root, args.model, args.upstream, allow_unverified=args.allow_unverified),
                    args.json)
    if args.command == "get" and args.allow_unverified:
        raise BrainzooError("--allow-unverified goes with --upstream")
    if args.command == "get":
        return emit(sources.get(root, args.model, source=args.source), args.json)
    if args.command == "publish":
        return emit(publish.publish(root, args.model, osf_project=args.osf_project,
                                    new_osf_project=args.new_osf_project, dry_run=args.dry_run), args.json)
    if args.command == "mirror" and args.mirror_command == "export":
        return emit(mirror.mirror_export(root, args.dir, args.models or None), args.json)
    if args.command == "mirror":
        return emit(mirror.mirror_add(root, args.dir, name=args.name), args.json)
    if args.command == "verify":
        return emit(zoo.verify(root, remote=args.remote), args.json)
    if args.command == "validate":
        return emit(validate.validate(root), args.json)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # as typed: cards record the exact command that measured their numbers
    try:
        return run_command(args)
    except BrainzooError as err:
        if args.json:
            print(json.dumps({"action": args.command, "status": "error", "message": str(err)}))
        print(f"brainzoo {args.command}: error: {err}", file=sys.stderr)
        return 1


def end_on_sigterm(signum: int, frame) -> None:
    """SIGTERM (a cluster scheduler's kill, a timeout) ends the command as Ctrl-C does: by an exception, so its
    temporary and half-written outputs are removed on the way out."""
    sys.exit(128 + signum)


def entry() -> None:
    """The ``brainzoo`` command: :func:`main`, then exit without traversing every object for cycles.

    Python's final garbage collections walk all of TensorFlow's objects, which adds half a second to every
    process that imported it; frozen objects are skipped, and the operating system reclaims the memory.
    """
    signal.signal(signal.SIGTERM, end_on_sigterm)
    status = main()
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":
    entry()
