"""Show a model on real georeferenced scenes: per scene, a pixel-tile and a metre-tile index, every
query searched on both, a contact sheet and the hits JSON per (query, tiling), and a table skeleton.

    python scripts/scene_table.py QUERIES.tsv OUT_DIR [--scenes DIR] [--checkpoint CKPT] [-k 10]

QUERIES.tsv: one `scene file name <TAB> query` per line (`#` comments and blank lines skipped); the
scene files are looked up in --scenes (default /work/shared/data/eval/geo). For every scene two
indexes are built with the CLI (`python -m rsitr.cli --threads 1 index build`):

- `pixel`: `--tile-size 256` (the CLI's default pixel tile), i.e. tiles of a fixed pixel size
  whatever the scene's ground resolution;
- `metre`: no tiling flag, i.e. the model card's ground tile sizes (the shipped default model:
  80 m and 320 m), each resampled to the model's input; the build's log names the chosen scales
  and any scale left out, kept in `OUT_DIR/<scene>/metre.build.log`.

An index whose `manifest.json` already exists is reused (delete the folder to rebuild). Then every
query runs on both indexes (`rsitr search -k K --json --contact-sheet`), writing
`OUT_DIR/<scene>/<tiling>__<query>.png` and `.json` (ranks, scores, windows, CRS bounds, WGS84
footprints). The printed markdown table has the columns to fill in by looking at the sheets: the
rank of the first tile that really shows the query, per tiling, and that tile's footprint.

Everything goes through the CLI in subprocesses (what a user runs), one build at a time, so the
numbers and pictures are the ones a user gets. OUT_DIR should be outside the repository.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("scene_table")

DEFAULT_SCENES = Path("/work/shared/data/eval/geo")
TILINGS: dict[str, list[str]] = {
    "pixel": ["--tile-size", "256"],
    "metre": [],
}


def read_queries(path: Path) -> list[tuple[str, str]]:
    """(scene file name, query) pairs of a queries TSV, in file order; malformed lines are errors."""
    pairs: list[tuple[str, str]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise SystemExit(f"{path}:{n}: expected 'scene file<TAB>query', got {line!r}")
        pairs.append((parts[0].strip(), parts[1].strip()))
    return pairs


def slug(text: str) -> str:
    """A file-name-safe form of a query."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60]


def cli(args: list[str], checkpoint: str | None, log_file: Path | None = None) -> str:
    """Run `python -m rsitr.cli --threads 1 ARGS` and return its stdout; its stderr goes to log_file."""
    cmd = [sys.executable, "-m", "rsitr.cli", "--threads", "1", *args]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    log.info("$ %s", " ".join(cmd[1:]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if log_file is not None:
        log_file.write_text(proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout


def build(scene: Path, tiling: str, out: Path, checkpoint: str | None) -> Path:
    """The scene's index for one tiling, built unless its manifest already exists."""
    idx = out / f"idx-{tiling}"
    if (idx / "manifest.json").exists():
        log.info("reusing %s", idx)
        return idx
    out.mkdir(parents=True, exist_ok=True)
    stdout = cli(["index", "build", str(scene), "--out", str(idx), *TILINGS[tiling]], checkpoint,
                 out / f"{tiling}.build.log")
    log.info("%s", stdout.strip())
    return idx


def build_notes(out: Path, tiling: str) -> list[str]:
    """What the build log says about the tiling (chosen scales, scales left out, no-data, black
    fill) and the item count, without the time stamps and library chatter."""
    path = out / f"{tiling}.build.log"
    if not path.exists():
        return []
    return [ln.split(" ", 3)[-1] for ln in path.read_text(encoding="utf-8").splitlines()
            if re.search(r"rsitr\.search\.(sources|build)", ln)]


def first_footprint(hits: dict) -> str:
    """The rank-1 hit's footprint, as a hint for the table (the judged rank may differ)."""
    if not hits["results"]:
        return "(no hits)"
    r = hits["results"][0]
    size = f"{r['scale_m']:g} m" if r.get("scale_m") else f"{r['window'][2]} px"
    if r.get("whole_scene"):
        size = f"whole scene < {size}"
    if r.get("wgs84"):
        w, s, e, n = r["wgs84"]
        return f"{(s + n) / 2:.5f},{(w + e) / 2:.5f} ({size})"
    return f"window {r.get('window')}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("queries", type=Path, help="TSV: scene file name <TAB> query")
    ap.add_argument("out", type=Path, help="output folder (outside the repository)")
    ap.add_argument("--scenes", type=Path, default=DEFAULT_SCENES, help="folder holding the scene files")
    ap.add_argument("--checkpoint", default=None, help="model (default: the CLI's, the shipped default model)")
    ap.add_argument("-k", type=int, default=10, help="hits per search (default 10)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    pairs = read_queries(args.queries)
    scenes = list(dict.fromkeys(s for s, _ in pairs))
    for s in scenes:
        if not (args.scenes / s).is_file():
            raise SystemExit(f"{args.queries}: scene {s!r} not found in {args.scenes}")
    rows = []
    for s in scenes:
        out = args.out / Path(s).stem
        idx = {t: build(args.scenes / s, t, out, args.checkpoint) for t in TILINGS}
        for scene, query in pairs:
            if scene != s:
                continue
            hints = {}
            for t, folder in idx.items():
                stem = out / f"{t}__{slug(query)}"
                stdout = cli(["search", str(folder), query, "-k", str(args.k), "--json",
                              "--contact-sheet", str(stem.with_suffix(".png"))], args.checkpoint)
                hits = json.loads(stdout)
                stem.with_suffix(".json").write_text(json.dumps(hits, indent=1), encoding="utf-8")
                hints[t] = first_footprint(hits)
            rows.append((s, query, hints))

    print("| scene | query | pixel rank | metre rank | footprint of first correct hit | remark |")
    print("|---|---|---:|---:|---|---|")
    for s, query, hints in rows:
        print(f"| {s} | {query} | ? | ? | ? (rank 1: pixel {hints['pixel']}; metre {hints['metre']}) | |")
    for s in scenes:
        for t in TILINGS:
            for note in build_notes(args.out / Path(s).stem, t):
                print(f"- {s} ({t}): {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
