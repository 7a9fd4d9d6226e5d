// The decoder's small ops as single MLX primitives: RMSNorm, the q/k head
// norm with rotary positions, one-query attention over the KV cache, and the
// SwiGLU gate; and the vision tower's LayerNorm and GELU (tanh approximation).
// On MLX's CPU backend `mx.fast.rms_norm`, `mx.fast.rope` and
// `mx.fast.scaled_dot_product_attention` run as their composed fallbacks (5
// to 20 ops each, ~4-5 us of dispatch per op) and `exp` costs ~12 ns per
// element: in a 4-bit decode step these ops took ~26 ms around ~35 ms of
// products. Here each is one op.
//
// Results are rounded where the fallbacks round (every op of a fallback
// rounds to the input dtype), so they match MLX's path up to the order of
// float32 sums and the last bit of exp, sin and cos.

#include <array>
#include <cmath>

#include "common.h"
#include "kernels.h"
#include "rounding.h"

namespace qwen3vl {
namespace {

#ifdef QMV_AVX512_BF16
// One-query attention over a bfloat16 cache with the bfloat16 dot product:
// every product q * k and p * v is exact (both factors are bfloat16), the
// sums float32 in another order than the portable loops below. A cache of
// 1,000 positions: ~13 -> ~30 GB/s.

// scores[g][t] = q_g . k_t for the `group` heads (scaled queries, already
// rounded to bfloat16, in qs [group][D]); D a multiple of 32.
void scores_bf16(const float* qs, int group, int D, const uint16_t* k, int64_t k_row, int T,
                 float* scores) {
  const int chunks = D / 32;
  std::vector<__m512i> queries(size_t(group) * chunks);
  for (int g = 0; g < group; ++g)
    for (int c = 0; c < chunks; ++c) {
      const float* q = qs + size_t(g) * D + 32 * c;
      queries[g * chunks + c] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + 16), _mm512_loadu_ps(q));
    }
  for (int t = 0; t < T; ++t) {
    const uint16_t* key = k + t * k_row;
    for (int g = 0; g < group; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < chunks; ++c)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)queries[g * chunks + c],
                               (__m512bh)_mm512_loadu_si512(key + 32 * c));
      scores[size_t(g) * T + t] = _mm512_reduce_add_ps(acc);
    }
  }
}

// acc[g][:] = sum_t p[g][t] * v_t for G heads (probabilities already rounded
// to bfloat16), two positions per dot product: rows t and t + 1 interleaved.
template <int C, int G>
void values_bf16(const float* probs, int T, const uint16_t* v, int64_t v_row, float* acc) {
  __m512 lo[G][C], hi[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) lo[g][c] = hi[g][c] = _mm512_setzero_ps();
  for (int t = 0; t < T; t += 2) {
    const bool pair = t + 1 < T;
    __m512i p[G];
    for (int g = 0; g < G; ++g) {
      const uint32_t first = bf16_bits(probs[size_t(g) * T + t]);
      const uint32_t second = pair ? bf16_bits(probs[size_t(g) * T + t + 1]) : 0;
      p[g] = _mm512_set1_epi32(int(first | second << 16));
    }
    for (int c = 0; c < C; ++c) {
      const __m512i a = _mm512_loadu_si512(v + t * v_row + 32 * c);
      const __m512i b = pair ? _mm512_loadu_si512(v + (t + 1) * v_row + 32 * c) : _mm512_setzero_si512();
      const __m512i low = _mm512_unpacklo_epi16(a, b), high = _mm512_unpackhi_epi16(a, b);
      for (int g = 0; g < G; ++g) {
        lo[g][c] = _mm512_dpbf16_ps(lo[g][c], (__m512bh)low, (__m512bh)p[g]);
        hi[g][c] = _mm512_dpbf16_ps(hi[g][c], (__m512bh)high, (__m512bh)p[g]);
      }
    }
  }
  // Lane 4L + i of `lo` holds element 8L + i of a 32-element chunk, of `hi` 8L + 4 + i.
  alignas(64) int32_t first[16], second[16];
  for (int j = 0; j < 16; ++j) {
    const int i = j % 8, lane = j / 8;
    first[j] = i < 4 ? 4 * lane + i : 16 + 4 * lane + i - 4;
    second[j] = i < 4 ? 4 * (2 + lane) + i : 16 + 4 * (2 + lane) + i - 4;
  }
  const __m512i first_half = _mm512_load_si512(first), second_half = _mm512_load_si512(second);
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) {
      float* out = acc + size_t(g) * C * 32 + 32 * c;
      _mm512_storeu_ps(out, _mm512_permutex2var_ps(lo[g][c], first_half, hi[g][c]));
      _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(lo[g][c], second_half, hi[g][c]));
    }
}

// values_bf16 for `group` heads, two at a time (the rows are read from cache again).
template <int C>
void values_bf16_heads(const float* probs, int group, int T, const uint16_t* v, int64_t v_row, float* acc) {
  int g = 0;
  for (; g + 1 < group; g += 2) values_bf16<C, 2>(probs + size_t(g) * T, T, v, v_row, acc + size_t(g) * C * 32);
  if (g < group) values_bf16<C, 1>(probs + size_t(g) * T, T, v, v_row, acc + size_t(g) * C * 32);
}

// Head sizes the bfloat16 path takes.
bool values_bf16_fits(int D) { return D == 64 || D == 128 || D == 256; }

void values_bf16_any(const float* probs, int group, int D, int T, const uint16_t* v, int64_t v_row, float* acc) {
  if (D == 64) values_bf16_heads<2>(probs, group, T, v, v_row, acc);
  else if (D == 128) values_bf16_heads<4>(probs, group, T, v, v_row, acc);
  else values_bf16_heads<8>(probs, group, T, v, v_row, acc);
}
#else  // portable builds: never called
bool values_bf16_fits(int) { return false; }
void scores_bf16(const float*, int, int, const uint16_t*, int64_t, int, float*) {}
void values_bf16_any(const float*, int, int, int, const uint16_t*, int64_t, float*) {}
#endif

}  // namespace

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "rms_norm");
  check_float(x, "rms_norm", "x");
  if (weight.dtype() != x.dtype() || weight.ndim() != 1 || x.ndim() < 1 ||
      weight.shape(0) != x.shape(-1))
    throw std::invalid_argument("rms_norm: weight must be [D] of x's dtype for x [..., D]");
  auto fn = [eps](const std::vector<mx::array>& in, mx::array& out) {
    const int n = in[0].shape(-1);
    const size_t rows = in[0].size() / n;
    std::vector<char> x_copy, w_copy;
    const char* x = row_major_data(in[0], x_copy);
    const char* w = row_major_data(in[1], w_copy);
    std::vector<float> row(n);
    dispatch_float(out.dtype(), [&](auto tag) {
      using T = decltype(tag);
      for (size_t r = 0; r < rows; ++r) {
        normalize_row<T>(elements<T>(x) + r * n, elements<T>(w), n, eps, row.data());
        Storage<T>* o = elements<T>(out) + r * n;
        for (int i = 0; i < n; ++i) o[i] = from_rounded<T>(row[i]);
      }
    });
  };
  return mx::array(x.shape(), x.dtype(), std::make_shared<CpuOp>(stream, "RMSNormRows", fn),
                   {x, weight});
}

// mx.fast.layer_norm as its CPU fallback computes it: in float32 x - mean
// times rsqrt(variance + eps), rounded to x's dtype, times the weight
// (rounded), plus the bias (rounded). Rows split over `threads`.
mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias,
                     float eps, int threads, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "layer_norm");
  check_float(x, "layer_norm", "x");
  for (const mx::array* a : {&weight, &bias})
    if (a->dtype() != x.dtype() || a->ndim() != 1 || x.ndim() < 1 || a->shape(0) != x.shape(-1))
      throw std::invalid_argument(
          "layer_norm: weight and bias must be [D] of x's dtype for x [..., D]");
  auto fn = [eps, threads](const std::vector<mx::array>& in, mx::array& out) {
    const int n = in[0].shape(-1);
    const size_t rows = in[0].size() / n;
    std::vector<char> x_copy, w_copy, b_copy;
    const char* x = row_major_data(in[0], x_copy);
    const char* w = row_major_data(in[1], w_copy);
    const char* b = row_major_data(in[2], b_copy);
    dispatch_float(out.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int parts = int(std::min<size_t>(rows, size_t(threads) * 4));
      run_parts(parts, threads, [&](int part) {
        std::vector<float> row(n);
        for (size_t r = rows * part / parts; r < rows * (part + 1) / parts; ++r) {
          to_floats<T>(elements<T>(x) + r * n, row.data(), n);
          const float mean = sum(row.data(), n) * (1.f / n);
          for (int i = 0; i < n; ++i) row[i] -= mean;
          const float inverse = 1.f / std::sqrt(dot(row.data(), row.data(), n) * (1.f / n) + eps);
          Storage<T>* o = elements<T>(out) + r * n;
          for (int i = 0; i < n; ++i) {
            const float scaled = round_to<T>(round_to<T>(row[i] * inverse) * to_float<T>(elements<T>(w)[i]));
            o[i] = round_and_store<T>(scaled + to_float<T>(elements<T>(b)[i]));
          }
        }
      });
    });
  };
  return mx::array(x.shape(), x.dtype(), std::make_shared<CpuOp>(stream, "LayerNormRows", fn),
                   {x, weight, bias});
}

mx::array norm_rope(const mx::array& x, const mx::array& weight, const mx::array& offsets,
                    int n_heads, float eps, float base, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "norm_rope");
  check_float(x, "norm_rope", "x");
  if (x.ndim() != 3 || n_heads <= 0 || x.shape(2) % n_heads != 0)
    throw std::invalid_argument("norm_rope: x must be [B, L, n_heads * D]");
  const int B = x.shape(0), L = x.shape(1), D = x.shape(2) / n_heads;
  if (D % 2 != 0 || weight.dtype() != x.dtype() || weight.ndim() != 1 || weight.shape(0) != D)
    throw std::invalid_argument("norm_rope: weight must be [D] of x's dtype, D even");
  if (offsets.dtype() != mx::int32 || (offsets.size() != 1 && offsets.size() != size_t(B)))
    throw std::invalid_argument("norm_rope: offsets must be int32, one or one per row");
  auto fn = [n_heads, eps, base](const std::vector<mx::array>& in, mx::array& out) {
    const int B = in[0].shape(0), L = in[0].shape(1), H = n_heads;
    const int D = in[0].shape(2) / H;
    std::vector<char> x_copy, w_copy, o_copy;
    const char* x = row_major_data(in[0], x_copy);
    const char* w = row_major_data(in[1], w_copy);
    const int32_t* offsets = reinterpret_cast<const int32_t*>(row_major_data(in[2], o_copy));
    RopeAngles angles(D, base);
    std::vector<float> row(D);
    dispatch_float(out.dtype(), [&](auto tag) {
      using T = decltype(tag);
      for (int b = 0; b < B; ++b)
        for (int l = 0; l < L; ++l) {
          angles.at<T>(float(l) + float(offsets[in[2].size() == 1 ? 0 : b]));
          for (int h = 0; h < H; ++h)
            norm_rope_head<T>(elements<T>(x) + ((size_t(b) * L + l) * H + h) * D, elements<T>(w),
                              D, eps, angles, row.data(),
                              elements<T>(out) + ((size_t(b) * H + h) * L + l) * D);
        }
    });
  };
  return mx::array({B, n_heads, L, D}, x.dtype(), std::make_shared<CpuOp>(stream, "NormRope", fn),
                   {x, weight, offsets});
}

mx::array decode_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                           float scale, std::optional<mx::array> mask, int threads,
                           mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "decode_attention");
  check_float(q, "decode_attention", "q");
  if (q.ndim() != 4 || k.ndim() != 4 || v.shape() != k.shape() || q.shape(2) != 1 ||
      k.shape(0) != q.shape(0) || k.shape(3) != q.shape(3) || k.shape(2) < 1 ||
      q.shape(1) % k.shape(1) != 0)
    throw std::invalid_argument(
        "decode_attention: expected q [B, H, 1, D] and k, v [B, Hkv, T, D] with H a multiple of Hkv");
  if (k.dtype() != q.dtype() || v.dtype() != q.dtype())
    throw std::invalid_argument("decode_attention: q, k and v must share a dtype");
  if (threads < 1 || threads > 256)
    throw std::invalid_argument("decode_attention: threads must be between 1 and 256");
  if (mask) {
    const auto& m = *mask;
    const bool shape_ok = m.ndim() == 4 && (m.shape(0) == 1 || m.shape(0) == q.shape(0)) &&
                          (m.shape(1) == 1 || m.shape(1) == q.shape(1)) && m.shape(2) == 1 &&
                          m.shape(3) == k.shape(2);
    if (!shape_ok || (m.dtype() != mx::bool_ && m.dtype() != q.dtype()))
      throw std::invalid_argument(
          "decode_attention: mask must be [B or 1, H or 1, 1, T], boolean (false = masked) "
          "or additive in q's dtype");
  }
  auto fn = [scale, threads](const std::vector<mx::array>& in, mx::array& out) {
    const mx::array &q = in[0], &k = in[1], &v = in[2];
    const mx::array* mask = in.size() > 3 ? &in[3] : nullptr;
    const int B = q.shape(0), H = q.shape(1), D = q.shape(3);
    const int KV = k.shape(1), T = k.shape(2), group = H / KV;
    std::vector<char> q_copy, k_copy, v_copy, m_copy;
    const char* qd = row_major_data(q, q_copy);
    const char* md = mask ? row_major_data(*mask, m_copy) : nullptr;
    // The cache hands over a slice [..., :T, :] of a longer buffer: read it in
    // place when each position's D values are contiguous.
    const bool k_direct = k.strides(3) == 1, v_direct = v.strides(3) == 1;
    const char* kd = k_direct ? k.data<char>() : row_major_data(k, k_copy);
    const char* vd = v_direct ? v.data<char>() : row_major_data(v, v_copy);
    auto strides_of = [&](const mx::array& a, bool direct) {
      if (direct) return std::array<int64_t, 3>{a.strides(0), a.strides(1), a.strides(2)};
      return std::array<int64_t, 3>{int64_t(KV) * T * D, int64_t(T) * D, D};
    };
    const auto ks = strides_of(k, k_direct), vs = strides_of(v, v_direct);
    dispatch_float(out.dtype(), [&](auto tag) {
      using T_ = decltype(tag);
      const float scale_t = round_to<T_>(scale);  // the fallback multiplies by scale in q's dtype
      const bool fast = std::is_same_v<T_, mx::bfloat16_t> && k_direct && v_direct && values_bf16_fits(D);
      // The `group` query heads of one KV head share each converted K and V row.
      auto heads = [&](int part, int parts) {
        std::vector<float> qs(size_t(group) * D), row(D), scores(size_t(group) * T);
        std::vector<float> acc(size_t(group) * D), totals(group);
        const int pairs = B * KV;
        for (int pair = pairs * part / parts; pair < pairs * (part + 1) / parts; ++pair) {
          const int b = pair / KV, kvh = pair % KV, h0 = kvh * group;
          const Storage<T_>* kb = elements<T_>(kd) + b * ks[0] + kvh * ks[1];
          const Storage<T_>* vb = elements<T_>(vd) + b * vs[0] + kvh * vs[1];
          for (int g = 0; g < group; ++g) {
            const Storage<T_>* qh = elements<T_>(qd) + (size_t(b) * H + h0 + g) * D;
            for (int d = 0; d < D; ++d) qs[g * D + d] = round_to<T_>(scale_t * to_float<T_>(qh[d]));
          }
          if (fast) {
            scores_bf16(qs.data(), group, D, reinterpret_cast<const uint16_t*>(kb), ks[2], T, scores.data());
            for (float& score : scores) score = round_to<T_>(score);
          } else {
            for (int t = 0; t < T; ++t) {
              to_floats<T_>(kb + t * ks[2], row.data(), D);
              for (int g = 0; g < group; ++g)
                scores[size_t(g) * T + t] = round_to<T_>(dot(qs.data() + g * D, row.data(), D));
            }
          }
          // As the fallback: masked scores become the dtype's lowest value (a
          // row with every key masked then attends to all of them evenly);
          // additive masks are added in the dtype.
          for (int g = 0; mask && g < group; ++g) {
            const size_t m_row = (mask->shape(0) == 1 ? 0 : size_t(b)) * mask->shape(1) +
                                 (mask->shape(1) == 1 ? 0 : size_t(h0 + g));
            float* s = scores.data() + size_t(g) * T;
            if (mask->dtype() == mx::bool_) {
              const bool* m = reinterpret_cast<const bool*>(md) + m_row * T;
              for (int t = 0; t < T; ++t) s[t] = m[t] ? s[t] : lowest<T_>();
            } else {
              const Storage<T_>* m = elements<T_>(md) + m_row * T;
              for (int t = 0; t < T; ++t) s[t] = round_to<T_>(s[t] + to_float<T_>(m[t]));
            }
          }
          for (int g = 0; g < group; ++g) {
            float* s = scores.data() + size_t(g) * T;
            const float top = *std::max_element(s, s + T);
            for (int t = 0; t < T; ++t) s[t] = exp_f32(s[t] - top);
            totals[g] = sum(s, T);
          }
          if (fast) {
            for (int g = 0; g < group; ++g)
              for (int t = 0; t < T; ++t)
                scores[size_t(g) * T + t] = round_to<T_>(scores[size_t(g) * T + t] / totals[g]);
            values_bf16_any(scores.data(), group, D, T, reinterpret_cast<const uint16_t*>(vb), vs[2], acc.data());
          } else {
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int t = 0; t < T; ++t) {
              to_floats<T_>(vb + t * vs[2], row.data(), D);
              for (int g = 0; g < group; ++g) {
                const float p = round_to<T_>(scores[size_t(g) * T + t] / totals[g]);
                float* a = acc.data() + g * D;
                for (int d = 0; d < D; ++d) a[d] += p * row[d];
              }
            }
          }
          for (int g = 0; g < group; ++g) {
            Storage<T_>* o = elements<T_>(out) + (size_t(b) * H + h0 + g) * D;
            for (int d = 0; d < D; ++d) o[d] = round_and_store<T_>(acc[g * D + d]);
          }
        }
      };
      // Short caches are not worth waking the pool for.
      const int parts = size_t(B) * H * T * D < (1u << 16) ? 1 : B * KV;
      run_parts(parts, threads, [&](int part) { heads(part, parts); });
    });
  };
  const int B = q.shape(0), H = q.shape(1), D = q.shape(3);
  std::vector<mx::array> inputs = {q, k, v};
  if (mask) inputs.push_back(*mask);
  return mx::array({B, 1, H * D}, q.dtype(),
                   std::make_shared<CpuOp>(stream, "DecodeAttention", fn), std::move(inputs));
}

mx::array silu_mul(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "silu_mul");
  check_float(gate, "silu_mul", "gate");
  if (up.dtype() != gate.dtype() || up.shape() != gate.shape())
    throw std::invalid_argument("silu_mul: gate and up must share shape and dtype");
  auto fn = [](const std::vector<mx::array>& in, mx::array& out) {
    const size_t n = out.size();
    std::vector<char> g_copy, u_copy;
    const char* g = row_major_data(in[0], g_copy);
    const char* u = row_major_data(in[1], u_copy);
    dispatch_float(out.dtype(), [&](auto tag) {
      using T = decltype(tag);
      silu_mul_row<T>(elements<T>(g), elements<T>(u), n, elements<T>(out));
    });
  };
  return mx::array(gate.shape(), gate.dtype(), std::make_shared<CpuOp>(stream, "SiluMul", fn),
                   {gate, up});
}

namespace {

// An elementwise op on a floating-point x, in parts over `threads`: op(T{}, v)
// is the result for element v (as float32, already rounded to T).
template <typename Op>
mx::array elementwise(const mx::array& x, int threads, mx::StreamOrDevice s, const char* name,
                      const char* primitive, Op op) {
  auto stream = cpu_stream(s, name);
  check_float(x, name, "x");
  auto fn = [threads, op](const std::vector<mx::array>& in, mx::array& out) {
    const size_t n = out.size();
    std::vector<char> x_copy;
    const char* data = row_major_data(in[0], x_copy);
    dispatch_float(out.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const Storage<T>* xt = elements<T>(data);
      Storage<T>* o = elements<T>(out);
      constexpr size_t kBlock = 256, kPart = 1 << 16;
      const int parts = int((n + kPart - 1) / kPart);
      run_parts(parts, threads, [&](int part) {
        float block[kBlock];
        const size_t end = std::min(n, (size_t(part) + 1) * kPart);
        for (size_t start = size_t(part) * kPart; start < end; start += kBlock) {
          const int count = int(std::min(kBlock, end - start));
          for (int i = 0; i < count; ++i) block[i] = op(tag, to_float<T>(xt[start + i]));
          for (int i = 0; i < count; ++i) o[start + i] = from_rounded<T>(block[i]);
        }
      });
    });
  };
  return mx::array(x.shape(), x.dtype(), std::make_shared<CpuOp>(stream, primitive, fn), {x});
}

}  // namespace

// nn.gelu_approx(x) = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3))),
// each op rounded to x's dtype as MLX's (compiled) composition rounds, its
// constants too. MLX's CPU version takes ~40 ns per element: ~3 s of the
// vision tower for one 448x448 image.
mx::array gelu_approx(const mx::array& x, int threads, mx::StreamOrDevice s) {
  return elementwise(x, threads, s, "gelu_approx", "GeluApprox", [](auto tag, float v) {
    using T = decltype(tag);
    const float c1 = round_to<T>(0.7978845608028654f), c2 = round_to<T>(0.044715f);
    const float cube = round_to<T>(v * v * v);  // exact in float32 for bfloat16 v
    const float inner = round_to<T>(c1 * round_to<T>(v + round_to<T>(c2 * cube)));
    const float one_plus_tanh = round_to<T>(1.f + round_to<T>(tanh_f32(inner)));
    return round_to<T>(round_to<T>(0.5f * v) * one_plus_tanh);
  });
}

// nn.gelu(x) = x * (1 + erf(x / sqrt(2))) / 2 (the mergers' exact GELU), rounded
// as its MLX composition rounds, with MLX's erf formula. MLX's CPU version
// takes ~23 ns per element (~75 ms for the four mergers of a 448x448 image).
mx::array gelu(const mx::array& x, int threads, mx::StreamOrDevice s) {
  return elementwise(x, threads, s, "gelu", "Gelu", [](auto tag, float v) {
    using T = decltype(tag);
    const float root2 = round_to<T>(1.4142135623730951f);
    const float e = round_to<T>(erf_f32(round_to<T>(v / root2)));
    return round_to<T>(round_to<T>(v * round_to<T>(1.f + e)) / 2.f);
  });
}

// The vision tower's rotary embedding: x [n, H, D] (any float dtype) in float32,
// x * cos + rotate_half(x) * sin with cos, sin [n, 1, D] float32, rounded to
// x's dtype; each float32 product and sum rounded apart, as MLX's ops do.
// MLX's ops: ~1.4 ms per 784 x 16 x 64 call, two a layer.
mx::array rotary(const mx::array& x, const mx::array& cos, const mx::array& sin, int threads,
                 mx::StreamOrDevice s) {
  auto stream = cpu_stream(s, "rotary");
  check_float(x, "rotary", "x");
  if (x.ndim() != 3 || x.shape(2) % 2 != 0 || cos.dtype() != mx::float32 || sin.dtype() != mx::float32 ||
      cos.shape() != sin.shape() || cos.ndim() != 3 || cos.shape(0) != x.shape(0) || cos.shape(1) != 1 ||
      cos.shape(2) != x.shape(2))
    throw std::invalid_argument("rotary: expected x [n, H, D] (D even) and float32 cos, sin [n, 1, D]");
  auto fn = [threads](const std::vector<mx::array>& in, mx::array& out) {
    const int n = in[0].shape(0), H = in[0].shape(1), D = in[0].shape(2), half = D / 2;
    std::vector<char> copies[3];
    const char* xd = row_major_data(in[0], copies[0]);
    const float* cd = reinterpret_cast<const float*>(row_major_data(in[1], copies[1]));
    const float* sd = reinterpret_cast<const float*>(row_major_data(in[2], copies[2]));
    dispatch_float(out.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const Storage<T>* xt = elements<T>(xd);
      Storage<T>* o = elements<T>(out);
      constexpr int kRowsPerPart = 64;
      run_parts((n + kRowsPerPart - 1) / kRowsPerPart, threads, [&](int part) {
        std::vector<float> y(D), direct(D), turned(D);
        for (int i = part * kRowsPerPart; i < std::min(n, (part + 1) * kRowsPerPart); ++i) {
          const float *c = cd + size_t(i) * D, *sn = sd + size_t(i) * D;
          for (int h = 0; h < H; ++h) {
            const size_t row = (size_t(i) * H + h) * D;
            to_floats<T>(xt + row, y.data(), D);
            // Products and sums in separate loops: no fused multiply-add.
            for (int d = 0; d < D; ++d) direct[d] = y[d] * c[d];
            for (int d = 0; d < half; ++d) turned[d] = -y[half + d] * sn[d];
            for (int d = half; d < D; ++d) turned[d] = y[d - half] * sn[d];
            for (int d = 0; d < D; ++d) o[row + d] = round_and_store<T>(direct[d] + turned[d]);
          }
        }
      });
    });
  };
  return mx::array(x.shape(), x.dtype(), std::make_shared<CpuOp>(stream, "Rotary", fn), {x, cos, sin});
}

}  // namespace qwen3vl
