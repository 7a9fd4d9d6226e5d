"""Qwen3-VL for mlx-vlm, as a plugin. Importing this package is cheap: nothing heavy loads here."""

__version__ = "0.1.0"
