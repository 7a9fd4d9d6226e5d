"""Linear layers that take the fast kernel on MLX's CPU backend.

Off the CPU (Metal, CUDA) these are exactly `nn.Linear` and
`nn.QuantizedLinear`. On the CPU (mlx[cpu] on Linux) MLX's own kernels are
the bottleneck (shared/notes/mlx-cpu-performance.md, benchmarks/bench_blas.py):

- `quantized_matmul` is ~19x slower than dequantizing the weight and doing a
  dense product, for prefill-shaped inputs (128 rows), and a little slower
  even for one row; so quantized layers dequantize on the CPU.
- bfloat16 and float16 products never reach BLAS. With an optimized BLAS
  preloaded (`MLX_VLM_QWEN3VL_BLAS`, see cpu_blas.py), inputs of several rows
  (prefill, the vision tower) run the product in float32 through sgemm (6-40x
  faster) and cast the result back. Single rows (decode) stay as they are:
  upcasting a matrix-vector product costs more than it saves.

Both are the same arithmetic up to float rounding (float32 accumulation).
"""

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn


@lru_cache(maxsize=None)
def cpu_policy():
    """(on_cpu, fast_blas): decided once per process."""
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    if not on_cpu:
        return False, False
    from mlx_vlm_qwen3vl import cpu_blas

    return True, cpu_blas.loaded_library is not None


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1] if x.ndim else 1


def _upcast(x: mx.array) -> bool:
    """Run this product in float32 through the fast BLAS?"""
    on_cpu, fast_blas = cpu_policy()
    return fast_blas and x.dtype != mx.float32 and _rows(x) > 1


class Linear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        if not _upcast(x):
            return super().__call__(x)
        out = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        if "bias" in self:
            out = out + self.bias.astype(mx.float32)
        return out.astype(x.dtype)

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        on_cpu, _ = cpu_policy()
        if not on_cpu or self.mode != "affine":
            return super().__call__(x)
        dtype = mx.float32 if _upcast(x) else x.dtype
        weight = mx.dequantize(
            self["weight"],
            self["scales"],
            self.get("biases"),
            group_size=self.group_size,
            bits=self.bits,
            dtype=dtype,
        )
        out = x.astype(dtype) @ weight.T
        if "bias" in self:
            out = out + self["bias"].astype(dtype)
        return out.astype(x.dtype)
