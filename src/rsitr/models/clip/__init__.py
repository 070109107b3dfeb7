"""rsitr's CLIP: model, checkpoint loaders and BPE tokenizer (no open_clip / torchvision)."""
from rsitr.models.clip.loading import infer_config, load_clip, read_state_dict
from rsitr.models.clip.model import CLIP, CONFIGS, CLIPConfig

__all__ = ["CLIP", "CLIPConfig", "CONFIGS", "infer_config", "load_clip", "read_state_dict"]
