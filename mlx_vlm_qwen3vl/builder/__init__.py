"""Seeded random-weight Qwen3-VL checkpoints with the real tokenizer, for tests and benchmarks."""

from .checkpoint import build_checkpoint, checkpoint_bytes
from .shapes import SHAPES

__all__ = ["build_checkpoint", "checkpoint_bytes", "SHAPES"]
