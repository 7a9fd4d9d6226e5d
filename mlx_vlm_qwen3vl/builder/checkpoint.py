"""`build_checkpoint`: a complete Qwen3-VL checkpoint directory with seeded random weights."""

import json
from importlib import resources
from pathlib import Path

from . import metadata
from .safetensors_writer import DTYPES, write_weights
from .shapes import SHAPES, resolve
from .tokenizer import tokenizer_config, write_tokenizer_json
from .weights import all_tensors

# Real checkpoints ship shards of a few GB; small shapes fit in one file.
SHARD_BYTES = 4 << 30


def chat_template() -> str:
    return resources.files(__package__).joinpath("chat_template.jinja").read_text()


def _remove_old_weights(out):
    """Drop weights a previous build left here: stale shards next to new ones would be loaded."""
    for path in [
        *out.glob("model-*-of-*.safetensors"),
        out / "model.safetensors",
        out / "model.safetensors.index.json",
    ]:
        path.unlink(missing_ok=True)


def _write_json(path, data):
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def build_checkpoint(
    out_dir,
    shape="tiny",
    seed=0,
    dtype=None,
    tie_word_embeddings=None,
    attention_bias=None,
    **config_overrides,
) -> Path:
    """Write a Qwen3-VL checkpoint with random weights to `out_dir` and return its path.

    `shape` is "tiny" or a released size ("2b", "4b", "8b", "32b"). The same seed gives the same
    bytes. `dtype` is "float32" or "bfloat16" (default: float32 for tiny, bfloat16 otherwise).
    `tie_word_embeddings` and `attention_bias` default to the shape's real values; any other
    keyword overrides a config field (see `shapes.resolve`).
    """
    arch = resolve(shape, tie_word_embeddings, attention_bias, **config_overrides)
    dtype = dtype or SHAPES[shape].default_dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_old_weights(out)

    template = chat_template()
    _write_json(out / "config.json", metadata.model_config(arch, dtype, seed))
    _write_json(out / "generation_config.json", metadata.generation_config())
    _write_json(out / "preprocessor_config.json", metadata.preprocessor_config(arch))
    _write_json(out / "video_preprocessor_config.json", metadata.video_preprocessor_config(arch))
    _write_json(out / "tokenizer_config.json", tokenizer_config(template))
    write_tokenizer_json(out / "tokenizer.json")
    (out / "chat_template.jinja").write_text(template)
    (out / "README.md").write_text(metadata.readme(arch, dtype, seed))
    write_weights(out, all_tensors(arch), seed, dtype, SHARD_BYTES)
    return out


def checkpoint_bytes(
    shape="tiny", dtype=None, tie_word_embeddings=None, attention_bias=None, **config_overrides
):
    """How many bytes of weights `build_checkpoint` would write with these arguments."""
    arch = resolve(shape, tie_word_embeddings, attention_bias, **config_overrides)
    itemsize = DTYPES[dtype or SHAPES[shape].default_dtype][1]
    return sum(spec.size for spec in all_tensors(arch)) * itemsize
