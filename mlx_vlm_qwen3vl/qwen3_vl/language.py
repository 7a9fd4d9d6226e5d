"""Qwen3-VL language model: a Qwen3 decoder (GQA attention with per-head
q/k RMSNorm, SwiGLU MLP) with interleaved 3D rotary positions and DeepStack
visual features added after the first decoder layers.

Positions, per row, count only real tokens. A row's rope delta (from the
prompt's images and videos) moves every later token: the token at real offset
`n` sits at `n + delta`. The delta is kept on the model between calls so the
host's decode loop, which passes only the new token and the cache, continues
from the prompt. Batched caches (`BatchKVCache`) carry per-row offsets and
left padding themselves; plain caches fed a left-padded batch get the padding
from the 2D attention mask of the first call, and the model remembers which
keys are padding for every later step.
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_vlm.models.base import (
    LanguageModelOutput,
    cache_position_offset,
    create_attention_mask,
    kv_sequence_length,
)
from mlx_vlm.models.cache import create_causal_mask

from . import huge_pages
from .config import ModelConfig, TextConfig
from .decode_layer import decode_layer
from .decoder_ops import RMSNorm, attention, norm_rope, silu_mul
from .layers import Embedding, Linear, products
from .rope import InterleavedMRoPE, plain_offset, rope_index


class Attention(nn.Module):
    def __init__(self, args: TextConfig):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        bias = args.attention_bias
        self.q_proj = Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.rope = InterleavedMRoPE(self.head_dim, args.rope_theta, args.mrope_section)

    def __call__(self, x, mask=None, cache=None, positions=None) -> mx.array:
        B, L, _ = x.shape
        if positions is None:
            positions = cache.offset if cache is not None else 0
        q, k, v = products((self.q_proj, self.k_proj, self.v_proj), x)
        q = norm_rope(q, self.q_norm, self.rope, positions, self.n_heads)
        k = norm_rope(k, self.k_norm, self.rope, positions, self.n_kv_heads)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return self.o_proj(self.attend(q, k, v, mask, cache))

    def attend(self, q, k, v, mask=None, cache=None) -> mx.array:
        """The new queries [B, H, L, D] over the cache after adding k and v to
        it, as [B, L, H * D] (before o_proj)."""
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if isinstance(mask, mx.array):
            mask = mask[..., : kv_sequence_length(k)]
        return attention(q, k, v, cache, self.scale, mask)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden_dim, bias=False)
        self.up_proj = Linear(dim, hidden_dim, bias=False)
        self.down_proj = Linear(hidden_dim, dim, bias=False)

    def __call__(self, x) -> mx.array:
        gate, up = products((self.gate_proj, self.up_proj), x)
        return self.down_proj(silu_mul(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, args: TextConfig):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, mask=None, cache=None, positions=None) -> mx.array:
        fused = decode_layer(self, x, mask, cache, positions)
        if fused is not None:
            return fused
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, positions)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3VLTextModel(nn.Module):
    def __init__(self, args: TextConfig):
        super().__init__()
        if args.hidden_act != "silu":
            raise ValueError(
                f"text_config.hidden_act {args.hidden_act!r} is not supported; "
                "Qwen3-VL uses 'silu'"
            )
        rope = {**(args.rope_scaling or {}), **(args.rope_parameters or {})}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(
                f"text_config rope_type {rope_type!r} is not supported; Qwen3-VL uses "
                "'default' (interleaved mRoPE without scaling)"
            )
        if not args.mrope_interleaved:
            raise ValueError(
                "text_config mrope_interleaved is false (Qwen2-VL's chunked layout); "
                "Qwen3-VL checkpoints use the interleaved layout"
            )
        self.args = args
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self,
        inputs: Optional[mx.array] = None,
        inputs_embeds: Optional[mx.array] = None,
        mask=None,
        cache=None,
        positions=None,
        deepstack_visual_embeds: Optional[mx.array] = None,
    ) -> mx.array:
        """Hidden states after the final norm. `positions` is an offset or
        the (cos, sin) of explicit position ids (`InterleavedMRoPE.angles`);
        `deepstack_visual_embeds` is [B, L, n, D], zero outside visual tokens,
        added after layer i < n."""
        h = self.embed_tokens(inputs) if inputs_embeds is None else inputs_embeds
        if cache is None:
            cache = [None] * len(self.layers)
        if mask is None:
            mask = create_attention_mask(h, cache[0])
        n_deepstack = 0 if deepstack_visual_embeds is None else deepstack_visual_embeds.shape[2]
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            h = layer(h, mask, c, positions)
            if i < n_deepstack:
                h = h + deepstack_visual_embeds[:, :, i].astype(h.dtype)
        return self.norm(h)


class LanguageModel(nn.Module):
    def __init__(self, args: TextConfig, config: Optional[ModelConfig] = None):
        super().__init__()
        self.args = args
        self.config = config
        self.model_type = args.model_type
        self.model = Qwen3VLTextModel(args)
        self.tie_word_embeddings = bool(config.tie_word_embeddings) if config else False
        if not self.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        # Generation state (see module docstring).
        self._rope_deltas = None
        self._position_ids = None
        self._valid_keys = None

    @property
    def layers(self):
        return self.model.layers

    @property
    def head_dim(self):
        return self.args.head_dim

    @property
    def n_kv_heads(self):
        return self.args.num_key_value_heads

    def get_rope_index(self, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
        """3D position ids [3, B, L] and rope deltas [B, 1] of a whole prompt."""
        if self.config is None:
            raise ValueError("get_rope_index needs the model config (token ids, merge size)")
        return rope_index(
            input_ids,
            image_grid_thw,
            video_grid_thw,
            attention_mask,
            image_token_id=self.config.image_token_id,
            video_token_id=self.config.video_token_id,
            spatial_merge_size=self.config.vision_config.spatial_merge_size,
        )

    def __call__(
        self,
        inputs: Optional[mx.array] = None,
        inputs_embeds: Optional[mx.array] = None,
        mask=None,
        cache=None,
        position_ids: Optional[mx.array] = None,
        rope_deltas: Optional[mx.array] = None,
        deepstack_visual_embeds: Optional[mx.array] = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> LanguageModelOutput:
        huge_pages.place(self)
        h = self.model.embed_tokens(inputs) if inputs_embeds is None else inputs_embeds
        B, L = h.shape[:2]
        first = cache[0] if cache else None
        start = cache_position_offset(first)
        batch_cache = first is not None and isinstance(first.offset, mx.array)

        key_mask = _as_key_mask(mask, B)
        custom_mask = mask if key_mask is None else None  # 4D array or "causal"
        if start == 0 and position_ids is None and rope_deltas is None:
            self._rope_deltas = None  # a fresh prompt with no vision metadata
        if rope_deltas is not None:
            self._rope_deltas = rope_deltas
        if batch_cache:
            key_mask = None  # the batch cache holds the padding
        else:
            self._update_valid_keys(key_mask, start, L, B)

        if position_ids is not None:
            positions = self._explicit_positions(position_ids, start, B, L)
        else:
            positions = self._implicit_positions(first, start, batch_cache, key_mask, B, L)

        if custom_mask is None:
            mask = self._attention_mask(h, first, start, batch_cache)
        else:
            mask = custom_mask

        deepstack = _window(deepstack_visual_embeds, start, B, L, batch_cache)
        out = self.model(
            inputs_embeds=h,
            mask=mask,
            cache=cache,
            positions=positions,
            deepstack_visual_embeds=deepstack,
        )
        if logits_to_keep:
            out = out[:, -logits_to_keep:]
        if self.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(out)
        else:
            logits = self.lm_head(out)
        # The host takes log-probabilities in the logits' dtype: in bfloat16
        # near-tied top tokens collapse to the lowest id (transformers also
        # picks tokens from float32 logits).
        return LanguageModelOutput(logits=logits.astype(mx.float32))

    # ------------------------------------------------------------ positions
    def _explicit_positions(self, position_ids, start, B, L):
        if position_ids.ndim == 2:
            position_ids = mx.broadcast_to(position_ids[None], (3,) + position_ids.shape)
        if position_ids.shape[-1] > L:
            # The host passes the whole prompt's ids with each prefill chunk.
            position_ids = position_ids[..., start : start + L]
        if position_ids.shape[1] != B:
            raise ValueError(
                f"position_ids have {position_ids.shape[1]} rows for a batch of {B}; "
                "every row needs its position ids"
            )
        if position_ids.shape[-1] != L:
            raise ValueError(
                f"position_ids cover {position_ids.shape[-1]} tokens from offset {start} "
                f"but {L} tokens were given; pass the prompt's full position_ids"
            )
        offset = plain_offset(position_ids)
        if offset is not None:
            return offset  # text: the fast rotation
        return self.layers[0].self_attn.rope.angles(position_ids)

    def _implicit_positions(self, first, start, batch_cache, key_mask, B, L):
        """Text positions: real offset + rope delta, per row."""
        if batch_cache:
            offset = first.offset  # real tokens so far per row (negative = padding to come)
        elif self._valid_keys is not None:
            past = self._valid_keys[:, :start]
            offset = past.astype(mx.int32).sum(axis=1)
        else:
            offset = start
        delta = self._rope_deltas
        if delta is not None:
            delta = delta.reshape(-1).astype(mx.int32)
            if delta.shape[0] not in (1, B):
                raise ValueError(
                    f"rope_deltas has {delta.shape[0]} rows for a batch of {B}; "
                    "pass one delta per row"
                )
            offset = offset + delta
        if isinstance(offset, mx.array) and offset.size == 1:
            offset = offset.reshape(())
        if key_mask is not None and not bool(key_mask.all()):
            # Left-padded prefill: count real tokens in this window.
            steps = mx.cumsum(key_mask.astype(mx.int32), axis=1) - 1
            ids = mx.reshape(offset, (-1, 1)) + steps
            ids = mx.broadcast_to(ids[None], (3, B, L))
            return self.layers[0].self_attn.rope.angles(ids)
        if isinstance(offset, mx.array) and offset.ndim == 1 and offset.shape[0] != B:
            offset = mx.broadcast_to(offset, (B,))
        return offset

    # ------------------------------------------------------------ masks
    def _update_valid_keys(self, key_mask, start, L, B):
        """Track padding keys for plain caches across calls."""
        if key_mask is not None and key_mask.shape[1] == start + L:
            new = key_mask
        elif key_mask is not None and key_mask.shape[1] == L:
            prior = self._valid_keys
            if prior is None:
                prior = mx.ones((B, start), dtype=mx.bool_)
            new = mx.concatenate([prior[:, :start], key_mask], axis=1)
        elif key_mask is not None:
            raise ValueError(
                f"attention mask covers {key_mask.shape[1]} tokens; expected {L} "
                f"(this call) or {start + L} (all tokens so far)"
            )
        elif start > 0 and self._valid_keys is not None:
            ones = mx.ones((self._valid_keys.shape[0], L), dtype=mx.bool_)
            new = mx.concatenate([self._valid_keys[:, :start], ones], axis=1)
        else:
            new = None
        if new is not None and bool(new.all()):
            new = None
        self._valid_keys = new

    def _attention_mask(self, h, first, start, batch_cache):
        if batch_cache or self._valid_keys is None:
            return create_attention_mask(h, first)
        L = h.shape[1]
        causal = create_causal_mask(L, start)
        return causal[None, None] & self._valid_keys[:, None, None, : start + L]


def _as_key_mask(mask, B):
    """A 2D [B, K] attention mask (1 = real token) as bool, else None."""
    if isinstance(mask, mx.array) and mask.ndim == 2:
        if mask.shape[0] != B:
            raise ValueError(f"attention mask has {mask.shape[0]} rows for a batch of {B}")
        return mask.astype(mx.bool_)
    return None


def _window(features, start, B, L, batch_cache):
    """The [B, L, ...] slice of deepstack features for this call. The host
    passes them whole with every prefill chunk of one prompt (sliced at the
    cache offset here) or already sliced (batches)."""
    if features is None:
        return None
    if features.shape[0] != B:
        raise ValueError(
            f"deepstack_visual_embeds have {features.shape[0]} rows for a batch of {B}; "
            "every row needs its (possibly zero) deepstack features"
        )
    if features.shape[1] == L:
        return features
    if not batch_cache and start + L <= features.shape[1]:
        return features[:, start : start + L]
    # Features of only the uncached suffix of a prompt (the host's prompt-cache
    # reuse): it allows that only for text, whose deepstack is zero.
    if not bool(mx.any(features)):
        return None
    raise ValueError(
        f"deepstack_visual_embeds cover {features.shape[1]} tokens, which does not "
        f"match this call ({L} tokens from offset {start})"
    )
