"""The decoder's small ops in the native kernel (qwen3_vl/decoder_ops.py,
csrc/decode_ops.cpp) against the MLX compositions they replace, in both
builds, and the model's decode with them against the model without them."""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_vlm.utils import load_model

from mlx_vlm_qwen3vl import cpu_kernel
from mlx_vlm_qwen3vl.qwen3_vl import decoder_ops

from helpers import single_run

FLOATS = [mx.float32, mx.bfloat16, mx.float16]


@pytest.fixture(scope="module", params=["native", "generic"])
def kernel(request):
    return cpu_kernel.load_variant(request.param)


def normal(shape, seed, dtype, scale=1.0):
    return (scale * mx.random.normal(shape, key=mx.random.key(seed))).astype(dtype)


def assert_close(got, want, dtype, f32_tol=2e-6, identical=0.9):
    """float32: only the order of sums differs. Half types: results are
    rounded where MLX rounds, so most are identical and the rest one
    rounding step apart."""
    assert got.shape == want.shape and got.dtype == want.dtype
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    scale = np.abs(want).max()
    if dtype == mx.float32:
        assert np.abs(got - want).max() <= f32_tol * scale
    else:
        step = 2.0 ** (-7 if dtype == mx.bfloat16 else -10)
        assert np.abs(got - want).max() <= 2 * step * scale
        assert (got == want).mean() > identical


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 1, 2048), (2, 7, 96)])
def test_rms_norm_matches_mx_fast_rms_norm(kernel, dtype, shape):
    x = normal(shape, 0, dtype, 3.0)
    w = (1 + normal(shape[-1:], 1, mx.float32, 0.2)).astype(dtype)
    assert_close(kernel.rms_norm(x, w, 1e-6), mx.fast.rms_norm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(784, 1024), (2, 7, 96)])
def test_layer_norm_matches_mx_fast_layer_norm(kernel, dtype, shape):
    x = normal(shape, 0, dtype, 3.0) + 0.5  # a mean to take away
    w = (1 + normal(shape[-1:], 1, mx.float32, 0.2)).astype(dtype)
    b = normal(shape[-1:], 2, dtype, 0.3)
    for threads in (1, 2):
        assert_close(kernel.layer_norm(x, w, b, 1e-6, threads=threads),
                     mx.fast.layer_norm(x, w, b, 1e-6), dtype, identical=0.99)
    strided = mx.stack([x, x], axis=-1)[..., 0]  # every other element of a wider buffer
    assert mx.array_equal(kernel.layer_norm(strided, w, b, 1e-6), kernel.layer_norm(x, w, b, 1e-6))


def test_layer_norm_module_takes_the_kernel_where_it_can(monkeypatch):
    norm = decoder_ops.LayerNorm(64, eps=1e-6)
    norm.update({"weight": 1 + normal((64,), 3, mx.float32, 0.1), "bias": normal((64,), 4, mx.float32, 0.1)})
    x = normal((5, 64), 5, mx.float32)
    assert_close(norm(x), mx.fast.layer_norm(x, norm.weight, norm.bias, 1e-6), mx.float32)
    without_bias = decoder_ops.LayerNorm(64, eps=1e-6, bias=False)  # MLX's own
    assert mx.array_equal(without_bias(x), mx.fast.layer_norm(x, without_bias.weight, None, 1e-6))


def reference_norm_rope(x, w, offset, n_heads, base):
    B, L, _ = x.shape
    heads = mx.fast.rms_norm(x.reshape(B, L, n_heads, -1), w, 1e-6).transpose(0, 2, 1, 3)
    return mx.fast.rope(heads, heads.shape[-1], traditional=False, base=base, scale=1.0, offset=offset)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("offset", [0, 7, 300])
def test_norm_rope_matches_rms_norm_then_mx_fast_rope(kernel, dtype, offset):
    x = normal((1, 3, 4 * 64), 2, dtype, 2.0)
    w = (1 + normal((64,), 3, mx.float32, 0.2)).astype(dtype)
    got = kernel.norm_rope(x, w, mx.array([offset], dtype=mx.int32), 4, 1e-6, 5e6)
    assert got.shape == (1, 4, 3, 64)
    # float32 sin and cos of angles up to ~300 rad differ in their last bits
    # between implementations (both ~2e-5 from the float64 values there).
    assert_close(got, reference_norm_rope(x, w, offset, 4, 5e6), dtype, f32_tol=1e-5)


def test_norm_rope_takes_one_offset_per_row(kernel):
    x = normal((3, 2, 2 * 128), 4, mx.float32)
    w = (1 + normal((128,), 5, mx.float32, 0.2))
    offsets = mx.array([0, 11, 40], dtype=mx.int32)
    got = kernel.norm_rope(x, w, offsets, 2, 1e-6, 1e4)
    assert_close(got, reference_norm_rope(x, w, offsets, 2, 1e4), mx.float32)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("length", [1, 37, 300])
def test_decode_attention_matches_sdpa_over_a_cache_slice(kernel, dtype, length):
    # As the KV cache hands them over: the first `length` positions of a longer buffer.
    keys = normal((2, 2, 512, 64), 6, dtype)[..., :length, :]
    values = normal((2, 2, 512, 64), 7, dtype)[..., :length, :]
    q = normal((2, 6, 1, 64), 8, dtype, 2.0)
    want = mx.fast.scaled_dot_product_attention(q, keys, values, scale=64**-0.5)
    want = want.transpose(0, 2, 1, 3).reshape(2, 1, -1)
    got = kernel.decode_attention(q, keys, values, 64**-0.5, threads=2)
    assert_close(got, want, dtype)
    one_thread = kernel.decode_attention(q, keys, values, 64**-0.5, threads=1)
    assert mx.array_equal(got, one_thread)


@pytest.mark.parametrize("head_dim, heads", [(128, 16), (256, 32), (128, 8)])
def test_decode_attention_head_sizes_and_groups_of_the_models(kernel, head_dim, heads):
    """bfloat16 caches take the native build's dot-product path for head sizes
    64/128/256 and any number of query heads per KV head (here 2, 4 and 1),
    an odd cache length included."""
    keys = normal((1, 8, 1100, head_dim), 30, mx.bfloat16)[..., :1001, :]
    values = normal((1, 8, 1100, head_dim), 31, mx.bfloat16)[..., :1001, :]
    q = normal((1, heads, 1, head_dim), 32, mx.bfloat16, 2.0)
    scale = head_dim**-0.5
    want = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale)
    got = kernel.decode_attention(q, keys, values, scale, threads=2)
    assert_close(got, want.transpose(0, 2, 1, 3).reshape(1, 1, -1), mx.bfloat16)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", ["boolean", "additive"])
def test_decode_attention_takes_the_batch_caches_padding_mask(kernel, dtype, kind):
    keys = normal((3, 2, 64, 32), 11, dtype)[..., :40, :]
    values = normal((3, 2, 64, 32), 12, dtype)[..., :40, :]
    q = normal((3, 4, 1, 32), 13, dtype)
    if kind == "boolean":  # as BatchKVCache makes it; row 2 has every key masked
        mask = mx.random.uniform(shape=(3, 1, 1, 40), key=mx.random.key(14)) > 0.3
        mask = mask * mx.array([True, True, False]).reshape(3, 1, 1, 1)
    else:
        mask = normal((3, 4, 1, 40), 15, dtype, 2.0)
    want = mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.17, mask=mask)
    got = kernel.decode_attention(q, keys, values, 0.17, mask, threads=2)
    assert_close(got, want.transpose(0, 2, 1, 3).reshape(3, 1, -1), dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_silu_mul_matches_nn_silu_times_up(kernel, dtype):
    gate = normal((1, 3, 1000), 9, dtype, 4.0)  # exp over a wide range, both signs
    up = normal((1, 3, 1000), 10, dtype)
    # The sigmoids differ in their last float32 bit, which moves ~1 in 10
    # half-precision roundings by a step; both are as far from the exact values.
    assert_close(kernel.silu_mul(gate, up), nn.silu(gate) * up, dtype, identical=0.8)


def test_silu_mul_is_exact_at_the_extremes(kernel):
    gate = mx.array([-200.0, -88.0, -20.0, 0.0, 20.0, 88.0, 200.0])
    got = np.array(kernel.silu_mul(gate, mx.ones_like(gate)))
    want = np.array(gate) / (1 + np.exp(-np.array(gate, dtype=np.float64)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("threads", [1, 2])
def test_gelu_approx_matches_nn_gelu_approx(kernel, dtype, threads):
    # Over 2^16 elements, so that two threads take parts; a wide range and the far tails.
    x = mx.concatenate([normal((300, 300), 11, dtype, 3.0).reshape(-1),
                        mx.array([0.0, -0.0, 1e-8, -1e-8, 9.0, -9.0, 40.0, -40.0], dtype=dtype)])
    got, want = kernel.gelu_approx(x, threads=threads), nn.gelu_approx(x)
    # Half types: bit-identical in practice (tanh's last float32 bit rarely moves a rounding).
    assert_close(got, want, dtype, identical=0.999)


@pytest.mark.parametrize("dtype", FLOATS)
def test_gelu_matches_nn_gelu(kernel, dtype):
    # Over 2^16 elements (two threads take parts); a wide range and the far tails.
    x = mx.concatenate([normal((300, 300), 13, dtype, 3.0).reshape(-1),
                        mx.array([0.0, -0.0, 1e-8, -1e-8, 9.0, -9.0, 40.0, -40.0], dtype=dtype)])
    got, want = kernel.gelu(x, threads=2), nn.gelu(x)
    # MLX's erf formula with another exp: float32 within a few ulp, half types nearly all identical.
    assert_close(got, want, dtype, f32_tol=1e-6, identical=0.999)


@pytest.mark.parametrize("dtype", FLOATS)
def test_vision_rotary_equals_the_mlx_composition(kernel, dtype):
    from mlx_vlm_qwen3vl.qwen3_vl import vision

    qkv = normal((130, 3, 4, 64), 14, dtype)
    x = qkv[:, 1]  # as the tower passes it: a strided view of the qkv product
    angles = normal((130, 1, 64), 15, mx.float32, 20.0)
    cos, sin = mx.cos(angles), mx.sin(angles)
    want = (x.astype(mx.float32) * cos + vision.rotate_half(x.astype(mx.float32)) * sin).astype(dtype)
    # float32 products and sums rounded apart, as MLX's ops round them: bit-identical.
    assert mx.array_equal(kernel.rotary(x, cos, sin, threads=2), want)


def test_gelu_approx_keeps_its_shape_and_strides(kernel):
    x = normal((4, 6, 8), 12, mx.bfloat16).transpose(1, 0, 2)  # not row-major
    got = kernel.gelu_approx(x)
    assert got.shape == x.shape
    assert_close(got, nn.gelu_approx(x), mx.bfloat16, identical=0.999)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda k: k.rms_norm(mx.ones((2, 8)), mx.ones((4,)), 1e-6), "weight must be"),
        (lambda k: k.rms_norm(mx.ones((2, 8)), mx.ones((8,), mx.bfloat16), 1e-6), "weight must be"),
        (lambda k: k.norm_rope(mx.ones((1, 2, 10)), mx.ones((5,)), mx.array([0]), 3, 1e-6, 1e4), "n_heads"),
        (lambda k: k.norm_rope(mx.ones((1, 2, 12)), mx.ones((4,)), mx.array([0.0]), 3, 1e-6, 1e4), "int32"),
        (lambda k: k.decode_attention(mx.ones((1, 4, 2, 8)), mx.ones((1, 2, 5, 8)), mx.ones((1, 2, 5, 8)), 1.0), r"q \[B, H, 1, D\]"),
        (lambda k: k.decode_attention(mx.ones((1, 3, 1, 8)), mx.ones((1, 2, 5, 8)), mx.ones((1, 2, 5, 8)), 1.0), "multiple"),
        (lambda k: k.decode_attention(mx.ones((1, 2, 1, 8)), mx.ones((1, 2, 5, 8)), mx.ones((1, 2, 5, 8)), 1.0, mx.ones((1, 1, 1, 4), mx.bool_)), "mask must be"),
        (lambda k: k.silu_mul(mx.ones((4,)), mx.ones((5,))), "share"),
        (lambda k: k.gelu_approx(mx.ones((4,), mx.int32)), "floating point"),
        (lambda k: k.rotary(mx.ones((4, 2, 8)), mx.ones((4, 1, 6)), mx.ones((4, 1, 6))), r"cos, sin \[n, 1, D\]"),
        (lambda k: k.layer_norm(mx.ones((2, 8)), mx.ones((8,)), mx.ones((7,)), 1e-6), "weight and bias must be"),
    ],
)
def test_bad_inputs_are_named(kernel, call, message):
    with pytest.raises(ValueError, match=message):
        call(kernel)


def test_model_decode_takes_the_native_ops_and_matches_mlx_ops(tiny_checkpoint, monkeypatch):
    model = load_model(Path(tiny_checkpoint))
    ids = [151644, 872, 198] + list(range(100, 140)) + [151645, 198]
    calls = {}
    real = cpu_kernel.load()

    class Counting:
        def __getattr__(self, name):
            op = getattr(real, name)

            def counted(*args, **kwargs):
                calls[name] = calls.get(name, 0) + 1
                return op(*args, **kwargs)

            return counted

    monkeypatch.setattr(cpu_kernel, "load", lambda: Counting())
    native, native_tokens = single_run(model, ids, {}, 6)
    layers = len(model.language_model.layers)
    assert calls["decode_attention"] == 6 * layers  # every decode step, not the prompt
    assert calls["norm_rope"] == 2 * 7 * layers
    assert calls["silu_mul"] == 7 * layers
    assert calls["rms_norm"] == 7 * (2 * layers + 1)

    monkeypatch.setattr(decoder_ops, "_kernel", lambda *arrays: None)
    composed, composed_tokens = single_run(model, ids, {}, 6)
    assert native_tokens == composed_tokens
    assert len(set(native_tokens)) > 1  # a fixture that varies its output
    for a, b in zip(native, composed):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * np.abs(b).max())


def test_bfloat16_prefill_attention_is_native_and_matches_sdpa(monkeypatch):
    """Many queries, causal, grouped heads: decoder_ops.attention routes them to
    the kernel where the CPU has AVX-512 BF16, else to MLX's attention."""
    q = normal((1, 4, 9, 64), 20, mx.bfloat16)
    k, v = normal((1, 2, 9, 64), 21, mx.bfloat16), normal((1, 2, 9, 64), 22, mx.bfloat16)
    got = decoder_ops.attention(q, k, v, None, 0.125, "causal")
    kernel = cpu_kernel.load()
    monkeypatch.setattr(decoder_ops, "_kernel", lambda *arrays: None)
    composed = decoder_ops.attention(q, k, v, None, 0.125, "causal")
    assert got.shape == composed.shape == (1, 9, 4 * 64)
    if kernel.has_dense_bf16():
        assert_close(got, composed, mx.bfloat16)
    else:
        assert mx.array_equal(got, composed)
