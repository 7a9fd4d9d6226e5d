// Attention of many queries, without a mask (the vision tower's windows) or
// causal (the text prefill, grouped-query heads), in bfloat16 with the dense
// kernel's dot products. MLX's CPU
// `scaled_dot_product_attention` runs as its fallback: two bfloat16 matmuls at
// ~7 GFLOP/s on one core and a softmax at ~16 ns per score; for one 448x448
// image (784 patches, 16 heads) that is ~0.7 s per layer, half the tower.
//
// Rounded as the fallback rounds: q * scale, the scores and the
// probabilities to bfloat16; sums and the softmax in float32.

#include <cmath>

#include "common.h"
#include "kernels.h"

namespace qwen3vl {
namespace {

#ifdef QMV_AVX512_BF16
// V [T, D] as panels of 32 of its D columns, each [ceil(T / 2)][32] pairs of
// positions (2p, 2p + 1), zero past T.
void pack_values(const uint16_t* v, int T, int D, std::vector<uint32_t>& packed) {
  const int pairs = (T + 1) / 2;
  packed.assign(size_t((D + 31) / 32) * pairs * 32, 0);
  for (int t = 0; t < T; ++t)
    for (int d = 0; d < D; ++d)
      packed[(size_t(d / 32) * pairs + t / 2) * 32 + d % 32] |= uint32_t(v[size_t(t) * D + d]) << (16 * (t % 2));
}

// One (batch, head): q [L, D] (scaled), k and v [T, D] contiguous; out rows
// `out_stride` apart. K and V are packed once, for every block of queries.
// Causal: query l sees keys up to T - L + l, and the others get the lowest
// bfloat16 score, as the fallback's mask does.
void head_attention(const uint16_t* q, const uint16_t* k, const uint16_t* v, int L, int T, int D,
                    bool causal, uint16_t* out, size_t out_stride) {
  constexpr int kBlock = 32;  // query rows at a time: scores stay in L2
  const int key_pairs = D / 2, value_pairs = (T + 1) / 2;
  thread_local std::vector<uint32_t> keys, values;
  keys.resize(size_t((T + 31) / 32) * key_pairs * 32);
  pack_panels(k, D, D, T, keys.data());  // the keys as a weight matrix [T, D]
  pack_values(v, T, D, values);
  std::vector<float> scores(size_t(kBlock) * T), mixed(size_t(kBlock) * D);
  std::vector<uint16_t> probabilities(size_t(kBlock) * 2 * value_pairs);
  for (int first = 0; first < L; first += kBlock) {
    const int rows = std::min(kBlock, L - first);
    // Keys no row of this block sees (causal) get probability 0: skip them.
    const int seen = causal ? std::min(T, T - L + first + rows) : T;
    const int seen_pairs = (seen + 1) / 2, stride = 2 * seen_pairs;  // a zero after an odd count
    packed_product(q + size_t(first) * D, rows, D, keys.data(), key_pairs, size_t(key_pairs) * 32, seen,
                   scores.data(), seen);
    for (int r = 0; r < rows; ++r) {
      float* s = scores.data() + size_t(r) * seen;
      const int visible = causal ? std::min(T, T - L + first + r + 1) : T;
      for (int t = 0; t < seen; ++t)
        s[t] = t < visible ? bf16_to_float(bf16_bits(s[t])) : lowest<mx::bfloat16_t>();
      const float top = max(s, seen);
      for (int t = 0; t < seen; ++t) s[t] = exp_f32(s[t] - top);
      const float total = sum(s, seen);
      uint16_t* p = probabilities.data() + size_t(r) * stride;
      for (int t = 0; t < seen; ++t) p[t] = bf16_bits(s[t] / total);
      if (seen < stride) p[seen] = 0;
    }
    packed_product(probabilities.data(), rows, stride, values.data(), seen_pairs, size_t(value_pairs) * 32,
                   D, mixed.data(), D);
    for (int r = 0; r < rows; ++r)
      for (int d = 0; d < D; ++d)
        out[(size_t(first) + r) * out_stride + d] = bf16_bits(mixed[size_t(r) * D + d]);
  }
}
#endif

}  // namespace

mx::array attention_bf16(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                         bool causal, int threads, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (!has_dense_bf16())
    throw std::invalid_argument("attention_bf16: this build has no AVX-512 BF16 path");
  if (stream.device != mx::Device::cpu)
    throw std::invalid_argument("attention_bf16: a CPU stream is required");
  if (q.dtype() != mx::bfloat16 || k.dtype() != mx::bfloat16 || v.dtype() != mx::bfloat16 ||
      q.ndim() != 4 || k.shape() != v.shape() || k.ndim() != 4 || k.shape(0) != q.shape(0) ||
      q.shape(1) % k.shape(1) != 0 || k.shape(3) != q.shape(3) || q.shape(3) % 2 != 0)
    throw std::invalid_argument(
        "attention_bf16: expected bfloat16 q [B, H, L, D] and k, v [B, Hkv, T, D] with H a "
        "multiple of Hkv and D even");
  if (causal && k.shape(2) < q.shape(2))
    throw std::invalid_argument("attention_bf16: causal attention needs T >= L keys");
  if (threads < 1 || threads > 256)
    throw std::invalid_argument("attention_bf16: threads must be between 1 and 256");
  auto fn = [scale, causal, threads](const std::vector<mx::array>& in, mx::array& out) {
#ifdef QMV_AVX512_BF16
    const int B = in[0].shape(0), H = in[0].shape(1), L = in[0].shape(2), D = in[0].shape(3);
    const int KV = in[1].shape(1), T = in[1].shape(2), group = H / KV;
    std::vector<char> copies[3];
    const uint16_t* data[3];
    for (int i = 0; i < 3; ++i)
      data[i] = reinterpret_cast<const uint16_t*>(row_major_data(in[i], copies[i]));
    const float scale_bf16 = bf16_to_float(bf16_bits(scale));
    uint16_t* o = reinterpret_cast<uint16_t*>(out.data<char>());
    run_parts(B * H, threads, [&](int pair) {
      const int b = pair / H, h = pair % H;
      const size_t kv_head = size_t(b) * KV + h / group;
      std::vector<uint16_t> qs(size_t(L) * D);
      const uint16_t* qh = data[0] + size_t(pair) * L * D;
      for (size_t i = 0; i < qs.size(); ++i) qs[i] = bf16_bits(scale_bf16 * bf16_to_float(qh[i]));
      // out [B, L, H * D]: this head's D columns of each row.
      head_attention(qs.data(), data[1] + kv_head * T * D, data[2] + kv_head * T * D, L, T, D, causal,
                     o + size_t(b) * L * H * D + size_t(h) * D, size_t(H) * D);
    });
#endif
  };
  const int B = q.shape(0), H = q.shape(1), L = q.shape(2), D = q.shape(3);
  return mx::array({B, L, H * D}, mx::bfloat16,
                   std::make_shared<CpuOp>(stream, "AttentionBf16", fn), {q, k, v});
}

}  // namespace qwen3vl
