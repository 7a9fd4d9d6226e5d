// The primitives the extension exports (bound to Python in module.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "mlx/mlx.h"

namespace qwen3vl {

namespace mx = mlx::core;

// Products (quantized_matvec.cpp).
mx::array quantized_matvec(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits, int threads,
                           std::optional<mx::Dtype> dtype, mx::StreamOrDevice s);
// Several quantized matrices times the same x (at most 8 rows): one output
// [..., sum of their out features], each column as quantized_matvec gives it.
mx::array quantized_matvec_many(const mx::array& x, const std::vector<mx::array>& weights,
                                const std::vector<mx::array>& scales,
                                const std::vector<mx::array>& biases, int group_size, int bits,
                                int threads, std::optional<mx::Dtype> dtype,
                                mx::StreamOrDevice s);
// out [rows, sum of their out features] (float32) = x [rows, in_features]
// (at most 8 rows of x_dtype) times `count` quantized matrices given as
// matrices[3i] (w), [3i + 1] (scales), [3i + 2] (biases), each column as
// quantized_matvec computes it; on `threads` threads.
void quantized_rows(const char* x, mx::Dtype x_dtype, int rows, int in_features,
                    const mx::array* matrices, int count, int group_size, int bits, int threads,
                    float* out);
// The argument checks of the quantized products.
void check_quantized_matrix(int in_features, const mx::array& w, const mx::array& scales,
                            const mx::array& biases, int group_size, int bits);
void check_quantized(const mx::array& x, const mx::array& w, const mx::array& scales,
                     const mx::array& biases, int group_size, int bits);
void check_threads_and_dtype(int threads, mx::Dtype dtype);
// inputs[first, last) have contiguous rows (a check where MLX evaluates the op:
// strides are only known then).
void check_contiguous_rows(const std::vector<mx::array>& inputs, int first, int last,
                           const char* op);
mx::array matmul_bf16(const mx::array& x, const mx::array& w, std::optional<mx::array> bias,
                      int threads, std::optional<mx::Dtype> dtype, mx::StreamOrDevice s);
bool has_dense_bf16();
// out [rows, N] (float32) = x [rows, K] @ w[N, K].T (+ bias), bfloat16 inputs as raw
// bits, row stride of w `w_stride` elements; AVX-512 BF16 builds only.
void dense(const uint16_t* x, int rows, const uint16_t* w, size_t w_stride, int in_features,
           int out_features, const float* bias, float* out, int threads);
// The same product with w packed once by the caller for many x: panels of 32
// output features, panel i at packed + i * panel_stride holding pairs
// [K / 2][32] (bfloat16 bits of w[n][2p] | w[n][2p + 1] << 16); the first
// `pairs` pairs are used (x rows x_stride apart, 2 * pairs elements each).
void packed_product(const uint16_t* x, int rows, int x_stride, const uint32_t* packed, int pairs,
                    size_t panel_stride, int out_features, float* out, size_t out_stride);
// w [N, K] (K even) packed that way: ceil(N / 32) panels of K / 2 pairs, zeros
// past N (panel_stride K / 2 * 32).
void pack_panels(const uint16_t* w, size_t w_stride, int in_features, int out_features,
                 uint32_t* packed);
const char* kernel_name();

// A decoder layer's decode step in two ops (decode_layer.cpp).
// [q [B, H, 1, hd], k [B, Hkv, 1, hd], v [B, Hkv, 1, hd]] for x [B, 1, D]:
// projections = q, k, v as (weight, scales, biases) each, or with bits 0 as
// dense bfloat16 weights (one array each).
std::vector<mx::array> decode_qkv(const mx::array& x, const mx::array& norm_weight,
                                  const std::vector<mx::array>& projections, const mx::array& q_norm,
                                  const mx::array& k_norm, const mx::array& offsets, int n_heads,
                                  float eps, float head_eps, float base, int group_size, int bits,
                                  int threads, mx::StreamOrDevice s);
// mlp = gate, up, down, given as the projections above.
mx::array decode_residual_mlp(const mx::array& attn, const mx::array& x,
                              const std::vector<mx::array>& o_proj, const mx::array& norm_weight,
                              float eps, const std::vector<mx::array>& mlp, int group_size,
                              int bits, int threads, mx::StreamOrDevice s);

// The decoder's small ops (decode_ops.cpp).
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s);
mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias,
                     float eps, int threads, mx::StreamOrDevice s);
mx::array norm_rope(const mx::array& x, const mx::array& weight, const mx::array& offsets,
                    int n_heads, float eps, float base, mx::StreamOrDevice s);
mx::array decode_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                           float scale, std::optional<mx::array> mask, int threads,
                           mx::StreamOrDevice s);
mx::array silu_mul(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s);
mx::array gelu_approx(const mx::array& x, int threads, mx::StreamOrDevice s);
mx::array gelu(const mx::array& x, int threads, mx::StreamOrDevice s);
mx::array rotary(const mx::array& x, const mx::array& cos, const mx::array& sin, int threads,
                 mx::StreamOrDevice s);
mx::array attention_bf16(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                         bool causal, int threads, mx::StreamOrDevice s);

// Weights in transparent huge pages (huge_pages.cpp).
bool huge_pages_available();
std::vector<mx::array> copy_to_huge_pages(const std::vector<mx::array>& arrays);
size_t collapse_to_huge_pages(const mx::array& a);
void release_free_memory();

}  // namespace qwen3vl
