"""Products split across the CPU's cores (qwen3_vl/parallel.py): the same
numbers bit for bit, from any thread, with bounded temporaries."""

import threading

import mlx.core as mx
import numpy as np
import pytest

from mlx_vlm_qwen3vl import cpu_kernel
from mlx_vlm_qwen3vl.qwen3_vl import layers, parallel


@pytest.fixture
def workers(monkeypatch):
    """Set the worker count; records how many slices each split made."""
    monkeypatch.setattr(layers, "cpu_policy", lambda: (True, False))
    made = []
    real_slices = parallel.slices

    def recording_slices(size, parts):
        made.append(parts)
        return real_slices(size, parts)

    monkeypatch.setattr(parallel, "slices", recording_slices)

    def set_workers(count):
        monkeypatch.setenv(parallel.ENV_VAR, str(count))
        parallel.worker_streams.cache_clear()
        made.clear()
        return made

    yield set_workers
    parallel.worker_streams.cache_clear()


def seeded_layers(dtype=mx.bfloat16):
    mx.random.seed(11)
    dense = layers.Linear(256, 1000, bias=True)
    dense.bias = mx.random.normal((1000,)) * 0.1
    head = layers.Embedding(3000, 256)
    for module in (dense, head):
        module.update({k: v.astype(dtype) for k, v in module.parameters().items()})
    return dense, head


def products(dense, head, x):
    return [dense(x), head.as_linear(x)]


@pytest.fixture(params=["native kernel", "mlx kernels"])
def native(request, monkeypatch):
    """With the native kernel (which splits its rows itself) and without it."""
    if request.param == "mlx kernels":
        monkeypatch.setattr(cpu_kernel, "load", lambda: None)
    return request.param == "native kernel"


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_dense_products_split_across_workers_are_bit_identical(workers, native, rows, dtype):
    dense, head = seeded_layers(dtype)
    x = mx.random.normal((2, rows, 256)).astype(dtype)
    workers(1)
    single = products(dense, head, x)
    made = workers(3)
    split = products(dense, head, x)
    if native and dtype == mx.bfloat16 and cpu_kernel.load().has_dense_bf16():
        assert made == []  # the native kernel splits its rows over the cores itself
    else:
        assert made == [3, 3]  # 1000 and 3000 output features, three workers
    for a, b in zip(single, split):
        assert a.dtype == dtype and a.shape == b.shape
        assert mx.array_equal(a, b)


@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_products_split_across_workers_are_bit_identical(workers, native, rows, bits):
    dense, head = seeded_layers()
    dense, head = dense.to_quantized(64, bits), head.to_quantized(64, bits)
    x = mx.random.normal((1, rows, 256)).astype(mx.bfloat16)
    workers(1)
    single = products(dense, head, x)
    made = workers(2)
    split = products(dense, head, x)
    if native:
        assert made == []  # the native kernel splits its rows over the cores itself
    else:
        assert made and all(parts >= 2 for parts in made)
    for a, b in zip(single, split):
        assert mx.array_equal(a, b)


def test_vision_attention_split_by_heads_is_bit_identical(workers, tiny_checkpoint):
    from mlx_vlm.utils import load_model

    model = load_model(tiny_checkpoint)
    tower = model.vision_tower
    rng = np.random.default_rng(0)
    grid = mx.array([[1, 4, 6], [2, 4, 4]])
    pixels = mx.array(rng.standard_normal((24 + 32, tower.patch_dim)).astype(np.float32))
    workers(1)
    merged, deepstack = tower(pixels, grid)
    made = workers(2)
    merged_split, deepstack_split = tower(pixels, grid)
    assert 2 in made
    assert mx.array_equal(merged, merged_split)
    assert all(mx.array_equal(a, b) for a, b in zip(deepstack, deepstack_split))


def test_split_products_run_from_another_thread(workers):
    """The server builds and evaluates the model in a worker thread: the
    streams are thread-local, like the host's generation stream."""
    dense, head = seeded_layers()
    x = mx.random.normal((1, 1, 256)).astype(mx.bfloat16)
    workers(2)
    expected = products(dense, head, x)  # streams first used on this thread
    mx.eval(expected, x, dense.parameters(), head.parameters())
    results = []
    generation_stream = mx.new_thread_local_stream(mx.cpu)  # as mlx-vlm's generate

    def run():
        try:
            with mx.stream(generation_stream):
                out = products(dense, head, x)
            mx.eval(out)
            results.append(out)
        except Exception as exc:  # surfaced in the assertion below
            results.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not isinstance(results[0], Exception), results[0]
    assert all(mx.array_equal(a, b) for a, b in zip(expected, results[0]))


def test_dequantized_temporaries_stay_bounded(workers, native):
    """A 16-row product through a 4-bit 32768 x 2048 head (128 MB dense in
    bfloat16): MLX's CPU dequantize needs ~5x its output, so unsliced this
    held about 640 MB."""
    workers(2)
    head = layers.Embedding(32768, 2048)
    head.set_dtype(mx.bfloat16)
    head = head.to_quantized(64, 4)
    x = mx.random.normal((1, 16, 2048)).astype(mx.bfloat16)
    mx.eval(head.parameters(), x)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    out = head.as_linear(x)
    mx.eval(out)
    extra = mx.get_peak_memory() - before
    assert extra < 128 * 2**20, f"{extra / 2**20:.0f} MB of temporaries"


@pytest.mark.parametrize("value", ["zero", "0", "-2", "1.5"])
def test_bad_thread_count_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(parallel.ENV_VAR, value)
    with pytest.raises(ValueError, match=f"{parallel.ENV_VAR}=.*whole number"):
        parallel.worker_count()


def test_default_is_the_available_cores(monkeypatch):
    monkeypatch.delenv(parallel.ENV_VAR, raising=False)
    monkeypatch.setattr(parallel, "_available_cores", lambda: 64)
    assert parallel.worker_count() == parallel.MAX_WORKERS
    monkeypatch.setattr(parallel, "_available_cores", lambda: 2)
    assert parallel.worker_count() == 2


def test_nothing_is_split_off_the_cpu(workers, monkeypatch):
    workers(2)
    monkeypatch.setattr(parallel.mx, "default_device", lambda: mx.Device(mx.gpu))
    calls = []
    parallel.split_axis(lambda part, stream: calls.append((part, stream)) or mx.zeros(4), 4096)
    assert calls == [(slice(None), None)]
