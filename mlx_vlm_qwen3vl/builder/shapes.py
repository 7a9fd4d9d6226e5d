"""Architectures the builder knows: a tiny test shape and the four released Qwen3-VL sizes.

The released values are those of the `config.json` files of Qwen/Qwen3-VL-{2B,4B,8B,32B}-Instruct
on the Hugging Face Hub, taken from public copies of those files found with a code search (Nov 2026):
the 4B and 32B files verbatim, the 2B text block and its vision sizes, the 8B vision block and text
sizes (its intermediate_size 12288 is Qwen3-8B's, which the 8B builds on). The resulting parameter
counts match the ones the Hub lists (2.13B, 4.44B, 8.77B, 33.4B). All four share head_dim 128,
rope_theta 5e6, rms_norm_eps 1e-6, vocab 151936, max_position_embeddings 262144, interleaved
mrope_section [24, 20, 20], and a vision tower with patch 16, temporal patch 2, merge 2,
2304 position embeddings and gelu_pytorch_tanh. 2B and 4B tie the embeddings, 8B and 32B do not.
"""

from dataclasses import dataclass, field

VOCAB_SIZE = 151936


@dataclass(frozen=True)
class Shape:
    name: str
    text: dict
    vision: dict
    tie_word_embeddings: bool
    default_dtype: str = "bfloat16"


def _text(hidden, layers, heads, kv_heads, intermediate, **extra):
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": 128,
        "intermediate_size": intermediate,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 5000000,
        "mrope_section": [24, 20, 20],
        "max_position_embeddings": 262144,
        "vocab_size": VOCAB_SIZE,
        "attention_bias": False,
        **extra,
    }


def _vision(depth, hidden, heads, intermediate, out_hidden, deepstack, **extra):
    return {
        "depth": depth,
        "hidden_size": hidden,
        "num_heads": heads,
        "intermediate_size": intermediate,
        "out_hidden_size": out_hidden,
        "deepstack_visual_indexes": deepstack,
        "num_position_embeddings": 2304,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "in_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
        **extra,
    }


_SMALL_TOWER = dict(depth=24, hidden=1024, heads=16, intermediate=4096, deepstack=[5, 11, 17])
_LARGE_TOWER = dict(depth=27, hidden=1152, heads=16, intermediate=4304, deepstack=[8, 16, 24])

SHAPES = {
    # Small enough for CPU tests, yet every feature is live: GQA (8 heads over 4 kv heads), three
    # non-zero mrope sections, deepstack on 2 of 3 vision blocks, and a 12x12 position grid that
    # images of other sizes must interpolate from.
    "tiny": Shape(
        name="tiny",
        text=_text(128, 3, 8, 4, 256, head_dim=16, mrope_section=[4, 2, 2]),
        vision=_vision(3, 32, 2, 64, 64, [0, 1], num_position_embeddings=144),
        tie_word_embeddings=True,
        default_dtype="float32",
    ),
    "2b": Shape("2b", _text(2048, 28, 16, 8, 6144), _vision(out_hidden=2048, **_SMALL_TOWER), True),
    "4b": Shape("4b", _text(2560, 36, 32, 8, 9728), _vision(out_hidden=2560, **_SMALL_TOWER), True),
    "8b": Shape("8b", _text(4096, 36, 32, 8, 12288), _vision(out_hidden=4096, **_LARGE_TOWER), False),
    "32b": Shape("32b", _text(5120, 64, 64, 8, 25600), _vision(out_hidden=5120, **_LARGE_TOWER), False),
}


@dataclass
class Architecture:
    """One fully resolved architecture: the shape with the caller's overrides applied."""

    shape: str
    text: dict
    vision: dict
    tie_word_embeddings: bool
    top: dict = field(default_factory=dict)


TOP_LEVEL_KEYS = {"image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"}


def resolve(shape, tie_word_embeddings=None, attention_bias=None, **overrides) -> Architecture:
    """Apply overrides to a named shape.

    `text_config={...}` and `vision_config={...}` update those blocks; a bare key goes to the text
    block if it is a text field, else to the vision block if it is a vision field, else to the
    top level if it is one of TOP_LEVEL_KEYS. Unless given, the vision output width follows the
    text hidden size, since the merger must feed the language model.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    base = SHAPES[shape]
    text, vision, top = dict(base.text), dict(base.vision), {}
    text.update(overrides.pop("text_config", None) or {})
    vision_updates = dict(overrides.pop("vision_config", None) or {})
    for key, value in overrides.items():
        if key in text:
            text[key] = value
        elif key in vision:
            vision_updates[key] = value
        elif key in TOP_LEVEL_KEYS:
            top[key] = value
        else:
            raise TypeError(f"unknown config override {key!r}")
    if "out_hidden_size" not in vision_updates:
        vision_updates["out_hidden_size"] = text["hidden_size"]
    vision.update(vision_updates)
    if attention_bias is not None:
        text["attention_bias"] = bool(attention_bias)
    tied = base.tie_word_embeddings if tie_word_embeddings is None else bool(tie_word_embeddings)
    _check(text, vision)
    return Architecture(shape, text, vision, tied, top)


def _check(text, vision):
    if sum(text["mrope_section"]) != text["head_dim"] // 2:
        raise ValueError("mrope_section must sum to head_dim / 2")
    if text["num_attention_heads"] % text["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    if vision["hidden_size"] % vision["num_heads"]:
        raise ValueError("vision hidden_size must be a multiple of num_heads")
    side = round(vision["num_position_embeddings"] ** 0.5)
    if side * side != vision["num_position_embeddings"]:
        raise ValueError("num_position_embeddings must be a perfect square")
    if any(not 0 <= i < vision["depth"] for i in vision["deepstack_visual_indexes"]):
        raise ValueError("deepstack_visual_indexes must name vision blocks")
    if text["vocab_size"] < VOCAB_SIZE:
        raise ValueError(f"vocab_size must hold the {VOCAB_SIZE}-row Qwen vocabulary")
