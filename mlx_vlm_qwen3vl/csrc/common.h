// What the native CPU kernels share: MLX and the SIMD path they build
// against, dtype helpers and the worker pool.
#pragma once

#include <algorithm>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && !defined(QMV_GENERIC)
#define QMV_AVX512_BF16 1
#include <immintrin.h>
#endif

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace qwen3vl {

namespace mx = mlx::core;

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// float32 -> bfloat16 bits, rounded to nearest even as MLX's conversion does
// (branch-free so that loops over it vectorize; NaN stays NaN, overflow goes
// to infinity).
inline uint16_t bf16_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// The lowest finite value of T, as float32 (what MLX's attention fallback puts in masked scores).
template <typename T>
inline float lowest() {
  if constexpr (std::is_same_v<T, float>) return -3.4028234663852886e38f;
  else if constexpr (std::is_same_v<T, mx::bfloat16_t>) return -3.3895313892515355e38f;
  else return -65504.f;
}

// Scales, biases and activations arrive as float32, float16 or bfloat16:
// `count` of them from element `start` of `data`, as float32.
inline void load_floats(const void* data, mx::Dtype dtype, size_t start, size_t count, float* out) {
  switch (dtype) {
    case mx::float32:
      std::memcpy(out, static_cast<const float*>(data) + start, count * sizeof(float));
      break;
    case mx::bfloat16: {
      auto p = static_cast<const uint16_t*>(data) + start;
      for (size_t i = 0; i < count; ++i) out[i] = bf16_to_float(p[i]);
      break;
    }
    default: {
      auto p = static_cast<const mx::float16_t*>(data) + start;
      for (size_t i = 0; i < count; ++i) out[i] = static_cast<float>(p[i]);
    }
  }
}

inline void load_floats(const mx::array& a, size_t start, size_t count, float* out) {
  load_floats(a.data<void>(), a.dtype(), start, count, out);
}

// The elements of `a` in row-major order (raw bytes): its own buffer when it
// is row-contiguous, else a gathered copy kept in `storage`.
inline const char* row_major_data(const mx::array& a, std::vector<char>& storage) {
  if (a.flags().row_contiguous) return a.data<char>();
  const int64_t item = a.itemsize();
  storage.resize(a.size() * item);
  const char* base = a.data<char>();
  const int outer_dims = int(a.ndim()) - 1;
  const int64_t inner = a.shape(-1), inner_stride = a.strides(-1);
  const size_t rows = inner ? a.size() / inner : 0;
  std::vector<int64_t> index(outer_dims, 0);
  char* out = storage.data();
  // Row by row along the last axis: one memcpy per row when it is contiguous.
  for (size_t r = 0; r < rows; ++r, out += inner * item) {
    int64_t offset = 0;
    for (int d = 0; d < outer_dims; ++d) offset += index[d] * a.strides(d);
    const char* row = base + offset * item;
    if (inner_stride == 1) {
      std::memcpy(out, row, inner * item);
    } else {
      for (int64_t i = 0; i < inner; ++i) std::memcpy(out + i * item, row + i * inner_stride * item, item);
    }
    for (int d = outer_dims - 1; d >= 0 && ++index[d] == a.shape(d); --d) index[d] = 0;
  }
  return storage.data();
}

// float32 results into an output of another float dtype, rounded as astype does.
inline void store_as(const float* values, size_t count, mx::array& out, size_t offset) {
  if (out.dtype() == mx::bfloat16) {
    auto p = out.data<mx::bfloat16_t>() + offset;
    for (size_t i = 0; i < count; ++i) p[i] = mx::bfloat16_t(values[i]);
  } else {
    auto p = out.data<mx::float16_t>() + offset;
    for (size_t i = 0; i < count; ++i) p[i] = mx::float16_t(values[i]);
  }
}

// Runs compute(first_row, rows, results) for the `rows` rows of an output
// [rows, width]: straight into `out` when it is float32, else into a float32
// buffer this thread keeps and then rounded into `out` as astype rounds, in
// chunks of at most 64 MB (and at least min_chunk rows). A fresh float32
// buffer of tens of MB per call (one 896x896 image's MLP: 51 MB) costs page
// faults and zeroing every time: a third of the product's time.
template <typename F>
void into_output(mx::array& out, int rows, int width, int min_chunk, F&& compute) {
  if (out.dtype() == mx::float32) return compute(0, rows, out.data<float>());
  constexpr size_t kScratchBytes = size_t(64) << 20;
  const int chunk = std::max<int>(min_chunk, kScratchBytes / (sizeof(float) * std::max(width, 1)));
  thread_local std::unique_ptr<float[]> scratch;
  thread_local size_t capacity = 0;
  const size_t needed = size_t(std::min(chunk, rows)) * width;
  if (needed > capacity) {
    scratch.reset(new float[needed]);
    capacity = needed;
  }
  for (int first = 0; first < rows; first += chunk) {
    const int count = std::min(chunk, rows - first);
    compute(first, count, scratch.get());
    store_as(scratch.get(), size_t(count) * width, out, size_t(first) * width);
  }
}

// The sum of 16 partial sums, pairwise (a short dependency chain).
inline float reduce16(float* partial) {
  for (int width = 8; width >= 1; width /= 2)
    for (int j = 0; j < width; ++j) partial[j] += partial[j + width];
  return partial[0];
}

// Sum of a[i] * b[i] in 16 partial sums (vectorizes without reassociating).
inline float dot(const float* a, const float* b, int n) {
  float partial[16] = {};
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) partial[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) partial[i % 16] += a[i] * b[i];
  return reduce16(partial);
}

inline float sum(const float* a, int n) {
  float partial[16] = {};
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) partial[j] += a[i + j];
  for (; i < n; ++i) partial[i % 16] += a[i];
  return reduce16(partial);
}

// The largest of a[0..n) (n >= 1), in 16 partial maxima so that it vectorizes.
inline float max(const float* a, int n) {
  float partial[16];
  for (int j = 0; j < 16; ++j) partial[j] = a[0];
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) partial[j] = std::max(partial[j], a[i + j]);
  for (; i < n; ++i) partial[0] = std::max(partial[0], a[i]);
  for (int width = 8; width >= 1; width /= 2)
    for (int j = 0; j < width; ++j) partial[j] = std::max(partial[j], partial[j + width]);
  return partial[0];
}

// exp(x) in float32 within ~2 ulp (Cephes' expf), written so that loops over
// it vectorize (std::exp is a call per element, std::floor stops GCC).
// Arguments are clamped to [-87.33, 88]: results stay finite and normal.
inline float exp_f32(float x) {
  x = std::min(88.f, std::max(-87.33f, x));
  const float t = x * 1.44269504088896341f;
  const float n = float(int32_t(t + (t >= 0.f ? 0.5f : -0.5f)));  // nearest integer
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// tanh(x) in float32 within a few ulp (Cephes' tanhf), branch-free so that
// loops over it vectorize: an odd polynomial below |x| = 0.625, else
// 1 - 2 / (exp(2|x|) + 1) with x's sign.
inline float tanh_f32(float x) {
  const float a = std::fabs(x), s = x * x;
  const float small =
      ((((-5.70498872745e-3f * s + 2.06390887954e-2f) * s - 5.37397155531e-2f) * s +
        1.33314422036e-1f) * s - 3.33332819422e-1f) * s * x + x;
  const float magnitude = 1.f - 2.f / (exp_f32(2.f * std::min(a, 44.f)) + 1.f);
  const float large = x < 0.f ? -magnitude : magnitude;  // not copysign: GCC would not vectorize it
  return a < 0.625f ? small : large;
}

// erf(x) as MLX's CPU backend computes it (Abramowitz-Stegun 7.1.26 with
// fma, PyTorch's vectorized formula), with exp_f32 for exp.
inline float erf_f32(float x) {
  const float a = std::fabs(x);
  const float t = 1.f / std::fma(0.3275911f, a, 1.f);
  float r = std::fma(1.061405429f, t, -1.453152027f);
  r = std::fma(r, t, 1.421413741f);
  r = std::fma(r, t, -0.284496736f);
  r = std::fma(r, t, 0.254829592f);
  const float e = -exp_f32(-x * x);
  const float result = std::fma(e * t, r, 1.f);
  return x > 0.f ? result : -result;
}

// A few threads that take parts of one product. MLX runs a stream's work on
// one thread and syncs streams with events; splitting each product over
// streams costs more in those syncs than a decode-sized product takes.
// Parts are handed out as threads get free, so a thread that loses its core
// for a while (to the Python thread building the next step) leaves its parts
// to the others instead of holding everyone up.
class WorkerPool {
 public:
  static WorkerPool& get() {
    static WorkerPool* pool = new WorkerPool();  // never destroyed: workers outlive exit
    return *pool;
  }

  // Runs task(0) .. task(parts - 1) on `threads` threads, this one included.
  void run(int parts, int threads, const std::function<void(int)>& task) {
    std::lock_guard<std::mutex> one_job_at_a_time(run_mutex_);
    threads = std::max(1, std::min(threads, parts));
    grow(threads - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &task;
      parts_ = parts;
      helpers_ = threads - 1;
      next_.store(0);
      pending_.store(threads - 1);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    take_parts();
    while (pending_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  }

 private:
  void take_parts() {
    for (int part; (part = next_.fetch_add(1, std::memory_order_relaxed)) < parts_;) (*task_)(part);
  }

  void grow(int workers) {
    while (int(threads_.size()) < workers) {
      int index = int(threads_.size());
      threads_.emplace_back([this, index] { work(index); });
      threads_.back().detach();
    }
  }

  void work(int index) {
    uint64_t seen = 0;
    for (;;) {
      // Spin a little before sleeping: decode issues products back to back.
      for (int spin = 0; spin < kSpins && generation_.load(std::memory_order_acquire) == seen; ++spin)
        std::this_thread::yield();
      bool helping;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        seen = generation_.load();
        helping = index < helpers_;
      }
      if (helping) {
        take_parts();
        pending_.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* task_ = nullptr;
  int parts_ = 0, helpers_ = 0;
  std::atomic<int> next_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  static constexpr int kSpins = 4000;
};

// A primitive whose CPU work is one function of its inputs' data that fills
// its outputs, run on the stream's thread. `check` runs first, where MLX
// evaluates the op, so that it can reject inputs (strides are only known
// then) with an exception.
class CpuMultiOp : public mx::Primitive {
 public:
  using Fn = std::function<void(const std::vector<mx::array>&, std::vector<mx::array>&)>;
  using Check = std::function<void(const std::vector<mx::array>&)>;

  CpuMultiOp(mx::Stream stream, const char* name, Fn fn, Check check = nullptr)
      : mx::Primitive(stream), name_(name), fn_(std::move(fn)), check_(std::move(check)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    if (check_) check_(inputs);
    for (auto& out : outputs) out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    std::vector<mx::array> held, results;
    for (auto& a : inputs) {
      encoder.set_input_array(a);
      held.push_back(mx::array::unsafe_weak_copy(a));
    }
    for (auto& out : outputs) {
      encoder.set_output_array(out);
      results.push_back(mx::array::unsafe_weak_copy(out));
    }
    encoder.dispatch([held = std::move(held), results = std::move(results), fn = fn_]() mutable {
      fn(held, results);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string(name_) + " runs on the CPU only");
  }

  const char* name() const override { return name_; }

 private:
  const char* name_;
  Fn fn_;
  Check check_;
};

// The one-output form most ops use: fn(inputs, out).
class CpuOp : public CpuMultiOp {
 public:
  using UnaryFn = std::function<void(const std::vector<mx::array>&, mx::array&)>;

  CpuOp(mx::Stream stream, const char* name, UnaryFn fn, Check check = nullptr)
      : CpuMultiOp(stream, name,
                   [fn = std::move(fn)](const std::vector<mx::array>& in,
                                        std::vector<mx::array>& out) { fn(in, out[0]); },
                   std::move(check)) {}
};

// Runs task(0) .. task(parts - 1) on up to `threads` threads (one part: on this thread).
inline void run_parts(int parts, int threads, const std::function<void(int)>& task) {
  if (parts <= 1 || threads <= 1) {
    for (int part = 0; part < parts; ++part) task(part);
    return;
  }
  WorkerPool::get().run(parts, threads, task);
}

}  // namespace qwen3vl
