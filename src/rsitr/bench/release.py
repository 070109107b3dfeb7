"""Building a shipped model (:mod:`rsitr.models.shipped`): train, export the trained parts,
evaluate, write the card -- one command, ``rsitr models build RELEASE.yaml``; and the model's
QB-Norm query bank (``rsitr models qbank RELEASE.yaml`` remakes only the bank).

A *release file* (``src/rsitr/configs/releases/NAME.yaml``) names the model, its training config
and seed, the evaluation sets and options, and the card's text (data, licences, intended use,
limits, ground resolution, test-time defaults). :func:`build_release` trains the config into a run
folder (or continues one: a finished run is not trained again), exports its best checkpoint as fp16
safetensors with a card, then evaluates *the exported model itself* (so the card's numbers are the
shipped weights', fp16 included) on every set, with and without test-time views and QB-Norm, and
writes the metrics into the card. The evaluation sets marked ``zero_shot`` are never used for a
choice: they are reported only.

A release with a ``teachers:`` entry (a list of seeds) is a distilled model: :func:`build_release`
first trains the release's config and overrides (its ``distill.*`` overrides aside) once per teacher
seed, each into its own run folder (``RUN-teacher-seedN`` beside the student's ``RUN``; a finished one
is not trained again), then trains the student with ``distill.teachers`` set to those folders (their
checkpoints pinned by sha256 in the student's config.json), so one command rebuilds teachers and
student from scratch. The card names the teachers (seed, run folder, best epoch and val mR, sha256).

A release with a ``qbank:`` entry (:class:`QBankSpec`) also ships a QB-Norm query bank:
:func:`build_query_bank` draws ``size`` of the training captions of the named evaluation sets
(seed ``seed``; :func:`rsitr.bench.qbank.subsample`), encodes them with the exported model as
search encodes a query, measures test mR with that bank, with the full caption bank and with none
(text->image normalised only: a caption bank), and stores it with the shipped model
(:func:`rsitr.models.shipped.write_query_bank`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsitr.utils.config import in_range
from rsitr.utils.errors import RsitrError
from rsitr.utils.io import read_yaml
from rsitr.utils.version import git_commit

log = logging.getLogger(__name__)

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR")


@dataclass
class EvalSet:
    """One evaluation set of a release: ``label``, the annotation file or folder ``data`` (``${VAR}``
    and ``${VAR:-default}`` expanded), the evaluated ``split``, the QB-Norm ``bank`` split (None: no
    QB-Norm row), ``format``/``image_root`` as for ``rsitr eval``, and ``zero_shot`` (a set the
    model never trained on, reported only)."""

    label: str
    data: str
    split: str = "test"
    bank: str | None = "train"
    format: str = "auto"
    image_root: str | None = None
    zero_shot: bool = False


@dataclass
class QBankSpec:
    """A release's query bank: the ``split`` captions of the evaluation sets labelled in
    ``sources``, ``size`` of them drawn with ``seed`` (None: all), QB-Norm ``beta`` (None: the
    release's ``qbnorm_beta``)."""

    sources: list[str]
    split: str = "train"
    size: int | None = None
    seed: int = 0
    beta: float | None = None


@dataclass
class Release:
    name: str
    config: str  # the training config (YAML), relative to the release file or absolute
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    eval_sets: list[EvalSet] = field(default_factory=list)
    ttas: tuple[int, ...] = (1, 8)
    qbnorm_beta: float = 14.0
    card: dict[str, Any] = field(default_factory=dict)
    qbank: QBankSpec | None = None
    teachers: tuple[int, ...] = ()  # seeds of the teacher runs distilled into this one (see the module doc)
    path: Path | None = None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Release":
        """The release file at ``path``, every field checked: a missing or unknown key, or a value
        of the wrong type or range, is one error line naming the file and the key."""
        from rsitr.data.transforms import DIHEDRAL_VIEWS

        p = Path(path)
        raw = read_yaml(p, "release file")
        if not isinstance(raw, dict) or "name" not in raw or "config" not in raw:
            raise RsitrError(f"{p}: a release file needs at least 'name' and 'config'")

        def bad(key: str, want: str, got: Any) -> RsitrError:
            return RsitrError(f"{p}: {key} must be {want}, got {got!r}")

        allowed = {f.name for f in dataclasses.fields(cls)} - {"path"}  # path: where the file was read from
        unknown = sorted(set(map(str, raw)) - allowed)
        if unknown:
            raise RsitrError(f"{p}: unknown key(s) {unknown}; a release file takes {sorted(allowed)}")
        for key in ("name", "config"):
            if not isinstance(raw[key], str) or not raw[key].strip():
                raise bad(key, "a non-empty string", raw[key])
        seed = raw.get("seed", 0)
        if not _whole(seed, 0):
            raise bad("seed", "a whole number >= 0", seed)
        overrides = raw.get("overrides") or {}
        if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
            raise bad("overrides", "a mapping of training-config keys to values", overrides)
        ttas = raw.get("ttas", [1, 8])
        if not isinstance(ttas, list) or not ttas or any(isinstance(t, bool) or t not in DIHEDRAL_VIEWS for t in ttas):
            raise bad("ttas", f"a non-empty list of test-time view counts from {list(DIHEDRAL_VIEWS)}", ttas)
        beta = raw.get("qbnorm_beta", 14.0)
        if not in_range(beta, 0, None, True):
            raise bad("qbnorm_beta", "a positive finite number", beta)
        card = raw.get("card") or {}
        if not isinstance(card, dict):
            raise bad("card", "a mapping", card)
        # the card keys the search commands read (rsitr.search.build, rsitr.cli.search)
        tiles = card.get("ground_tiles_m")
        if tiles is not None and (not isinstance(tiles, list) or not tiles or not all(in_range(t, 0, None, True) for t in tiles)):
            raise bad("card.ground_tiles_m", "a non-empty list of positive tile sizes in metres", tiles)
        views = card.get("test_time_views_default", 1)
        if isinstance(views, bool) or views not in DIHEDRAL_VIEWS:
            raise bad("card.test_time_views_default", f"one of {list(DIHEDRAL_VIEWS)}", views)
        sets = _eval_sets(raw.get("eval_sets") or [], p)
        qbank = _qbank(raw.get("qbank"), sets, p)
        teachers = raw.get("teachers") or []
        if not isinstance(teachers, list) or not all(_whole(t, 0) for t in teachers) or len(set(teachers)) != len(teachers):
            raise bad("teachers", "a list of distinct teacher seeds (whole numbers >= 0)", teachers)
        if teachers and _sets_teachers(overrides):
            raise bad("overrides", "free of distill.teachers / distill.sha256 when 'teachers' is given (the build sets them)",
                      overrides)
        return cls(name=raw["name"], config=raw["config"], seed=seed, overrides=dict(overrides), eval_sets=sets, ttas=tuple(ttas),
                   qbnorm_beta=float(beta), card=dict(card), qbank=qbank, teachers=tuple(teachers), path=p)

    def config_path(self) -> Path:
        c = Path(self.config)
        if c.is_absolute() or c.exists():
            return c
        return (self.path.parent / c) if self.path is not None else c


def teacher_run(run_dir: str | Path, seed: int) -> Path:
    """The run folder of a release's teacher ``seed``, beside the student's ``run_dir``."""
    run = Path(run_dir)
    return run.parent / f"{run.name}-teacher-seed{seed}"


def _distill_key(key: str) -> bool:
    return key == "distill" or key.startswith("distill.")


def _sets_teachers(overrides: dict[str, Any]) -> bool:
    """Whether ``overrides`` set the distillation teachers or their digests (dotted or nested)."""
    keys = set(overrides)
    nested = overrides.get("distill")
    if isinstance(nested, dict):
        keys |= {f"distill.{k}" for k in nested}
    return bool(keys & {"distill.teachers", "distill.sha256"})


def _whole(v: Any, low: int) -> bool:
    """A whole number (not a float, not a boolean) >= ``low``."""
    return isinstance(v, int) and in_range(v, low, None, False)


def _eval_sets(spec: Any, p: Path) -> list[EvalSet]:
    """A release's ``eval_sets``: a list of mappings with EvalSet's keys; labels unique."""
    if not isinstance(spec, list):
        raise RsitrError(f"{p}: eval_sets must be a list of evaluation sets, got {spec!r}")
    keys = {f.name: f for f in dataclasses.fields(EvalSet)}
    sets = []
    for i, s in enumerate(spec):
        where = f"{p}: eval_sets[{i}]"
        if not isinstance(s, dict) or "label" not in s or "data" not in s:
            raise RsitrError(f"{where} must be a mapping with at least label and data, got {s!r}")
        unknown = sorted(set(map(str, s)) - set(keys))
        if unknown:
            raise RsitrError(f"{where}: unknown key(s) {unknown}; it takes {sorted(keys)}")
        for k in ("label", "data", "split", "format"):
            if k in s and (not isinstance(s[k], str) or not s[k].strip()):
                raise RsitrError(f"{where}.{k} must be a non-empty string, got {s[k]!r}")
        for k in ("bank", "image_root"):
            if s.get(k) is not None and (not isinstance(s[k], str) or not s[k].strip()):
                raise RsitrError(f"{where}.{k} must be a non-empty string or null, got {s[k]!r}")
        if "zero_shot" in s and not isinstance(s["zero_shot"], bool):
            raise RsitrError(f"{where}.zero_shot must be true or false, got {s['zero_shot']!r}")
        sets.append(EvalSet(**s))
    labels = [s.label for s in sets]
    if len(set(labels)) != len(labels):
        raise RsitrError(f"{p}: eval_sets labels must be unique, got {labels}")
    return sets


def _qbank(spec: Any, sets: list[EvalSet], p: Path) -> QBankSpec | None:
    """A release's ``qbank``: sources naming evaluation sets, a split, a size >= 1 (or null), a seed >= 0, a beta > 0 (or null)."""
    if spec is None:
        return None
    keys = [f.name for f in dataclasses.fields(QBankSpec)]
    if not isinstance(spec, dict) or set(map(str, spec)) - set(keys) or "sources" not in spec:
        raise RsitrError(f"{p}: bad qbank entry {spec!r}; keys: {', '.join(keys)} (sources required)")
    labels = [s.label for s in sets]
    src = spec["sources"]
    if not isinstance(src, list) or not src or any(x not in labels for x in src):
        raise RsitrError(f"{p}: qbank.sources must name evaluation sets (labels {labels}), got {src!r}")
    if not isinstance(spec.get("split", "train"), str) or not spec.get("split", "train").strip():
        raise RsitrError(f"{p}: qbank.split must be a non-empty string, got {spec.get('split')!r}")
    if spec.get("size") is not None and not _whole(spec["size"], 1):
        raise RsitrError(f"{p}: qbank.size must be a whole number >= 1 or null (every caption), got {spec['size']!r}")
    if not _whole(spec.get("seed", 0), 0):
        raise RsitrError(f"{p}: qbank.seed must be a whole number >= 0, got {spec.get('seed')!r}")
    beta = spec.get("beta")
    if beta is not None and not in_range(beta, 0, None, True):
        raise RsitrError(f"{p}: qbank.beta must be a positive finite number or null (the release's qbnorm_beta), got {beta!r}")
    return QBankSpec(**spec)


def expand(text: str) -> str:
    """``${VAR}`` / ``${VAR:-default}`` as suite files expand them (:func:`rsitr.bench.suite._expand`)."""
    from rsitr.bench.suite import _expand

    return _expand(text)


def evaluate_model(source: str, sets: list[EvalSet], *, ttas=(1, 8), qbnorm_beta: float = 14.0, engine: str = "auto",
                   batch_size: int = 128, progress: bool = True) -> list[dict[str, Any]]:
    """Rows of test metrics (expected ties) of the model ``source`` on every set: one per
    test-time view count, and with QB-Norm (the set's own ``bank`` split as the query bank) for sets
    that have one. Each split is encoded once per view count; the bank once."""
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import encode_dataset, evaluate_ties, pair_metrics, qbnorm_scores
    from rsitr.methods.factory import load
    from rsitr.models.engine import engine_for

    model = load(source)
    eng = engine_for(model.backbone, engine)
    # a method that scores by more than the pooled cosine (token or two-stage scoring, a re-ranker such as
    # iEBAKER's SAR) is scored by its own scoring, as its bench cell is: its plain row is the cell's test row
    own_scoring = model.method is not None and not model.method.capabilities.cosine
    rows: list[dict[str, Any]] = []
    for s in sets:
        path = expand(s.data)
        root = expand(s.image_root) if s.image_root else None
        if not Path(path).exists():
            log.warning("%s: %s not found; not evaluated (set the variable in its path)", s.label, path)
            continue
        data = load_dataset(path, format=s.format, image_root=root, split=s.split)
        split = data.split(s.split)
        if len(split) == 0:
            raise RsitrError(f"{s.label}: split {s.split!r} of {path} is empty")
        common = {"batch_size": batch_size, "progress": progress, "engine": eng}
        bank = None
        if s.bank and len(data.split(s.bank)) and not own_scoring:
            bank = encode_dataset(model.backbone, data.split(s.bank), tta=1, **common)
        for tta in ttas:
            t0 = time.perf_counter()
            if own_scoring:  # the method's own scoring (re-ranker, token features): through the evaluator
                sim, owner = None, None
                m = evaluate_ties(model.backbone, split, method=model.method, ties=("expected",), tta=tta, **common)["expected"]
            else:
                enc = encode_dataset(model.backbone, split, tta=tta, **common)
                sim, owner = enc.images @ enc.texts.t(), enc.text_to_image
                m = pair_metrics(sim, owner)
            secs = time.perf_counter() - t0
            base = {"dataset": s.label, "split": s.split, "images": len(split), "captions": split.n_captions, "tta": tta,
                    "zero_shot": s.zero_shot, "encode_s_per_image": round(secs / len(split), 5)}
            rows.append({**base, "rerank": "none", **{k: float(m[k]) for k in METRICS}})
            if bank is not None:
                q = pair_metrics(qbnorm_scores(enc, bank, qbnorm_beta), owner)
                rows.append({**base, "rerank": f"qbnorm(beta={qbnorm_beta:g}, bank={s.bank})", **{k: float(q[k]) for k in METRICS}})
            log.info("%s tta=%d: mR %.2f%s", s.label, tta, rows[-1 - (bank is not None)]["mR"],
                     f", with QB-Norm {rows[-1]['mR']:.2f}" if bank is not None else "")
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = ["dataset", "split", "images", "tta", "rerank", *METRICS, "encode_s_per_image"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r.get(c), float) and c in METRICS else str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def export_run(run_dir: str | Path, name: str, out_dir: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Export the best (else last) checkpoint of ``run_dir`` as the shipped model ``name``."""
    from rsitr.models.checkpoint import TrainCheckpoint
    from rsitr.models.shipped import export_checkpoint

    ck = TrainCheckpoint.load(run_dir)
    meta = {"trained_run": str(run_dir), "best": ck.best}
    return export_checkpoint(ck, out_dir, name, {**(card or {}), **{k: v for k, v in meta.items() if k not in (card or {})}})


def build_release(release: Release, out_dir: str | Path, run_dir: str | Path, *, train: bool = True, engine: str = "auto",
                  progress: bool = True) -> dict[str, Any]:
    """Train the teachers (a release with ``teachers:``) and the model (a finished run is not
    trained again; nothing is trained when ``train`` is False), export, evaluate the export, write
    the card. Returns the card document."""
    from rsitr.models.shipped import read_card, write_card

    run = Path(run_dir)
    t0 = time.perf_counter()
    teachers = [teacher_run(run, s) for s in release.teachers]
    if train:
        plain = {k: v for k, v in release.overrides.items() if not _distill_key(k)}
        for seed, folder in zip(release.teachers, teachers):
            log.info("%s: teacher seed %d -> %s", release.name, seed, folder)
            _train(release, plain, seed, folder, progress)
        extra = {"distill.teachers": [str(t) for t in teachers]} if teachers else {}
        _train(release, {**release.overrides, **extra}, release.seed, run, progress)
    train_s = time.perf_counter() - t0
    if not ((run / "checkpoint_best.pt").is_file() or (run / "checkpoint_last.pt").is_file()):
        raise RsitrError(f"{run}: no checkpoint to export (train it first, or drop --no-train)")
    card = {**release.card, "release_file": _card_path(release.path) if release.path else None, "built_at_commit": git_commit(),
            "training_config": _card_path(release.config_path()), "seed": release.seed}
    if teachers:
        card["teachers"] = _teacher_entries(release, run, teachers)
    out = export_run(run, release.name, out_dir, card)
    rows = evaluate_model(_shipped_source(out, release.name), release.eval_sets,
                          ttas=release.ttas, qbnorm_beta=release.qbnorm_beta, engine=engine, progress=progress)
    doc = read_card(release.name, out.parent)
    doc["card"]["metrics"] = rows
    write_card(out, doc)
    if release.qbank is not None:
        build_query_bank(release, out, engine=engine, progress=progress)
    doc = read_card(release.name, out.parent)
    doc["card"]["build_seconds"] = {"train_and_cache": round(train_s, 1), "total": round(time.perf_counter() - t0, 1)}
    write_card(out, doc)
    return doc


def _train(release: Release, overrides: dict[str, Any], seed: int, run: Path, progress: bool) -> None:
    """Train the release's config with ``overrides`` and ``seed`` into ``run``: resumed when it holds a
    checkpoint, left as it is when it holds a finished run of that config (another config is an error)."""
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train as train_run

    cfg = TrainConfig.from_yaml(release.config_path()).override({**overrides, "seed": seed, "out_dir": str(run)})
    if _finished(run, cfg.to_dict()):
        log.info("%s: a finished run of this config, not trained again", run)
        return
    train_run(cfg, resume=(run / "checkpoint_last.pt").is_file(), progress=progress)


# set by the run itself, or where it lies: not part of what a finished run is compared on
_RUN_OWN = ("out_dir", "distill.sha256")


def _finished(run: Path, want: dict[str, Any]) -> bool:
    """Whether ``run`` holds a finished run (``result.json`` with every planned step, not stopped by a
    time budget) whose ``config.json`` agrees with ``want`` (a TrainConfig dict) on every key both
    record (a key a run of older code lacks is not compared). A finished run of another config is
    an error: it would ship under the release's name."""
    from rsitr.bench.suite import _flatten
    from rsitr.utils.io import jsonable, read_json

    if not (run / "result.json").is_file() or not (run / "config.json").is_file():
        return False
    result = read_json(run / "result.json", "run result")
    if not isinstance(result, dict) or result.get("budget_stopped") or result.get("steps", 0) < result.get("planned_steps", 1):
        return False
    have, need = _flatten(read_json(run / "config.json", "run config")), _flatten(jsonable(want))
    differ = sorted(k for k in set(have) & set(need) if have[k] != need[k] and k not in _RUN_OWN)
    if differ:
        shown = ", ".join(f"{k}: {have[k]!r} there, {need[k]!r} here" for k in differ[:4])
        raise RsitrError(f"{run}: holds a finished run of another config ({shown}{', ...' if len(differ) > 4 else ''}); "
                         f"build into another --run folder")
    return True


def _teacher_entries(release: Release, run: Path, teachers: list[Path]) -> list[dict[str, Any]]:
    """The card's record of the teachers the exported run was distilled from: each one's seed,
    folder, best epoch / val mR, and the sha256 the student pinned."""
    from rsitr.models.checkpoint import TrainCheckpoint

    ck = TrainCheckpoint.load(run)
    d = dict(ck.config.get("distill") or {})
    given = [str(t) for t in d.get("teachers") or ()]
    if given != [str(t) for t in teachers]:
        raise RsitrError(f"{run}: the run was distilled from {given}, not from the release's teachers {[str(t) for t in teachers]} "
                         f"(seeds {list(release.teachers)}); rebuild it in a new run folder")
    out = []
    for seed, folder, sha in zip(release.teachers, teachers, d.get("sha256") or [None] * len(teachers)):
        best = TrainCheckpoint.load(folder).best if folder.exists() else {}
        out.append({"seed": seed, "run": str(folder), "best": best, "sha256": sha})
    return out


def build_query_bank(release: Release, folder: str | Path, *, engine: str = "auto", batch_size: int = 256,
                     progress: bool = True) -> dict[str, Any]:
    """(Re)make the QB-Norm query bank of the release's model exported in ``folder`` (see the
    module doc) without retraining; returns its card entry."""
    from rsitr.bench.qbank import bank_metrics, subsample
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import encode_dataset
    from rsitr.methods.factory import load
    from rsitr.models.engine import encode_texts, engine_for
    from rsitr.models.shipped import write_query_bank
    import torch

    spec = release.qbank
    if spec is None:
        raise RsitrError(f"{release.path}: the release has no 'qbank:' entry (sources, split, size, seed)")
    folder = Path(folder)
    beta = float(spec.beta if spec.beta is not None else release.qbnorm_beta)
    model = load(_shipped_source(folder, release.name))
    model.eval()
    eng = engine_for(model.backbone, engine)
    by_label = {s.label: s for s in release.eval_sets}
    texts: list[str] = []
    sources, tests = [], []
    for label in spec.sources:
        s = by_label[label]
        path = expand(s.data)
        root = expand(s.image_root) if s.image_root else None
        if not Path(path).exists():
            raise RsitrError(f"qbank source {label}: {path} not found (set the variable in its path)")
        data = load_dataset(path, format=s.format, image_root=root, split=s.split)
        caps = data.split(spec.split).texts()[0]
        if not caps:
            raise RsitrError(f"qbank source {label}: split '{spec.split}' of {path} has no captions (splits present: {data.splits})")
        texts += caps
        sources.append({"label": label, "data": s.data, "split": spec.split, "captions": len(caps)})
        tests.append((label, data.split(s.split)))
    full = encode_texts(model.backbone, texts, eng, batch_size=batch_size, progress=progress, desc="encode training captions")
    pick = subsample(len(texts), int(spec.size) if spec.size else len(texts), spec.seed)
    bank = full[torch.from_numpy(pick)].half()
    measured = []
    for label, split in tests:  # the test mR each bank gives (tta 1): what the card reports next to the bank
        enc = encode_dataset(model.backbone, split, batch_size=batch_size, progress=progress, engine=eng)
        m = {name: bank_metrics(enc, b, None, beta) for name, b in (("none", None), ("shipped", bank.float()), ("full", full))}
        measured.append({"dataset": label, "split": by_label[label].split, **{k: v["mR"] for k, v in m.items()},
                         **{f"t2i_{k}": v["t2i_mR"] for k, v in m.items()}})
        log.info("query bank, %s test mR: none %.2f, shipped bank (%d) %.2f, full bank (%d) %.2f", label, m["none"]["mR"], len(pick),
                 m["shipped"]["mR"], len(texts), m["full"]["mR"])
    meta = {"sources": sources, "seed": spec.seed, "beta": beta, "full_count": len(texts), "measured": measured,
            "encoded_as": "search queries: the shipped model's tokenizer + text encoder, L2-normalised, fp16",
            "built_at_commit": git_commit()}
    return write_query_bank(folder, bank.numpy(), meta)


def _card_path(path: str | Path) -> str:
    """A path as a card records it: from ``src/rsitr/`` on when it lies in a checkout (so a card built in
    any clone or worktree names the same file), else as given."""
    parts = Path(os.path.normpath(Path(path).absolute())).parts
    for i in range(len(parts) - 1):
        if parts[i:i + 2] == ("src", "rsitr"):
            return "/".join(parts[i:])
    return str(path)


def _shipped_source(folder: Path, name: str) -> str:
    """A spec that loads the export in ``folder``: ``shipped:NAME`` inside the package, else the folder."""
    from rsitr.models import shipped

    if folder.resolve().parent == shipped.SHIPPED_DIR.resolve():
        return shipped.PREFIX + name
    return str(folder)


__all__ = ["EvalSet", "QBankSpec", "Release", "build_query_bank", "build_release", "evaluate_model", "export_run", "markdown_table",
           "teacher_run"]
