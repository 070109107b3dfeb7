"""``rsitr bench serve``: the HTTP server under concurrent load.

The command starts ``rsitr serve INDEX`` itself (a child process on 127.0.0.1, a free port), waits
for ``/healthz``, and then:

1. **in sequence**: asks every query of a fixed set once (text queries, image uploads of indexed
   tiles) and keeps the answers (ids and scores);
   (the uploads are indexed tiles as ``/tiles/{id}`` renders them, sent as
   ``application/octet-stream``);
2. **under load**: ``clients`` threads, each with its own HTTP connection, send requests back to
   back for ``duration`` seconds, in a fixed mix of kinds (``text``: ``GET /search``, ``image``:
   ``POST /search/image`` of a small tile, ``thumb``: ``GET /tiles/{id}``, ``upload``:
   ``POST /search/image`` of a large file, by default a generated ~18 MB TIFF just under the
   server's 20 MB limit; :func:`parse_mix`). Every answer to a query of the set is
   compared with the answer in sequence (same ids in the same order, scores within ``1e-5``);
3. the server's resident memory (``VmRSS`` of its process, from ``/proc``) is sampled every
   0.25 s: at the end of the warm-up (the first ``warmup`` seconds of the load phase, whose
   requests are not counted in the latencies), its peak after that, at the end, and after
   ``idle`` seconds without requests: memory taken by the load should be given back (the
   target: within 10% of the post-warm-up figure, reported as ``returned_within_10pct``).

Printed: requests/s overall and per kind, p50/p95/p99 latency per kind, errors (non-2xx,
connection failures), mismatches against the sequential answers, and the RSS figures. The run is
bounded: it ends after ``duration`` seconds and every request has a timeout.
With ``--out`` the result is written by the benchmarks' one writer,
:func:`rsitr.bench.measurements.write_result`.
"""
from __future__ import annotations

import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

TEXT_QUERIES = (
    "many buildings and green trees are around a playground", "a river runs through the green farmland",
    "several planes are parked at the airport", "a bridge over the river", "storage tanks next to a harbour",
    "a baseball field surrounded by trees", "dense residential area with roads", "the beach is next to the blue sea",
    "a parking lot with many cars", "a church in the middle of buildings", "bare land with a few plants",
    "a stadium with a green field", "some ships are in the port", "a pond surrounded by trees", "an industrial area",
    "a railway station with several tracks", "a desert with yellow sand", "mountains covered with forest",
    "a square in the center of the city", "a school with a playground", "a viaduct crosses the road", "a meadow",
    "a commercial area with tall buildings", "a resort near the water",
)
KINDS = ("text", "image", "thumb", "upload")
DEFAULT_MIX = {"text": 0.7, "image": 0.1, "thumb": 0.2, "upload": 0.0}


def parse_mix(text: str | None) -> dict[str, float]:
    """``--mix``: ``KIND:WEIGHT,...`` over :data:`KINDS` (``text:0.5,upload:0.5``; kinds not named
    weigh 0), or the older positional ``TEXT,IMAGE,THUMB`` weights. Default :data:`DEFAULT_MIX`."""
    if not text:
        return dict(DEFAULT_MIX)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    mix = {k: 0.0 for k in KINDS}
    try:
        if all(":" in p for p in parts):
            for p in parts:
                kind, w = p.split(":", 1)
                if kind.strip() not in mix:
                    raise RsitrError(f"--mix: unknown kind {kind.strip()!r} (kinds: {', '.join(KINDS)})")
                mix[kind.strip()] = float(w)
        elif len(parts) == 3:
            mix.update(zip(("text", "image", "thumb"), (float(p) for p in parts)))
        else:
            raise ValueError(text)
    except ValueError:
        raise RsitrError(f"--mix: expected KIND:WEIGHT,... (kinds: {', '.join(KINDS)}) or TEXT,IMAGE,THUMB weights, got {text!r}") from None
    if min(mix.values()) < 0 or not np.isfinite(list(mix.values())).all() or sum(mix.values()) <= 0:
        raise RsitrError(f"--mix: weights must be non-negative with a positive sum, got {text!r}")
    return mix


def make_upload_tiff(path: str | Path, megabytes: float = 18.75, seed: int = 0) -> Path:
    """An uncompressed RGB TIFF of about ``megabytes`` MB of noise (the default: just under the
    server's 20 MB upload limit), for the ``upload`` kind of load."""
    from PIL import Image

    side = int((megabytes * 1024 * 1024 / 3) ** 0.5)
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    path = Path(path)
    Image.fromarray(arr, "RGB").save(path, format="TIFF")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    errors: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    error_examples: list[str] = field(default_factory=list)
    mismatches: int = 0
    checked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _answer(body: dict) -> tuple[list[int], list[float]]:
    res = body["results"]
    return [int(r["id"]) for r in res], [float(r["score"]) for r in res]


def _same(a: tuple[list[int], list[float]], b: tuple[list[int], list[float]], tol: float = 1e-5) -> bool:
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(abs(x - y) <= tol for x, y in zip(a[1], b[1]))


def start_server(index: str | Path, *, port: int, engine: str = "auto", threads: int | None = None, extra_env: dict | None = None,
                 timeout: float = 600.0, verbose: bool = False) -> subprocess.Popen:
    """``rsitr serve INDEX`` on 127.0.0.1:``port`` as a child process; returns once ``/healthz`` answers.
    Quiet (``-q``: no access log line per request) unless ``verbose``, which lets its log through
    to this process's stderr."""
    import httpx

    cmd = [sys.executable, "-m", "rsitr.cli", "-v" if verbose else "-q"] + (["--threads", str(threads)] if threads else []) + \
        ["serve", str(index), "--host", "127.0.0.1", "--port", str(port), "--engine", engine]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=None if verbose else subprocess.PIPE, text=True,
                            env={**os.environ, **(extra_env or {})})
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            said = (proc.stderr.read() or "").strip()[-500:] if proc.stderr is not None else "(its log is above)"
            raise RsitrError(f"the server exited with status {proc.returncode}: {said}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise RsitrError(f"the server did not answer /healthz within {timeout:.0f} s")
        time.sleep(0.25)


def run_serve_bench(index: str | Path, *, clients: int = 32, duration: float = 60.0, warmup: float = 5.0, k: int = 20,
                    mix: Sequence[float] | dict[str, float] = (0.7, 0.1, 0.2), n_images: int = 8, engine: str = "auto",
                    server_threads: int | None = None, seed: int = 0, timeout: float = 60.0, upload: str | Path | None = None,
                    idle: float = 5.0, verbose: bool = False, progress: bool = True) -> dict[str, Any]:
    """Load the server of ``index`` (see the module doc); returns the figures as a dict. ``mix``:
    weights per kind (a dict over :data:`KINDS`, or text/image/thumb weights); ``upload``: the
    file of the ``upload`` kind (default: :func:`make_upload_tiff` in a temporary folder);
    ``idle``: seconds without requests before the last RSS reading.

    Quiet unless ``verbose``: the HTTP client's log line per request (httpx/httpcore at INFO) and
    the server's access log are silenced for the run; ``progress`` shows one progress line over
    the load phase (seconds done, requests answered) instead."""
    with _quiet_http_client(not verbose):
        return _run_serve_bench(index, clients=clients, duration=duration, warmup=warmup, k=k, mix=mix, n_images=n_images, engine=engine,
                                server_threads=server_threads, seed=seed, timeout=timeout, upload=upload, idle=idle, verbose=verbose,
                                progress=progress)


class _quiet_http_client:
    """Context: the httpx / httpcore loggers at WARNING (when ``on``), restored afterwards."""

    NAMES = ("httpx", "httpcore")

    def __init__(self, on: bool):
        self.on, self.saved = on, {}

    def __enter__(self):
        if self.on:
            for name in self.NAMES:
                lg = logging.getLogger(name)
                self.saved[name] = lg.level
                lg.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        for name, level in self.saved.items():
            logging.getLogger(name).setLevel(level)
        return False


def _run_serve_bench(index, *, clients, duration, warmup, k, mix, n_images, engine, server_threads, seed, timeout, upload, idle, verbose,
                     progress) -> dict[str, Any]:
    from rsitr.utils.progress import progress_bar

    import tempfile
    import httpx

    from rsitr.search.manifest import IndexManifest

    index = Path(index)
    manifest = IndexManifest.load(index)
    items = manifest.read_items(index)
    if not items:
        raise RsitrError(f"{index}: the index is empty")
    if not isinstance(mix, dict):
        if len(mix) != 3:
            raise RsitrError("bench serve: --mix of three non-negative weights (text, image, thumb)")
        mix = {**{kk: 0.0 for kk in KINDS}, **dict(zip(("text", "image", "thumb"), (float(w) for w in mix)))}
    mix = {kk: float(mix.get(kk, 0.0)) for kk in KINDS}
    if clients < 1 or duration <= 0 or warmup < 0 or idle < 0 or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise RsitrError("bench serve: --clients >= 1, --duration > 0, --warmup >= 0, --idle >= 0, --mix of non-negative weights")
    tmpdir = tempfile.TemporaryDirectory(prefix="rsitr-bench-upload-")
    big: tuple[str, bytes] | None = None
    if mix["upload"] > 0:
        up = Path(upload) if upload is not None else make_upload_tiff(Path(tmpdir.name) / "upload.tif", seed=seed)
        try:
            big = (up.name, up.read_bytes())
        except OSError as exc:
            raise RsitrError(f"--upload {up}: cannot read it ({exc.strerror})") from None
    rng = random.Random(seed)
    picks = rng.sample(items, min(n_images, len(items)))
    port = _free_port()
    t_start = time.perf_counter()
    proc = start_server(index, port=port, engine=engine, threads=server_threads, verbose=verbose)
    startup_s = time.perf_counter() - t_start
    base = f"http://127.0.0.1:{port}"
    rss: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample_rss():
        # also drives the progress line: seconds of the load phase done, requests answered
        t0 = time.perf_counter()
        bar = progress_bar(total=int(round(warmup + duration)), desc="bench serve: load", unit="s", disable=not progress)
        shown = 0
        try:
            while not stop.is_set():
                v = _rss_mb(proc.pid)
                if v is not None:
                    rss.append((time.perf_counter() - t0, v))
                done = min(int(time.perf_counter() - t0), int(round(warmup + duration)))
                if done > shown:
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(requests=sum(len(v) for v in stats.latencies.values()), errors=sum(stats.errors.values()))
                    bar.update(done - shown)
                    shown = done
                stop.wait(0.25)
        finally:
            bar.close()

    try:
        # 1. the answers in sequence
        reference: dict[tuple[str, int], tuple[list[int], list[float]]] = {}
        seq_lat: dict[str, list[float]] = {"text": [], "image": []}
        with httpx.Client(base_url=base, timeout=timeout) as c:
            # the uploads: indexed tiles as the server renders them (JPEG, 256 px; any raster kind)
            uploads = []
            for it in picks:
                r = c.get(f"/tiles/{it.id}", params={"size": 256})
                if r.status_code != 200:
                    raise RsitrError(f"GET /tiles/{it.id}: HTTP {r.status_code}")
                uploads.append((f"tile-{it.id}", r.content))
            for i, q in enumerate(TEXT_QUERIES):
                t = time.perf_counter()
                r = c.get("/search", params={"q": q, "k": k})
                seq_lat["text"].append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RsitrError(f"GET /search in sequence: HTTP {r.status_code} {r.text[:200]}")
                reference[("text", i)] = _answer(r.json())
            for i, (name, data) in enumerate(uploads):
                t = time.perf_counter()
                r = c.post("/search/image", params={"k": k}, files={"file": (name, data, "application/octet-stream")})
                seq_lat["image"].append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RsitrError(f"POST /search/image in sequence: HTTP {r.status_code} {r.text[:200]}")
                reference[("image", i)] = _answer(r.json())
            if big is not None:
                t = time.perf_counter()
                r = c.post("/search/image", params={"k": k}, files={"file": (big[0], big[1], "application/octet-stream")})
                seq_lat["upload"] = [time.perf_counter() - t]
                if r.status_code != 200:
                    raise RsitrError(f"POST /search/image of {big[0]} ({len(big[1]) / 2**20:.1f} MB) in sequence: HTTP {r.status_code} {r.text[:200]}")
                reference[("upload", 0)] = _answer(r.json())
        # 2. under load
        stats = Stats()
        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        t_load = time.perf_counter()
        t_warm_end = t_load + warmup
        t_end = t_warm_end + duration
        weights = np.asarray([mix[kk] for kk in KINDS], dtype=float) / float(sum(mix.values()))

        def client(cid: int) -> None:
            r_local = random.Random(seed * 1000 + cid)
            with httpx.Client(base_url=base, timeout=timeout) as c:
                while True:
                    now = time.perf_counter()
                    if now >= t_end:
                        return
                    kind = r_local.choices(KINDS, weights=weights)[0]
                    key = None
                    try:
                        t = time.perf_counter()
                        if kind == "text":
                            i = r_local.randrange(len(TEXT_QUERIES))
                            key = ("text", i)
                            resp = c.get("/search", params={"q": TEXT_QUERIES[i], "k": k})
                        elif kind == "image":
                            i = r_local.randrange(len(uploads))
                            key = ("image", i)
                            name, data = uploads[i]
                            resp = c.post("/search/image", params={"k": k}, files={"file": (name, data, "application/octet-stream")})
                        elif kind == "upload":
                            key = ("upload", 0)
                            resp = c.post("/search/image", params={"k": k}, files={"file": (big[0], big[1], "application/octet-stream")})
                        else:
                            resp = c.get(f"/tiles/{r_local.randrange(len(items))}", params={"size": 128})
                        dt = time.perf_counter() - t
                        ok = resp.status_code == 200
                        same = None
                        if ok and key is not None:
                            same = _same(_answer(resp.json()), reference[key])
                        err = None if ok else f"{kind}: HTTP {resp.status_code} {resp.text[:120]}"
                    except httpx.HTTPError as exc:
                        dt, ok, same, err = time.perf_counter() - t, False, None, f"{kind}: {type(exc).__name__}: {exc}"
                    counted = t >= t_warm_end
                    with stats.lock:
                        if same is not None:
                            stats.checked += 1
                            stats.mismatches += 0 if same else 1
                        if not ok:
                            stats.errors[kind] += 1
                            if len(stats.error_examples) < 5:
                                stats.error_examples.append(err)
                        elif counted:
                            stats.latencies[kind].append(dt)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=duration + warmup + timeout + 30)
        wall = time.perf_counter() - t_warm_end
        rss_end = _rss_mb(proc.pid)
        time.sleep(idle)  # no requests: what the server keeps of the load
        rss_idle = _rss_mb(proc.pid)
        stop.set()
        sampler.join(5)
    finally:
        stop.set()
        tmpdir.cleanup()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    rows = []
    for kind in (kk for kk in KINDS if mix[kk] > 0):  # the kinds of the mix only
        lat = np.asarray(stats.latencies[kind]) * 1000.0
        rows.append({"kind": kind, "requests": int(lat.size), "req_per_s": round(lat.size / wall, 2) if wall > 0 else 0.0,
                     "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "p99_ms": _pct(lat, 99), "errors": stats.errors[kind]})
    total = sum(r["requests"] for r in rows)
    rss_warm = [v for t, v in rss if t <= warmup] or [v for _, v in rss[:1]]
    rss_after = [v for t, v in rss if t > warmup]
    return {
        "index": str(index), "items": len(items), "model": manifest.model.checkpoint, "clients": clients, "duration_s": duration,
        "warmup_s": warmup, "k": k, "mix": dict(zip(KINDS, [float(w) for w in weights])), "server_startup_s": round(startup_s, 1),
        "sequential_p50_ms": {kk: _pct(np.asarray(v) * 1000.0, 50) for kk, v in seq_lat.items()},
        "rows": rows, "total_requests": total, "total_req_per_s": round(total / wall, 2) if wall > 0 else 0.0,
        "errors": sum(stats.errors.values()), "error_examples": stats.error_examples,
        "answers_checked": stats.checked, "answers_differing_from_sequence": stats.mismatches,
        "rss_mb": {"end_of_warmup": round(rss_warm[-1], 1) if rss_warm else None,
                   "peak_after_warmup": round(max(rss_after), 1) if rss_after else None,
                   "end": round(rss[-1][1], 1) if rss else None,
                   "peak": round(max(v for _, v in rss), 1) if rss else None},
        "load_average": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
        "idle_s": idle, "upload_mb": round(len(big[1]) / 2**20, 2) if big else None,
    } | {"rss_after_load_mb": _rss_summary(rss_warm[-1] if rss_warm else None, rss_end, rss_idle)}


def _rss_summary(warm: float | None, end: float | None, idle: float | None) -> dict[str, Any]:
    """RSS after warm-up, at the end of the load and after the idle pause, and whether the idle
    figure is back within 10% of the post-warm-up one (the target)."""
    back = None if warm is None or idle is None else bool(idle <= warm * 1.10)
    return {"after_warmup": round(warm, 1) if warm is not None else None, "at_end": round(end, 1) if end is not None else None,
            "after_idle": round(idle, 1) if idle is not None else None, "returned_within_10pct": back}


def _pct(a: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(a, q)), 1) if a.size else None


def render(out: dict[str, Any]) -> str:
    lines = [
        f"rsitr bench serve: {out['items']:,} items ({out['model']}), {out['clients']} clients for {out['duration_s']:.0f} s "
        f"after {out['warmup_s']:.0f} s of warm-up, k={out['k']}, mix {', '.join(f'{k} {v:.0%}' for k, v in out['mix'].items())}",
        "",
        "| kind | requests | req/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        lines.append(f"| {r['kind']} | {r['requests']} | {r['req_per_s']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['errors']} |")
    lines.append(f"| all | {out['total_requests']} | {out['total_req_per_s']} | | | | {out['errors']} |")
    m = out["rss_mb"]
    lines += [
        "",
        f"answers under load equal to the answers in sequence: {out['answers_checked'] - out['answers_differing_from_sequence']} "
        f"of {out['answers_checked']}",
        f"server RSS MB: {m['end_of_warmup']} at the end of warm-up, peak {m['peak_after_warmup']} after it, {m['end']} at the end "
        f"(peak overall {m['peak']})",
        f"server start-up {out['server_startup_s']} s; in sequence p50: text {out['sequential_p50_ms'].get('text')} ms, "
        f"image {out['sequential_p50_ms'].get('image')} ms; 1-min load average at the end {out['load_average']}",
    ]
    a = out.get("rss_after_load_mb")
    if a:
        lines.append(f"server RSS MB after warm-up {a['after_warmup']}, at the end of the load {a['at_end']}, after {out['idle_s']:g} s idle "
                     f"{a['after_idle']}: {'back within 10%' if a['returned_within_10pct'] else 'NOT back within 10%'} of the post-warm-up figure"
                     + (f" (uploads of {out['upload_mb']} MB)" if out.get("upload_mb") else ""))
    if out["error_examples"]:
        lines.append("first errors: " + " | ".join(out["error_examples"]))
    return "\n".join(lines)

