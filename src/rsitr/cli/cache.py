"""``rsitr cache ls|prune``: the trunk-feature caches and exported ONNX graphs rsitr keeps (rsitr.utils.cachedir)."""
from __future__ import annotations

import argparse
import json

from rsitr.cli.common import add_command
from rsitr.utils.errors import RsitrError


def _folders(args: argparse.Namespace) -> list:
    from rsitr.models.engine import default_cache_dir

    return list(args.folders) or [default_cache_dir()]


def _add_folders(p: argparse.ArgumentParser) -> None:
    p.add_argument("folders", nargs="*", metavar="FOLDER",
                   help="cache folders: a run's or suite's cache_dir (trunk caches, stored teacher passes), the ONNX graph cache "
                        "(default: $RSITR_ONNX_CACHE, else ~/.cache/rsitr/onnx)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def cmd_ls(args: argparse.Namespace) -> int:
    from rsitr.utils.cachedir import render, scan

    out = []
    for folder in _folders(args):
        items = scan(folder)
        if args.json:
            out.append({"folder": str(folder), "bytes": sum(it.size for it in items),
                        "items": [{"file": it.path.name, "kind": it.kind, "bytes": it.size, "last_used": it.last_used,
                                   "description": it.description} for it in items]})
        else:
            print(render(folder, items) + "\n")
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from rsitr.utils.cachedir import human_size, prune

    if args.unused_days is None:
        raise RsitrError("say what to remove: --unused-days N (items not used for N days; 0 = every item)")
    if args.unused_days < 0:
        raise RsitrError(f"--unused-days must be >= 0, got {args.unused_days:g}")
    out, total = [], 0
    for folder in _folders(args):
        r = prune(folder, args.unused_days * 86400, dry_run=args.dry_run)
        total += r.freed
        out.append({"folder": str(folder), **r.to_dict()})
        if not args.json:
            verb = "would remove" if args.dry_run else "removed"
            for it in r.removed:
                print(f"{verb} {it.path} ({human_size(it.size)}, {it.kind}: {it.summary()})")
            for p in r.temporaries:
                print(f"{verb} {p} (temporary of a writer that died)")
            print(f"{folder}: {verb} {len(r.removed)} item(s) and {len(r.temporaries)} temporary file(s), "
                  f"{human_size(r.freed)}; kept {len(r.kept)}")
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "freed_bytes": total, "folders": out}, indent=2))
    return 0


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    _add_folders(p)
    p.add_argument("--unused-days", type=float, default=None, metavar="N",
                   help="remove the items not used (loaded) for N days (0: all of them); required")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")


def add_cache_cli(sub) -> None:
    """``rsitr cache ls|prune`` on ``rsitr``'s subparsers."""
    cache = sub.add_parser("cache", help="list / prune trunk-feature caches and exported ONNX graphs").add_subparsers(dest="cache_command", required=True)
    add_command(cache, "ls", "list the cache items of folders: kind, size, days since last use, what each holds", _add_folders, cmd_ls)
    add_command(cache, "prune", "remove cache items not used for N days (and temporaries of writers that died)", _add_prune_args, cmd_prune)
