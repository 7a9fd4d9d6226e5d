// Element types and rounding shared by the decoder's native ops
// (decode_ops.cpp, decode_layer.cpp): every helper rounds where the MLX op it
// stands for rounds, so that fused and separate ops give the same bits.
#pragma once

#include "common.h"

namespace qwen3vl {

// Rounds a float32 value to T and back (what an MLX op on T arrays does).
template <typename T>
inline float round_to(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, mx::bfloat16_t>) {
    return bf16_to_float(bf16_bits(v));
  } else {
    return static_cast<float>(T(v));
  }
}

// How T is stored: bfloat16 as its raw bits, so that loops over it vectorize
// (MLX's bfloat16_t is a struct the vectorizer has no vector type for).
template <typename T>
using Storage = std::conditional_t<std::is_same_v<T, mx::bfloat16_t>, uint16_t, T>;

template <typename T>
inline float to_float(Storage<T> v) {
  if constexpr (std::is_same_v<T, mx::bfloat16_t>) return bf16_to_float(v);
  else return static_cast<float>(v);
}

// A float32 value already rounded to T, stored as T (exact: no rounding left).
template <typename T>
inline Storage<T> from_rounded(float v) {
  if constexpr (std::is_same_v<T, mx::bfloat16_t>) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    return uint16_t(bits >> 16);
  } else {
    return T(v);
  }
}

template <typename T>
inline Storage<T> round_and_store(float v) {
  return from_rounded<T>(round_to<T>(v));
}

template <typename T>
inline void to_floats(const Storage<T>* src, float* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = to_float<T>(src[i]);
}

template <typename T>
inline const Storage<T>* elements(const char* data) {
  return reinterpret_cast<const Storage<T>*>(data);
}

template <typename T>
inline Storage<T>* elements(mx::array& out) {
  return reinterpret_cast<Storage<T>*>(out.data<char>());
}

template <typename F>
inline void dispatch_float(mx::Dtype dtype, F&& f) {
  switch (dtype) {
    case mx::float32: return f(float{});
    case mx::bfloat16: return f(mx::bfloat16_t{});
    default: return f(mx::float16_t{});
  }
}

inline void check_float(const mx::array& a, const char* op, const char* what) {
  if (a.dtype() != mx::float32 && a.dtype() != mx::bfloat16 && a.dtype() != mx::float16)
    throw std::invalid_argument(std::string(op) + ": " + what + " must be floating point");
}

inline mx::Stream cpu_stream(mx::StreamOrDevice s, const char* op) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu)
    throw std::invalid_argument(std::string(op) + ": a CPU stream is required");
  return stream;
}

// x * rsqrt(mean(x^2) + eps), rounded, times the weight, rounded.
template <typename T>
inline void normalize_row(const Storage<T>* x, const Storage<T>* weight, int n, float eps, float* out) {
  to_floats<T>(x, out, n);
  const float mean_square = dot(out, out, n) * (1.f / n);
  const float r = 1.f / std::sqrt(mean_square + eps);
  for (int i = 0; i < n; ++i) out[i] = round_to<T>(round_to<T>(out[i] * r) * to_float<T>(weight[i]));
}

// mx.fast.rope's fallback (traditional=False) at one position: inv_freq[i] =
// exp(-i * log(base) / half) in float32, cos and sin of position * inv_freq
// rounded to T.
struct RopeAngles {
  std::vector<float> inv_freq, cosines, sines;

  RopeAngles(int head_dim, float base)
      : inv_freq(head_dim / 2), cosines(head_dim / 2), sines(head_dim / 2) {
    const int half = head_dim / 2;
    const float step = float(std::log(double(base)) / half);
    for (int i = 0; i < half; ++i) inv_freq[i] = std::exp(float(-i) * step);
  }

  template <typename T>
  void at(float position) {
    for (size_t i = 0; i < inv_freq.size(); ++i) {
      const float theta = position * inv_freq[i];
      cosines[i] = round_to<T>(std::cos(theta));
      sines[i] = round_to<T>(std::sin(theta));
    }
  }
};

// One head [D]: RMSNorm (`row`: D floats of scratch), then the rotation at
// the angles last set.
template <typename T>
inline void norm_rope_head(const Storage<T>* x, const Storage<T>* weight, int D, float eps,
                           const RopeAngles& angles, float* row, Storage<T>* out) {
  normalize_row<T>(x, weight, D, eps, row);
  const int half = D / 2;
  const float* cosines = angles.cosines.data();
  const float* sines = angles.sines.data();
  for (int i = 0; i < half; ++i) {
    const float x1 = row[i], x2 = row[half + i];
    out[i] = round_and_store<T>(round_to<T>(x1 * cosines[i]) - round_to<T>(x2 * sines[i]));
    out[half + i] = round_and_store<T>(round_to<T>(x1 * sines[i]) + round_to<T>(x2 * cosines[i]));
  }
}

// nn.silu(gate) * up for n elements: sigmoid, times gate, times up; each rounded.
template <typename T>
inline void silu_mul_row(const Storage<T>* gate, const Storage<T>* up, size_t n, Storage<T>* out) {
  constexpr size_t kBlock = 256;
  float block[kBlock];
  for (size_t start = 0; start < n; start += kBlock) {
    const int count = int(std::min(kBlock, n - start));
    for (int i = 0; i < count; ++i) {
      const float x = to_float<T>(gate[start + i]);
      const float sigmoid = round_to<T>(1.f / (1.f + exp_f32(-x)));
      block[i] = round_to<T>(round_to<T>(x * sigmoid) * to_float<T>(up[start + i]));
    }
    for (int i = 0; i < count; ++i) out[start + i] = from_rounded<T>(block[i]);
  }
}

}  // namespace qwen3vl
