"""Drive rsitr with bad inputs, as a new user would, and print a markdown table:
input -> exit status / HTTP status -> the message (first line of stderr, or the JSON detail).
A row with "Traceback" in its output is flagged. Usage: python scripts/bad_inputs.py [WORKDIR]"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}


def cli(*args: str, timeout: int = 600) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "rsitr.cli", "-q", *args], capture_output=True, text=True, env=ENV, timeout=timeout)
    out = p.stderr.strip() or p.stdout.strip()
    if "Traceback" in p.stderr:
        return p.returncode, "TRACEBACK: " + p.stderr.strip().splitlines()[-1]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    return p.returncode, (lines[-1] if lines else out.splitlines()[0] if out else "")


def main() -> int:
    import torch
    from PIL import Image

    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="rsitr-bad-"))
    work.mkdir(parents=True, exist_ok=True)
    rand = os.urandom(4096)
    imgs = work / "imgs"
    imgs.mkdir(exist_ok=True)
    for i in range(3):
        Image.new("RGB", (48, 48), (60 * i, 100, 40)).save(imgs / f"t{i}.png")
    files = {
        "random.safetensors": rand, "random.pt": rand, "empty.pt": b"", "zip-garbage.pt": b"PK\x03\x04" + rand[:300],
        "text.json": b"not json at all", "karpathy-bad.json": json.dumps({"images": [{"filename": 3}]}).encode(),
        "captions.csv": b"\xff\xfe\x00garbage,\x00\n\"unterminated", "labels.csv": b"filename,label\nx.png\n",
    }
    for name, data in files.items():  # each in its own folder (a labels.csv next to a file would be read with it)
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        sub = work / Path(name).stem
        sub.mkdir(exist_ok=True)
        (sub / name).write_bytes(data)
        (work / name).write_bytes(data)
    from rsitr.data.synth import write_synth

    good = work / "synth"
    if not (good / "dataset_synth.json").is_file():
        write_synth(good, n_images=12, seed=0, image_size=32)
    good_ann = good / "dataset_synth.json"
    full = work / "full.pt"
    torch.save({"w": torch.zeros(1000)}, full)
    (work / "truncated.pt").write_bytes(full.read_bytes()[:1500])
    torch.save({"obj": io.BytesIO(b"x")}, work / "object.pt")
    badimgs = work / "badimgs"
    badimgs.mkdir(exist_ok=True)
    (badimgs / "broken.tif").write_bytes(rand)
    (badimgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rand[:100])
    Image.new("RGB", (48, 48), (9, 9, 9)).save(badimgs / "good.png")

    rows: list[tuple[str, str, str]] = []

    def row(what: str, res: tuple) -> None:
        rows.append((what, str(res[0]), res[1].replace("|", "\\|")))
        print(f"  {what}: {res[0]}", file=sys.stderr, flush=True)

    for ck in ("random.safetensors", "random.pt", "empty.pt", "zip-garbage.pt", "truncated.pt", "object.pt", "text.json", "missing.pt"):
        row(f"index build --checkpoint {ck}", cli("index", "build", str(imgs), "--checkpoint", str(work / ck), "--out", str(work / f"idx-{ck}")))
    row("eval (synthetic data) --checkpoint random.safetensors", cli("eval", "--data", str(good_ann), "--checkpoint", str(work / "random.safetensors")))
    row("eval (synthetic data) --checkpoint truncated.pt", cli("eval", "--data", str(good_ann), "--checkpoint", str(work / "truncated.pt")))
    for ann in ("text.json", "karpathy-bad.json", "captions.csv", "labels.csv", "nonexistent.json"):
        stem = Path(ann).stem
        row(f"data check {ann}", cli("data", "check", str(work / stem / ann) if (work / stem).is_dir() else str(work / ann)))
    row("data check synth --labels labels.csv (a row without label)", cli("data", "check", str(good_ann), "--labels", str(work / "labels" / "labels.csv")))
    row("train --data captions.csv", cli("train", "--data", str(work / "captions" / "captions.csv"), "--out", str(work / "run-bad")))
    row("train --set time_budget=abc", cli("train", "--data", str(good_ann), "--backbone", "clip:tiny", "--set", "time_budget=abc", "--out", str(work / "run-b2")))
    row("train --set nokey=1", cli("train", "--data", str(good_ann), "--set", "nokey=1", "--out", str(work / "run-b3")))
    row("train --set time_budget=0.001 (clip:tiny, stopped at step 1)", cli("train", "--data", str(good_ann), "--backbone", "clip:tiny", "--mode", "full",
                                                                            "--set", "batch_size=4", "--set", "time_budget=0.001", "--out", str(work / "run-b4")))
    row("index build on corrupt tif + png", cli("index", "build", str(badimgs), "--checkpoint", "clip:tiny", "--out", str(work / "idx-bad")))
    row("index build --skip-bad on corrupt tif + png + a good png", cli("index", "build", str(badimgs), "--checkpoint", "clip:tiny", "--out", str(work / "idx-bad2"), "--skip-bad"))
    idx = work / "idx"
    row("index build (good, for the rows below)", cli("index", "build", str(imgs), "--checkpoint", "clip:tiny", "--out", str(idx)))
    row("search --rerank sar", cli("search", str(idx), "ships", "--rerank", "sar"))
    row("search --rerank ftf (no tokens)", cli("search", str(idx), "ships", "--rerank", "ftf"))
    row("search -k 0", cli("search", str(idx), "ships", "-k", "0"))
    row("search (no query)", cli("search", str(idx)))
    row("search --image broken.tif", cli("search", str(idx), "--image", str(badimgs / "broken.tif")))
    row("search on a non-index folder", cli("search", str(imgs), "ships"))
    man = json.loads((idx / "manifest.json").read_text())
    bad_idx = work / "idx-badmanifest"
    subprocess.run(["cp", "-r", str(idx), str(bad_idx)], check=True)
    (bad_idx / "manifest.json").write_text("{ truncated")
    row("search, manifest.json truncated", cli("search", str(bad_idx), "ships"))
    man2 = dict(man)
    man2.pop("model", None)
    (bad_idx / "manifest.json").write_text(json.dumps(man2))
    row("search, manifest.json without its model", cli("search", str(bad_idx), "ships"))
    row("serve --token ''", cli("serve", str(idx), "--token", "", "--port", "1"))

    # the HTTP API, in process
    from fastapi.testclient import TestClient

    from rsitr.serve.app import create_app

    app = create_app(idx, token="T")
    h = {"Authorization": "Bearer T"}
    tile = (imgs / "t0.png").read_bytes()
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, format="TIFF")
    with TestClient(app) as c:
        def http(what, r):
            try:
                detail = r.json().get("detail")
            except Exception:  # noqa: BLE001 - a non-JSON body (the page, a thumbnail)
                detail = r.headers.get("content-type")
            if isinstance(detail, list):
                detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
            rows.append((what, f"HTTP {r.status_code}", str(detail)[:200].replace("|", "\\|")))

        http("GET /search (no token)", c.get("/search", params={"q": "ships"}))
        http("GET /search wrong token", c.get("/search", params={"q": "ships"}, headers={"Authorization": "Bearer x"}))
        http("GET /healthz (no token)", c.get("/healthz"))
        http("GET /search q=''", c.get("/search", params={"q": ""}, headers=h))
        http("GET /search q='   '", c.get("/search", params={"q": "   "}, headers=h))
        http("GET /search q=501 chars", c.get("/search", params={"q": "a" * 501}, headers=h))
        http("GET /search k=0", c.get("/search", params={"q": "x", "k": 0}, headers=h))
        http("GET /search k=abc", c.get("/search", params={"q": "x", "k": "abc"}, headers=h))
        http("GET /search rerank=sar", c.get("/search", params={"q": "x", "rerank": "sar"}, headers=h))
        http("GET /search rerank=bogus", c.get("/search", params={"q": "x", "rerank": "bogus"}, headers=h))
        http("GET /tiles/../../etc/passwd", c.get("/tiles/..%2F..%2Fetc%2Fpasswd", headers=h))
        http("GET /tiles/999999", c.get("/tiles/999999", headers=h))
        http("POST /search/image real PNG as application/octet-stream",
             c.post("/search/image", files={"file": ("t.png", tile, "application/octet-stream")}, headers=h))
        http("POST /search/image TIFF as application/octet-stream",
             c.post("/search/image", files={"file": ("t.tif", buf.getvalue(), "application/octet-stream")}, headers=h))
        http("POST /search/image text as image/png", c.post("/search/image", files={"file": ("a.png", b"hello", "image/png")}, headers=h))
        http("POST /search/image GIF", c.post("/search/image", files={"file": ("a.gif", b"GIF89a" + b"\0" * 30, "image/gif")}, headers=h))
        http("POST /search/image truncated PNG", c.post("/search/image", files={"file": ("t.png", tile[: len(tile) // 2], "image/png")}, headers=h))
        http("POST /search/image empty", c.post("/search/image", files={"file": ("t.png", b"", "image/png")}, headers=h))
        http("POST /search/image no file", c.post("/search/image", headers=h))
        http("POST /search/image 21 MB", c.post("/search/image", files={"file": ("b.png", tile + b"\0" * (21 << 20), "image/png")}, headers=h))

    print("| input | exit / HTTP | message |")
    print("|---|---|---|")
    for what, code, msg in rows:
        print(f"| {what} | {code} | {msg} |")
    bad = [r for r in rows if "TRACEBACK" in r[2]]
    print(f"\n{len(rows)} inputs, {len(bad)} with a traceback", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
