"""The decoder's small ops (and the vision tower's LayerNorm and GELUs), each
one native op on MLX's CPU backend.

On the CPU, MLX runs `mx.fast.rms_norm`, `mx.fast.rope` and
`mx.fast.scaled_dot_product_attention` as their composed fallbacks (5-20 ops
each, ~4-5 us of dispatch per op) and its `exp` costs ~12 ns per element: in
a 4-bit decode step of the 2B shape these ops took ~26 ms beside ~35 ms of
products. The native kernel (cpu_kernel.py, csrc/decode_ops.cpp) does each in
one op, rounding where the fallbacks round. Off the CPU, without the kernel,
or for inputs it does not take (explicit 3D positions of prompts with images,
padded multi-query attention, quantized KV caches) these are exactly the MLX
compositions.
"""

import mlx.core as mx
import mlx.nn as nn

from mlx_vlm.models.base import scaled_dot_product_attention
from mlx_vlm.models.cache import BatchKVCache, KVCache

from mlx_vlm_qwen3vl import cpu_kernel

from . import layers
from .parallel import worker_count

_FLOATS = (mx.float32, mx.bfloat16, mx.float16)


def _kernel(x: mx.array, *others: mx.array):
    """The native kernel when it takes ops on x (and others of x's dtype)."""
    if not layers.cpu_policy()[0] or x.dtype not in _FLOATS:
        return None
    if any(a.dtype != x.dtype for a in others):
        return None
    return cpu_kernel.load()


class RMSNorm(nn.RMSNorm):
    def __call__(self, x: mx.array) -> mx.array:
        kernel = _kernel(x, self.weight)
        if kernel is None:
            return super().__call__(x)
        return kernel.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """The vision tower's norm (MLX's CPU fallback: ~3.5 ms per 784x1024 call)."""

    def __call__(self, x: mx.array) -> mx.array:
        if "weight" not in self or "bias" not in self:
            return super().__call__(x)
        kernel = _kernel(x, self.weight, self.bias)
        if kernel is None:
            return super().__call__(x)
        return kernel.layer_norm(x, self.weight, self.bias, self.eps, threads=worker_count())


def silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """The SwiGLU gate, silu(gate) * up."""
    kernel = _kernel(gate, up)
    if kernel is None:
        return nn.silu(gate) * up
    return kernel.silu_mul(gate, up)


def gelu_approx(x: mx.array) -> mx.array:
    """nn.gelu_approx (the vision MLP's activation). MLX's compiled CPU version
    takes ~40 ns per element: ~3 s of the vision tower for one 448x448 image."""
    kernel = _kernel(x)
    if kernel is None:
        return nn.gelu_approx(x)
    return kernel.gelu_approx(x, threads=worker_count())


def gelu(x: mx.array) -> mx.array:
    """nn.gelu (erf; the vision mergers' activation): MLX's CPU version takes
    ~23 ns per element."""
    kernel = _kernel(x)
    if kernel is None:
        return nn.gelu(x)
    return kernel.gelu(x, threads=worker_count())


def rotary_kernel(x: mx.array):
    """The native kernel for the vision tower's rotary embedding of x
    (vision.apply_rotary; MLX's ops: ~1.4 ms per 784-patch call)."""
    return _kernel(x)


def norm_rope(x: mx.array, norm: nn.RMSNorm, rope, positions, n_heads: int) -> mx.array:
    """Projected queries or keys [B, L, n_heads * D] -> per-head RMSNorm and
    rotary positions, [B, n_heads, L, D]."""
    kernel = _kernel(x, norm.weight)
    if kernel is None or isinstance(positions, tuple):
        B, L, _ = x.shape
        heads = norm(x.reshape(B, L, n_heads, -1)).transpose(0, 2, 1, 3)
        return rope.apply(heads, positions)
    return kernel.norm_rope(x, norm.weight, rope_offsets(positions), n_heads, norm.eps, rope.base)


def rope_offsets(positions) -> mx.array:
    """The native rope's int32 offsets from an offset or an array of them (one
    per row, any shape)."""
    if isinstance(positions, mx.array):
        return positions if positions.dtype == mx.int32 else positions.astype(mx.int32)
    return mx.array([positions], dtype=mx.int32)


def attention(q, k, v, cache, scale: float, mask) -> mx.array:
    """Attention of q [B, H, L, D] over the keys and values the cache returned,
    as [B, L, H * D]. Native: one query over a plain or batch cache (its
    padding mask included); many queries (prefill), unmasked or causal, in
    bfloat16 where the CPU has AVX-512 BF16."""
    B, H, L, _ = q.shape
    plain = type(cache) in _NATIVE_CACHES and isinstance(k, mx.array)
    if plain and L == 1 and _one_query_mask(mask, q):
        kernel = _kernel(q, k, v)
        if kernel is not None:
            return kernel.decode_attention(q, k, v, scale, mask, threads=worker_count())
    causal = isinstance(mask, str) and mask == "causal"
    if plain and L > 1 and (mask is None or causal) and k.dtype == v.dtype == q.dtype:
        kernel = layers.native_attention_kernel(q)
        if kernel is not None:
            return kernel.attention_bf16(q, k, v, scale, causal=causal, threads=worker_count())
    out = scaled_dot_product_attention(q, k, v, cache, scale=scale, mask=mask)
    return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


# Caches that hand back plain key and value arrays (no quantized state).
_NATIVE_CACHES = (type(None), KVCache, BatchKVCache)


def _one_query_mask(mask, q) -> bool:
    """None, or a [B or 1, H or 1, 1, T] boolean or additive mask the kernel takes."""
    if mask is None:
        return True
    if not isinstance(mask, mx.array) or mask.ndim != 4 or mask.shape[2] != 1:
        return False
    return mask.dtype in (mx.bool_, q.dtype) and mask.shape[1] in (1, q.shape[1])
