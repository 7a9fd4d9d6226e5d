"""A decoder layer's decode step in two native ops on the CPU.

Each quantized layer of a decode step is otherwise 23 MLX ops: the norms, the products,
slices of the joint q/k/v and gate/up products, reshapes, adds, the gate.
Each op costs a few microseconds to build in Python and to dispatch, and the
small ones run on one core while the other waits: in a 4-bit decode step of
the 2B shape that was a fifth of the time. Here a layer is

    q, k, v = decode_qkv(x)                     input norm, q/k/v, head norms, rope
    a = self_attn.attend(q, k, v)               the host's cache update, the attention, as before
    return decode_residual_mlp(a, x)            o_proj, residual, norm, SwiGLU MLP, residual

with the same bits as the separate ops (csrc/decode_layer.cpp). It applies
where every op of the layer would take the native kernel anyway: one new
token per row (at most 8 rows), a plain position offset, all seven
projections without biases or adapters and either quantized alike or dense
bfloat16 (on a CPU with AVX-512 BF16). Anything else (and off the CPU)
returns None and the layer runs op by op.
"""

import mlx.core as mx

from . import layers
from .decoder_ops import rope_offsets
from .parallel import worker_count


def _kernel(layer, x: mx.array, positions):
    """(the native kernel, the projections' format as decode_qkv takes it), or None."""
    if x.ndim != 3 or x.shape[1] != 1 or x.shape[0] > 8 or isinstance(positions, tuple):
        return None
    attn, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm, attn.k_norm)
    if any(n.weight.dtype != x.dtype for n in norms) or attn.q_norm.eps != attn.k_norm.eps:
        return None
    projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                   mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    kernel = layers.one_op_kernel(projections, x)
    if kernel is not None:
        return kernel, dict(group_size=attn.q_proj.group_size, bits=attn.q_proj.bits)
    kernel = layers.dense_kernel(projections, x)
    if kernel is not None:
        return kernel, dict(group_size=0, bits=0)  # bits 0: dense bfloat16 weights
    return None


def _matrices(*modules, dense: bool) -> list:
    names = ("weight",) if dense else ("weight", "scales", "biases")
    return [m[name] for m in modules for name in names]


def decode_layer(layer, x: mx.array, mask, cache, positions):
    """layer(x, mask, cache, positions) in two native ops, or None where
    that does not apply (see the module docstring)."""
    found = _kernel(layer, x, positions)
    if found is None:
        return None
    kernel, common = found
    dense = common["bits"] == 0
    attn, mlp = layer.self_attn, layer.mlp
    if positions is None:
        positions = cache.offset if cache is not None else 0
    threads = worker_count()
    q, k, v = kernel.decode_qkv(
        x, layer.input_layernorm.weight, _matrices(attn.q_proj, attn.k_proj, attn.v_proj, dense=dense),
        attn.q_norm.weight, attn.k_norm.weight, rope_offsets(positions), attn.n_heads,
        layer.input_layernorm.eps, attn.q_norm.eps, attn.rope.base, **common, threads=threads,
    )
    a = attn.attend(q, k, v, mask, cache)
    return kernel.decode_residual_mlp(
        a, x, _matrices(attn.o_proj, dense=dense), layer.post_attention_layernorm.weight,
        layer.post_attention_layernorm.eps,
        _matrices(mlp.gate_proj, mlp.up_proj, mlp.down_proj, dense=dense),
        **common, threads=threads,
    )
