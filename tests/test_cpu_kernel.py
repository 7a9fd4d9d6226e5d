"""The native CPU kernel for quantized decode (cpu_kernel.py, csrc/quantized_matvec.cpp).

Both builds are tested on every machine: `native` (the AVX-512 BF16 path where
the CPU has it) and `generic` (the portable loops every other CPU runs).
"""

import warnings

import mlx.core as mx
import pytest

from mlx_vlm_qwen3vl import cpu_kernel
from mlx_vlm_qwen3vl.qwen3_vl import layers


@pytest.fixture(scope="module", params=["native", "generic"])
def kernel(request):
    return cpu_kernel.load_variant(request.param)


def quantized(out_features, in_features, bits, group_size, scale_dtype=mx.bfloat16, seed=0):
    w = mx.random.normal((out_features, in_features), key=mx.random.key(seed))
    q, s, b = mx.quantize(w.astype(mx.bfloat16), group_size=group_size, bits=bits)
    return q, s.astype(scale_dtype), b.astype(scale_dtype)


def exact_product(x, q, s, b, group_size, bits):
    """x @ W.T with W dequantized in float32 and the sums in float64-free float32 matmul."""
    f32 = mx.float32
    w = mx.dequantize(q, s.astype(f32), b.astype(f32), group_size=group_size, bits=bits, dtype=f32)
    return x.astype(f32) @ w.T


def max_rel(a, b):
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def test_the_native_build_takes_the_fast_path_where_the_cpu_has_it():
    module = cpu_kernel.load()
    assert module is not None
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    has_avx512_bf16 = all(f" {flag}" in flags for flag in ("avx512f", "avx512bw", "avx512_bf16"))
    assert module.kernel_name() == ("avx512-bf16" if has_avx512_bf16 else "generic")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 21])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_products_equal_the_dequantized_float32_product(kernel, bits, rows, group_size):
    q, s, b = quantized(200, 512, bits, group_size, seed=rows)
    x = mx.random.normal((rows, 512), key=mx.random.key(100 + rows)).astype(mx.bfloat16)
    got = kernel.quantized_matvec(x, q, s, b, group_size, bits)
    assert got.dtype == mx.float32 and got.shape == (rows, 200)
    # Only the order of the float32 sums differs.
    assert max_rel(got, exact_product(x, q, s, b, group_size, bits)) < 2e-6


@pytest.mark.parametrize("x_dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("scale_dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_every_float_dtype_of_activations_and_scales(kernel, x_dtype, scale_dtype):
    q, s, b = quantized(96, 256, 4, 64, scale_dtype)
    x = mx.random.normal((3, 256), key=mx.random.key(7)).astype(x_dtype)
    got = kernel.quantized_matvec(x, q, s, b, 64, 4)
    assert max_rel(got, exact_product(x, q, s, b, 64, 4)) < 2e-6


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_results_in_another_dtype_are_rounded_as_astype_rounds(kernel, dtype):
    q, s, b = quantized(160, 256, 4, 64)
    x = mx.random.normal((2, 256), key=mx.random.key(8)).astype(mx.bfloat16)
    f32 = kernel.quantized_matvec(x, q, s, b, 64, 4)
    got = kernel.quantized_matvec(x, q, s, b, 64, 4, dtype=dtype)
    assert got.dtype == dtype
    assert mx.array_equal(got, f32.astype(dtype))
    with pytest.raises(ValueError, match="dtype must be"):
        kernel.quantized_matvec(x, q, s, b, 64, 4, dtype=mx.int32)


def test_leading_axes_are_kept(kernel):
    q, s, b = quantized(64, 128, 4, 64)
    x = mx.random.normal((2, 3, 128), key=mx.random.key(1)).astype(mx.bfloat16)
    got = kernel.quantized_matvec(x, q, s, b, 64, 4)
    assert got.shape == (2, 3, 64)
    assert max_rel(got, exact_product(x, q, s, b, 64, 4)) < 2e-6


def test_row_slices_of_larger_weights_are_read_in_place(kernel):
    """The model passes slices of a layer's rows (one per core); they must
    neither be copied nor misread."""
    q, s, b = quantized(300, 256, 4, 64)
    x = mx.random.normal((1, 256), key=mx.random.key(2)).astype(mx.bfloat16)
    whole = kernel.quantized_matvec(x, q, s, b, 64, 4)
    part = kernel.quantized_matvec(x, q[100:250], s[100:250], b[100:250], 64, 4)
    assert mx.array_equal(part, whole[:, 100:250])
    # Strided activations are gathered: the same result as a contiguous copy.
    wide = mx.random.normal((3, 2, 512), key=mx.random.key(3)).astype(mx.bfloat16)
    for strided in (wide[:, 0, ::2], wide[:, :, :256].transpose(1, 0, 2), wide[:, 1, 256:]):
        copy = mx.array(strided.tolist(), dtype=mx.bfloat16)
        assert mx.array_equal(kernel.quantized_matvec(strided, q, s, b, 64, 4),
                              kernel.quantized_matvec(copy, q, s, b, 64, 4))


def test_the_kernel_runs_on_worker_streams_bit_identically(kernel):
    q, s, b = quantized(256, 256, 4, 64)
    x = mx.random.normal((2, 256), key=mx.random.key(4)).astype(mx.bfloat16)
    whole = kernel.quantized_matvec(x, q, s, b, 64, 4)
    streams = [mx.new_thread_local_stream(mx.cpu) for _ in range(2)]
    halves = [kernel.quantized_matvec(x, q[i * 128:(i + 1) * 128], s[i * 128:(i + 1) * 128],
                                      b[i * 128:(i + 1) * 128], 64, 4, stream=streams[i])
              for i in range(2)]
    assert mx.array_equal(mx.concatenate(halves, axis=-1), whole)


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_threads_split_the_rows_bit_identically(kernel, threads):
    q, s, b = quantized(1000, 256, 4, 64)
    x = mx.random.normal((3, 256), key=mx.random.key(6)).astype(mx.bfloat16)
    one = kernel.quantized_matvec(x, q, s, b, 64, 4)
    assert mx.array_equal(kernel.quantized_matvec(x, q, s, b, 64, 4, threads=threads), one)
    # Several products at once from several Python threads share the pool.
    import threading

    results = [None] * 4

    def run(i):
        stream = mx.new_thread_local_stream(mx.cpu)
        results[i] = kernel.quantized_matvec(x, q, s, b, 64, 4, threads=threads, stream=stream)
        mx.eval(results[i])

    workers = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert all(r is not None and mx.array_equal(r, one) for r in results)


@pytest.mark.parametrize("call, message", [
    (lambda k, x, q, s, b: k.quantized_matvec(x, q, s, b, 64, 3), "bits must be 4 or 8"),
    (lambda k, x, q, s, b: k.quantized_matvec(x[:, :128], q, s, b, 64, 4), "disagree"),
    (lambda k, x, q, s, b: k.quantized_matvec(x, q, s, b, 32, 4), "disagree"),
    (lambda k, x, q, s, b: k.quantized_matvec(x.astype(mx.int32), q, s, b, 64, 4), "floating point"),
    (lambda k, x, q, s, b: k.quantized_matvec(x, q, s, b[:, :2], 64, 4), "expected x"),
    (lambda k, x, q, s, b: k.quantized_matvec(x, q, s, b, 64, 4, threads=0), "threads must be"),
])
def test_bad_arguments_get_a_clear_error(kernel, call, message):
    q, s, b = quantized(32, 256, 4, 64)
    x = mx.ones((1, 256), mx.bfloat16)
    with pytest.raises(ValueError, match=message):
        call(kernel, x, q, s, b)


def test_transposed_weight_rows_are_refused_at_evaluation(kernel):
    q, s, b = quantized(64, 256, 8, 64)
    x = mx.ones((1, 256), mx.bfloat16)
    square = mx.ones((64, 64), mx.uint32)
    with pytest.raises(ValueError, match="rows of w, scales and biases must be contiguous"):
        mx.eval(kernel.quantized_matvec(x, square.T, s, b, 64, 8))


def test_rows_in_blocks_equal_rows_one_at_a_time(kernel):
    q, s, b = quantized(200, 256, 4, 64)
    x = mx.random.normal((2, 7, 256), key=mx.random.key(9)).astype(mx.bfloat16)  # 14 rows: blocks of 8
    together = kernel.quantized_matvec(x, q, s, b, 64, 4, threads=2, dtype=mx.bfloat16)
    alone = mx.concatenate(
        [kernel.quantized_matvec(x[:, i:i + 1], q, s, b, 64, 4, dtype=mx.bfloat16) for i in range(7)], axis=1
    )
    assert mx.array_equal(together, alone)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_several_weights_in_one_op_equal_their_products_side_by_side(kernel, bits, rows, dtype):
    """quantized_matvec_many (a decode step's q/k/v, gate/up): every column as
    quantized_matvec computes it, bit for bit, whatever the threads."""
    weights = [quantized(n, 256, bits, 64, scale_dtype, seed=n)
               for n, scale_dtype in ((200, mx.bfloat16), (64, mx.float16), (130, mx.bfloat16))]
    x = mx.random.normal((1, rows, 256), key=mx.random.key(rows)).astype(mx.bfloat16)
    columns = [list(t) for t in zip(*weights)]
    side_by_side = mx.concatenate(
        [kernel.quantized_matvec(x, q, s, b, 64, bits, dtype=dtype) for q, s, b in weights], axis=-1)
    for threads in (1, 2, 3):
        together = kernel.quantized_matvec_many(x, *columns, 64, bits, threads=threads, dtype=dtype)
        assert together.shape == (1, rows, 394) and together.dtype == dtype
        assert mx.array_equal(together, side_by_side)


def test_one_op_products_refuse_what_they_do_not_take(kernel):
    q, s, b = quantized(64, 256, 4, 64)
    x = mx.ones((9, 256), dtype=mx.bfloat16)
    with pytest.raises(ValueError, match="at most 8 rows"):
        kernel.quantized_matvec_many(x, [q], [s], [b], 64, 4)
    with pytest.raises(ValueError, match="each with its scales and biases"):
        kernel.quantized_matvec_many(x[:1], [q, q], [s], [b], 64, 4)
    with pytest.raises(ValueError, match="shapes of x, w, scales, biases disagree"):
        kernel.quantized_matvec_many(x[:1], [q, q[:, :16]], [s, s], [b, b], 64, 4)


@pytest.mark.parametrize("bits, scale_dtype", [(4, mx.bfloat16), (8, mx.float16), (4, mx.float32)])
def test_many_rows_in_packed_panels(kernel, bits, scale_dtype):
    """From 16 rows (bfloat16 x) the native build packs 32 output features at a
    time: the same formula summed in another order, the same on any threads."""
    q, s, b = quantized(70, 256, bits, 64, scale_dtype, seed=bits)  # 70: a partial panel
    x = mx.random.normal((2, 20, 256), key=mx.random.key(10)).astype(mx.bfloat16)
    together = kernel.quantized_matvec(x, q, s, b, 64, bits)
    assert max_rel(together, exact_product(x, q, s, b, 64, bits)) < 2e-6
    alone = mx.concatenate([kernel.quantized_matvec(x[:, i:i + 1], q, s, b, 64, bits) for i in range(20)], axis=1)
    assert max_rel(together, alone) < 2e-6
    for threads in (2, 3):
        assert mx.array_equal(kernel.quantized_matvec(x, q, s, b, 64, bits, threads=threads), together)


def test_quantized_layers_use_the_kernel_unless_a_fast_blas_takes_many_rows(monkeypatch):
    calls = []
    module = cpu_kernel.load()
    real = module.quantized_matvec

    class Recording:
        def has_dense_bf16(self):
            return module.has_dense_bf16()

        def quantized_matvec(self, *args, **kwargs):
            calls.append(args[0].shape)
            return real(*args, **kwargs)

    monkeypatch.setattr(cpu_kernel, "load", lambda: Recording())
    layer = layers.Linear(256, 128).to_quantized(group_size=64, bits=4)
    for fast_blas in (False, True):
        monkeypatch.setattr(layers, "cpu_policy", lambda: (True, fast_blas))
        mx.eval(layer(mx.ones((1, 1, 256), mx.bfloat16)))
        assert calls, "a decode-shaped product did not reach the kernel"
        calls.clear()
        # Prefill: the kernel's packed panels (bfloat16 x, AVX-512 BF16) beat
        # dequantize + sgemm; without them a fast BLAS takes it.
        mx.eval(layer(mx.ones((1, 16, 256), mx.bfloat16)))
        assert bool(calls) == (not fast_blas or module.has_dense_bf16())
        calls.clear()
        mx.eval(layer(mx.ones((1, 16, 256), mx.float16)))
        assert bool(calls) == (not fast_blas)
        calls.clear()


def test_turned_off_the_layers_keep_mlx_kernels(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV_VAR, "0")
    cpu_kernel.load.cache_clear()
    try:
        assert cpu_kernel.load() is None
        monkeypatch.setattr(layers, "cpu_policy", lambda: (True, False))
        layer = layers.Linear(256, 128).to_quantized(group_size=64, bits=4)
        x = mx.random.normal((1, 1, 256), key=mx.random.key(5)).astype(mx.bfloat16)
        off = layer(x)
        monkeypatch.delenv(cpu_kernel.ENV_VAR)
        cpu_kernel.load.cache_clear()
        on = layer(x)
        assert max_rel(on.astype(mx.float32), off.astype(mx.float32)) < 1e-2  # bf16 outputs
    finally:
        cpu_kernel.load.cache_clear()


def test_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=cpu_kernel.ENV_VAR):
        cpu_kernel.setting()


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: "/bin/false")
    cpu_kernel.load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cpu_kernel.load() is None
            assert cpu_kernel.load() is None  # cached: no second build, no second warning
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1
        assert "compiling failed" in messages[0] and cpu_kernel.ENV_VAR in messages[0]
        assert not list(tmp_path.rglob("*.so"))
    finally:
        cpu_kernel.load.cache_clear()


def test_no_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(cpu_kernel.KernelUnavailable, match=r"no C\+\+ compiler"):
        cpu_kernel._compiler()


# Dense bfloat16 products (matmul_bf16): the AVX-512 BF16 build only.

def dense_inputs(rows, out_features, in_features, seed=0):
    kx, kw, kb = mx.random.split(mx.random.key(seed), 3)
    x = mx.random.normal((rows, in_features), key=kx).astype(mx.bfloat16)
    w = (mx.random.normal((out_features, in_features), key=kw) * 0.05).astype(mx.bfloat16)
    b = mx.random.normal((out_features,), key=kb).astype(mx.bfloat16)
    return x, w, b


def exact_dense(x, w, b=None):
    f32 = mx.float32
    out = x.astype(f32) @ w.astype(f32).T
    return out if b is None else out + b.astype(f32)


@pytest.fixture(scope="module")
def dense_kernel():
    """The native build. On a CPU without AVX-512 BF16 (where it has no dense
    path) the dense tests check instead that it refuses and the layers keep
    MLX's kernel."""
    return cpu_kernel.load()


def has_dense(kernel) -> bool:
    if kernel.has_dense_bf16():
        return True
    x, w, _ = dense_inputs(1, 64, 64)
    with pytest.raises(ValueError, match="no AVX-512 BF16 path"):
        kernel.matmul_bf16(x, w)
    layer = layers.Linear(64, 64)
    layer.set_dtype(mx.bfloat16)
    assert layers._native_dense_kernel(x, layer.weight) is None
    return False


@pytest.mark.parametrize("rows", [1, 3, 8, 21, 100])
@pytest.mark.parametrize("in_features", [32, 96, 2048, 40, 784])  # 40, 784: a masked tail
def test_dense_products_equal_the_float32_product(dense_kernel, rows, in_features):
    if not has_dense(dense_kernel):
        return
    x, w, b = dense_inputs(rows, 150, in_features, seed=rows)
    f32 = dense_kernel.matmul_bf16(x, w, b, threads=2, dtype=mx.float32)
    assert max_rel(f32, exact_dense(x, w, b)) < 2e-6  # only the order of float32 sums differs
    no_bias = dense_kernel.matmul_bf16(x, w, dtype=mx.float32)
    assert max_rel(no_bias, exact_dense(x, w)) < 2e-6
    bf16 = dense_kernel.matmul_bf16(x, w, b, threads=2)
    assert bf16.dtype == mx.bfloat16 and mx.array_equal(bf16, f32.astype(mx.bfloat16))


@pytest.mark.parametrize("rows", [16, 40])  # the packed-panel path
def test_dense_panels_on_any_threads_and_a_column_slice_of_w(dense_kernel, rows):
    if not has_dense(dense_kernel):
        return
    x, w, b = dense_inputs(rows, 70, 256, seed=rows)  # 70 outputs: a partial panel
    wide = mx.concatenate([w, w[:, :64] * 3], axis=-1)[:, :256]  # rows 320 apart
    one = dense_kernel.matmul_bf16(x, w, b, dtype=mx.float32)
    assert max_rel(one, exact_dense(x, w, b)) < 2e-6
    for threads in (2, 3):
        assert mx.array_equal(dense_kernel.matmul_bf16(x, w, b, threads=threads, dtype=mx.float32), one)
    assert mx.array_equal(dense_kernel.matmul_bf16(x, wide, b, dtype=mx.float32), one)


def test_outputs_over_64_mb_come_in_chunks_equal_to_the_whole(dense_kernel, kernel):
    """Half-precision results of many rows go through a float32 buffer of at
    most 64 MB: 4,200 x 4,096 outputs take two chunks, each rounded from the
    same float32 values the unchunked float32 output holds."""
    x, w, b = dense_inputs(4200, 4096, 64, seed=5)
    if has_dense(dense_kernel):
        f32 = dense_kernel.matmul_bf16(x, w, b, threads=2, dtype=mx.float32)
        assert mx.array_equal(dense_kernel.matmul_bf16(x, w, b, threads=2), f32.astype(mx.bfloat16))
    q, s, bq = mx.quantize(w, group_size=64, bits=4)
    f32 = kernel.quantized_matvec(x, q, s, bq, 64, 4, threads=2)
    assert max_rel(f32, exact_product(x, q, s, bq, 64, 4)) < 2e-6
    got = kernel.quantized_matvec(x, q, s, bq, 64, 4, threads=2, dtype=mx.bfloat16)
    assert mx.array_equal(got, f32.astype(mx.bfloat16))


def test_dense_threads_and_strided_inputs(dense_kernel):
    if not has_dense(dense_kernel):
        return
    x, w, b = dense_inputs(12, 700, 256, seed=3)
    one = dense_kernel.matmul_bf16(x, w, b)
    for threads in (2, 3, 8):
        assert mx.array_equal(dense_kernel.matmul_bf16(x, w, b, threads=threads), one)
    wide = mx.concatenate([x, x], axis=-1)
    assert mx.array_equal(dense_kernel.matmul_bf16(wide[:, ::2], w, b),
                          dense_kernel.matmul_bf16(mx.array(wide[:, ::2].tolist(), dtype=mx.bfloat16), w, b))
    assert dense_kernel.matmul_bf16(x.reshape(3, 4, 256), w, b).shape == (3, 4, 700)


@pytest.mark.parametrize("call, message", [
    (lambda k, x, w, b: k.matmul_bf16(x.astype(mx.float32), w), "expected bfloat16"),
    (lambda k, x, w, b: k.matmul_bf16(x, w[:, :32]), "disagree"),
    (lambda k, x, w, b: k.matmul_bf16(x, w, b[:5]), "bias must be"),
    (lambda k, x, w, b: k.matmul_bf16(x, w, threads=0), "threads must be"),
])
def test_dense_bad_arguments_get_a_clear_error(dense_kernel, call, message):
    if not has_dense(dense_kernel):
        return
    x, w, b = dense_inputs(2, 64, 64)
    with pytest.raises(ValueError, match=message):
        call(dense_kernel, x, w, b)


def test_the_generic_build_refuses_dense_products():
    generic = cpu_kernel.load_variant("generic")
    assert not generic.has_dense_bf16()
    x, w, _ = dense_inputs(1, 64, 64)
    with pytest.raises(ValueError, match="no AVX-512 BF16 path"):
        generic.matmul_bf16(x, w)


def test_bfloat16_layers_use_the_dense_kernel(dense_kernel, monkeypatch):
    if not has_dense(dense_kernel):
        return
    calls = []
    real = dense_kernel.matmul_bf16

    class Recording:
        def has_dense_bf16(self):
            return True

        def matmul_bf16(self, *args, **kwargs):
            calls.append(args[0].shape)
            return real(*args, **kwargs)

    monkeypatch.setattr(cpu_kernel, "load", lambda: Recording())
    layer = layers.Linear(256, 128)
    layer.set_dtype(mx.bfloat16)
    x = mx.random.normal((1, 5, 256), key=mx.random.key(4)).astype(mx.bfloat16)
    for fast_blas in (False, True):
        monkeypatch.setattr(layers, "cpu_policy", lambda: (True, fast_blas))
        out = layer(x)
        assert calls  # faster than a fast BLAS's float32 sgemm too
        assert max_rel(out.astype(mx.float32), exact_dense(x, layer.weight, layer.bias)) < 1e-2
        calls.clear()
    layer.set_dtype(mx.float32)
    layer(x.astype(mx.float32))
    assert not calls  # float32 keeps MLX's kernel


@pytest.mark.parametrize("shape", [(1, 16, 784, 64), (4, 3, 64, 72), (2, 2, 37, 40)])
def test_attention_matches_mlx_attention_of_the_vision_windows(dense_kernel, shape):
    if not dense_kernel.has_dense_bf16():
        with pytest.raises(ValueError, match="no AVX-512 BF16 path"):
            dense_kernel.attention_bf16(*(mx.ones((1, 1, 4, 8), mx.bfloat16),) * 3, 1.0)
        return
    B, H, L, D = shape
    q, k, v = (normal_bf16((B, H, L, D), seed) for seed in (1, 2, 3))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5)
    want = want.transpose(0, 2, 1, 3).reshape(B, L, H * D)
    got = dense_kernel.attention_bf16(q, k, v, D**-0.5, threads=2)
    assert got.shape == want.shape and got.dtype == mx.bfloat16
    # Rounded where MLX's fallback rounds: nearly all identical, the rest one step apart.
    assert max_rel(got.astype(mx.float32), want.astype(mx.float32)) <= 2 * 2.0**-7
    assert (got == want).astype(mx.float32).mean().item() > 0.99
    # Strided inputs (a transposed view) give the same as contiguous ones.
    kt = k.transpose(0, 1, 3, 2)
    strided = dense_kernel.attention_bf16(q, kt.transpose(0, 1, 3, 2), v, D**-0.5)
    assert mx.array_equal(strided, got)


@pytest.mark.parametrize("shape", [(1, 16, 8, 100, 100, 128), (2, 4, 2, 5, 12, 64), (1, 2, 1, 37, 37, 40)])
def test_causal_grouped_query_attention_matches_mlx_attention_of_the_prefill(dense_kernel, shape):
    if not dense_kernel.has_dense_bf16():
        return
    B, H, KV, L, T, D = shape  # T > L: a prefill chunk after cached tokens
    q = normal_bf16((B, H, L, D), 4)
    k, v = normal_bf16((B, KV, T, D), 5), normal_bf16((B, KV, T, D), 6)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask="causal")
    want = want.transpose(0, 2, 1, 3).reshape(B, L, H * D)
    got = dense_kernel.attention_bf16(q, k, v, D**-0.5, causal=True, threads=2)
    assert max_rel(got.astype(mx.float32), want.astype(mx.float32)) <= 2 * 2.0**-7
    assert (got == want).astype(mx.float32).mean().item() > 0.99


def test_attention_rejects_what_it_does_not_take(dense_kernel):
    if not dense_kernel.has_dense_bf16():
        return
    x = mx.ones((1, 2, 4, 8), mx.bfloat16)
    with pytest.raises(ValueError, match=r"bfloat16 q \[B, H, L, D\]"):
        dense_kernel.attention_bf16(x.astype(mx.float32), x, x, 1.0)
    with pytest.raises(ValueError, match=r"k, v \[B, Hkv, T, D\]"):
        dense_kernel.attention_bf16(x, mx.ones((1, 3, 4, 8), mx.bfloat16), mx.ones((1, 3, 4, 8), mx.bfloat16), 1.0)
    with pytest.raises(ValueError, match="causal attention needs"):
        dense_kernel.attention_bf16(x, x[:, :, :2], x[:, :, :2], 1.0, causal=True)
    odd = mx.ones((1, 2, 4, 7), mx.bfloat16)
    with pytest.raises(ValueError, match="D even"):
        dense_kernel.attention_bf16(odd, odd, odd, 1.0)


def normal_bf16(shape, seed):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(mx.bfloat16)
