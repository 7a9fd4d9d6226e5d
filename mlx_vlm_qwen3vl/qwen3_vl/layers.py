"""Linear and embedding layers that take the fast kernel on MLX's CPU backend.

Off the CPU (Metal, CUDA) these are exactly `nn.Linear`, `nn.Embedding` and
their quantized forms. On the CPU (mlx[cpu] on Linux) MLX's own kernels set
the cost (shared/notes/mlx-cpu-performance.md, benchmarks/bench_blas.py), and
the same arithmetic is much faster in another form:

- Quantized weights: the native kernel (cpu_kernel.py) streams the packed
  weights once per 8 rows, ~20x faster than MLX's `quantized_matmul` at one
  row; from 16 bfloat16 rows (prefill) it packs 32 output features at a time
  (~340 GFLOP/s on two cores with AVX-512 BF16). Only where it lacks that
  path (another CPU, other activation dtypes) do many rows go to dequantize +
  sgemm when an optimized BLAS is loaded. Without the
  kernel: `quantized_matmul` with float32 activations, scales and biases for
  a few rows (~8x faster than with bfloat16 ones), dequantize + matmul for
  more (~19x faster than `quantized_matmul` in bfloat16 at 128 rows). All of
  these are closer to the exact product than MLX's bfloat16 kernel.
- Dense bfloat16 weights: MLX's CPU bfloat16 matmul runs at ~7 GFLOP/s
  per core (~2 GB/s as a matrix-vector product); the native kernel, where
  the CPU has AVX-512 BF16, does ~350-380 GFLOP/s on two cores for the
  vision tower and prefill (packed panels; an optimized float32 sgemm
  reaches ~185 here) and ~22x MLX's speed per decode product.
- Without that kernel path, with an optimized BLAS preloaded
  (`MLX_VLM_QWEN3VL_BLAS`, see cpu_blas.py), bfloat16 products of several
  rows (prefill, the vision tower) run in float32 through sgemm (6-40x
  faster than MLX's bfloat16 matmul); the vision tower then runs wholly in
  float32 (`vision_compute_dtype`). Single rows keep their kernel: upcasting
  a matrix-vector product costs more than it saves.
- MLX's CPU kernels use one thread: every product not handed to the fast
  BLAS runs its output features in slices, one stream per core
  (parallel.py; bit-identical). Dense temporaries (dequantized or upcast
  weight rows) come in bounded slices.

Every result is cast back to the input's dtype.
"""

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from mlx_vlm_qwen3vl import cpu_kernel

from .parallel import split_axis, worker_count

# Up to this many rows a quantized product stays with the native kernel even
# when a fast BLAS is loaded, and (without the kernel) float32
# quantized_matmul beats dequantize + matmul.
QUANTIZED_KERNEL_MAX_ROWS = 8
# Bound on the temporaries of one slice of a product (see _sliced_product).
TEMPORARY_SLICE_BYTES = 1 << 20


@lru_cache(maxsize=None)
def cpu_policy():
    """(on_cpu, fast_blas): decided once per process."""
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    if not on_cpu:
        return False, False
    from mlx_vlm_qwen3vl import cpu_blas

    return True, cpu_blas.loaded_library is not None


def is_loadable_weight(name: str, parameter_names: set) -> bool:
    """Is checkpoint key `name` a parameter of a module with these parameter
    names? Scales and biases of a quantized weight count: they exist only
    after the host's nn.quantize, which runs after sanitize."""
    if name in parameter_names:
        return True
    stem, _, leaf = name.rpartition(".")
    return leaf in ("scales", "biases") and f"{stem}.weight" in parameter_names


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1] if x.ndim else 1


def _upcast(x: mx.array) -> bool:
    """Run this dense product in float32 through the fast BLAS? (Only asked
    when the native bfloat16 kernel does not take it.)"""
    on_cpu, fast_blas = cpu_policy()
    return fast_blas and x.dtype != mx.float32 and _rows(x) > 1


def vision_compute_dtype(dtype):
    """The vision tower is matmul-bound on every row: with a fast BLAS on the
    CPU and no native bfloat16 kernel run all of it (attention and norms too)
    in float32."""
    on_cpu, fast_blas = cpu_policy()
    if not fast_blas or _kernel_with_dense_bf16() is not None:
        return dtype
    return mx.float32


def _cpu_quantized(layer) -> bool:
    on_cpu, _ = cpu_policy()
    return on_cpu and layer.mode == "affine"


def _goes_to_fast_blas(x: mx.array) -> bool:
    """Would a dense matmul of x call the fast BLAS (which uses every core)?"""
    return x.dtype == mx.float32 and _rows(x) > 1 and cpu_policy()[1]


def _sliced_product(product, out_features: int, temporary_row_bytes: int, parallel: bool):
    """Runs `product(rows, stream)` over slices of the output features:
    one per core when `parallel`, and small enough that the temporaries a
    slice builds (`temporary_row_bytes` per output feature: dequantized or
    upcast weight rows, float32 scales) stay under TEMPORARY_SLICE_BYTES.
    MLX's CPU dequantize needs ~5x its output."""
    parts = -(-out_features * temporary_row_bytes // TEMPORARY_SLICE_BYTES)
    return split_axis(product, out_features, parts=parts, parallel=parallel)


def _native_kernel(layer, x: mx.array):
    """The native kernel, when it takes this product: always, unless an
    optimized BLAS does many rows faster after dequantizing (where the kernel
    has no packed panels for them: bfloat16 x on an AVX-512 BF16 build)."""
    if layer.bits not in (4, 8) or "biases" not in layer or x.shape[-1] % layer.group_size:
        return None
    if _rows(x) > QUANTIZED_KERNEL_MAX_ROWS and cpu_policy()[1]:
        if x.dtype != mx.bfloat16 or _kernel_with_dense_bf16() is None:
            return None
    return cpu_kernel.load()


def _quantized_product(layer, x: mx.array) -> mx.array:
    """x @ W.T for a quantized W: the native kernel, else MLX's kernels in
    float32 unless dense bf16 is the fast way."""
    weight, scales, biases = layer["weight"], layer["scales"], layer.get("biases")
    kwargs = dict(group_size=layer.group_size, bits=layer.bits)
    out_features = weight.shape[0]
    kernel = _native_kernel(layer, x)
    if kernel is not None:
        # The kernel splits the rows over the cores itself: syncing worker
        # streams would cost more than a decode-sized product takes.
        # Results come in x's dtype unless a bias is still to be added in float32.
        threads = worker_count()
        dtype = mx.float32 if "bias" in layer else x.dtype
        return kernel.quantized_matvec(
            x, weight, scales, biases, **kwargs, threads=threads, dtype=dtype
        )
    # Only the products depend on x: without this the worker streams would
    # dequantize (or upcast) every layer's weights ahead of the activations.
    weight, scales = mx.depends([weight, scales], [x])
    if biases is not None:
        biases = mx.depends(biases, x)
    if _rows(x) <= QUANTIZED_KERNEL_MAX_ROWS:
        f32 = mx.float32
        x = x.astype(f32)

        def product(rows, stream):
            upcast = [None if a is None else a[rows].astype(f32, stream=stream) for a in (scales, biases)]
            return mx.quantized_matmul(
                x, weight[rows], *upcast, transpose=True, **kwargs, stream=stream
            )

        scale_bytes = 2 * scales.shape[-1] * f32.size
        return _sliced_product(product, out_features, scale_bytes, parallel=True)
    dtype = mx.float32 if _upcast(x) else x.dtype
    x = x.astype(dtype)

    def product(rows, stream):
        dense = mx.dequantize(
            weight[rows], scales[rows], None if biases is None else biases[rows],
            **kwargs, dtype=dtype, stream=stream,
        )
        return mx.matmul(x, dense.T, stream=stream)

    dense_bytes = x.shape[-1] * dtype.size
    return _sliced_product(product, out_features, dense_bytes, not _goes_to_fast_blas(x))


def products(modules, x: mx.array) -> list:
    """[m(x) for m in modules]; on the CPU in one native op where they are
    quantized layers of one width and group size without a bias and x has at
    most QUANTIZED_KERNEL_MAX_ROWS rows (a decode step's q/k/v and gate/up:
    fewer ops and one pass of the thread pool instead of three or two). The
    outputs are the same numbers, as views of one array."""
    kernel = one_op_kernel(modules, x)
    if kernel is None:
        return [m(x) for m in modules]
    first = modules[0]
    out = kernel.quantized_matvec_many(
        x, [m["weight"] for m in modules], [m["scales"] for m in modules],
        [m["biases"] for m in modules], first.group_size, first.bits,
        threads=worker_count(), dtype=x.dtype,
    )
    outputs, start = [], 0
    for m in modules:
        end = start + m["weight"].shape[0]
        outputs.append(out[..., start:end])
        start = end
    return outputs


def one_op_kernel(modules, x: mx.array):
    """The native kernel when it can take these quantized layers' products
    of x in one op (see products), else None."""
    if _rows(x) > QUANTIZED_KERNEL_MAX_ROWS:
        return None
    first = modules[0]
    for m in modules:
        if type(m) is not QuantizedLinear or not _cpu_quantized(m) or "bias" in m:
            return None
        if (m.bits, m.group_size) != (first.bits, first.group_size):
            return None
    return _native_kernel(first, x)


def dense_kernel(modules, x: mx.array):
    """The native kernel when it takes every one of these dense layers'
    products of inputs like x: bfloat16 weights without a bias, in widths of
    32, on a CPU with AVX-512 BF16 (what Linear runs there for each)."""
    if not cpu_policy()[0]:
        return None
    for m in modules:
        weight = m["weight"]
        if type(m) is not Linear or "bias" in m or weight.dtype != mx.bfloat16 or weight.shape[-1] % 32:
            return None
    return _native_dense_kernel(x, modules[0]["weight"])


def _native_dense_kernel(x: mx.array, weight: mx.array):
    """The native bfloat16 kernel, when it takes this product: bfloat16 x and
    W on a CPU with AVX-512 BF16 (faster than a BLAS's float32 sgemm)."""
    if x.dtype != mx.bfloat16 or weight.dtype != mx.bfloat16 or x.shape[-1] % 32:
        return None
    return _kernel_with_dense_bf16()


def native_attention_kernel(q: mx.array):
    """The native kernel for attention without a mask (the vision tower's
    windows): bfloat16 queries on a CPU with AVX-512 BF16. MLX's CPU attention
    runs as its fallback, ~0.7 s per vision layer for one 448x448 image."""
    if q.dtype != mx.bfloat16 or q.shape[-1] % 2 or not cpu_policy()[0]:
        return None
    return _kernel_with_dense_bf16()


def _kernel_with_dense_bf16():
    """The native kernel if this build has its AVX-512 BF16 path, else None."""
    kernel = cpu_kernel.load()
    return kernel if kernel is not None and kernel.has_dense_bf16() else None


def dense_product(x: mx.array, weight: mx.array, bias=None) -> mx.array:
    """x @ W.T (+ bias); on the CPU the native kernel for bfloat16, else MLX's
    matmul split over the cores, in float32 through the fast BLAS when it pays."""
    if not cpu_policy()[0]:
        return mx.matmul(x, weight.T) if bias is None else mx.addmm(bias, x, weight.T)
    kernel = _native_dense_kernel(x, weight)
    if kernel is not None:
        threads = worker_count()
        return kernel.matmul_bf16(x, weight, bias, threads=threads, dtype=x.dtype)
    upcast = _upcast(x)
    if upcast:
        weight, = mx.depends([weight], [x])
        x = x.astype(mx.float32)

    def product(rows, stream):
        w = weight[rows].astype(x.dtype, stream=stream) if upcast else weight[rows]
        if bias is None:
            return mx.matmul(x, w.T, stream=stream)
        return mx.addmm(bias[rows].astype(w.dtype), x, w.T, stream=stream)

    temporary_bytes = x.shape[-1] * x.dtype.size if upcast else 0
    return _sliced_product(product, weight.shape[0], temporary_bytes, not _goes_to_fast_blas(x))


class Linear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        on_cpu, _ = cpu_policy()
        if not on_cpu:
            return super().__call__(x)
        return dense_product(x, self.weight, self.get("bias")).astype(x.dtype)

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if not _cpu_quantized(self):
            return super().__call__(x)
        out = _quantized_product(self, x)
        if "bias" in self:
            out = out + self["bias"].astype(out.dtype)
        return out.astype(x.dtype)


class Embedding(nn.Embedding):
    def as_linear(self, x: mx.array) -> mx.array:
        """The tied output head: the largest product of every decode step."""
        on_cpu, _ = cpu_policy()
        if not on_cpu:
            return super().as_linear(x)
        return dense_product(x, self.weight).astype(x.dtype)

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedEmbedding.from_embedding(self, group_size, bits, mode)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        """The tied output head: the largest product of every decode step."""
        if not _cpu_quantized(self):
            return super().as_linear(x)
        return _quantized_product(self, x).astype(x.dtype)
