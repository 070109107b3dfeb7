"""``rsitr models``: the models that ship with rsitr (list, show), and building one
(``export`` a run, ``evaluate`` a model on the release's sets, ``build`` = train + export + evaluate,
``qbank`` = (re)make only a model's QB-Norm query bank)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rsitr.cli.common import add_engine_arg
from rsitr.utils.errors import RsitrError


def cmd_list(args: argparse.Namespace) -> int:
    from rsitr.models.shipped import DEFAULT, list_shipped, read_card

    names = list_shipped()
    if args.json:
        print(json.dumps([{**read_card(n), "default": n == DEFAULT} for n in names], indent=1))
        return 0
    if not names:
        print("no shipped models in this install")
        return 0
    for n in names:
        c = read_card(n)
        w = c["weights"]
        mark = " (default)" if n == DEFAULT else ""
        print(f"{n}{mark}: {c['card'].get('summary', '')}")
        print(f"  {c['checkpoint']['backbone']['source']}, mode {c['checkpoint']['config']['model'].get('mode')}, method "
              f"{c['checkpoint']['method']['name']}; {w['parameters']:,} trained parameters, {w['bytes'] / 1e6:.1f} MB fp16")
        for row in c["card"].get("metrics", []):
            if row.get("rerank") == "none":
                print(f"  {row['dataset']:>8} {row['split']} tta={row['tta']}: mR {row['mR']:.2f}"
                      + (" (zero-shot)" if row.get("zero_shot") else ""))
        if c.get("qbank"):
            q = c["qbank"]
            print(f"  QB-Norm query bank: {q['count']:,} training captions, {q['bytes'] / 1e6:.1f} MB (search --rerank qbnorm)")
        print(f"  card: rsitr models show {n}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from rsitr.models.shipped import SHIPPED_DIR, read_card

    card = read_card(args.name)
    if args.json:
        print(json.dumps(card, indent=1))
    else:
        print((SHIPPED_DIR / args.name / "card.md").read_text())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rsitr.bench.release import export_run

    out = export_run(args.run, args.name, Path(args.out) / args.name)
    print(f"exported {args.run} as {args.name} to {out}")
    return 0


def _release(path: str):
    from rsitr.bench.release import Release

    return Release.from_yaml(path)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rsitr.bench.release import evaluate_model, markdown_table

    rel = _release(args.release)
    source = args.checkpoint or f"shipped:{rel.name}"
    rows = evaluate_model(source, rel.eval_sets, ttas=tuple(args.tta or rel.ttas), qbnorm_beta=rel.qbnorm_beta, engine=args.engine,
                          progress=not args.quiet)
    if args.json:
        print(json.dumps({"model": source, "rows": rows}, indent=1))
    else:
        print(f"{source}: test splits, expected ties\n")
        print(markdown_table(rows))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from rsitr.bench.release import build_release, markdown_table
    from rsitr.models.shipped import SHIPPED_DIR

    rel = _release(args.release)
    out = Path(args.out) if args.out else SHIPPED_DIR
    run = Path(args.run) if args.run else Path("runs") / f"release-{rel.name}"
    doc = build_release(rel, out / rel.name, run, train=not args.no_train, engine=args.engine, progress=not args.quiet)
    print(markdown_table(doc["card"]["metrics"]))
    print(f"\n{rel.name}: {out / rel.name} (run folder {run}); {doc['card']['build_seconds']}")
    return 0


def cmd_qbank(args: argparse.Namespace) -> int:
    from rsitr.bench.release import build_query_bank
    from rsitr.models.shipped import SHIPPED_DIR

    rel = _release(args.release)
    folder = Path(args.out) / rel.name if args.out else SHIPPED_DIR / rel.name
    if not (folder / "card.json").is_file():
        raise RsitrError(f"{folder}: no exported model {rel.name} there (`rsitr models build` makes it)")
    q = build_query_bank(rel, folder, engine=args.engine, batch_size=args.batch_size, progress=not args.quiet)
    for m in q["measured"]:
        print(f"{m['dataset']} {m['split']}: mR {m['none']:.2f} without a bank, {m['shipped']:.2f} with this bank, "
              f"{m['full']:.2f} with all {q['full_count']:,} captions")
    print(f"{folder / q['file']}: {q['count']:,} captions, {q['bytes']:,} bytes, sha256 {q['sha256'][:16]}...")
    return 0


def add_models_cli(sub) -> None:
    p = sub.add_parser("models", help="the trained models that ship with rsitr (the default --checkpoint), and building one")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)
    ms = p.add_subparsers(dest="models_command")
    ls = ms.add_parser("list", help="the shipped models and their test metrics (default)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_list)
    sh = ms.add_parser("show", help="a shipped model's card")
    sh.add_argument("name", help="the model's name (see `rsitr models`)")
    sh.add_argument("--json", action="store_true", help="print card.json")
    sh.set_defaults(func=cmd_show)
    ex = ms.add_parser("export", help="export a training run's trained parts (fp16 safetensors + card) as a model")
    ex.add_argument("run", help="run folder (its best checkpoint) or checkpoint file")
    ex.add_argument("--name", required=True, help="the model's name")
    ex.add_argument("--out", required=True, help="folder to write NAME/ into")
    ex.set_defaults(func=cmd_export)
    ev = ms.add_parser("evaluate", help="a model's test metrics on a release's evaluation sets (with and without TTA / QB-Norm)")
    ev.add_argument("release", help="release file (src/rsitr/configs/releases/NAME.yaml)")
    ev.add_argument("--checkpoint", default=None, help="the model to evaluate (default: the shipped model of the release)")
    ev.add_argument("--tta", type=int, nargs="+", choices=(1, 4, 8), default=None, help="test-time view counts (default: the release's)")
    ev.add_argument("--json", action="store_true", help="print JSON")
    add_engine_arg(ev)
    ev.set_defaults(func=cmd_evaluate)
    b = ms.add_parser("build", help="train a release's config, export it, evaluate the export, write its card (the rebuild command)")
    b.add_argument("release", help="release file (src/rsitr/configs/releases/NAME.yaml)")
    b.add_argument("--run", default=None, help="run folder (default runs/release-NAME; a release's teachers train into RUN-teacher-seedN beside it); "
                   "a finished run there is not trained again")
    b.add_argument("--out", default=None, help="folder to write NAME/ into (default: the package's shipped_models/)")
    b.add_argument("--no-train", action="store_true", help="export and evaluate the run folder as it is")
    add_engine_arg(b)
    b.set_defaults(func=cmd_build)
    q = ms.add_parser("qbank", help="(re)make a shipped model's QB-Norm query bank from its release's 'qbank:' entry, without retraining")
    q.add_argument("release", help="release file (src/rsitr/configs/releases/NAME.yaml) with a 'qbank:' entry")
    q.add_argument("--out", default=None, help="folder holding NAME/ (default: the package's shipped_models/)")
    q.add_argument("--batch-size", type=int, default=256, help="captions per encode batch (default 256)")
    add_engine_arg(q)
    q.set_defaults(func=cmd_qbank)
