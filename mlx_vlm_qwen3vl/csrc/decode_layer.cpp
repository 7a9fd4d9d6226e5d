// A decoder layer's decode step (one new token per row) in two ops around the
// KV cache update and the attention, for 4/8-bit quantized or dense bfloat16
// projections:
//
//   decode_qkv:          n = RMSNorm(x); q, k, v = n W_q, n W_k, n W_v;
//                        q and k each get their per-head RMSNorm and rotary positions
//   decode_residual_mlp: h = x + attn W_o;  h + (silu(m W_gate) * (m W_up)) W_down, m = RMSNorm(h)
//
// Separately these are 18 of a quantized layer's 23 MLX ops (norms, products,
// slices of the products' joint output, reshapes, adds, the SwiGLU gate), ~500
// of a 28-layer decode step: each op costs a few microseconds to build in Python and to
// dispatch, and between them one core idles while the other runs the small
// ops. Every intermediate is rounded to x's dtype where the separate ops round
// (the helpers of rounding.h and the same product code: quantized_rows,
// dense), so the results are the same bits.

#include "common.h"
#include "kernels.h"
#include "rounding.h"

namespace qwen3vl {
namespace {

constexpr int kMaxDecodeRows = 8;  // quantized_rows takes at most 8 rows

// What both ops check first (x [B, 1, D], the thread count); their CPU stream.
mx::Stream check_call(const mx::array& x, int threads, mx::StreamOrDevice s, const char* op) {
  auto stream = cpu_stream(s, op);
  check_float(x, op, "x");
  if (x.ndim() != 3 || x.shape(1) != 1 || x.shape(0) < 1 || x.shape(0) > kMaxDecodeRows)
    throw std::invalid_argument(std::string(op) + ": x must be [B, 1, D] with B <= 8");
  check_threads_and_dtype(threads, x.dtype());
  return stream;
}

void check_norm(const mx::array& weight, const mx::array& x, int size, const char* op) {
  if (weight.dtype() != x.dtype() || weight.ndim() != 1 || weight.shape(0) != size)
    throw std::invalid_argument(std::string(op) + ": a norm weight is not [" +
                                std::to_string(size) + "] of x's dtype");
}

// How the projections come: affine-quantized (weight, scales, biases each), or
// with bits 0 dense bfloat16 weights (one array each; AVX-512 BF16 builds).
struct Weights {
  int group_size, bits;
  bool dense() const { return bits == 0; }
  int arrays() const { return dense() ? 1 : 3; }  // per matrix
};

// Checks `count` matrices against an input of `in_features` and appends them
// to `inputs`; returns the sum of their output features.
int add_matrices(const std::vector<mx::array>& matrices, int count, int in_features,
                 Weights weights, mx::Dtype x_dtype, const char* op,
                 std::vector<mx::array>& inputs) {
  const int per = weights.arrays();
  if (int(matrices.size()) != per * count)
    throw std::invalid_argument(std::string(op) + ": expected " + std::to_string(count) +
                                (weights.dense() ? " dense weights" : " matrices as (weight, scales, biases) each"));
  if (weights.dense() && (!has_dense_bf16() || x_dtype != mx::bfloat16))
    throw std::invalid_argument(std::string(op) + ": dense weights (bits 0) need bfloat16 x and "
                                "an AVX-512 BF16 build");
  int total = 0;
  for (int i = 0; i < count; ++i) {
    const mx::array& w = matrices[per * i];
    if (weights.dense() && (w.dtype() != mx::bfloat16 || w.ndim() != 2 || w.shape(1) != in_features))
      throw std::invalid_argument(std::string(op) + ": a dense weight is not bfloat16 [N, " +
                                  std::to_string(in_features) + "]");
    if (!weights.dense())
      check_quantized_matrix(in_features, w, matrices[per * i + 1], matrices[per * i + 2],
                             weights.group_size, weights.bits);
    total += w.shape(0);
  }
  inputs.insert(inputs.end(), matrices.begin(), matrices.end());
  return total;
}

// x [rows, in_features] times `count` matrices, their outputs side by side
// [rows, total] and rounded to T as the separate product ops store them.
template <typename T>
std::vector<Storage<T>> rounded_products(const Storage<T>* x, int rows, int in_features,
                                         const mx::array* matrices, int count, int total,
                                         mx::Dtype dtype, Weights weights, int threads) {
  std::vector<float> products(size_t(rows) * total);
  if (!weights.dense()) {
    quantized_rows(reinterpret_cast<const char*>(x), dtype, rows, in_features, matrices, count,
                   weights.group_size, weights.bits, threads, products.data());
  } else {
#ifdef QMV_AVX512_BF16
    std::vector<float> part;
    for (int i = 0, column = 0; i < count; column += matrices[i].shape(0), ++i) {
      const mx::array& w = matrices[i];
      const int n = w.shape(0);
      part.resize(size_t(rows) * n);
      dense(reinterpret_cast<const uint16_t*>(x), rows, w.data<uint16_t>(), size_t(w.strides(0)),
            in_features, n, nullptr, part.data(), threads);
      for (int r = 0; r < rows; ++r)
        std::copy_n(part.data() + size_t(r) * n, n, products.data() + size_t(r) * total + column);
    }
#endif
  }
  std::vector<Storage<T>> out(products.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = round_and_store<T>(products[i]);
  return out;
}

template <typename T>
std::vector<Storage<T>> normalized_rows(const Storage<T>* x, const Storage<T>* weight, int rows,
                                        int n, float eps) {
  std::vector<Storage<T>> out(size_t(rows) * n);
  std::vector<float> row(n);
  for (int r = 0; r < rows; ++r) {
    normalize_row<T>(x + size_t(r) * n, weight, n, eps, row.data());
    for (int i = 0; i < n; ++i) out[size_t(r) * n + i] = from_rounded<T>(row[i]);
  }
  return out;
}

}  // namespace

std::vector<mx::array> decode_qkv(const mx::array& x, const mx::array& norm_weight,
                                  const std::vector<mx::array>& projections, const mx::array& q_norm,
                                  const mx::array& k_norm, const mx::array& offsets, int n_heads,
                                  float eps, float head_eps, float base, int group_size, int bits,
                                  int threads, mx::StreamOrDevice s) {
  constexpr const char* op = "decode_qkv";
  auto stream = check_call(x, threads, s, op);
  const Weights weights{group_size, bits};
  const int per = weights.arrays(), B = x.shape(0), D = x.shape(2);
  check_norm(norm_weight, x, D, op);
  std::vector<mx::array> inputs = {x, norm_weight};
  add_matrices(projections, 3, D, weights, x.dtype(), op, inputs);
  const int head_dim = q_norm.ndim() == 1 ? q_norm.shape(0) : 0;
  const int nq = projections[0].shape(0), nk = projections[per].shape(0), nv = projections[2 * per].shape(0);
  if (n_heads <= 0 || head_dim <= 0 || head_dim % 2 || nq != n_heads * head_dim ||
      nk % head_dim || nv != nk)
    throw std::invalid_argument(
        "decode_qkv: expected q rows n_heads * head_dim, k and v rows alike, head_dim even");
  check_norm(q_norm, x, head_dim, op);
  check_norm(k_norm, x, head_dim, op);
  if (offsets.dtype() != mx::int32 || (offsets.size() != 1 && offsets.size() != size_t(B)))
    throw std::invalid_argument("decode_qkv: offsets must be int32, one or one per row");
  inputs.insert(inputs.end(), {q_norm, k_norm, offsets});
  const int n_kv_heads = nk / head_dim;

  auto fn = [=](const std::vector<mx::array>& in, std::vector<mx::array>& out) {
    std::vector<char> x_copy, n_copy, qn_copy, kn_copy, o_copy;
    const char* x_data = row_major_data(in[0], x_copy);
    const char* norm = row_major_data(in[1], n_copy);
    const int norms = 2 + 3 * per;  // q_norm, k_norm, offsets follow the matrices
    const char* qn = row_major_data(in[norms], qn_copy);
    const char* kn = row_major_data(in[norms + 1], kn_copy);
    const mx::array& offsets = in[norms + 2];
    const int32_t* offset = reinterpret_cast<const int32_t*>(row_major_data(offsets, o_copy));
    const int total = nq + nk + nv;
    dispatch_float(in[0].dtype(), [&](auto tag) {
      using T = decltype(tag);
      const auto normed = normalized_rows<T>(elements<T>(x_data), elements<T>(norm), B, D, eps);
      const auto qkv = rounded_products<T>(normed.data(), B, D, &in[2], 3, total, in[0].dtype(),
                                           weights, threads);
      RopeAngles angles(head_dim, base);
      std::vector<float> row(head_dim);
      for (int b = 0; b < B; ++b) {
        const Storage<T>* projected = qkv.data() + size_t(b) * total;
        angles.at<T>(float(offset[offsets.size() == 1 ? 0 : b]));
        for (int h = 0; h < n_heads; ++h)
          norm_rope_head<T>(projected + h * head_dim, elements<T>(qn), head_dim, head_eps, angles,
                            row.data(), elements<T>(out[0]) + (size_t(b) * n_heads + h) * head_dim);
        for (int h = 0; h < n_kv_heads; ++h)
          norm_rope_head<T>(projected + nq + h * head_dim, elements<T>(kn), head_dim, head_eps,
                            angles, row.data(),
                            elements<T>(out[1]) + (size_t(b) * n_kv_heads + h) * head_dim);
        std::memcpy(elements<T>(out[2]) + size_t(b) * nv, projected + nq + nk, nv * sizeof(Storage<T>));
      }
    });
  };
  return mx::array::make_arrays(
      {{B, n_heads, 1, head_dim}, {B, n_kv_heads, 1, head_dim}, {B, n_kv_heads, 1, head_dim}},
      {x.dtype(), x.dtype(), x.dtype()},
      std::make_shared<CpuMultiOp>(stream, "DecodeQKV", fn,
                                   [per](const std::vector<mx::array>& in) {
                                     check_contiguous_rows(in, 2, 2 + 3 * per, "decode_qkv");
                                   }),
      inputs);
}

mx::array decode_residual_mlp(const mx::array& attn, const mx::array& x,
                              const std::vector<mx::array>& o_proj, const mx::array& norm_weight,
                              float eps, const std::vector<mx::array>& mlp, int group_size,
                              int bits, int threads, mx::StreamOrDevice s) {
  constexpr const char* op = "decode_residual_mlp";
  auto stream = check_call(x, threads, s, op);
  const Weights weights{group_size, bits};
  const int per = weights.arrays(), B = x.shape(0), D = x.shape(2);
  if (attn.dtype() != x.dtype() || attn.ndim() != 3 || attn.shape(0) != B || attn.shape(1) != 1)
    throw std::invalid_argument("decode_residual_mlp: attn must be [B, 1, A] of x's dtype");
  const int A = attn.shape(2);
  std::vector<mx::array> inputs = {attn, x};
  if (add_matrices(o_proj, 1, A, weights, x.dtype(), op, inputs) != D)
    throw std::invalid_argument("decode_residual_mlp: o_proj must give x's width");
  check_norm(norm_weight, x, D, op);
  inputs.push_back(norm_weight);
  std::vector<mx::array> gate_up(mlp.begin(), mlp.begin() + std::min<size_t>(2 * per, mlp.size()));
  std::vector<mx::array> down(mlp.begin() + gate_up.size(), mlp.end());
  const int both = add_matrices(gate_up, 2, D, weights, x.dtype(), op, inputs);
  const int I = gate_up[0].shape(0);
  if (both != 2 * I || add_matrices(down, 1, I, weights, x.dtype(), op, inputs) != D)
    throw std::invalid_argument("decode_residual_mlp: expected gate and up [I, D] and down [D, I]");

  auto fn = [=](const std::vector<mx::array>& in, mx::array& out) {
    std::vector<char> a_copy, x_copy, n_copy;
    const char* attn_data = row_major_data(in[0], a_copy);
    const char* x_data = row_major_data(in[1], x_copy);
    const char* norm = row_major_data(in[2 + per], n_copy);
    const mx::Dtype dtype = in[0].dtype();
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      const auto o = rounded_products<T>(elements<T>(attn_data), B, A, &in[2], 1, D, dtype,
                                         weights, threads);
      const Storage<T>* residual = elements<T>(x_data);
      std::vector<Storage<T>> h(size_t(B) * D);
      for (size_t i = 0; i < h.size(); ++i)
        h[i] = round_and_store<T>(to_float<T>(residual[i]) + to_float<T>(o[i]));
      const auto m = normalized_rows<T>(h.data(), elements<T>(norm), B, D, eps);
      const auto gu = rounded_products<T>(m.data(), B, D, &in[3 + per], 2, 2 * I, dtype, weights, threads);
      std::vector<Storage<T>> gated(size_t(B) * I);
      for (int b = 0; b < B; ++b)
        silu_mul_row<T>(gu.data() + size_t(b) * 2 * I, gu.data() + size_t(b) * 2 * I + I, I,
                        gated.data() + size_t(b) * I);
      const auto d = rounded_products<T>(gated.data(), B, I, &in[3 + 3 * per], 1, D, dtype, weights, threads);
      Storage<T>* result = elements<T>(out);
      for (size_t i = 0; i < h.size(); ++i)
        result[i] = round_and_store<T>(to_float<T>(h[i]) + to_float<T>(d[i]));
    });
  };
  return mx::array(x.shape(), x.dtype(),
                   std::make_shared<CpuOp>(stream, "DecodeResidualMLP", fn,
                                           [per](const std::vector<mx::array>& in) {
                                             check_contiguous_rows(in, 2, 2 + per, "decode_residual_mlp");
                                             check_contiguous_rows(in, 3 + per, 3 + 4 * per,
                                                                   "decode_residual_mlp");
                                           }),
                   inputs);
}

}  // namespace qwen3vl
