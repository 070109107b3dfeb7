"""The training checkpoint's owner type (:class:`rsitr.models.checkpoint.TrainCheckpoint`): one
save, one load that opens the file once, a schema version, validation with one-line errors, and
checkpoints written before the schema existed still load (a file of today's layout rebuilt from
``tests/data/checkpoint_38a6f42.json``: what rsitr at 38a6f42 wrote, tensors aside)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).parent / "data" / "checkpoint_38a6f42.json"


def _old_checkpoint(path: Path) -> dict:
    """Write a checkpoint exactly as rsitr 38a6f42 laid it out (its tensors: a fresh clip:tiny of
    the stored config, same names and shapes); returns the stored record."""
    from rsitr.models.clip import CLIP

    rec = json.loads(FIXTURE.read_text())
    d = {k: v for k, v in rec.items() if k not in ("state_shapes", "_about")}
    torch.manual_seed(0)
    model = CLIP.from_config(dict(rec["backbone"]["info"]["config"]))
    d["state"] = {f"backbone.{k}": v.clone() for k, v in model.state_dict().items()}
    assert {k: list(v.shape) for k, v in d["state"].items()} == rec["state_shapes"]
    assert "schema" not in d["rsitr"]
    torch.save(d, path)
    return d


def test_old_checkpoint_loads_and_rebuilds_its_method(tmp_path):
    from rsitr.methods.factory import load
    from rsitr.models.checkpoint import SCHEMA, TrainCheckpoint

    path = tmp_path / "checkpoint_best.pt"
    old = _old_checkpoint(path)
    ck = TrainCheckpoint.load(path)
    assert ck.schema == SCHEMA and ck.version == old["rsitr"]["version"]  # migrated from schema 0
    assert ck.method_record == {"name": "ftf", "options": old["method"]["options"]} and ck.state_is_full
    assert ck.resume is None and ck.global_step == old["progress"]["global_step"]
    loaded = load(str(tmp_path))  # the run folder, as every command takes it
    assert loaded.method.name == "ftf" and loaded.method.two_stage_params().alpha == 0.3 and loaded.method.opts.k == 4
    got = loaded.backbone.state_dict()
    assert all(torch.equal(got[k[len("backbone."):]], v) for k, v in old["state"].items())


def test_save_keeps_todays_keys_and_adds_the_schema(tmp_path):
    from rsitr.models.checkpoint import SCHEMA, TrainCheckpoint

    old = _old_checkpoint(tmp_path / "old.pt")
    TrainCheckpoint.load(tmp_path / "old.pt").save(tmp_path / "new.pt")
    new = torch.load(tmp_path / "new.pt", weights_only=True)
    assert set(new) == set(old) and new["rsitr"] == {**old["rsitr"], "schema": SCHEMA}
    assert new["method"] == old["method"] and new["progress"] == old["progress"] and new["state"].keys() == old["state"].keys()


def test_load_opens_the_file_once(tmp_path, monkeypatch):
    import rsitr.models.checkpoint as C
    from rsitr.methods.factory import load

    _old_checkpoint(tmp_path / "checkpoint_best.pt")
    opened = []
    real = torch.load

    def counting(f, *a, **kw):
        opened.append(str(f))
        assert kw.get("weights_only") is True
        return real(f, *a, **kw)

    monkeypatch.setattr(C.torch, "load", counting)
    load(str(tmp_path / "checkpoint_best.pt"))
    assert len(opened) == 1, opened


@pytest.mark.parametrize("change, words", [
    (lambda d: d["rsitr"].update(schema=99), "newer rsitr"),
    (lambda d: d["rsitr"].update(schema="1"), "rsitr.schema"),
    (lambda d: d.pop("config"), "'config' is missing"),
    (lambda d: d["method"].update(name=3), "'method.name' must be a str"),
    (lambda d: d.update(state_is_full="yes"), "'state_is_full' must be a bool"),
    (lambda d: d["state"].update({"backbone.x": [1.0]}), "'state' must map names to tensors"),
    (lambda d: d["rsitr"].update(kind="index-manifest"), "not an rsitr training checkpoint"),
])
def test_bad_checkpoint_is_one_line_naming_file_and_entry(tmp_path, change, words):
    from rsitr.models.checkpoint import TrainCheckpoint
    from rsitr.utils.errors import CheckpointError

    path = tmp_path / "bad.pt"
    d = _old_checkpoint(path)
    change(d)
    torch.save(d, path)
    with pytest.raises(CheckpointError) as info:
        TrainCheckpoint.load(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and words in msg, msg
