"""The CPU kernel choices of qwen3_vl/layers.py: same results, other kernels."""

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_vlm_qwen3vl.qwen3_vl import layers


@pytest.fixture
def policy(monkeypatch):
    def set_policy(on_cpu, fast_blas):
        monkeypatch.setattr(layers, "cpu_policy", lambda: (on_cpu, fast_blas))

    return set_policy


@pytest.fixture
def no_native_bf16(monkeypatch):
    """A CPU without AVX-512 BF16: bfloat16 products of several rows go to a fast BLAS."""
    monkeypatch.setattr(layers, "_kernel_with_dense_bf16", lambda: None)


def dense_layer(dtype=mx.bfloat16, bias=True):
    mx.random.seed(3)
    layer = layers.Linear(256, 192, bias=bias)
    layer.update({k: v.astype(dtype) for k, v in layer.parameters().items()})
    if bias:
        layer.bias = (mx.random.normal((192,)) * 0.1).astype(dtype)
    return layer


def max_rel(a, b):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


@pytest.mark.parametrize("rows", [1, 7])
def test_float32_product_through_fast_blas_matches_bf16(policy, no_native_bf16, rows):
    layer = dense_layer()
    x = mx.random.normal((2, rows, 256)).astype(mx.bfloat16)
    policy(True, False)
    reference = layer(x)
    policy(True, True)
    fast = layer(x)
    assert fast.dtype == mx.bfloat16 and fast.shape == reference.shape
    assert max_rel(fast, reference) < 1e-2  # bf16 rounding of the same float32 sums
    policy(False, False)
    assert mx.array_equal(layer(x), nn.Linear.__call__(layer, x))


def test_single_rows_and_float32_inputs_take_the_plain_kernel(policy):
    policy(True, True)
    assert not layers._upcast(mx.zeros((1, 1, 256), dtype=mx.bfloat16))
    assert not layers._upcast(mx.zeros((4, 256), dtype=mx.float32))
    assert layers._upcast(mx.zeros((4, 256), dtype=mx.bfloat16))
    policy(True, False)
    assert not layers._upcast(mx.zeros((4, 256), dtype=mx.bfloat16))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fast_blas", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 256), (2, 4, 256), (3, 5, 256)])  # float32 kernel / dequantize
def test_quantized_layers_on_cpu_give_the_same_result(policy, bits, fast_blas, shape):
    layer = dense_layer().to_quantized(group_size=64, bits=bits)
    assert isinstance(layer, layers.QuantizedLinear)
    x = mx.random.normal(shape).astype(mx.bfloat16)
    weight = mx.dequantize(
        layer.weight, layer.scales, layer.biases, group_size=64, bits=bits, dtype=mx.float32
    )
    exact = x.astype(mx.float32) @ weight.T + layer.bias.astype(mx.float32)
    policy(False, False)
    kernel = layer(x)  # mx.quantized_matmul
    policy(True, fast_blas)
    dequantized = layer(x)
    assert dequantized.dtype == kernel.dtype
    # Within bf16 output rounding of the exact product, and no worse than the
    # kernel (MLX's CPU quantized_matmul measures ~3e-2 here).
    assert max_rel(dequantized, exact) < 1e-2
    assert max_rel(dequantized, exact) <= max_rel(kernel, exact)


@pytest.mark.parametrize("rows", [1, 12])
def test_quantized_tied_head_on_cpu_gives_the_same_result(policy, rows):
    mx.random.seed(5)
    embedding = layers.Embedding(320, 128)
    embedding.weight = (embedding.weight * 0.05).astype(mx.bfloat16)
    quantized = embedding.to_quantized(group_size=64, bits=4)
    assert isinstance(quantized, layers.QuantizedEmbedding)
    x = mx.random.normal((1, rows, 128)).astype(mx.bfloat16)
    weight = mx.dequantize(
        quantized.weight, quantized.scales, quantized.biases, group_size=64, bits=4, dtype=mx.float32
    )
    exact = x.astype(mx.float32) @ weight.T
    policy(False, False)
    kernel = quantized.as_linear(x)
    policy(True, False)
    ours = quantized.as_linear(x)
    assert ours.dtype == kernel.dtype == mx.bfloat16
    assert max_rel(ours, exact) < 1e-2
    assert max_rel(ours, exact) <= max_rel(kernel, exact)


def test_nn_quantize_builds_our_quantized_layer():
    model = nn.Sequential(dense_layer(mx.float32), layers.Embedding(64, 128))
    nn.quantize(model, group_size=64, bits=4)
    assert type(model.layers[0]) is layers.QuantizedLinear
    assert type(model.layers[1]) is layers.QuantizedEmbedding


@pytest.mark.parametrize("blas, expected", [(None, "True False"), ("openblas", "True True")])
def test_policy_follows_device_and_preloaded_blas(blas, expected):
    env = {k: v for k, v in os.environ.items() if k != "MLX_VLM_QWEN3VL_BLAS"}
    if blas:
        env["MLX_VLM_QWEN3VL_BLAS"] = blas
    code = (
        "from mlx_vlm_qwen3vl.qwen3_vl.layers import cpu_policy\n"
        "print(*cpu_policy())\n"
        "import mlx.core as mx\n"
        "mx.set_default_device(mx.gpu) if mx.metal.is_available() else None\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_vision_keeps_bfloat16_with_the_native_kernel_and_a_fast_blas(policy):
    policy(True, True)
    expected = mx.bfloat16 if layers._kernel_with_dense_bf16() is not None else mx.float32
    assert layers.vision_compute_dtype(mx.bfloat16) == expected


def test_vision_runs_in_float32_only_with_a_fast_blas(policy, no_native_bf16, tiny_checkpoint):
    from pathlib import Path

    from mlx_vlm.utils import load_model

    policy(True, False)
    assert layers.vision_compute_dtype(mx.bfloat16) == mx.bfloat16
    policy(False, False)
    assert layers.vision_compute_dtype(mx.bfloat16) == mx.bfloat16

    model = load_model(Path(tiny_checkpoint))
    model.set_dtype(mx.bfloat16)
    grid = mx.array([[1, 4, 6]])
    pixels = mx.random.normal((24, 3 * 2 * 16 * 16), key=mx.random.key(0))
    policy(True, False)
    plain = model.encode_images(pixels, image_grid_thw=grid)
    policy(True, True)
    assert layers.vision_compute_dtype(mx.bfloat16) == mx.float32
    upcast = model.encode_images(pixels, image_grid_thw=grid)
    for a, b in zip(plain, upcast):
        assert a.dtype == b.dtype == mx.bfloat16
        assert 0 < max_rel(b, a) < 5e-2  # bf16 rounding along 3 blocks, not a different result
