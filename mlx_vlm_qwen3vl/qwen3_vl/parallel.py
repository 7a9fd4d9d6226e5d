"""Products split across the CPU's cores.

MLX's CPU backend runs the operations of one stream on one thread, and its
matmul kernels there (bfloat16, quantized, the bundled reference BLAS) are
single-threaded: a model uses one core however many there are. Operations on
different streams run on different threads. So a product whose output
features are cut into one slice per core, each slice on its own stream, runs
on all of them. Every output element is still computed by the same kernel
from the same inputs: the result is bit-identical to the unsplit product.

Streams are thread-local (`mx.new_thread_local_stream`), like the host's own
generation stream: the server builds and evaluates the model in its worker
thread.

`MLX_VLM_QWEN3VL_THREADS=N` sets the number of slices (1 turns splitting
off); default: the cores this process may run on, at most `MAX_WORKERS`.
"""

import os
from functools import lru_cache
from typing import Callable, Optional

import mlx.core as mx

ENV_VAR = "MLX_VLM_QWEN3VL_THREADS"
MAX_WORKERS = 8
# Narrower slices of a product's output features cost more in scheduling
# than they win.
MIN_SLICE = 32


@lru_cache(maxsize=None)
def _available_cores() -> int:
    """Asked once: every product of every decode step wants the count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_count() -> int:
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return min(_available_cores(), MAX_WORKERS)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(
            f"{ENV_VAR}={value!r}: expected a whole number of threads >= 1 "
            "(1 keeps every product on one core); unset it for the default"
        )
    return int(value)


@lru_cache(maxsize=None)
def worker_streams() -> tuple:
    """One thread-local CPU stream per worker; empty when there is one."""
    count = worker_count()
    if count < 2:
        return ()
    return tuple(mx.new_thread_local_stream(mx.cpu) for _ in range(count))


def slices(size: int, parts: int) -> list:
    bounds = [size * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def split_axis(
    compute: Callable[[slice, Optional[mx.Stream]], mx.array],
    size: int,
    axis: int = -1,
    min_slice: int = MIN_SLICE,
    parts: int = 1,
    parallel: bool = True,
) -> mx.array:
    """`compute(part, stream)` computes the slice `part` of an output axis of
    length `size` on `stream`; the slices are joined along `axis`.

    One slice per worker stream when `parallel` (and on the CPU), and at
    least `parts` slices, taken by the streams in turn (each stream runs its
    slices one after another). One slice is `compute(slice(None), None)`."""
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    streams = worker_streams() if parallel and on_cpu else ()
    count = min(max(parts, len(streams)), size // min_slice)
    if count < 2:
        return compute(slice(None), None)
    lanes = streams or (None,)
    outputs = [
        compute(part, lanes[i % len(lanes)]) for i, part in enumerate(slices(size, count))
    ]
    return mx.concatenate(outputs, axis=axis)
