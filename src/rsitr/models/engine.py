"""The inference engine: every no-grad encode (trunk caches, evaluation, index build, queries)
runs through ONNX Runtime, with eager torch as the fallback.

Why: on a CPU the frozen pretrained trunks are where the time goes. Exported once to ONNX and
run by ONNX Runtime (graph optimisations on, ``intra_op`` threads = ``torch.get_num_threads()``),
the EfficientNet-Lite trunk runs several times faster than eager torch with the same outputs
(within 1e-4, tested for every backbone family).

What is exported: one graph per part.

* a backbone with a trunk/head split (the two-tower model: ``image_trunk`` / ``text_trunk``,
  then ``image_head`` / ``text_head``): the two trunks (what trunk caches hold, below the cut of
  a top mode), *and* the whole model of each modality (``image_features`` / ``text_features``:
  trunk, the trained blocks above a cut, adapters in their slots, the projection heads), keyed
  by every tensor of the backbone, so an encode of a trained model is one ONNX Runtime call per
  batch. If a whole graph cannot be exported or differs from torch, the engine says so and runs
  that modality as the trunk's graph followed by the head (and trained blocks) in torch, the
  equality check deciding as for every graph. ``whole=False`` keeps to the trunk graphs (the
  training loop: its weights change with every run, an export per run would not pay);
* any other backbone (CLIP): ``image_features`` and ``text_features`` whole (adapters included).

Each graph is keyed by a hash of what determines its outputs: the backbone's class, name and
architecture config, the tensors of the modules it runs (so a trained trunk, an installed adapter
or a different cut point gives another key), the fixed input size of image graphs, and the
torch / opset versions. Files are written atomically as ``<cache_dir>/<part>-<key>.onnx`` and
reused by later runs; ``cache_dir`` defaults to ``$RSITR_ONNX_CACHE`` (``~/.cache/rsitr/onnx``).
Batch size and text length are dynamic; image graphs are exported per input resolution.

Each exported file is optimised once before it is saved (:func:`optimise_graph`): ONNX Runtime's
hardware-independent (basic) rewrites, constant folding first, and then every constant zero ``Pad``
in front of a ``Conv`` is folded into the convolution's own ``pads``. Why: the EfficientNet-Lite
trunks pad "same" explicitly before each strided or depthwise convolution; ONNX Runtime does not
fuse those pads, and each one forced two layout conversions (its blocked NCHWc layout to NCHW and
back) - 44% of the image trunk's time (ORT profile, batch 32); folded, the same outputs come
1.6x faster. The saved graph is plain ONNX (no hardware-specific ops), so it is as portable as
the raw export, and a session on it starts faster.

After an export the ONNX outputs are compared with torch on the export batch; a graph that
differs by more than ``tolerance`` (1e-4 max abs) is not used. Whenever ONNX Runtime is missing,
an export fails or that check fails, the engine says so in one log line and runs torch: results
never depend on which engine ran, only the speed does. Gradients never go through it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from rsitr.models.base import Backbone, Features
from rsitr.utils.errors import RsitrError
from rsitr.utils.weights import digest_state

log = logging.getLogger(__name__)

ENGINES = ("auto", "onnx", "torch")
OPSET = 17
# bump when what a graph computes for the same key changes, or how its file is written (2: constants
# folded and zero pads folded into their convolutions, see optimise_graph; 3: a graph is also
# checked on inputs of another batch size and text length than it was traced with; 4: RDB's TSA adapter
# traces at every text length, so the stored "fails on another size" verdicts of its models are not read)
FORMAT_VERSION = 4
TOLERANCE = 1e-4

_SAMPLE_TEXTS = [
    "many buildings and green trees are around a playground",
    "three white storage tanks are next to a road in an industrial area with a parking lot",
]
# the second check of an exported graph: another batch size and many text lengths (every residue
# of small windows, lengths below and above the traced one), so a graph whose trace fixed a size
# that should vary (Python arithmetic on a shape, e.g. the phrase windows of RDB's TSA adapter,
# which ran at some lengths and failed at others) is caught at export instead of at search time
_SAMPLE_TEXTS_2 = ["a bridge over a river", "a beach",
                   "green farmland beside a small village with a church, a school, a football pitch, a pond and many "
                   "tall trees along a narrow road that runs north to a railway station and a large car park"]
_CHECK_LENGTHS = (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 23, 26, 29, 32, 37, 41)


def default_cache_dir() -> Path:
    """``$RSITR_ONNX_CACHE``, else ``~/.cache/rsitr/onnx``."""
    root = os.environ.get("RSITR_ONNX_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "rsitr" / "onnx"


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine(kind: str | None) -> str:
    """``auto`` -> ``onnx`` where onnxruntime is installed, else ``torch``."""
    kind = (kind or "auto").lower()
    if kind not in ENGINES:
        raise RsitrError(f"unknown inference engine {kind!r}; use one of {', '.join(ENGINES)}")
    if kind == "auto":
        return "onnx" if onnxruntime_available() else "torch"
    return kind


def state_hash(modules: list[nn.Module], extra: dict) -> str:
    """sha256 over ``extra`` (JSON) and every tensor (name, dtype, shape, bytes) of ``modules``."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for i, m in enumerate(modules):
        digest_state(h, m, str(i))
    return h.hexdigest()[:24]


def fold_pads(model) -> int:
    """Fold every constant zero ``Pad`` that feeds only a ``Conv`` into that convolution's ``pads``
    (in place, on an ``onnx.ModelProto`` whose pad widths are initializers); returns how many.

    Left alone: other pad modes, a non-zero pad value, pads on the batch or channel axes, negative
    pads, a ``Conv`` with ``auto_pad`` set, a ``Pad`` whose output is also used elsewhere.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    users: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            users.setdefault(name, []).append(n)
    outputs = {o.name for o in g.output}
    folded = []
    for n in g.node:
        if n.op_type != "Pad" or n.domain not in ("", "ai.onnx") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if attrs.get("mode", b"constant") not in (b"constant", "constant"):
            continue
        value = n.input[2] if len(n.input) > 2 else ""
        if value and (value not in inits or np.any(numpy_helper.to_array(inits[value]) != 0)):
            continue
        if len(n.input) > 3 and n.input[3]:  # an axes input (opset 18+): not the full-rank form
            continue
        after = users.get(n.output[0], [])
        if len(after) != 1 or after[0].op_type != "Conv" or n.output[0] in outputs:
            continue
        conv = after[0]
        pads = [int(v) for v in numpy_helper.to_array(inits[n.input[1]]).reshape(-1)]
        rank = len(pads) // 2
        if rank < 3 or any(v < 0 for v in pads) or any(pads[i] or pads[rank + i] for i in range(2)):
            continue
        cattrs = {a.name: a for a in conv.attribute}
        if "auto_pad" in cattrs and helper.get_attribute_value(cattrs["auto_pad"]) not in (b"NOTSET", b"", "NOTSET"):
            continue
        spatial = rank - 2
        old = list(helper.get_attribute_value(cattrs["pads"])) if "pads" in cattrs else [0] * (2 * spatial)
        new = [old[i] + pads[2 + i] for i in range(spatial)] + [old[spatial + i] + pads[rank + 2 + i] for i in range(spatial)]
        if "pads" in cattrs:
            conv.attribute.remove(cattrs["pads"])
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = n.input[0]
        folded.append(n)
    for n in folded:
        g.node.remove(n)
    return len(folded)


def optimise_graph(path: Path) -> int:
    """Rewrite the ONNX file ``path`` in place for faster inference with the same outputs: ONNX
    Runtime's basic (hardware-independent: constant folding, redundant nodes) rewrites, then
    :func:`fold_pads`. Returns the pads folded. Any failure leaves ``path`` as it was (logged):
    the raw export computes the same outputs, only slower."""
    import tempfile

    import onnx
    import onnxruntime as ort

    try:
        with tempfile.TemporaryDirectory(prefix=".optimise-", dir=path.parent) as work:
            basic, folded = Path(work) / "basic.onnx", Path(work) / "folded.onnx"
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            opts.optimized_model_filepath = str(basic)
            opts.log_severity_level = 4  # fatal only: a run that fails raises, and rsitr says what failed in one warning
            ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            model = onnx.load(str(basic))
            n = fold_pads(model)
            onnx.save(model, str(folded))
            os.replace(folded, path)
        return n
    except Exception as exc:  # noqa: BLE001 - an optimisation that fails costs speed, never results
        log.info("inference engine: %s kept as exported (optimisation failed: %s: %s)", path, type(exc).__name__, exc)
        return 0


class _FeaturesOut(nn.Module):
    """Wraps a ``Features``-returning function as a module with tensor outputs (for export)."""

    def __init__(self, owner: nn.Module, fn: Callable[..., Features]):
        # built in eval mode: torch.onnx.export restores the wrapper's mode afterwards, and a
        # wrapper left in training mode would switch the owner's dropout on
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, *inputs: torch.Tensor):
        f = self.fn(*inputs)
        return f.pooled, f.tokens, f.mask


CHUNK = 32  # rows per ONNX Runtime call (see _Graph.__call__)


@dataclass
class _Exported:
    """An exported part as the ONNX cache keeps it: its session (None: torch runs the part), its
    export record (the ``.json`` beside the graph) and, when just exported, the file it was written to."""

    graph: "_Graph | None"
    meta: dict
    file: Path | None = None


class _Graph:
    """One exported part: an ONNX Runtime session over ``<part>-<key>.onnx``."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 4  # fatal only: a run that fails raises, and rsitr says what failed in one warning
        # no busy-waiting between ops: on a 2-core machine shared with data loading or other runs,
        # spinning threads take the cores from the work (measured here: 2x texts/s, 1.3x images/s)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, *tensors: torch.Tensor) -> Features:
        n = int(tensors[0].shape[0])
        outs = []
        # ONNX Runtime's CPU arena keeps the peak activation memory of the largest batch it has run
        # for the life of the session: Lite0's trunk at batch 128 holds 4.7 GB, at 32 1.3 GB, and
        # batches of 32 are no slower (measured here, one thread: 2.0 s vs 2.4 s per 128 images)
        for start in range(0, max(n, 1), CHUNK):
            feed = {name: t[start : start + CHUNK].detach().cpu().numpy() for name, t in zip(self.inputs, tensors)}
            outs.append(self.session.run(None, feed))
        if len(outs) == 1:
            pooled, tokens, mask = outs[0]
            return Features(torch.from_numpy(pooled), torch.from_numpy(tokens), torch.from_numpy(mask).bool())
        pooled, tokens, mask = (torch.from_numpy(np.concatenate([o[i] for o in outs])) for i in range(3))
        return Features(pooled, tokens, mask.bool())


class InferenceEngine:
    """No-grad encodes of ``backbone`` by ONNX Runtime (``engine="onnx"``/``"auto"``) or torch.

    The same six calls as the backbone: ``image_trunk`` / ``text_trunk`` (two-tower only),
    ``image_features`` / ``text_features`` and ``encode_image`` / ``encode_text``; outputs are on
    the CPU, in float32. Graphs are exported lazily on first use.
    """

    def __init__(self, backbone: Backbone, engine: str | None = "auto", *, cache_dir: str | os.PathLike | None = None,
                 threads: int | None = None, tolerance: float = TOLERANCE, whole: bool = True):
        self.backbone = backbone
        self.requested = resolve_engine(engine)
        self.kind = self.requested
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.threads = int(threads) if threads else torch.get_num_threads()
        self.tolerance = float(tolerance)
        self._graphs: dict[tuple, _Graph | None] = {}
        # a declared trunk/head split (SplitBackbone): the engine runs the trunks; the whole model of a
        # modality (trunk, trained blocks, heads, adapters) is one more graph each, unless whole=False
        # (training: its weights change every run) or the backbone has no untrimmed text path
        self.split = backbone.capabilities.trunk_cache
        self.whole = bool(whole) or not self.split
        self.whole_text = self.whole and (not self.split or hasattr(backbone, "text_features_core"))
        self.export_seconds = 0.0

    def __repr__(self) -> str:
        return f"InferenceEngine({self.backbone.info.name}, {self.kind})"

    # -- the parts -------------------------------------------------------------------------------
    def _part(self, name: str):
        """(module to export, modules whose state decides its outputs, example inputs, input
        names, dynamic axes, fixed input size or None)."""
        bb = self.backbone
        size = int(bb.preprocess.image_size)
        g = torch.Generator().manual_seed(0)
        if name in ("image_trunk", "image_features"):
            fn = bb.image_trunk if name == "image_trunk" else bb.image_features
            example = (torch.randn(2, 3, size, size, generator=g),)
            names, dyn = ["pixels"], {"pixels": {0: "batch"}}
        elif name in ("text_trunk", "text_features"):
            # the two-tower text trunk is exported without its batch-dependent trimming of padding
            # columns (a data-dependent shape); the engine trims and pads around the graph instead
            # (the whole text model of a split backbone likewise: text_features_core)
            fn = bb.text_trunk_core if name == "text_trunk" else (bb.text_features_core if self.split else bb.text_features)
            ids = bb.tokenize(_SAMPLE_TEXTS)
            if self.split:
                ids = ids[:, : self._trim(ids)]
            example = (ids,)
            names, dyn = ["ids"], {"ids": {0: "batch", 1: "length"}}
        else:  # pragma: no cover - internal
            raise ValueError(name)
        image = name.startswith("image")
        if self.split and name.endswith("_features"):
            owners = [bb]  # the whole model of a modality: keyed by every tensor of the checkpoint
        elif self.split:
            owners = list(bb.trunk_modules("image" if image else "text"))
        else:
            owners = [bb]
        out_dyn = {"pooled": {0: "batch"}, "tokens": {0: "batch"} if image else {0: "batch", 1: "length"},
                   "mask": {0: "batch"} if image else {0: "batch", 1: "length"}}
        return _FeaturesOut(bb, fn).eval(), owners, example, names, {**dyn, **out_dyn}, (size if image else None)

    def _other_examples(self, name: str) -> list[tuple[torch.Tensor, ...]]:
        """Inputs of other batch sizes (and text lengths) than the traced example (see _SAMPLE_TEXTS_2):
        images at batch 1 and 3; texts at batch 3 and every length of :data:`_CHECK_LENGTHS` the
        tokenizer gives (a split backbone's graph takes trimmed ids of any length; a whole text
        model, its tokenizer's fixed width)."""
        bb = self.backbone
        if name.startswith("image"):
            size = int(bb.preprocess.image_size)
            g = torch.Generator().manual_seed(1)
            return [(torch.randn(3, 3, size, size, generator=g),), (torch.randn(1, 3, size, size, generator=g),)]
        ids = bb.tokenize(_SAMPLE_TEXTS_2)
        if not self.split:
            return [(ids,), (ids[:1],)]
        width = self._trim(ids)
        return [(ids[:, :n],) for n in _CHECK_LENGTHS if n <= width] + [(ids[:, :width],)]

    def _trim(self, ids: torch.Tensor) -> int:
        from rsitr.models.towers.minilm import pad_trim

        return pad_trim(ids, self.backbone.pad_id)

    def key(self, name: str, part: tuple | None = None) -> str:
        """The cache key of part ``name`` (``part``: its :meth:`_part` when already built)."""
        _, owners, _, _, _, size = part if part is not None else self._part(name)
        info = self.backbone.info
        extra = {"part": name, "class": type(self.backbone).__name__, "name": info.name, "config": info.config,
                 "size": size, "torch": torch.__version__.split("+")[0], "opset": OPSET, "format": FORMAT_VERSION}
        # a trunk that ends at a cut (two-tower top mode) computes other outputs from the same
        # tensors: the cut is part of the key (no entry without one: whole-trunk keys stay as they were)
        cut = self.backbone.trunk_cut(name.split("_")[0]) if self.split else None
        if cut is not None:
            extra["cut"] = cut
        return state_hash(owners, extra)

    # -- export and sessions ---------------------------------------------------------------------
    def _graph(self, name: str) -> _Graph | None:
        if self.kind != "onnx":
            return None
        if name in self._graphs:
            return self._graphs[name]
        graph = None
        try:
            graph = self._load_or_export(name)
        except Exception as exc:  # noqa: BLE001 - any export/runtime failure falls back to torch
            log.warning("inference engine: ONNX export of %s %s failed (%s: %s); using torch for it",
                        self.backbone.info.name, name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        self._graphs[name] = graph
        return graph

    def _load_or_export(self, name: str) -> _Graph | None:
        """Part ``name``'s graph, read from the cache folder or exported, checked against torch and
        stored there (:func:`rsitr.utils.cachedir.load_or_compute`: a graph ONNX Runtime cannot load,
        or one without its export record, is exported again; a cache folder it cannot be stored in
        costs later processes an export, this one still runs it). None: torch runs the part (the
        graph differs from torch, or fails on other input sizes; that verdict is stored too)."""
        import shutil
        import tempfile

        from rsitr.utils.cachedir import StaleItem, load_or_compute
        from rsitr.utils.io import read_json

        part = self._part(name)
        key = self.key(name, part)
        path = self.cache_dir / f"{name}-{key}.onnx"
        meta_path = path.with_suffix(".json")

        def load(p: Path) -> _Exported:
            if not meta_path.is_file():
                raise StaleItem(f"{p}: an ONNX graph without its export record ({meta_path.name})")
            meta = read_json(meta_path, "ONNX graph record")
            if not isinstance(meta, dict):
                raise StaleItem(f"{meta_path}: not an ONNX graph record")
            if not meta.get("exact", False):
                self._warn_unused(str(p), meta)
                return _Exported(None, meta)
            try:
                return _Exported(_Graph(p, self.threads), meta)
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own error types: a truncated or damaged file
                raise StaleItem(f"{p}: ONNX Runtime cannot load this graph ({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})") from exc

        with tempfile.TemporaryDirectory(prefix="rsitr-onnx-") as work:
            def export() -> _Exported:
                return self._export(name, part, key, Path(work) / path.name)

            got = load_or_compute(path, f"ONNX graph of {self.backbone.info.name} {name}", load=load, compute=export,
                                  save=lambda v, tmp: shutil.copyfile(v.file, tmp), describe=lambda v: v.meta)
        return got.graph

    def _export(self, name: str, part: tuple, key: str, file: Path) -> _Exported:
        """Export part ``name`` to ``file``, check it against torch on the traced inputs and on other
        batch sizes and lengths; the graph only when it matches within the tolerance."""
        module, owners, example, in_names, dyn, _ = part
        t0 = time.perf_counter()
        was = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # tracer warnings about the shape checks of forward()
                    torch.onnx.export(module, example, str(file), input_names=in_names, output_names=["pooled", "tokens", "mask"],
                                      dynamic_axes=dyn, opset_version=OPSET, do_constant_folding=True, dynamo=False)
                folded = optimise_graph(file)
                graph = _Graph(file, self.threads)
                others = self._other_examples(name)  # only when exporting: a cached graph carries its verdict
                diff, failed = 0.0, None
                for ex in (example, *others):  # the traced inputs, then other batch sizes and lengths
                    ref = module(*ex)
                    try:
                        got = graph(*ex)
                    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own error types: a graph that cannot take these sizes
                        failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:600] if str(exc) else ''}"
                        diff = float("inf")
                        break
                    if tuple(got.tokens.shape) != tuple(ref[1].shape) or tuple(got.pooled.shape) != tuple(ref[0].shape):
                        failed, diff = f"output shapes {tuple(got.tokens.shape)} vs torch's {tuple(ref[1].shape)}", float("inf")
                        break
                    d = max(float((a.float() - b.float()).abs().max()) if a.numel() else 0.0 for a, b in zip(ref[:2], (got.pooled, got.tokens)))
                    diff = max(diff, d, float((ref[2].bool() != got.mask).any()))
        finally:
            self.backbone.train(was)
        exact = diff <= self.tolerance
        meta = {"part": name, "key": key, "backbone": self.backbone.info.name, "max_abs_diff": diff, "exact": exact,
                "tolerance": self.tolerance, "torch": torch.__version__, "opset": OPSET,
                "checked": [list(ex[0].shape) for ex in (example, *others)], "failed": failed}
        if failed:
            self._warn_unused(f"the ONNX {name} of {self.backbone.info.name}", meta)
            return _Exported(None, meta, file)
        self.export_seconds += time.perf_counter() - t0
        if not exact:
            self._warn_unused(f"the ONNX {name} of {self.backbone.info.name}", meta)
            return _Exported(None, meta, file)
        log.info("inference engine: exported %s of %s in %.1fs (%d pads folded; max abs diff %.1e)", name, self.backbone.info.name,
                 time.perf_counter() - t0, folded, diff)
        return _Exported(graph, meta, file)

    def _warn_unused(self, what: str, meta: dict) -> None:
        """The one warning for a graph torch runs instead, by its export record (new or stored)."""
        if meta.get("failed"):
            log.warning("inference engine: %s fails on inputs of another size than it was traced with (%s); using torch for it", what, meta["failed"])
        else:
            log.warning("inference engine: %s differs from torch by %.2e (> %.0e); using torch for it", what,
                        meta.get("max_abs_diff", float("nan")), self.tolerance)

    def uses_onnx(self, name: str) -> bool:
        """True iff ``name`` runs through ONNX Runtime (exports it if needed)."""
        return self._graph(name) is not None

    # -- the calls -------------------------------------------------------------------------------
    def _onnx(self, name: str, call: Callable[[_Graph], Features]) -> Features | None:
        """``call(graph)`` of part ``name``; None when the part runs in torch. A graph that ONNX
        Runtime refuses to run on these inputs is dropped with a warning (torch from then on), as
        its export check would have dropped it."""
        g = self._graph(name)
        if g is None:
            return None
        try:
            return call(g)
        except _ort_errors() as exc:
            log.warning("inference engine: ONNX Runtime cannot run the %s of %s on these inputs (%s); using torch for it",
                        name, self.backbone.info.name, str(exc).splitlines()[0][:600] if str(exc) else type(exc).__name__)
            self._graphs[name] = None
            return None

    @torch.no_grad()
    def image_trunk(self, pixels: torch.Tensor) -> Features:
        if not self.split:
            raise RsitrError(f"{self.backbone.info.name} has no trunk/head split")
        f = self._onnx("image_trunk", lambda g: g(pixels.float()))
        return f if f is not None else _cpu(self.backbone.image_trunk(pixels))

    @torch.no_grad()
    def text_trunk(self, ids: torch.Tensor) -> Features:
        if not self.split:
            raise RsitrError(f"{self.backbone.info.name} has no trunk/head split")
        f = self._onnx("text_trunk", lambda g: self.backbone.text_trunk(ids.cpu(), core=g))
        return f if f is not None else _cpu(self.backbone.text_trunk(ids))

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> Features:
        f = self._onnx("image_features", lambda g: g(pixels.float())) if self.whole else None
        if f is not None:
            return f
        if self.split:  # no whole graph: the trunk's graph, then the head and trained blocks in torch
            return _cpu(self._head("image", self.image_trunk(pixels)))
        return _cpu(self.backbone.image_features(pixels))

    @torch.no_grad()
    def text_features(self, ids: torch.Tensor) -> Features:
        f = self._onnx("text_features", lambda g: self._trimmed(g, ids.cpu()) if self.split else g(ids.cpu())) if self.whole_text else None
        if f is not None:
            return f
        if self.split:
            return _cpu(self._head("text", self.text_trunk(ids)))
        return _cpu(self.backbone.text_features(ids))

    def _trimmed(self, g: _Graph, ids: torch.Tensor) -> Features:
        """A split backbone's whole text graph on the columns that hold real tokens, its outputs
        padded back to the width of ``ids`` as the torch model pads them."""
        n = self._trim(ids)
        f = g(ids[:, :n])
        pad = ids.shape[1] - n
        if pad <= 0:
            return f
        row = self.backbone.text_pad_token().detach().float().cpu()
        tokens = torch.cat([f.tokens, row.expand(f.tokens.shape[0], pad, -1)], dim=1)
        return Features(f.pooled, tokens, torch.nn.functional.pad(f.mask, (0, pad), value=False))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_features(pixels).pooled

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_features(ids).pooled

    def _head(self, modality: str, f: Features) -> Features:
        dev = _device(self.backbone)
        f = Features(f.pooled.to(dev), f.tokens.to(dev), f.mask.to(dev))
        return self.backbone.image_head(f) if modality == "image" else self.backbone.text_head(f)

    def describe(self) -> dict:
        """Which engine runs each part (exports what is needed)."""
        parts = (("image_trunk", "text_trunk") if self.split else ()) + (("image_features",) if self.whole else ()) \
            + (("text_features",) if self.whole_text else ())
        return {"engine": self.kind, "requested": self.requested, "threads": self.threads,
                "parts": {p: ("onnx" if self.uses_onnx(p) else "torch") for p in parts}}


def _ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's error types for a graph that cannot run on given inputs."""
    import onnxruntime.capi.onnxruntime_pybind11_state as C

    return tuple(t for t in (getattr(C, n, None) for n in ("Fail", "InvalidArgument", "RuntimeException", "NotImplemented"))
                 if isinstance(t, type))


def _device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _cpu(f: Features) -> Features:
    return Features(f.pooled.float().cpu(), f.tokens.float().cpu(), f.mask.cpu())


def engine_for(backbone: Backbone, engine: str | None = "auto", **kwargs) -> InferenceEngine:
    """The :class:`InferenceEngine` of ``backbone`` (``engine``: auto | onnx | torch). On a model
    that is not on the CPU, ``onnx`` falls back to torch (ONNX Runtime runs the CPU provider)."""
    kind = resolve_engine(engine)
    if kind == "onnx" and _device(backbone).type != "cpu":
        log.info("inference engine: the model is on %s; using torch", _device(backbone))
        kind = "torch"
    eng = InferenceEngine(backbone, kind, **kwargs)
    return eng


@torch.no_grad()
def encode_texts(backbone: Backbone, texts: list[str], engine: InferenceEngine | None = None, *, batch_size: int = 256,
                 progress: bool = False, desc: str = "encode texts") -> torch.Tensor:
    """``[N, D]`` float32 L2-normalised embeddings of ``texts``: tokenised by ``backbone`` and
    encoded by ``engine`` (default: the backbone in torch) in batches of ``batch_size``, as a free
    text query is encoded at search time. What QB-Norm query banks are made of."""
    import math

    from rsitr.utils.progress import progress_bar

    run = engine if engine is not None else backbone
    parts = []
    for i in progress_bar(range(0, len(texts), batch_size), total=math.ceil(len(texts) / batch_size), desc=desc, disable=not progress):
        e = run.encode_text(backbone.tokenize(texts[i : i + batch_size]).to(_device(backbone))).float().cpu()
        parts.append(torch.nn.functional.normalize(e, dim=-1))
    if not parts:
        raise ValueError("encode_texts needs at least one text")
    return torch.cat(parts)


__all__ = ["ENGINES", "InferenceEngine", "default_cache_dir", "encode_texts", "engine_for", "fold_pads", "onnxruntime_available", "optimise_graph",
           "resolve_engine", "state_hash"]
