"""Short names for the Qwen3-VL checkpoints, with their generation defaults.

Sampling defaults are the ones Qwen publishes for Qwen3-VL: Instruct models
temperature 0.7, top_p 0.8, top_k 20; Thinking models temperature 1.0,
top_p 0.95, top_k 20.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
EOS_TOKEN_IDS = (151645, 151643)
DEFAULT_PROMPT = "Describe this image."

INSTRUCT_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
THINKING_SAMPLING = {"temperature": 1.0, "top_p": 0.95, "top_k": 20}

SIZES = ("2B", "4B", "8B", "32B")
QUANTIZED_BITS = (4, 8)


@dataclass(frozen=True)
class Alias:
    name: str
    checkpoint: str
    default_prompt: str = DEFAULT_PROMPT
    eos_tokens: Tuple[str, ...] = EOS_TOKENS
    eos_token_ids: Tuple[int, ...] = EOS_TOKEN_IDS
    sampling: Dict[str, float] = field(default_factory=dict)


def qwen3_vl_aliases() -> List[Alias]:
    table = []
    for size in SIZES:
        for variant, sampling in (("Instruct", INSTRUCT_SAMPLING), ("Thinking", THINKING_SAMPLING)):
            stem = f"qwen3-vl-{size.lower()}" + ("-thinking" if variant == "Thinking" else "")
            repo = f"Qwen3-VL-{size}-{variant}"
            table.append(Alias(stem, f"Qwen/{repo}", sampling=dict(sampling)))
            for bits in QUANTIZED_BITS:
                table.append(
                    Alias(f"{stem}-{bits}bit", f"mlx-community/{repo}-{bits}bit", sampling=dict(sampling))
                )
    return table
