"""Score fusion of trained runs, and querybank normalisation, chosen on val and tested once:
``rsitr bench fuse``.

* **Fusion** (a late combination of methods): the fused score of an image-text pair is the sum
  of the members' cosine scores, each in its own embedding space (members may be different
  methods or backbones; the index a member would build holds the same embeddings). A member's
  own re-ranking (FTF's fine stage, iEBAKER's SAR) is not part of its fused score.
* **QB-Norm** (:mod:`rsitr.retrieval.qbnorm`, Bogolin et al. CVPR 2022): every member's scores
  are normalised by a query bank -- the member's training split (its eval view), never the
  evaluated queries -- before the sum. Its temperature ``beta`` is chosen on the val split from
  ``--betas``; the test split is scored once with that choice.

Each row is reported plain and with QB-Norm; per seed (``--suite-dirs`` + ``--members`` +
``--seeds``: the members' cells of one seed form one group) and as a mean over seeds.
``fuse.json`` / ``fuse.md`` are written by the benchmarks' one writer,
:func:`rsitr.bench.measurements.write_result`.
"""
from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

BETAS = (5.0, 7.0, 10.0, 14.0, 20.0, 30.0)
SPLITS = ("val", "test")
KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR")


@dataclass
class Member:
    """One trained run's embeddings of the evaluated splits and of its query bank."""

    name: str
    run: Path
    images: dict[str, torch.Tensor]  # split -> [N, D] (L2-normalised)
    texts: dict[str, torch.Tensor]  # split -> [M, D]
    owner: dict[str, list[int]]  # split -> text_to_image
    bank_images: torch.Tensor
    bank_texts: torch.Tensor
    _norms: dict = field(default_factory=dict, repr=False)

    def sim(self, split: str) -> torch.Tensor:
        return self.images[split] @ self.texts[split].t()

    def qb(self, split: str, beta: float, dynamic: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """QB-Norm's ``(t2i, i2t)`` pair of ``split`` over this member's bank; each side's
        normalisers are kept per ``(split, beta, dynamic)``, as fusion scores many member subsets."""
        from rsitr.eval.evaluate import qbnorm_side
        from rsitr.retrieval.qbnorm import qb_norm

        key = (split, beta, dynamic)
        if key not in self._norms:
            with torch.no_grad():
                self._norms[key] = (qbnorm_side(self.images[split], self.bank_texts, beta, dynamic),
                                    qbnorm_side(self.texts[split], self.bank_images, beta, dynamic))
        (zi, ai), (zt, at) = self._norms[key]
        return qb_norm(self.sim(split), zi, zt, ai, at)


def run_folder(path: Path) -> Path:
    """The training run folder of ``path``: a run folder (``config.json`` + ``checkpoint_best.pt``)
    or a bench cell folder (its ``run/``)."""
    path = Path(path)
    for p in (path, path / "run"):
        if (p / "config.json").is_file() and (p / "checkpoint_best.pt").is_file():
            return p
    raise RsitrError(f"{path}: not a finished training run (no config.json + checkpoint_best.pt here or under run/)")


def _run_config(run: Path, data: str | None) -> dict[str, Any]:
    """A run's ``config.json``; a run trained on a mix of datasets is refused without ``data``
    (the dataset to score)."""
    raw = json.loads((run / "config.json").read_text())
    if data is None and raw.get("data", {}).get("sources"):
        raise RsitrError(f"{run}: trained on a mix of datasets; name the one to score with --data")
    return raw


def embed_member(path: Path, *, name: str | None = None, data: str | None = None, progress: bool = False,
                 checkpoint: Path | None = None, extra_splits: dict[str, str] | None = None, with_bank: bool = True,
                 dataset=None, trunk_memo: dict | None = None) -> Member:
    """Load the best checkpoint of a run (or ``checkpoint``, another checkpoint file of that run,
    e.g. a copy of one epoch's ``checkpoint_last.pt``) and embed the val and test splits, the
    ``extra_splits`` (``{name: split spec}``, e.g. ``{"val2": "val:distinct>=2"}``) and the bank
    (the training split, eval view; ``with_bank=False`` skips it: no QB-Norm then). ``dataset``: ``data``
    already loaded (a caller scoring several checkpoints loads it once); ``trunk_memo``: a dict the
    caller keeps across checkpoints, holding the trunk caches already loaded (keyed by trunk identity,
    split and views), so checkpoints of one trunk read each cache file once. Frozen-trunk activations come from the run's trunk cache
    (``cache_dir``) when its backbone allows one: the bank is then the training cache's view 0."""
    from rsitr.data.captions import load_dataset
    from rsitr.data.imagesets import TrunkCache, make_transforms
    from rsitr.models.trunk_cache import build_trunk_cache, supports_trunk_cache, trunk_identity
    from rsitr.eval.evaluate import encode_dataset
    from rsitr.methods.factory import load
    from rsitr.models.engine import engine_for
    from rsitr.train.config import TrainConfig
    from rsitr.train.data import load_training_data

    run = run_folder(path)
    cfg = TrainConfig.from_dict(_run_config(run, data))
    ds = dataset if dataset is not None else load_dataset(data) if data is not None else load_training_data(cfg.data)
    if cfg.data.val_split == "none":
        raise RsitrError(f"{run}: trained without a val split (data.val_split: none); beta is chosen on val")
    splits = {"val": ds.split(cfg.data.val_split), "test": ds.split(cfg.data.test_split), "bank": ds.split(cfg.data.train_split)}
    splits.update({k: ds.split(v) for k, v in (extra_splits or {}).items()})
    if not with_bank:
        del splits["bank"]
    for s in splits:
        if len(splits[s]) == 0:
            what = {"val": "a val split to choose beta on", "test": "a test split", "bank": "a training split (the query bank)"}.get(s, f"a non-empty split {s}")
            raise RsitrError(f"{run}: fusion needs {what}; the data has splits {ds.splits}")
    loaded = load(Path(checkpoint) if checkpoint is not None else run / "checkpoint_best.pt")
    bb = loaded.backbone
    bb.apply_mode(cfg.model.mode)
    bb.eval()
    engine = engine_for(bb, cfg.inference.engine, cache_dir=cfg.inference.onnx_cache)
    cached = cfg.cache_features != "off" and supports_trunk_cache(bb)
    eval_tf, train_tf = make_transforms(bb, cfg.augment)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
    common = dict(cache_dir=cache_dir, eval_transform=eval_tf, batch_size=cfg.eval_batch_size, progress=progress, engine=engine)
    images, texts, owner = {}, {}, {}
    bank = None
    trunk = json.dumps([trunk_identity(bb, "image"), trunk_identity(bb, "text"), str(cache_dir)], sort_keys=True, default=str) if cached else ""
    for s in splits:
        cache = None
        # what the cache depends on besides the trunk: the split's entries, the views and their seed
        key = (trunk, s == "bank", tuple((e.image_id, tuple(e.captions)) for e in splits[s].entries), cfg.cache_views if s == "bank" else 1,
               (cfg.seed if cfg.cache_seed is None else cfg.cache_seed) if s == "bank" else cfg.seed)
        if cached and trunk_memo is not None and key in trunk_memo:
            cache = trunk_memo[key]
        elif cached and s == "bank":  # the training run's cache (its views), view 0 = eval transform
            c = build_trunk_cache(bb, splits[s], views=cfg.cache_views, train_transform=train_tf, keep_tokens=False,
                                  seed=cfg.seed if cfg.cache_seed is None else cfg.cache_seed, **common)
            cache = TrunkCache([c.image[0]] if c.image is not None else None, c.text)
        elif cached:
            cache = build_trunk_cache(bb, splits[s], views=1, keep_tokens=False, seed=cfg.seed, **common)
        if cached and trunk_memo is not None:
            trunk_memo[key] = cache
        enc = encode_dataset(bb, splits[s], batch_size=cfg.eval_batch_size, trunk_cache=cache, progress=progress, engine=engine)
        if s == "bank":
            bank = enc
        else:
            images[s], texts[s], owner[s] = enc.images, enc.texts, list(enc.text_to_image)
    name = name or (run.parent.parent.name if run.name == "run" else run.name)
    empty = torch.zeros(0, images["val"].shape[1])
    return Member(name, run, images, texts, owner, bank.images if bank is not None else empty, bank.texts if bank is not None else empty)


def _scores(members: list[Member], split: str, beta: float | None, dynamic: bool):
    if beta is None:
        return sum(m.sim(split) for m in members)
    pairs = [m.qb(split, beta, dynamic) for m in members]
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def score_group(members: list[Member], *, betas=BETAS, dynamic: bool = False, choose: bool = False) -> list[dict[str, Any]]:
    """Rows for every member alone and (two or more members) for their fusion, each plain and
    with QB-Norm at the ``beta`` of ``betas`` that scores best on val. ``choose``: one more row,
    the subset of members and ``beta`` (QB-Norm on) that score best on val, over every subset."""
    from rsitr.eval.evaluate import pair_metrics

    if not members:
        raise RsitrError("no runs to score")
    for m in members[1:]:
        for s in SPLITS:
            if m.owner[s] != members[0].owner[s]:
                raise RsitrError(f"{m.run} and {members[0].run} were not scored on the same {s} split")
    groups = [([m], m.name) for m in members]
    if len(members) > 1:
        groups.append((members, "+".join(m.name for m in members)))
    scored: dict[tuple, dict[str, float]] = {}

    def metrics(sub: tuple[int, ...], split: str, beta: float | None) -> dict[str, float]:
        """The metrics of the members ``sub`` (indices) fused on ``split``, each (sub, split, beta) scored once."""
        key = (sub, split, beta)
        if key not in scored:
            scored[key] = pair_metrics(_scores([members[i] for i in sub], split, beta, dynamic), members[0].owner[split])
        return scored[key]

    groups = [((i,), m.name) for i, m in enumerate(members)]
    if len(members) > 1:
        groups.append((tuple(range(len(members))), "+".join(m.name for m in members)))
    rows = []
    for sub, name in groups:
        rows.append({"row": name, "qbnorm": False, "beta": None, "val": metrics(sub, "val", None), "test": metrics(sub, "test", None)})
        best = max(betas, key=lambda b: (metrics(sub, "val", b)["mR"], -b))  # ties: the smaller beta
        rows.append({"row": f"{name} + QB-Norm", "qbnorm": True, "beta": best, "val": metrics(sub, "val", best),
                     "val_by_beta": {str(b): metrics(sub, "val", b)["mR"] for b in betas}, "test": metrics(sub, "test", best)})
    if choose and len(members) > 1:
        import itertools

        cands = [sub for k in range(1, len(members) + 1) for sub in itertools.combinations(range(len(members)), k)]
        # ties: fewer members, then the smaller beta
        sub, best = max(((sub, b) for sub in cands for b in betas), key=lambda kb: (metrics(kb[0], "val", kb[1])["mR"], -len(kb[0]), -kb[1]))
        rows.append({"row": "chosen on val + QB-Norm", "qbnorm": True, "beta": best, "members": [members[i].name for i in sub],
                     "val": metrics(sub, "val", best), "candidates": len(cands), "test": metrics(sub, "test", best)})
    return rows


def find_cell(suite_dirs: list[Path], member: str, seed: int, dataset: str | None = None) -> Path:
    """The finished cell ``cells/<dataset>/<member>/seed<seed>`` in one of ``suite_dirs``. A member
    ``DATASET:METHOD`` names its suite dataset itself (members of two suites: ``baseline`` of
    rsicd-towers and ``ucm+rsicd:baseline`` of joint-towers)."""
    if ":" in member:
        dataset, member = member.split(":", 1)
    hits = []
    for d in suite_dirs:
        pattern = f"cells/{dataset or '*'}/{member}/seed{seed}"
        hits += [p for p in sorted(Path(d).glob(pattern)) if (p / "run" / "checkpoint_best.pt").is_file()]
    if not hits:
        raise RsitrError(f"no finished cell {member}/seed{seed} under {', '.join(map(str, suite_dirs))}")
    if len(hits) > 1:
        log.warning("%s/seed%d is in %d run folders; using %s", member, seed, len(hits), hits[0])
    return hits[0]


def _distinct(members: list[Member]) -> list[Member]:
    """Members of one name (the same method of two suites: an RSICD baseline and the UCM+RSICD
    joint baseline) are named by their suite dataset too, ``ucm+rsicd:baseline``."""
    names = [m.name for m in members]
    for m in members:
        if names.count(m.name) > 1:
            cell = m.run.parent if m.run.name == "run" else m.run
            if cell.parent.parent.parent.name == "cells":  # cells/<dataset>/<method>/seedN
                m.name = f"{cell.parent.parent.name}:{m.name}"
    return members


def fuse(groups: dict[str, list[tuple[str, Path]]], *, betas=BETAS, dynamic: bool = False, data: str | None = None,
         progress: bool = False, choose: bool = False) -> dict[str, Any]:
    """Score every group (``{label: [(member name, run or cell folder), ...]}``, e.g. one group
    per seed) and average the rows over the groups."""
    if data is None:  # refuse a mixed-data run before minutes of embedding the others
        for runs in groups.values():
            for _, p in runs:
                _run_config(run_folder(p), None)
    per = {}
    for label, runs in groups.items():
        log.info("group %s: %s", label, ", ".join(str(n or p) for n, p in runs))
        members = _distinct([embed_member(p, name=n, data=data, progress=progress) for n, p in runs])
        per[label] = score_group(members, betas=betas, dynamic=dynamic, choose=choose)
    return {"betas": list(betas), "dynamic": dynamic, "groups": {g: [[n, str(p)] for n, p in groups[g]] for g in groups},
            "per_group": per, "mean": summarize(per)}


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result of several ``fuse.json`` (e.g. one per seed, scored at different times): their
    groups together, averaged again. They must have the same rows, betas and variant."""
    if not results:
        raise RsitrError("nothing to merge")
    first = results[0]
    per, groups = {}, {}
    for r in results:
        if r["betas"] != first["betas"] or r["dynamic"] != first["dynamic"]:
            raise RsitrError("cannot merge fusion results scored with different betas or QB-Norm variants")
        for g, rows in r["per_group"].items():
            if [x["row"] for x in rows] != [x["row"] for x in next(iter(first["per_group"].values()))]:
                raise RsitrError(f"group {g!r} has other rows than the first result's; merge results of the same members only")
            if g in per:
                raise RsitrError(f"group {g!r} is in two of the results")
            per[g], groups[g] = rows, r["groups"][g]
    return {"betas": first["betas"], "dynamic": first["dynamic"], "groups": groups, "per_group": per, "mean": summarize(per)}


def summarize(per: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean (and std of mR) over the groups of every row."""
    names = [r["row"] for r in next(iter(per.values()))]
    mean = []
    for i, name in enumerate(names):
        rs = [per[g][i] for g in per]
        row = {"row": name, "groups": len(rs), "betas": [r["beta"] for r in rs]}
        if "members" in rs[0]:
            row["members"] = [r["members"] for r in rs]
        for part in ("val", "test"):
            for k in KEYS:
                vals = [r[part][k] for r in rs]
                row[f"{part}_{k}"] = statistics.fmean(vals)
                if k == "mR":
                    row[f"{part}_mR_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        mean.append(row)
    return mean


def render(result: dict[str, Any]) -> str:
    """Markdown: the mean table, then one table per group."""
    n = len(result["per_group"])
    lines = [f"### Fusion and QB-Norm (test split; beta chosen on val from {result['betas']}{', dynamic' if result['dynamic'] else ''}; mean over {n} group(s))", "",
             "| row | beta per group | val mR | I2T R@1 | R@5 | R@10 | T2I R@1 | R@5 | R@10 | test mR |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["mean"]:
        betas = ", ".join("-" if b is None else f"{b:g}" for b in r["betas"])
        std = f" +- {r['test_mR_std']:.2f}" if r["groups"] > 1 else ""
        lines.append(f"| {r['row']} | {betas} | {r['val_mR']:.2f} | " + " | ".join(f"{r['test_' + k]:.2f}" for k in KEYS[:6]) + f" | {r['test_mR']:.2f}{std} |")
    for g, rows in result["per_group"].items():
        lines += ["", f"#### {g}", "", "| row | beta | val mR | test mR |", "|---|---:|---:|---:|"]
        lines += [f"| {r['row']}{' (' + '+'.join(r['members']) + ')' if 'members' in r else ''} | {'-' if r['beta'] is None else format(r['beta'], 'g')} | "
                  f"{r['val']['mR']:.2f} | {r['test']['mR']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def fuse_suite(suite, out: Path, *, progress: bool = False) -> dict[str, Any] | None:
    """The suite's ``fuse:`` section on a run folder: one group per (dataset, seed) whose member
    cells all finished; writes ``fuse.json`` and ``fuse.md`` there (read by ``rsitr bench
    report``). None when the suite has no such section or no seed is complete."""
    spec = suite.fuse
    if not spec:
        return None
    out = Path(out)
    groups = {}
    datasets = sorted({c.dataset for c in suite.cells})
    seeds = sorted({c.seed for c in suite.cells})
    for d in datasets:
        for seed in seeds:
            cells = [out / "cells" / d / m / f"seed{seed}" for m in spec["members"]]
            if all((c / "run" / "checkpoint_best.pt").is_file() and (c / "result.json").is_file() for c in cells):
                groups[f"{d} seed {seed}" if len(datasets) > 1 else f"seed {seed}"] = list(zip(spec["members"], cells))
    if not groups:
        log.info("fuse: no seed has every member of %s finished", spec["members"])
        return None
    res = fuse(groups, betas=tuple(float(b) for b in spec.get("betas") or BETAS), dynamic=bool(spec.get("dynamic", False)),
               choose=bool(spec.get("choose", False)), progress=progress)
    write_result(out, res)
    return res


def write_result(out: Path, res: dict[str, Any]) -> str:
    """``out/fuse.json`` and ``out/fuse.md`` (written atomically); returns the markdown."""
    from rsitr.bench.measurements import write_result as write_files

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = render(res)
    write_files(out / "fuse.json", res, md)
    return md
