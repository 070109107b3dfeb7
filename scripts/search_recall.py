"""Text->image recall of the search engine itself: every caption of a split is a `search` query
over an index of that split's images; a hit is the caption's own image among the first K
results. Compares re-rankers (plain cosine, QB-Norm over the index's query bank, FTF).

    python scripts/search_recall.py INDEX DATASET [--split test] [--rerank none qbnorm] [--depth 100] [--limit N]

The index must hold the split's images (e.g. `rsitr index build` over a folder of links to them);
items are matched to captions by resolved image path. Prints a markdown table and JSON."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    from rsitr.data.captions import load_dataset
    from rsitr.search.engine import SearchEngine
    from rsitr.utils.progress import progress_bar

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index", help="index folder over the split's images")
    ap.add_argument("data", help="caption dataset")
    ap.add_argument("--split", default="test")
    ap.add_argument("--rerank", nargs="+", default=["none", "qbnorm"], help="re-rankers to compare (none, qbnorm, ftf)")
    ap.add_argument("--depth", type=int, default=100, help="candidates a re-ranker re-orders (default 100)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N captions")
    args = ap.parse_args()

    ds = load_dataset(args.data).split(args.split)
    eng = SearchEngine(args.index)
    by_path = {str(Path(it.path).resolve()): it.id for it in eng.items}
    queries = []
    missing = 0
    for e in ds.entries:
        item = by_path.get(str(Path(e.path).resolve()))
        if item is None:
            missing += 1
            continue
        queries += [(c, item) for c in e.captions]
    if missing:
        print(f"warning: {missing} images of the split are not in the index; their captions are skipped")
    queries = queries[: args.limit] if args.limit else queries
    rows = []
    for rr in args.rerank:
        hits = {1: 0, 5: 0, 10: 0}
        t0 = time.perf_counter()
        for text, item in progress_bar(queries, desc=f"search ({rr})"):
            ids = [r["id"] for r in eng.search(text, k=10, rerank=rr, rerank_depth=args.depth)]
            for k in hits:
                hits[k] += item in ids[:k]
        secs = time.perf_counter() - t0
        rows.append({"rerank": rr, "queries": len(queries), **{f"t2i_r{k}": 100.0 * v / len(queries) for k, v in hits.items()},
                     "ms_per_query": 1000.0 * secs / len(queries)})
    print("| rerank | queries | T2I R@1 | R@5 | R@10 | ms / query |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rerank']} | {r['queries']} | {r['t2i_r1']:.2f} | {r['t2i_r5']:.2f} | {r['t2i_r10']:.2f} | {r['ms_per_query']:.1f} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
