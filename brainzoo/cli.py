"""The ``brainzoo`` command: a thin argparse layer that renders the library's result records."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Iterable, Iterator

from brainzoo import __version__, catalogue, validate, zoo
from brainzoo.errors import BrainzooError


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
        r["weights"] = f"{r['weights_present']}/{r['weights_published']} present" + (
            f", {r['weights_files'] - r['weights_published']} to convert" if r["weights_files"] > r["weights_published"] else "")
        r["size"] = f"{r['weights_bytes'] / 1e6:.1f} MB"
    return render_table(records, ["id", "task", "contrast", "weights", "size"])


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
    p.add_argument("model", help="catalogue id, e.g. neuronets/deepbet/1.0.2")
    p = sub.add_parser("get", parents=[common], help="fetch a version's weights (datalad get), checksummed")
    p.add_argument("model")
    p.add_argument("--source", help="git-annex remote to fetch from (default: cheapest reachable)")
    p = sub.add_parser("verify", parents=[common], help="fsck present weights and compare sha256 with the specs")
    p.add_argument("--remote", help="instead check that this remote holds every published weights file")
    sub.add_parser("validate", parents=[common], help="check specs, cards and the index against the schemas")
    return parser


def run_command(args: argparse.Namespace) -> int:
    root = catalogue.repo_root()
    if args.command == "bootstrap":
        return emit(zoo.bootstrap(root), args.json)
    if args.command == "list":
        return emit(zoo.list_versions(root), args.json, table=list_text)
    if args.command == "info":
        return emit(zoo.info(args.model, root), args.json, table=info_text)
    if args.command == "get":
        return emit(zoo.get(args.model, root, source=args.source), args.json)
    if args.command == "verify":
        return emit(zoo.verify(root, remote=args.remote), args.json)
    if args.command == "validate":
        return emit(validate.validate(root), args.json)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except BrainzooError as err:
        if args.json:
            print(json.dumps({"action": args.command, "status": "error", "message": str(err)}))
        print(f"brainzoo {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
