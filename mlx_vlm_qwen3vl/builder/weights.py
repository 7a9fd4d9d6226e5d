"""Every parameter of `Qwen3VLForConditionalGeneration`, with its Hugging Face name, shape and a
seeded random init.

Default inits (ones for norms, zeros for biases) make weak test fixtures: a bug that drops a bias or
a norm weight goes unnoticed. Here every tensor is random. Matrices are N(0, 1/fan_in) so each layer
keeps activations O(1); the projections that write into a residual stream are shrunk by
1/sqrt(2 * depth) so the stream stays O(1) over the whole stack.
"""

import math
import zlib
from dataclasses import dataclass, replace

import numpy as np

from .tokenizer import TOKENIZER_SIZE

NORM_SPREAD = 0.1
BIAS_STD = 0.02
POSITION_STD = 0.5
# With tied weights the input token's embedding, left in the residual stream, scores that same token
# at the output, and a random model repeats itself forever; so tied embeddings are small next to
# what the layers add. An untied lm_head has no such bias and unit-scale embeddings work best.
TIED_EMBEDDING_STD = 0.01
UNTIED_EMBEDDING_STD = 1.0


@dataclass(frozen=True)
class TensorSpec:
    """A tensor drawn as mean + std * N(0, 1)."""

    name: str
    shape: tuple
    std: float
    mean: float = 0.0
    # Rows from here on are zero: the embedding rows past the tokenizer's last id are padding, and
    # zero output rows keep a random model from generating ids that decode to nothing.
    live_rows: int | None = None

    @property
    def size(self):
        return math.prod(self.shape)


def _matrix(name, shape, fan_in, gain=1.0):
    return TensorSpec(name, tuple(shape), gain / math.sqrt(fan_in))


def _bias(name, size):
    return TensorSpec(name, (size,), BIAS_STD)


def _linear(prefix, out_features, in_features, bias, gain=1.0):
    yield _matrix(f"{prefix}.weight", (out_features, in_features), in_features, gain)
    if bias:
        yield _bias(f"{prefix}.bias", out_features)


def _norm(prefix, size, bias=False):
    yield TensorSpec(f"{prefix}.weight", (size,), NORM_SPREAD, mean=1.0)
    if bias:
        yield _bias(f"{prefix}.bias", size)


def text_tensors(text, tie_word_embeddings):
    prefix = "model.language_model"
    hidden, head_dim = text["hidden_size"], text["head_dim"]
    q_width = text["num_attention_heads"] * head_dim
    kv_width = text["num_key_value_heads"] * head_dim
    bias = text["attention_bias"]
    residual_gain = 1 / math.sqrt(2 * text["num_hidden_layers"])

    vocab = text["vocab_size"]
    embedding_std = TIED_EMBEDDING_STD if tie_word_embeddings else UNTIED_EMBEDDING_STD
    yield TensorSpec(
        f"{prefix}.embed_tokens.weight", (vocab, hidden), embedding_std, live_rows=TOKENIZER_SIZE
    )
    for i in range(text["num_hidden_layers"]):
        layer = f"{prefix}.layers.{i}"
        yield from _norm(f"{layer}.input_layernorm", hidden)
        yield from _linear(f"{layer}.self_attn.q_proj", q_width, hidden, bias)
        yield from _linear(f"{layer}.self_attn.k_proj", kv_width, hidden, bias)
        yield from _linear(f"{layer}.self_attn.v_proj", kv_width, hidden, bias)
        yield from _linear(f"{layer}.self_attn.o_proj", hidden, q_width, bias, residual_gain)
        yield from _norm(f"{layer}.self_attn.q_norm", head_dim)
        yield from _norm(f"{layer}.self_attn.k_norm", head_dim)
        yield from _norm(f"{layer}.post_attention_layernorm", hidden)
        yield from _linear(f"{layer}.mlp.gate_proj", text["intermediate_size"], hidden, False)
        yield from _linear(f"{layer}.mlp.up_proj", text["intermediate_size"], hidden, False)
        yield from _linear(f"{layer}.mlp.down_proj", hidden, text["intermediate_size"], False, residual_gain)
    yield from _norm(f"{prefix}.norm", hidden)
    if not tie_word_embeddings:
        yield replace(_matrix("lm_head.weight", (vocab, hidden), hidden), live_rows=TOKENIZER_SIZE)


def _merger(prefix, vision, postshuffle_norm):
    merged = vision["hidden_size"] * vision["spatial_merge_size"] ** 2
    yield from _norm(f"{prefix}.norm", merged if postshuffle_norm else vision["hidden_size"], bias=True)
    yield from _linear(f"{prefix}.linear_fc1", merged, merged, True)
    yield from _linear(f"{prefix}.linear_fc2", vision["out_hidden_size"], merged, True)


def vision_tensors(vision):
    prefix = "model.visual"
    hidden, depth = vision["hidden_size"], vision["depth"]
    patch = (vision["in_channels"], vision["temporal_patch_size"], vision["patch_size"], vision["patch_size"])
    residual_gain = 1 / math.sqrt(2 * depth)

    yield _matrix(f"{prefix}.patch_embed.proj.weight", (hidden, *patch), math.prod(patch))
    yield _bias(f"{prefix}.patch_embed.proj.bias", hidden)
    yield TensorSpec(f"{prefix}.pos_embed.weight", (vision["num_position_embeddings"], hidden), POSITION_STD)
    for i in range(depth):
        block = f"{prefix}.blocks.{i}"
        yield from _norm(f"{block}.norm1", hidden, bias=True)
        yield from _norm(f"{block}.norm2", hidden, bias=True)
        yield from _linear(f"{block}.attn.qkv", 3 * hidden, hidden, True)
        yield from _linear(f"{block}.attn.proj", hidden, hidden, True, residual_gain)
        yield from _linear(f"{block}.mlp.linear_fc1", vision["intermediate_size"], hidden, True)
        yield from _linear(
            f"{block}.mlp.linear_fc2", hidden, vision["intermediate_size"], True, residual_gain
        )
    yield from _merger(f"{prefix}.merger", vision, postshuffle_norm=False)
    for j in range(len(vision["deepstack_visual_indexes"])):
        yield from _merger(f"{prefix}.deepstack_merger_list.{j}", vision, postshuffle_norm=True)


def all_tensors(arch):
    """Every tensor of the checkpoint, in module order."""
    return [*text_tensors(arch.text, arch.tie_word_embeddings), *vision_tensors(arch.vision)]


def generate(spec, seed, chunk_elements=1 << 24):
    """Yield the float32 values of `spec`, flattened, in chunks of at most `chunk_elements`.

    Each tensor draws from its own stream, keyed by the seed and its name, so values do not depend
    on the order tensors are written in or how they are sharded, and chunking does not change them.
    """
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    live = spec.size if spec.live_rows is None else spec.live_rows * math.prod(spec.shape[1:])
    for start in range(0, spec.size, chunk_elements):
        n = min(spec.size - start, chunk_elements)
        values = rng.standard_normal(n, dtype=np.float32)
        values *= np.float32(spec.std)
        values += np.float32(spec.mean)
        values[max(live - start, 0) :] = 0
        yield values
