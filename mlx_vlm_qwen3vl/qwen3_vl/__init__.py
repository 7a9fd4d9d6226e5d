"""Qwen3-VL for mlx-vlm: the module `mlx_vlm.utils.load_model` imports for
`model_type == "qwen3_vl"`."""

from .config import ModelConfig, TextConfig, VisionConfig
from .language import LanguageModel
from .model import Model
from .vision import VisionModel

__all__ = ["Model", "ModelConfig", "TextConfig", "VisionConfig", "LanguageModel", "VisionModel"]
