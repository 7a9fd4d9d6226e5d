"""Configuration dataclasses, built from a checkpoint's config.json.

Both spellings of the rotary settings load: the original release's
`rope_theta` + `rope_scaling` and transformers 5's `rope_parameters`.
"""

import inspect
from dataclasses import dataclass, field
from typing import List, Optional, Union


class _FromDict:
    @classmethod
    def from_dict(cls, params: dict):
        known = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in known})

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


@dataclass
class TextConfig(_FromDict):
    model_type: str = "qwen3_vl_text"
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: Optional[int] = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    attention_bias: bool = False
    rope_theta: Optional[float] = None
    rope_scaling: Optional[dict] = None
    rope_parameters: Optional[dict] = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        rope = dict(self.rope_scaling or {})
        rope.update(self.rope_parameters or {})
        if self.rope_theta is None:
            self.rope_theta = float(rope.get("rope_theta", 5_000_000.0))
        self.mrope_section: List[int] = list(rope.get("mrope_section", [24, 20, 20]))
        self.mrope_interleaved: bool = bool(rope.get("mrope_interleaved", True))
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim/2 "
                f"= {self.head_dim // 2}; check text_config in config.json"
            )


@dataclass
class VisionConfig(_FromDict):
    model_type: str = "qwen3_vl"
    depth: int = 24
    hidden_size: int = 1024
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4096
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 2048
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: List[int] = field(default_factory=lambda: [5, 11, 17])
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class ModelConfig(_FromDict):
    text_config: Union[TextConfig, dict] = field(default_factory=TextConfig)
    vision_config: Union[VisionConfig, dict] = field(default_factory=VisionConfig)
    model_type: str = "qwen3_vl"
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: Optional[bool] = None
    eos_token_id: Optional[Union[int, List[int]]] = None
    model_path: Optional[str] = None

    def __post_init__(self):
        if self.tie_word_embeddings is None:
            # Like transformers: top level first, then text_config, else untied.
            text = self.text_config if isinstance(self.text_config, dict) else {}
            self.tie_word_embeddings = bool(text.get("tie_word_embeddings", False))
        if isinstance(self.text_config, dict):
            self.text_config = TextConfig.from_dict(self.text_config)
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
