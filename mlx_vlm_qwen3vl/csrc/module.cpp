// Python bindings of the native CPU kernels (nanobind, in MLX's type domain).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "kernels.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace qwen3vl;

NB_MODULE(_quantized_matvec, m) {
  m.doc() = "Native CPU kernels for Qwen3-VL on MLX: products and the decoder's small ops.";
  m.def("quantized_matvec", &quantized_matvec, "x"_a, "w"_a, "scales"_a, "biases"_a,
        "group_size"_a, "bits"_a, nb::kw_only(), "threads"_a = 1, "dtype"_a = nb::none(),
        "stream"_a = nb::none(),
        "x @ dequantize(w, scales, biases).T (x in blocks of 8 rows), summed in\n"
        "float32 and returned as `dtype` (default float32), on `threads` threads.");
  m.def("quantized_matvec_many", &quantized_matvec_many, "x"_a, "weights"_a, "scales"_a,
        "biases"_a, "group_size"_a, "bits"_a, nb::kw_only(), "threads"_a = 1,
        "dtype"_a = nb::none(), "stream"_a = nb::none(),
        "The products of x (at most 8 rows) with several quantized matrices of one\n"
        "group size and width, concatenated along the last axis: one op, one pass\n"
        "of the thread pool. Each column equals quantized_matvec's.");
  m.def("matmul_bf16", &matmul_bf16, "x"_a, "w"_a, "bias"_a = nb::none(), nb::kw_only(),
        "threads"_a = 1, "dtype"_a = nb::none(), "stream"_a = nb::none(),
        "x @ w.T (+ bias) for bfloat16 x and w, summed in float32, returned as `dtype`\n"
        "(default bfloat16), on `threads` threads. AVX-512 BF16 builds only.");
  m.def("rms_norm", &rms_norm, "x"_a, "weight"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "RMSNorm over the last axis, rounded as mx.fast.rms_norm's CPU fallback rounds.");
  m.def("layer_norm", &layer_norm, "x"_a, "weight"_a, "bias"_a, "eps"_a, nb::kw_only(),
        "threads"_a = 1, "stream"_a = nb::none(),
        "LayerNorm over the last axis, rounded as mx.fast.layer_norm's CPU fallback rounds.");
  m.def("norm_rope", &norm_rope, "x"_a, "weight"_a, "offsets"_a, "n_heads"_a, "eps"_a, "base"_a,
        nb::kw_only(), "stream"_a = nb::none(),
        "x [B, L, n_heads * D] -> [B, n_heads, L, D]: RMSNorm of each head, then\n"
        "rotary positions offsets[b] + l (mx.fast.rope, traditional=False).");
  m.def("decode_attention", &decode_attention, "q"_a, "k"_a, "v"_a, "scale"_a,
        "mask"_a = nb::none(), nb::kw_only(), "threads"_a = 1, "stream"_a = nb::none(),
        "Attention of one query per row, q [B, H, 1, D] over k, v [B, Hkv, T, D], with an\n"
        "optional mask [B or 1, H or 1, 1, T] (boolean or additive); returns [B, 1, H * D].");
  m.def("silu_mul", &silu_mul, "gate"_a, "up"_a, nb::kw_only(), "stream"_a = nb::none(),
        "silu(gate) * up, rounded as nn.silu(gate) * up rounds.");
  m.def("gelu_approx", &gelu_approx, "x"_a, nb::kw_only(), "threads"_a = 1, "stream"_a = nb::none(),
        "nn.gelu_approx(x) (tanh approximation), rounded as its MLX composition rounds,\n"
        "on `threads` threads.");
  m.def("gelu", &gelu, "x"_a, nb::kw_only(), "threads"_a = 1, "stream"_a = nb::none(),
        "nn.gelu(x) (erf), rounded as its MLX composition rounds, on `threads` threads.");
  m.def("rotary", &rotary, "x"_a, "cos"_a, "sin"_a, nb::kw_only(), "threads"_a = 1,
        "stream"_a = nb::none(),
        "x [n, H, D] * cos + rotate_half(x) * sin in float32 (cos, sin [n, 1, D]), as x's dtype.");
  m.def("attention_bf16", &attention_bf16, "q"_a, "k"_a, "v"_a, "scale"_a, nb::kw_only(),
        "causal"_a = false, "threads"_a = 1, "stream"_a = nb::none(),
        "softmax(q k^T * scale) v, unmasked or causal (query l sees keys up to T - L + l),\n"
        "for bfloat16 q [B, H, L, D], k, v [B, Hkv, T, D]; returns [B, L, H * D].\n"
        "AVX-512 BF16 builds only.");
  m.def("decode_qkv", &decode_qkv, "x"_a, "norm_weight"_a, "projections"_a, "q_norm"_a,
        "k_norm"_a, "offsets"_a, "n_heads"_a, "eps"_a, "head_eps"_a, "base"_a, "group_size"_a,
        "bits"_a, nb::kw_only(), "threads"_a = 1, "stream"_a = nb::none(),
        "A decode step's attention inputs, x [B, 1, D] -> [q, k, v] ([B, heads, 1, hd]):\n"
        "RMSNorm, the q/k/v products (projections: weight, scales, biases of each;\n"
        "with bits 0 one dense bfloat16 weight each), per-head RMSNorm and rotary\n"
        "positions `offsets` of q and k. The same bits as the separate ops.");
  m.def("decode_residual_mlp", &decode_residual_mlp, "attn"_a, "x"_a, "o_proj"_a,
        "norm_weight"_a, "eps"_a, "mlp"_a, "group_size"_a, "bits"_a, nb::kw_only(),
        "threads"_a = 1, "stream"_a = nb::none(),
        "The rest of a decode step's layer: h = x + o_proj(attn), then h + the SwiGLU\n"
        "MLP of RMSNorm(h) (mlp: gate, up, down, given as in decode_qkv). The same\n"
        "bits as the separate ops.");
  m.def("copy_to_huge_pages", &copy_to_huge_pages, "arrays"_a,
        "Copies of the evaluated `arrays`, together in one 2 MB-aligned arena that asks\n"
        "Linux for transparent huge pages (freed with the last copy); strided views and\n"
        "other systems: the arrays themselves.");
  m.def("collapse_to_huge_pages", &collapse_to_huge_pages, "a"_a,
        "Asks Linux to back the whole 2 MB pages inside the evaluated array `a` with huge\n"
        "pages, now (MADV_COLLAPSE); returns the bytes it did (0 where it cannot).");
  m.def("release_free_memory", &release_free_memory,
        "Returns the C heap's free pages to the system (glibc's malloc_trim).");
  m.def("huge_pages_available", &huge_pages_available, "Can this build place arrays in huge pages?");
  m.def("has_dense_bf16", &has_dense_bf16, "Does this build have matmul_bf16?");
  m.def("kernel_name", &kernel_name, "Which code path this build runs.");
}
