"""Load real CLIP checkpoints into :class:`rsitr.models.clip.model.CLIP`, exactly.

Supported sources (architecture inferred from the tensors, never from the file name):

* **open_clip state dicts** - RemoteCLIP / GeoRSCLIP releases and open_clip training
  checkpoints (``{"state_dict": ...}`` with or without a DDP ``module.`` prefix), as ``.pt`` /
  ``.bin`` / ``.safetensors``;
* **OpenAI CLIP** ``.pt`` - a plain state dict, or the released TorchScript archive. The archive
  is read by a restricted unpickler of our own that rebuilds only tensors and plain containers
  (no code in the archive is run, no arbitrary global is resolved);
* **Hugging Face CLIP directories** - ``config.json`` + ``model.safetensors`` /
  ``pytorch_model.bin`` (``CLIPModel`` layout), mapped onto the OpenAI key names;
* **open_clip hub directories** - ``open_clip_config.json`` + ``open_clip_model.safetensors`` /
  ``open_clip_pytorch_model.bin``.

Every pickle goes through ``torch.load(weights_only=True)``.

Activation: OpenAI's weights were trained with QuickGELU, open_clip's ``ViT-B-32`` config (the
one RemoteCLIP and GeoRSCLIP load their weights into) uses nn.GELU. ``quick_gelu=None`` picks
QuickGELU for OpenAI TorchScript archives, OpenAI-style state dicts (which carry
``input_resolution``) and HF configs with ``hidden_act="quick_gelu"``; GELU otherwise. Pass
``quick_gelu=True/False`` to override (the weights cannot tell).
"""
from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from pathlib import Path

import torch

from rsitr.models.clip.model import CLIP, CLIPConfig
from rsitr.utils.errors import CheckpointError
from rsitr.utils.io import sha256_file
from rsitr.utils.weights import load_safetensors, load_torch_file

log = logging.getLogger(__name__)

# Non-parameter entries OpenAI/open_clip files may carry; dropped on load.
_IGNORED = re.compile(r"(^|\.)(attn_mask|input_resolution|context_length|vocab_size|position_ids)$")


# -- TorchScript archives ---------------------------------------------------------------------
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptModule:
    """Stand-in for a ``__torch__.*`` class in a TorchScript archive: keeps its attributes."""

    def __init__(self, *args, **kwargs):
        self.attrs: dict = {}

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.attrs = dict(state)
        elif isinstance(state, tuple) and state and isinstance(state[0], dict):
            self.attrs = dict(state[0])
        else:
            self.attrs = {}


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset, size, stride, *_ignored):
    # ``storage`` is the flat tensor persistent_load returned for the archive's data/<key>
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _identity_list(*args):
    return list(args[0]) if len(args) == 1 else list(args)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh, zf: zipfile.ZipFile, prefix: str):
        super().__init__(fh)
        self._zf, self._prefix = zf, prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _ScriptModule
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module == "torch.jit._pickle" and name.startswith("build_"):
            return _identity_list
        raise CheckpointError(f"TorchScript archive refers to {module}.{name}, which rsitr does not load (only tensors and containers)")

    def persistent_load(self, pid):
        kind, stype, key, _location, numel = pid
        if kind != "storage":
            raise CheckpointError(f"unexpected persistent id {kind!r} in TorchScript archive")
        dtype = stype.dtype
        raw = bytearray(self._zf.read(f"{self._prefix}data/{key}"))
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return t[:numel]


def _flatten(obj: _ScriptModule, prefix: str, out: dict) -> None:
    for k, v in obj.attrs.items():
        if isinstance(v, torch.Tensor):
            out[prefix + k] = v
        elif isinstance(v, _ScriptModule):
            _flatten(v, f"{prefix}{k}.", out)


def _is_torchscript(zf: zipfile.ZipFile) -> tuple[bool, str]:
    names = zf.namelist()
    data = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not data:
        return False, ""
    prefix = data[0][: -len("data.pkl")]
    return any(n.startswith(prefix + "code/") for n in names) or (prefix + "constants.pkl") in names, prefix


def _read_torchscript(path: Path, zf: zipfile.ZipFile, prefix: str) -> dict[str, torch.Tensor]:
    with zf.open(prefix + "data.pkl") as fh:
        import io

        root = _RestrictedUnpickler(io.BytesIO(fh.read()), zf, prefix).load()
    if not isinstance(root, _ScriptModule):
        raise CheckpointError(f"{path}: TorchScript archive without a module at its root")
    out: dict[str, torch.Tensor] = {}
    _flatten(root, "", out)
    return {k: v.clone() for k, v in out.items()}


# -- raw state dicts ------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors of a checkpoint file plus its container kind (``torchscript``/``pickle``/``safetensors``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.suffix == ".safetensors":
        return load_safetensors(path, what="checkpoint"), "safetensors"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            is_ts, prefix = _is_torchscript(zf)
            if is_ts:
                return _read_torchscript(path, zf, prefix), "torchscript"
    obj = load_torch_file(path, what="checkpoint")
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values() if not isinstance(v, (int, float))):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, "pickle"


# -- Hugging Face layout ------------------------------------------------------------------------
_HF_BLOCK = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def hf_to_openai(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a Hugging Face ``CLIPModel`` state dict onto OpenAI/open_clip key names."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        k = k.removeprefix("clip.").removeprefix("model.")
        if _IGNORED.search(k):
            continue
        m = re.match(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m:
            tower, i, sub, wb = m.groups()
            base = ("transformer" if tower == "text" else "visual.transformer") + f".resblocks.{i}."
            if sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((base, wb), {})[sub[-6]] = v
                continue
            if sub not in _HF_BLOCK:
                raise CheckpointError(f"unknown Hugging Face CLIP tensor {k}")
            out[base + _HF_BLOCK[sub] + "." + wb] = v
            continue
        simple = {
            "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
            "text_model.embeddings.position_embedding.weight": "positional_embedding",
            "text_model.final_layer_norm.weight": "ln_final.weight",
            "text_model.final_layer_norm.bias": "ln_final.bias",
            "vision_model.embeddings.class_embedding": "visual.class_embedding",
            "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
            "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
            "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
            "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
            "vision_model.post_layernorm.weight": "visual.ln_post.weight",
            "vision_model.post_layernorm.bias": "visual.ln_post.bias",
            "logit_scale": "logit_scale",
        }
        if k in simple:
            out[simple[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
        elif k == "visual_projection.weight":
            out["visual.proj"] = v.t().contiguous()
        else:
            raise CheckpointError(f"unknown Hugging Face CLIP tensor {k}")
    for (base, wb), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{base}: incomplete q/k/v projections in Hugging Face checkpoint")
        out[f"{base}attn.in_proj_{wb}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# -- architecture inference -----------------------------------------------------------------------
def infer_config(sd: dict[str, torch.Tensor], *, quick_gelu: bool = False, vision_heads: int | None = None, text_heads: int | None = None) -> CLIPConfig:
    """Architecture from tensor shapes (OpenAI key names). Head counts follow CLIP's 64-wide
    heads unless given (HF configs give them)."""
    if "visual.conv1.weight" not in sd:
        if any(k.startswith("visual.layer1") for k in sd):
            raise CheckpointError("ResNet CLIP image towers (RN50...) are not supported; use a ViT checkpoint")
        raise CheckpointError("not a CLIP checkpoint: no visual.conv1.weight (keys start with " + ", ".join(sorted(sd)[:5]) + ")")

    def count(prefix: str) -> int:
        idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        if idx != set(range(len(idx))):
            raise CheckpointError(f"non-contiguous layers under {prefix}: {sorted(idx)}")
        return len(idx)

    vw = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    n_pos = sd["visual.positional_embedding"].shape[0]
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid + 1 != n_pos:
        raise CheckpointError(f"visual.positional_embedding has {n_pos} rows, not a square grid + 1")
    tw = sd["ln_final.weight"].shape[0]
    return CLIPConfig(
        embed_dim=sd["text_projection"].shape[1],
        image_size=grid * patch,
        patch_size=patch,
        vision_width=vw,
        vision_layers=count("visual.transformer.resblocks."),
        vision_heads=vision_heads or max(1, vw // 64),
        vision_mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vw,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        text_width=tw,
        text_layers=count("transformer.resblocks."),
        text_heads=text_heads or max(1, tw // 64),
        text_mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / tw,
        quick_gelu=quick_gelu,
    )


def _find(dir_: Path, names: list[str]) -> Path | None:
    return next((dir_ / n for n in names if (dir_ / n).exists()), None)


def load_clip(path: str | Path, device: str = "cpu", *, quick_gelu: bool | None = None, dtype: torch.dtype = torch.float32) -> CLIP:
    """Load a CLIP checkpoint (see the module docstring for the formats)."""
    path = Path(path)
    vision_heads = text_heads = None
    hidden_act = None
    if path.is_dir():
        hf_cfg = path / "config.json"
        oc_cfg = path / "open_clip_config.json"
        weights = _find(path, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]) if oc_cfg.exists() else None
        if weights is None:
            weights = _find(path, ["model.safetensors", "pytorch_model.bin"])
            if weights is None or not hf_cfg.exists():
                runs = [str(c.parent) for pattern in ("*/checkpoint_*.pt", "*/*/checkpoint_*.pt") for c in path.glob(pattern)]
                if runs:
                    inside = sorted(dict.fromkeys(runs))
                    raise CheckpointError(f"{path}: not a model but a folder of rsitr runs; pass one run folder as --checkpoint: "
                                          + ", ".join(inside[:5]) + (f" (and {len(inside) - 5} more)" if len(inside) > 5 else ""))
                raise CheckpointError(f"{path}: a CLIP directory needs config.json + model.safetensors/pytorch_model.bin (Hugging Face) or open_clip_config.json + open_clip_model.safetensors")
            cfg = json.loads(hf_cfg.read_text())
            tc, vc = cfg.get("text_config", {}), cfg.get("vision_config", {})
            vision_heads, text_heads = vc.get("num_attention_heads"), tc.get("num_attention_heads")
            hidden_act = tc.get("hidden_act", "quick_gelu")
            for c, tower in ((tc, "text"), (vc, "vision")):
                eps = c.get("layer_norm_eps", 1e-5)
                if abs(eps - 1e-5) > 1e-12:
                    raise CheckpointError(f"{path}: {tower} layer_norm_eps {eps} differs from CLIP's 1e-5")
            if hidden_act not in ("quick_gelu", "gelu"):
                raise CheckpointError(f"{path}: unsupported activation {hidden_act!r}")
        else:
            oc = json.loads(oc_cfg.read_text()).get("model_cfg", {})
            hidden_act = "quick_gelu" if oc.get("quick_gelu") else "gelu"
            vision_heads = oc.get("vision_cfg", {}).get("heads")
            text_heads = oc.get("text_cfg", {}).get("heads")
        sd, kind = read_state_dict(weights)
        source = weights
    else:
        sd, kind = read_state_dict(path)
        source = path
    if any(k.startswith(("text_model.", "vision_model.")) or k.startswith(("clip.text_model", "model.text_model")) for k in sd):
        sd = hf_to_openai(sd)
    if quick_gelu is None:
        if hidden_act is not None:
            quick_gelu = hidden_act == "quick_gelu"
        else:
            quick_gelu = kind == "torchscript" or "input_resolution" in sd
    sd = {k: v for k, v in sd.items() if not _IGNORED.search(k)}
    cfg = infer_config(sd, quick_gelu=quick_gelu, vision_heads=vision_heads, text_heads=text_heads)
    name = next((n for n, c in _named().items() if c == CLIPConfig(**{**cfg.to_dict(), "quick_gelu": False})), "custom")
    model = CLIP(cfg, name=name, weights={"path": str(source), "sha256": sha256_file(source), "format": kind})
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    if "logit_scale" in sd and sd["logit_scale"].ndim == 1:  # some exports store it as [1]
        sd["logit_scale"] = sd["logit_scale"].reshape(())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint does not match the inferred {name} architecture (missing {missing[:5]}, unexpected {unexpected[:5]})")
    log.info("loaded CLIP %s from %s (%s, quick_gelu=%s)", name, source, kind, quick_gelu)
    return model.to(device=device, dtype=dtype).eval()


def _named() -> dict[str, CLIPConfig]:
    from rsitr.models.clip.model import CONFIGS

    return CONFIGS
