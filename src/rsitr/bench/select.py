"""Which held-out split picks the checkpoint the test split would pick: ``rsitr bench select``.

On RSICD the val split overstates test by 4-8 mR and the choices made on it (epochs, recipes,
fusion subsets) have not carried over to test. The splits differ in how their captions were
written, not in their class mix (total variation distance of the class histograms 0.03): 1,091 of
the 1,093 test images have at least two distinct captions, while half of val's (550 of 1,094) and
train's images repeat one sentence five times. A *selection rule* is a split spec that scores the
candidates, e.g. ``val`` (today's) or ``val:distinct>=2`` (val drawn the way test was;
:meth:`rsitr.data.types.CaptionDataset.split`).

Every candidate checkpoint (one per epoch of several seeds' runs: copies of each epoch's
``checkpoint_last.pt``) is scored on every rule and on test, plain and with QB-Norm (the run's
training split as the bank, one ``beta``). Reported: per seed, the epoch each rule picks and its
test mR against the best test epoch (the oracle); the Spearman rank correlation of each rule's
scores with test over each seed's epochs (the decision a rule makes), its mean over seeds, and
over all candidates pooled. With a recipe per group (each seed's chosen checkpoint), also between
groups: the Spearman of the groups' mean rule score with their mean test score, and the share of
group pairs the rule orders as test does. Written by the benchmarks' one writer
(:func:`rsitr.bench.measurements.write_result`): ``select.json`` + ``select.md``.
"""
from __future__ import annotations

import glob
import logging
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    group: str  # the run (seed) it belongs to
    label: str  # e.g. "ep7"
    scores: dict[str, dict[str, float]]  # "<rule or test>[+qb]" -> metrics


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (ties get their mean rank);
    NaN when either list is constant or shorter than 3."""
    if len(a) != len(b):
        raise ValueError("spearman: lists of different length")
    if len(a) < 3:
        return float("nan")

    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0 + 1.0
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return float("nan") if va == 0 or vb == 0 else cov / (va * vb) ** 0.5


def pairs_agree(a: list[float], b: list[float]) -> float:
    """The share of pairs ``(i, j)`` that ``a`` orders as ``b`` does (a tie on one side and not the
    other counts one half); NaN for fewer than two items."""
    if len(a) != len(b):
        raise ValueError("pairs_agree: lists of different length")
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    if not pairs:
        return float("nan")
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    score = sum(1.0 if sign(a[i] - a[j]) == sign(b[i] - b[j]) else 0.5 if 0 in (sign(a[i] - a[j]), sign(b[i] - b[j])) else 0.0
                for i, j in pairs)
    return score / len(pairs)


def candidate_labels(files: list[Path]) -> list[str]:
    """A label per checkpoint file: its epoch (``ep7``); where epochs repeat, the file's stem
    (``t3s1-ep9``); where stems repeat too, with as many of its parent folders as tell the files
    apart (``seed1/run/checkpoint_best``)."""
    epochs, stems = [epoch_label(f) for f in files], [f.stem for f in files]
    base = [e if epochs.count(e) == 1 else st for e, st in zip(epochs, stems)]
    labels = base
    for depth in range(1, max((len(f.parent.parts) for f in files), default=0) + 1):
        if len(set(labels)) == len(labels):
            break
        labels = ["/".join([*[x for x in f.parent.parts if x != f.parent.anchor][-depth:], b]) if base.count(b) > 1 else b
                  for f, b in zip(files, base)]
    return labels


def epoch_label(path: Path) -> str:
    m = re.search(r"ep(?:och)?[-_]?(\d+)", path.stem)
    return f"ep{int(m.group(1))}" if m else path.stem


def score_candidates(groups: dict[str, tuple[Path, list[Path]]], *, data: str, rules: list[str], beta: float | None = 14.0,
                     progress: bool = False) -> list[Candidate]:
    """Embed and score every checkpoint of ``groups`` (``{group: (run folder, [checkpoint files])}``)
    on the ``rules`` (split specs), the run's test split, each plain and (``beta`` not None) with
    QB-Norm at ``beta``."""
    from rsitr.bench.fuse import embed_member
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import pair_metrics

    names = {f"rule{i}": spec for i, spec in enumerate(rules)}
    ds = load_dataset(data)  # once for every checkpoint
    memo: dict = {}  # trunk caches read once for all checkpoints of one trunk
    out = []
    for group, (run, ckpts) in groups.items():
        for ck, label in zip(ckpts, candidate_labels(ckpts)):
            m = embed_member(run, data=data, dataset=ds, checkpoint=ck, extra_splits=names, progress=progress, with_bank=beta is not None, trunk_memo=memo)
            scores = {}
            for key, spec in [*names.items(), ("test", "test")]:
                scores[spec] = pair_metrics(m.sim(key), m.owner[key])
                if beta is not None:
                    scores[f"{spec}+qb"] = pair_metrics(m.qb(key, beta, False), m.owner[key])
            out.append(Candidate(group, label, scores))
            log.info("%s %s: %s", group, label, ", ".join(f"{k} {v['mR']:.2f}" for k, v in scores.items()))
    return out


def summarise(cands: list[Candidate], rules: list[str]) -> dict[str, Any]:
    """Per variant (plain, +qb) and rule: the epoch picked per group and its test mR, the oracle,
    Spearman with test per group, its mean, and pooled over all candidates."""
    groups = sorted({c.group for c in cands})
    res: dict[str, Any] = {"groups": groups, "rules": rules, "variants": {}}
    variants = [("", "plain")] + ([("+qb", "qbnorm")] if all("test+qb" in c.scores for c in cands) else [])
    for suffix, variant in variants:
        test_key = "test" + suffix
        rows = []
        for rule in rules:
            key = rule + suffix
            picks, rhos = {}, {}
            for g in groups:
                cs = [c for c in cands if c.group == g]
                pick = max(cs, key=lambda c: c.scores[key]["mR"])
                oracle = max(cs, key=lambda c: c.scores[test_key]["mR"])
                picks[g] = {"picked": pick.label, "test_mR": pick.scores[test_key]["mR"], "rule_mR": pick.scores[key]["mR"],
                            "oracle": oracle.label, "oracle_test_mR": oracle.scores[test_key]["mR"]}
                rhos[g] = spearman([c.scores[key]["mR"] for c in cs], [c.scores[test_key]["mR"] for c in cs])
            finite = [r for r in rhos.values() if r == r]
            # between groups (a group = a recipe: its seeds' chosen checkpoints): does the rule
            # order the recipes by their mean score as test orders them?
            mean_rule = [statistics.fmean(c.scores[key]["mR"] for c in cands if c.group == g) for g in groups]
            mean_test = [statistics.fmean(c.scores[test_key]["mR"] for c in cands if c.group == g) for g in groups]
            rows.append({
                "group_means": {g: {"rule_mR": r, "test_mR": t} for g, r, t in zip(groups, mean_rule, mean_test)},
                "spearman_groups": spearman(mean_rule, mean_test),
                "pairs_agree": pairs_agree(mean_rule, mean_test),
                "rule": rule, "picks": picks, "spearman": rhos,
                "spearman_mean": statistics.fmean(finite) if finite else float("nan"),
                "spearman_pooled": spearman([c.scores[key]["mR"] for c in cands], [c.scores[test_key]["mR"] for c in cands]),
                "picked_test_mR_mean": statistics.fmean(p["test_mR"] for p in picks.values()),
                "rule_minus_test_mean": statistics.fmean(c.scores[key]["mR"] - c.scores[test_key]["mR"] for c in cands),
            })
        res["variants"][variant] = {"rows": rows, "oracle_test_mR_mean": statistics.fmean(
            max(c.scores[test_key]["mR"] for c in cands if c.group == g) for g in groups)}
    res["candidates"] = [{"group": c.group, "label": c.label, "mR": {k: v["mR"] for k, v in c.scores.items()}} for c in cands]
    return res


def render(res: dict[str, Any]) -> str:
    lines = ["# Selection rules: which held-out split picks what test would pick", ""]
    for variant, v in res["variants"].items():
        lines += [f"## {variant} (oracle: the best test epoch per group, mean test mR {v['oracle_test_mR_mean']:.2f})", "",
                  "| rule | Spearman with test (mean over groups) | pooled | picked epochs | test mR of the picks (mean) | rule - test mR |",
                  "|---|---:|---:|---|---:|---:|"]
        for r in v["rows"]:
            picks = ", ".join(f"{g}: {p['picked']}" for g, p in r["picks"].items())
            lines.append(f"| `{r['rule']}` | {r['spearman_mean']:.3f} | {r['spearman_pooled']:.3f} | {picks} | "
                         f"{r['picked_test_mR_mean']:.2f} | {r['rule_minus_test_mean']:+.2f} |")
        lines.append("")
        if len(res["groups"]) >= 2:  # the groups as recipes (their seeds' chosen checkpoints)
            lines += ["Between groups (a group as a recipe: the mean over its checkpoints):", "",
                      "| rule | " + " | ".join(f"{g}: rule / test" for g in res["groups"]) + " | Spearman of the means | pairs ordered as test |",
                      "|---|" + "---:|" * (len(res["groups"]) + 2)]
            for r in v["rows"]:
                cells = [f"{r['group_means'][g]['rule_mR']:.2f} / {r['group_means'][g]['test_mR']:.2f}" for g in res["groups"]]
                lines.append(f"| `{r['rule']}` | " + " | ".join(cells) + f" | {r['spearman_groups']:.3f} | {r['pairs_agree']:.3f} |")
            lines.append("")
    keys = list(res["candidates"][0]["mR"]) if res["candidates"] else []
    lines += ["## Every candidate (mR)", "", "| group | checkpoint | " + " | ".join(f"`{k}`" for k in keys) + " |",
              "|---|---|" + "---:|" * len(keys)]
    for c in res["candidates"]:
        lines.append(f"| {c['group']} | {c['label']} | " + " | ".join(f"{c['mR'][k]:.2f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def parse_group(text: str) -> tuple[str, Path, list[Path]]:
    """``NAME=RUN:GLOB[,GLOB...]`` (checkpoints of the run folder RUN matching any GLOB) -> (name, run, files)."""
    name, eq, rest = text.partition("=")
    run, colon, pattern = rest.rpartition(":")
    if not eq or not colon or not name or not run or not pattern:
        raise RsitrError(f"--group {text!r}: expected NAME=RUN_FOLDER:CHECKPOINT_GLOB, e.g. s1=runs/joint-s1:runs/epochs/s1-ep*.pt")
    found = {Path(f) for pat in pattern.split(",") for f in glob.glob(pat)}  # several globs: RUN:a-ep[68].pt,a-ep1[02].pt
    files = sorted(found, key=lambda p: (len(p.stem), p.stem, str(p)))  # epochs in order; same-named files by path
    if not files:
        raise RsitrError(f"--group {name}: no checkpoint matches {pattern}")
    return name, Path(run), files
