// A CPU kernel for products with an affine-quantized matrix: every product of
// a quantized model's text stack (decode and prefill). MLX's own CPU
// `quantized_matmul` unpacks and multiplies one weight at a time (~1.2 G
// weights/s per core); this one does 32 weights per instruction, streams the
// packed matrix once per 8 rows of activations, and splits the output
// features over the cores. Built on first use for the machine it runs on
// (cpu_kernel.py).
//
//   out[m, n] = sum_k x[m, k] * (scales[n, g] * q[n, k] + biases[n, g]),  g = k / group_size
//             = sum_g scales[n, g] * (sum_{k in g} q[n, k] x[m, k]) + biases[n, g] * xsum[m, g]
//
// Accumulation is in float32. With bfloat16 activations every product
// q * x is exact in the AVX-512 BF16 dot product (q < 256 and x are both
// bfloat16 numbers), so the result differs from MLX's float32 kernel only in
// the order of the float32 sums.
//
// The second primitive, `matmul_bf16` (end of file), does dense bfloat16
// products the same way.

#include <array>

#include "common.h"
#include "kernels.h"

namespace qwen3vl {
namespace {

constexpr int kMaxRows = 8;  // rows per pass over the weights
// From this many rows (prefill, the vision tower) products run in packed
// panels of kPanel output features (see dense_panels and quantized_panels).
constexpr int kPanel = 32, kPanelMinRows = 16;

#ifdef QMV_AVX512_BF16
// The panels' inner loop: MR rows of bfloat16 x (rows in_features apart)
// times packed pairs [first, last) of one panel, into acc [MR][2] (32 outputs).
template <int MR>
__attribute__((always_inline)) inline void add_panel_pairs(const uint16_t* x, int in_features,
                                                           const uint32_t* packed, int first,
                                                           int last, __m512 (&acc)[MR][2]) {
  for (int k = first; k < last; ++k) {
    const __m512i w0 = _mm512_loadu_si512(packed + size_t(k) * kPanel);
    const __m512i w1 = _mm512_loadu_si512(packed + size_t(k) * kPanel + 16);
    for (int i = 0; i < MR; ++i) {
      uint32_t pair;
      std::memcpy(&pair, x + size_t(i) * in_features + 2 * k, sizeof pair);
      const __m512i xv = _mm512_set1_epi32(int(pair));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)w0, (__m512bh)xv);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)w1, (__m512bh)xv);
    }
  }
}

// Which of a panel's 16 outputs in vector `half` (0 or 1) exist, of `count`.
inline __mmask16 panel_mask(int count, int half) {
  const int left = count - 16 * half;
  return left >= 16 ? 0xFFFF : left <= 0 ? 0 : __mmask16((1u << left) - 1);
}

// Stores MR rows of a panel's outputs (the first `count` of 32) plus b0/b1.
template <int MR>
inline void store_panel(const __m512 (&acc)[MR][2], int count, __m512 b0, __m512 b1, float* out,
                        size_t out_stride) {
  const __mmask16 m0 = panel_mask(count, 0), m1 = panel_mask(count, 1);
  for (int i = 0; i < MR; ++i) {
    float* o = out + size_t(i) * out_stride;
    _mm512_mask_storeu_ps(o, m0, _mm512_add_ps(acc[i][0], b0));
    _mm512_mask_storeu_ps(o + 16, m1, _mm512_add_ps(acc[i][1], b1));
  }
}

// out[k] = column k of the 16 x 16 matrix of 32-bit elements in rows[0..15].
inline void transpose16(const __m512i (&rows)[16], __m512i (&out)[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
  }
  // b[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i + 3.
  for (int i = 0; i < 4; ++i) {
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i even_lo = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88);
    const __m512i odd_lo = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD);
    const __m512i even_hi = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88);
    const __m512i odd_hi = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
    out[j] = _mm512_shuffle_i32x4(even_lo, even_hi, 0x88);
    out[8 + j] = _mm512_shuffle_i32x4(even_lo, even_hi, 0xDD);
    out[4 + j] = _mm512_shuffle_i32x4(odd_lo, odd_hi, 0x88);
    out[12 + j] = _mm512_shuffle_i32x4(odd_lo, odd_hi, 0xDD);
  }
}
#endif


struct Problem {
  int rows, in_features, out_features, group_size, bits;
  int first_row;            // of the weight: a thread's part covers rows first_row + [0, out_features)
  // Rows of the weight, scales and biases are contiguous, not always the
  // matrices: the model passes row slices of larger ones.
  const uint8_t* weight;    // [out_features, in_features * bits / 8]
  size_t weight_row_stride; // in bytes
  const mx::array* scales;  // [out_features, groups]
  const mx::array* biases;  // [out_features, groups]
  const float* x;           // [rows, in_features]
  const uint16_t* x_bf16;   // same, when the activations are bfloat16
  const float* x_group_sums;  // [rows, groups]
  float* out;               // [rows, out_stride]: this part's first column
  int out_stride;
  // x_bf16 in the order the row kernel reads it (arrange_for_4bit at 4 bits),
  // arranged once for all parts.
  const uint16_t* x_rows = nullptr;
  int groups() const { return in_features / group_size; }
};

// Portable path: plain loops the compiler vectorizes for the host.
void matvec_generic(const Problem& p) {
  const int groups = p.groups();
  const int mask = (1 << p.bits) - 1;
  std::vector<float> q(p.group_size), scales(groups), biases(groups);
  for (int n = 0; n < p.out_features; ++n) {
    const size_t row = size_t(p.first_row) + n;
    const uint8_t* w = p.weight + row * p.weight_row_stride;
    load_floats(*p.scales, row * p.scales->strides(0), groups, scales.data());
    load_floats(*p.biases, row * p.biases->strides(0), groups, biases.data());
    float acc[kMaxRows] = {};
    for (int g = 0; g < groups; ++g) {
      for (int i = 0; i < p.group_size; ++i) {
        int k = g * p.group_size + i;
        int bit = k * p.bits;
        q[i] = float((w[bit >> 3] >> (bit & 7)) & mask);
      }
      float s = scales[g], b = biases[g];
      for (int m = 0; m < p.rows; ++m) {
        const float* x = p.x + size_t(m) * p.in_features + g * p.group_size;
        float dot = 0.f;
        for (int i = 0; i < p.group_size; ++i) dot += q[i] * x[i];
        acc[m] += s * dot + b * p.x_group_sums[m * groups + g];
      }
    }
    for (int m = 0; m < p.rows; ++m) p.out[size_t(m) * p.out_stride + n] = acc[m];
  }
}

#ifdef QMV_AVX512_BF16
// One chunk of packed weights -> bfloat16 vectors of 32 weights each (exact:
// the weights are integers below 256).
// 4 bits: 32 bytes = 64 weights; byte i holds weight 2i (low nibble) and
// 2i+1 (high nibble). Widened to 16-bit lanes, the nibbles index a table of
// bfloat16(0..15): one vector of the even weights, one of the odd ones (the
// activations are arranged to match, see arrange_for_4bit).
inline void unpack_4bit(const uint8_t* bytes, __m512i table, __m512i* q) {
  __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  q[0] = _mm512_permutexvar_epi16(_mm512_and_si512(w, _mm512_set1_epi16(0xF)), table);
  q[1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
}

// bfloat16(0 .. 15), twice: the vpermw table that turns nibbles into weights.
inline __m512i nibble_table() {
  alignas(64) uint16_t values[32];
  for (int i = 0; i < 32; ++i) values[i] = bf16_bits(float(i & 15));
  return _mm512_load_si512(values);
}

// 8 bits: 32 bytes = 32 weights in order.
inline void unpack_8bit(const uint8_t* bytes, __m512i, __m512i* q) {
  __m512 lo = _mm512_cvtepi32_ps(
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))));
  __m512 hi = _mm512_cvtepi32_ps(
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16))));
  q[0] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// Scales and biases stay in their dtype; 16 of them at a time to float32.
template <typename T>
inline __m512 load16(const T* p, __mmask16 mask) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(mask, p);
  } else if constexpr (std::is_same_v<T, uint16_t>) {  // bfloat16
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  } else {  // float16
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
  }
}

// sum_g biases[g] * x_group_sums[g]
template <typename T>
inline float bias_term(const T* biases, const float* x_group_sums, int groups) {
  __m512 acc = _mm512_setzero_ps();
  for (int g = 0; g < groups; g += 16) {
    __mmask16 mask = groups - g >= 16 ? 0xFFFF : (1u << (groups - g)) - 1;
    acc = _mm512_fmadd_ps(load16(biases + g, mask), _mm512_maskz_loadu_ps(mask, x_group_sums + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// How far ahead of its loads the row kernel asks for packed weights. With the
// hardware prefetcher alone two cores streamed a decode step's products at
// ~25 GB/s (a plain read: ~33).
constexpr int kPrefetchBytes = 2048;

// ROWS is a template argument so that the accumulators stay in registers;
// even and odd groups accumulate apart to halve the dependency chain.
// `x` holds the bfloat16 activations in the order the unpacked weights come.
// T: how scales and biases are stored (float, uint16_t for bfloat16, or
// mx::float16_t).
template <int BITS, int ROWS, typename T>
void matvec_avx512_bf16(const Problem& p, const uint16_t* x) {
  constexpr int kVectors = BITS == 4 ? 2 : 1;  // bfloat16 vectors per 32 packed bytes
  constexpr int kChunk = 32 * kVectors;        // weights per 32 packed bytes
  const int groups = p.groups(), group_size = p.group_size, in_features = p.in_features;
  const int out_features = p.out_features;
  const int group_bytes = group_size * BITS / 8;
  const int chunks = group_size / kChunk;
  const size_t scales_stride = p.scales->strides(0), biases_stride = p.biases->strides(0);
  const T* scales_base = p.scales->data<T>();
  const T* biases_base = p.biases->data<T>();
  const __m512i table = nibble_table();
  // A row's scales as float32 up front: one broadcast from memory per group.
  thread_local std::vector<float> scales;
  scales.resize((groups + 15) / 16 * 16);
  for (int n = 0; n < out_features; ++n) {
    const size_t row = size_t(p.first_row) + n;
    const uint8_t* w = p.weight + row * p.weight_row_stride;
    for (int g = 0; g < groups; g += 16) {
      __mmask16 mask = groups - g >= 16 ? 0xFFFF : (1u << (groups - g)) - 1;
      _mm512_storeu_ps(scales.data() + g, load16(scales_base + row * scales_stride + g, mask));
    }
    __m512 even[ROWS], odd[ROWS];
    for (int m = 0; m < ROWS; ++m) even[m] = odd[m] = _mm512_setzero_ps();
    // acc[m] += scales[g] * (the group's q . x[m])
    auto add_group = [&](int g, __m512* acc) __attribute__((always_inline)) {
      const uint8_t* wg = w + size_t(g) * group_bytes;
      const uint16_t* xg = x + size_t(g) * group_size;
      __m512 dot[ROWS];
      for (int m = 0; m < ROWS; ++m) dot[m] = _mm512_setzero_ps();
      for (int c = 0; c < chunks; ++c, wg += 32, xg += kChunk) {
        _mm_prefetch(reinterpret_cast<const char*>(wg) + kPrefetchBytes, _MM_HINT_T0);
        __m512i q[kVectors];
        if constexpr (BITS == 4) unpack_4bit(wg, table, q);
        else unpack_8bit(wg, table, q);
        for (int v = 0; v < kVectors; ++v)
          for (int m = 0; m < ROWS; ++m) {
            __m512i xv = _mm512_loadu_si512(xg + size_t(m) * in_features + 32 * v);
            dot[m] = _mm512_dpbf16_ps(dot[m], (__m512bh)q[v], (__m512bh)xv);
          }
      }
      const __m512 s = _mm512_set1_ps(scales[g]);
      for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_fmadd_ps(s, dot[m], acc[m]);
    };
    int g = 0;
    for (; g + 1 < groups; g += 2) {
      add_group(g, even);
      add_group(g + 1, odd);
    }
    if (g < groups) add_group(g, even);
    const T* biases = biases_base + row * biases_stride;
    for (int m = 0; m < ROWS; ++m)
      p.out[size_t(m) * p.out_stride + n] =
          _mm512_reduce_add_ps(_mm512_add_ps(even[m], odd[m])) +
          bias_term(biases, p.x_group_sums + m * groups, groups);
  }
}

// Each block of 64 activations as its 32 even ones, then its 32 odd ones.
std::vector<uint16_t> arrange_for_4bit(const uint16_t* x, size_t count) {
  std::vector<uint16_t> out(count);
  for (size_t block = 0; block < count; block += 64)
    for (int i = 0; i < 32; ++i) {
      out[block + i] = x[block + 2 * i];
      out[block + 32 + i] = x[block + 2 * i + 1];
    }
  return out;
}

template <int BITS, typename T>
void dispatch_rows(const Problem& p) {
  const uint16_t* x = p.x_rows;
  switch (p.rows) {
    case 1: return matvec_avx512_bf16<BITS, 1, T>(p, x);
    case 2: return matvec_avx512_bf16<BITS, 2, T>(p, x);
    case 3: return matvec_avx512_bf16<BITS, 3, T>(p, x);
    case 4: return matvec_avx512_bf16<BITS, 4, T>(p, x);
    case 5: return matvec_avx512_bf16<BITS, 5, T>(p, x);
    case 6: return matvec_avx512_bf16<BITS, 6, T>(p, x);
    case 7: return matvec_avx512_bf16<BITS, 7, T>(p, x);
    default: return matvec_avx512_bf16<BITS, 8, T>(p, x);
  }
}

template <int BITS>
void dispatch_scales(const Problem& p) {
  switch (p.scales->dtype()) {
    case mx::float32: return dispatch_rows<BITS, float>(p);
    case mx::bfloat16: return dispatch_rows<BITS, uint16_t>(p);
    default: return dispatch_rows<BITS, mx::float16_t>(p);
  }
}

void dispatch_bits_and_scales(const Problem& p) {
  if (p.bits == 4) dispatch_scales<4>(p);
  else dispatch_scales<8>(p);
}
#endif


void matvec_part(const Problem& p) {
#ifdef QMV_AVX512_BF16
  const bool fast = p.x_rows && p.group_size % (p.bits == 4 ? 64 : 32) == 0 &&
                    p.scales->dtype() == p.biases->dtype();
  if (fast) return dispatch_bits_and_scales(p);
#endif
  matvec_generic(p);
}

// p's output features in blocks, several per thread (see WorkerPool), appended to `parts`.
void add_parts(const Problem& p, int threads, std::vector<Problem>& parts) {
  constexpr int kMinPart = 64, kPartsPerThread = 8;
  const int count = std::max(1, std::min(threads * kPartsPerThread, p.out_features / kMinPart));
  for (int i = 0; i < count; ++i) {
    const int begin = int(int64_t(p.out_features) * i / count);
    const int end = int(int64_t(p.out_features) * (i + 1) / count);
    Problem part = p;
    part.first_row += begin;
    part.out_features = end - begin;
    part.out += begin;
    parts.push_back(part);
  }
}

#ifdef QMV_AVX512_BF16
// Many rows: as in dense_panels (below), 32 output features at a time, their
// integer weights packed as exact bfloat16 pairs [K / 2][32], every output
// in its own lane, and per group of inputs
//   out += scale * (q . x) + bias * sum(x)
// (the row kernel's formula, summed in another order).
constexpr int kQuantizedPanelRows = 6;

struct Panel {
  std::vector<uint32_t> pairs;      // [K / 2][kPanel]
  std::vector<float> scales, biases;  // [groups][kPanel]
};

void pack_quantized_panel(const Problem& p, int n0, int count, Panel& panel) {
  static const auto tables = [] {
    std::array<uint32_t, 256> nibble_pairs{}, bytes{};
    for (int v = 0; v < 256; ++v) {
      nibble_pairs[v] = uint32_t(bf16_bits(float(v & 15))) | uint32_t(bf16_bits(float(v >> 4))) << 16;
      bytes[v] = bf16_bits(float(v));
    }
    return std::make_pair(nibble_pairs, bytes);
  }();
  const int pairs = p.in_features / 2, groups = p.groups();
  panel.pairs.assign(size_t(pairs) * kPanel, 0);
  panel.scales.assign(size_t(groups) * kPanel, 0.f);
  panel.biases.assign(size_t(groups) * kPanel, 0.f);
  std::vector<float> row_values(groups);
  const bool blocks = p.bits == 4 && count == kPanel && pairs % 16 == 0;
  if (blocks) {  // 16 rows x 16 bytes at a time, each byte to its two nibbles, then transposed
    const __m512i table = nibble_table(), low = _mm512_set1_epi32(15);
    for (int k0 = 0; k0 < pairs; k0 += 16)
      for (int c0 = 0; c0 < kPanel; c0 += 16) {
        __m512i rows[16], columns[16];
        for (int i = 0; i < 16; ++i) {
          const uint8_t* w = p.weight + (size_t(p.first_row) + n0 + c0 + i) * p.weight_row_stride + k0;
          const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
          // 16-bit lanes: the low nibble, then the high one, each looked up as bfloat16.
          const __m512i index = _mm512_or_si512(_mm512_and_si512(bytes, low),
                                                _mm512_slli_epi32(_mm512_srli_epi32(bytes, 4), 16));
          rows[i] = _mm512_permutexvar_epi16(index, table);
        }
        transpose16(rows, columns);
        for (int k = 0; k < 16; ++k)
          _mm512_storeu_si512(panel.pairs.data() + size_t(k0 + k) * kPanel + c0, columns[k]);
      }
  }
  for (int c = 0; c < count; ++c) {
    const size_t row = size_t(p.first_row) + n0 + c;
    const uint8_t* w = p.weight + row * p.weight_row_stride;
    uint32_t* column = panel.pairs.data() + c;
    if (!blocks && p.bits == 4) {
      for (int k = 0; k < pairs; ++k) column[size_t(k) * kPanel] = tables.first[w[k]];
    } else if (!blocks) {
      for (int k = 0; k < pairs; ++k)
        column[size_t(k) * kPanel] = tables.second[w[2 * k]] | tables.second[w[2 * k + 1]] << 16;
    }
    load_floats(p.scales->data<char>(), p.scales->dtype(), row * p.scales->strides(0), groups, row_values.data());
    for (int g = 0; g < groups; ++g) panel.scales[size_t(g) * kPanel + c] = row_values[g];
    load_floats(p.biases->data<char>(), p.biases->dtype(), row * p.biases->strides(0), groups, row_values.data());
    for (int g = 0; g < groups; ++g) panel.biases[size_t(g) * kPanel + c] = row_values[g];
  }
}

// MR rows of x (bfloat16, rows in_features apart) x one packed panel.
template <int MR>
void quantized_panel_rows(const Problem& p, const uint16_t* x, const float* x_group_sums,
                          const Panel& panel, int n0, int count, float* out) {
  const int groups = p.groups(), pairs_per_group = p.group_size / 2;
  __m512 total[MR][2];
  for (int i = 0; i < MR; ++i) total[i][0] = total[i][1] = _mm512_setzero_ps();
  for (int g = 0; g < groups; ++g) {
    __m512 acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    add_panel_pairs<MR>(x, p.in_features, panel.pairs.data(), g * pairs_per_group,
                        (g + 1) * pairs_per_group, acc);
    const float* sg = panel.scales.data() + size_t(g) * kPanel;
    const float* bg = panel.biases.data() + size_t(g) * kPanel;
    const __m512 s0 = _mm512_loadu_ps(sg), s1 = _mm512_loadu_ps(sg + 16);
    const __m512 b0 = _mm512_loadu_ps(bg), b1 = _mm512_loadu_ps(bg + 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 xs = _mm512_set1_ps(x_group_sums[size_t(i) * groups + g]);
      total[i][0] = _mm512_fmadd_ps(xs, b0, _mm512_fmadd_ps(acc[i][0], s0, total[i][0]));
      total[i][1] = _mm512_fmadd_ps(xs, b1, _mm512_fmadd_ps(acc[i][1], s1, total[i][1]));
    }
  }
  store_panel<MR>(total, count, _mm512_setzero_ps(), _mm512_setzero_ps(), out + n0, p.out_stride);
}

using QuantizedPanelRows = void (*)(const Problem&, const uint16_t*, const float*, const Panel&,
                                    int, int, float*);
constexpr QuantizedPanelRows kQuantizedPanelRowsFns[kQuantizedPanelRows] = {
    quantized_panel_rows<1>, quantized_panel_rows<2>, quantized_panel_rows<3>,
    quantized_panel_rows<4>, quantized_panel_rows<5>, quantized_panel_rows<6>};

// All p.rows rows (x in p.x_bf16, their group sums in p.x_group_sums) into p.out.
void quantized_panels(const Problem& p, int threads) {
  const int panels = (p.out_features + kPanel - 1) / kPanel;
  run_parts(panels, threads, [&](int index) {
    thread_local Panel panel;
    const int n0 = index * kPanel, count = std::min(kPanel, p.out_features - n0);
    pack_quantized_panel(p, n0, count, panel);
    for (int first = 0; first < p.rows; first += kQuantizedPanelRows) {
      const int block = std::min(kQuantizedPanelRows, p.rows - first);
      kQuantizedPanelRowsFns[block - 1](p, p.x_bf16 + size_t(first) * p.in_features,
                                        p.x_group_sums + size_t(first) * p.groups(), panel, n0,
                                        count, p.out + size_t(first) * p.out_stride);
    }
  });
}
#endif

// sums[m * groups + g] = the sum of row m's inputs in group g, in order.
void group_sums(const float* x, int rows, int in_features, int group_size, float* sums) {
  const int groups = in_features / group_size;
  for (int m = 0; m < rows; ++m)
    for (int g = 0; g < groups; ++g) {
      float total = 0.f;
      for (int i = 0; i < group_size; ++i) total += x[size_t(m) * in_features + g * group_size + i];
      sums[size_t(m) * groups + g] = total;
    }
}

}  // namespace

// The parts of all the matrices share one pass of the thread pool (a decode
// step's q/k/v and gate/up: fewer ops and pool runs, no idle tail per matrix).
void quantized_rows(const char* x, mx::Dtype x_dtype, int rows, int in_features,
                    const mx::array* matrices, int count, int group_size, int bits, int threads,
                    float* out) {
  if (rows > kMaxRows) throw std::invalid_argument("quantized_rows: at most 8 rows");
  const int groups = in_features / group_size;
  int total = 0;
  for (int i = 0; i < count; ++i) total += matrices[3 * i].shape(0);
  std::vector<float> xf(size_t(rows) * in_features), sums(size_t(rows) * groups);
  load_floats(x, x_dtype, 0, size_t(rows) * in_features, xf.data());
  group_sums(xf.data(), rows, in_features, group_size, sums.data());
  const uint16_t* x_bf16 = x_dtype == mx::bfloat16 ? reinterpret_cast<const uint16_t*>(x) : nullptr;
  const uint16_t* x_rows = x_bf16;
#ifdef QMV_AVX512_BF16
  std::vector<uint16_t> arranged;
  if (x_bf16 && bits == 4 && in_features % 64 == 0) {
    arranged = arrange_for_4bit(x_bf16, size_t(rows) * in_features);
    x_rows = arranged.data();
  }
#endif
  std::vector<Problem> parts;
  int column = 0;
  for (int i = 0; i < count; ++i) {
    const mx::array &w = matrices[3 * i], &s = matrices[3 * i + 1], &b = matrices[3 * i + 2];
    Problem p{rows, in_features, w.shape(0), group_size, bits, /*first_row=*/0,
              w.data<uint8_t>(), size_t(w.strides(0)) * w.itemsize(), &s, &b, xf.data(),
              x_bf16, sums.data(), out + column, total, x_rows};
    add_parts(p, threads, parts);
    column += w.shape(0);
  }
  run_parts(int(parts.size()), threads, [&](int i) { matvec_part(parts[i]); });
}

namespace {

// Rows of x in blocks of up to kMaxRows times one or more quantized matrices
// (in = x, w0, s0, b0, w1, s1, b1, ...), their outputs side by side in `out`.
void row_blocks(const std::vector<mx::array>& in, const char* x_data, mx::array& out,
                int group_size, int bits, int threads) {
  const mx::array& x = in[0];
  const int in_features = x.shape(-1);
  const int rows = x.size() / in_features;
  const int total = out.shape(-1);
  const int count = int(in.size() - 1) / 3;
  std::vector<float> out_f32(out.dtype() == mx::float32 ? 0 : size_t(std::min(kMaxRows, rows)) * total);
  for (int first = 0; first < rows; first += kMaxRows) {
    const int block = std::min(kMaxRows, rows - first);
    const char* x_block = x_data + size_t(first) * in_features * x.itemsize();
    float* results = out_f32.empty() ? out.data<float>() + size_t(first) * total : out_f32.data();
    quantized_rows(x_block, x.dtype(), block, in_features, &in[1], count, group_size, bits,
                   threads, results);
    if (!out_f32.empty())
      store_as(results, size_t(block) * total, out, size_t(first) * total);
  }
}

// in = x, w, scales, biases (or several matrices, see row_blocks).
void quantized_matvec_rows(const std::vector<mx::array>& in, mx::array& out, int group_size,
                           int bits, int threads) {
  const mx::array& x = in[0];
  std::vector<char> x_copy;  // when x is a strided view
  const char* x_data = row_major_data(x, x_copy);
#ifdef QMV_AVX512_BF16
  const int in_features = x.shape(-1);
  const int rows = x.size() / in_features;
  const int groups = in_features / group_size;
  const int out_features = out.shape(-1);
  const mx::array &w = in[1], &s = in[2], &b = in[3];
  if (in.size() == 4 && rows >= kPanelMinRows && x.dtype() == mx::bfloat16 && group_size % 2 == 0 &&
      s.dtype() == b.dtype()) {
    std::vector<float> xf(static_cast<size_t>(in_features)), sums(size_t(rows) * groups);
    for (int m = 0; m < rows; ++m) {
      load_floats(x_data, x.dtype(), size_t(m) * in_features, in_features, xf.data());
      group_sums(xf.data(), 1, in_features, group_size, sums.data() + size_t(m) * groups);
    }
    const uint16_t* x_bf16 = reinterpret_cast<const uint16_t*>(x_data);
    into_output(out, rows, out_features, kPanelMinRows, [&](int first, int count, float* results) {
      Problem p{count, in_features, out_features, group_size, bits, /*first_row=*/0,
                w.data<uint8_t>(), size_t(w.strides(0)) * w.itemsize(), &s, &b, nullptr,
                x_bf16 + size_t(first) * in_features, sums.data() + size_t(first) * groups, results,
                out_features};
      quantized_panels(p, threads);
    });
    return;
  }
#endif
  row_blocks(in, x_data, out, group_size, bits, threads);
}

}  // namespace

void check_contiguous_rows(const std::vector<mx::array>& inputs, int first, int last,
                           const char* op) {
  for (int i = first; i < last; ++i)
    if (inputs[i].strides(-1) != 1)
      throw std::invalid_argument(std::string(op) +
                                  ": the rows of w, scales and biases must be contiguous");
}

void check_rows_contiguous(const std::vector<mx::array>& inputs) {
  check_contiguous_rows(inputs, 1, int(inputs.size()), "quantized_matvec");
}

// The checks every quantized product makes of its arguments.
void check_quantized_matrix(int in_features, const mx::array& w, const mx::array& scales,
                            const mx::array& biases, int group_size, int bits) {
  for (auto* a : {&scales, &biases})
    if (a->dtype() != mx::float32 && a->dtype() != mx::float16 && a->dtype() != mx::bfloat16)
      throw std::invalid_argument("quantized_matvec: scales and biases must be floating point");
  if (bits != 4 && bits != 8)
    throw std::invalid_argument("quantized_matvec: bits must be 4 or 8");
  if (w.ndim() != 2 || scales.ndim() != 2 || biases.shape() != scales.shape())
    throw std::invalid_argument("quantized_matvec: expected x [..., K], w [N, K*bits/32], "
                                "scales and biases [N, K/group_size]");
  if (w.dtype() != mx::uint32 || w.shape(1) * 32 / bits != in_features ||
      group_size <= 0 || in_features % group_size != 0 ||
      scales.shape(0) != w.shape(0) || scales.shape(1) != in_features / group_size)
    throw std::invalid_argument("quantized_matvec: shapes of x, w, scales, biases disagree");
}

void check_quantized(const mx::array& x, const mx::array& w, const mx::array& scales,
                     const mx::array& biases, int group_size, int bits) {
  if (x.dtype() != mx::float32 && x.dtype() != mx::float16 && x.dtype() != mx::bfloat16)
    throw std::invalid_argument("quantized_matvec: x must be floating point");
  if (x.ndim() < 1)
    throw std::invalid_argument("quantized_matvec: expected x [..., K]");
  check_quantized_matrix(x.shape(-1), w, scales, biases, group_size, bits);
}

void check_threads_and_dtype(int threads, mx::Dtype dtype) {
  if (threads < 1 || threads > 256)
    throw std::invalid_argument("quantized_matvec: threads must be between 1 and 256");
  if (dtype != mx::float32 && dtype != mx::float16 && dtype != mx::bfloat16)
    throw std::invalid_argument("quantized_matvec: dtype must be float32, float16 or bfloat16");
}


mx::array quantized_matvec(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits, int threads,
                           std::optional<mx::Dtype> dtype, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu)
    throw std::invalid_argument("quantized_matvec: a CPU stream is required");
  check_quantized(x, w, scales, biases, group_size, bits);
  const mx::Dtype out_dtype = dtype.value_or(mx::float32);
  check_threads_and_dtype(threads, out_dtype);
  auto out_shape = x.shape();
  out_shape.back() = w.shape(0);
  // No `contiguous` ops (each op costs a dispatch in a decode step, and it
  // would copy a row slice of a larger buffer): strided x is gathered in the kernel.
  std::vector<mx::array> inputs = {x, w, scales, biases};
  return mx::array(out_shape, out_dtype,
                   std::make_shared<CpuOp>(
                       stream, "QuantizedMatvec",
                       [group_size, bits, threads](const std::vector<mx::array>& in, mx::array& out) {
                         quantized_matvec_rows(in, out, group_size, bits, threads);
                       },
                       check_rows_contiguous),
                   std::move(inputs));
}

mx::array quantized_matvec_many(const mx::array& x, const std::vector<mx::array>& weights,
                                const std::vector<mx::array>& scales,
                                const std::vector<mx::array>& biases, int group_size, int bits,
                                int threads, std::optional<mx::Dtype> dtype,
                                mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu)
    throw std::invalid_argument("quantized_matvec_many: a CPU stream is required");
  if (weights.empty() || scales.size() != weights.size() || biases.size() != weights.size())
    throw std::invalid_argument("quantized_matvec_many: give one or more weights, each with its "
                                "scales and biases");
  const int rows = x.ndim() ? int(x.size() / x.shape(-1)) : 1;
  if (rows > kMaxRows)
    throw std::invalid_argument("quantized_matvec_many: at most 8 rows of x (use quantized_matvec)");
  const mx::Dtype out_dtype = dtype.value_or(mx::float32);
  check_threads_and_dtype(threads, out_dtype);
  std::vector<mx::array> inputs = {x};
  int total = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    check_quantized(x, weights[i], scales[i], biases[i], group_size, bits);
    inputs.insert(inputs.end(), {weights[i], scales[i], biases[i]});
    total += weights[i].shape(0);
  }
  auto out_shape = x.shape();
  out_shape.back() = total;
  return mx::array(out_shape, out_dtype,
                   std::make_shared<CpuOp>(
                       stream, "QuantizedMatvecMany",
                       [group_size, bits, threads](const std::vector<mx::array>& in, mx::array& out) {
                         quantized_matvec_rows(in, out, group_size, bits, threads);
                       },
                       check_rows_contiguous),
                   std::move(inputs));
}


namespace {

// ---------------------------------------------------------------------------
// Dense bfloat16 products, x @ w.T (+ bias): MLX's CPU bfloat16 matmul runs
// at ~7 GFLOP/s per core and its matrix-vector product at ~2 GB/s. Here
// every bfloat16 product is exact in the AVX-512 BF16 dot product and summed
// in float32, like MLX's kernel, in another order.
#ifdef QMV_AVX512_BF16
// Outputs [n0, n1) for ROWS rows of x; even and odd chunks of 32 accumulate apart.
template <int ROWS>
void dense_rows(const uint16_t* x, size_t x_stride, const uint16_t* w, size_t w_stride,
                int in_features, int n0, int n1, const float* bias, float* out,
                size_t out_stride) {
  for (int n = n0; n < n1; ++n) {
    const uint16_t* wr = w + size_t(n) * w_stride;
    __m512 acc[2][ROWS];
    for (int m = 0; m < ROWS; ++m) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 64 <= in_features; k += 64)
      for (int h = 0; h < 2; ++h) {
        __m512i wv = _mm512_loadu_si512(wr + k + 32 * h);
        for (int m = 0; m < ROWS; ++m)
          acc[h][m] = _mm512_dpbf16_ps(acc[h][m], (__m512bh)wv,
                                       (__m512bh)_mm512_loadu_si512(x + m * x_stride + k + 32 * h));
      }
    for (; k < in_features; k += 32) {  // up to 63 left: masked loads read zeros past the end
      const int left = in_features - k;
      const __mmask32 mask = left >= 32 ? 0xFFFFFFFFu : (1u << left) - 1;
      __m512i wv = _mm512_maskz_loadu_epi16(mask, wr + k);
      for (int m = 0; m < ROWS; ++m)
        acc[0][m] = _mm512_dpbf16_ps(acc[0][m], (__m512bh)wv,
                                     (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * x_stride + k));
    }
    const float b = bias ? bias[n] : 0.f;
    for (int m = 0; m < ROWS; ++m)
      out[m * out_stride + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m], acc[1][m])) + b;
  }
}

using DenseRows = void (*)(const uint16_t*, size_t, const uint16_t*, size_t, int, int, int,
                           const float*, float*, size_t);
constexpr DenseRows kDenseRows[kMaxRows] = {dense_rows<1>, dense_rows<2>, dense_rows<3>,
                                            dense_rows<4>, dense_rows<5>, dense_rows<6>,
                                            dense_rows<7>, dense_rows<8>};

#endif

// x @ w.T (+ bias) into out, on `threads` threads.
void matmul_bf16_into(const std::vector<mx::array>& inputs, mx::array& out, int threads) {
#ifdef QMV_AVX512_BF16
  const mx::array& x = inputs[0];
  const mx::array& w = inputs[1];
  const int in_features = x.shape(-1), out_features = out.shape(-1);
  const int rows = x.size() / in_features;
  std::vector<char> x_copy;
  const char* x_data = row_major_data(x, x_copy);
  std::vector<float> bias;
  if (inputs.size() > 2) {
    bias.resize(out_features);
    const mx::array& b = inputs[2];
    std::vector<char> b_copy;
    load_floats(row_major_data(b, b_copy), b.dtype(), 0, out_features, bias.data());
  }
  const uint16_t* x_bf16 = reinterpret_cast<const uint16_t*>(x_data);
  into_output(out, rows, out_features, kPanelMinRows, [&](int first, int count, float* results) {
    dense(x_bf16 + size_t(first) * in_features, count, w.data<uint16_t>(), size_t(w.strides(0)),
          in_features, out_features, bias.empty() ? nullptr : bias.data(), results, threads);
  });
#endif
}

}  // namespace

#ifdef QMV_AVX512_BF16
namespace {

// Many rows: the weights in panels of 32 output features, each packed as
// [K / 2][32] pairs of bfloat16 (one 64-byte line per pair of inputs), and
// MR rows x 32 outputs accumulate in registers with each row's pair of
// inputs broadcast: 2 weight loads per 2 * MR dot products and no horizontal
// sums (the row-dot kernel above sums 16 lanes per output). The packed
// panel (K * 64 bytes) stays in L2 while all rows pass.
constexpr int kPanelRows = 12;

void pack_panel(const uint16_t* w, size_t w_stride, int in_features, int n0, int count,
                uint32_t* packed) {
  const int pairs = in_features / 2;
  if (count == kPanel && pairs % 16 == 0) {  // 16 x 16 blocks of pairs, transposed in registers
    for (int p0 = 0; p0 < pairs; p0 += 16)
      for (int c0 = 0; c0 < kPanel; c0 += 16) {
        __m512i rows[16], columns[16];
        for (int i = 0; i < 16; ++i) rows[i] = _mm512_loadu_si512(w + size_t(n0 + c0 + i) * w_stride + 2 * p0);
        transpose16(rows, columns);
        for (int k = 0; k < 16; ++k) _mm512_storeu_si512(packed + size_t(p0 + k) * kPanel + c0, columns[k]);
      }
    return;
  }
  // A row at a time (read in order), its pairs a column of the panel.
  for (int c = 0; c < kPanel; ++c) {
    if (c >= count) {
      for (int p = 0; p < pairs; ++p) packed[size_t(p) * kPanel + c] = 0;
      continue;
    }
    const uint16_t* row = w + size_t(n0 + c) * w_stride;
    for (int p = 0; p < pairs; ++p) {
      uint32_t pair;
      std::memcpy(&pair, row + 2 * p, sizeof pair);
      packed[size_t(p) * kPanel + c] = pair;
    }
  }
}

// MR rows (x_stride apart) times the first `pairs` pairs of one packed panel,
// plus b0/b1 (the panel's bias or zeros), into the first `count` of 32 columns.
template <int MR>
void packed_rows(const uint16_t* x, int x_stride, const uint32_t* panel, int pairs, int count,
                 __m512 b0, __m512 b1, float* out, size_t out_stride) {
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  add_panel_pairs<MR>(x, x_stride, panel, 0, pairs, acc);
  store_panel<MR>(acc, count, b0, b1, out, out_stride);
}

using PackedRows = void (*)(const uint16_t*, int, const uint32_t*, int, int, __m512, __m512, float*,
                            size_t);
constexpr PackedRows kPackedRowsFns[kPanelRows] = {
    packed_rows<1>, packed_rows<2>, packed_rows<3>, packed_rows<4>,  packed_rows<5>,  packed_rows<6>,
    packed_rows<7>, packed_rows<8>, packed_rows<9>, packed_rows<10>, packed_rows<11>, packed_rows<12>};

void dense_panels(const uint16_t* x, int rows, const uint16_t* w, size_t w_stride,
                  int in_features, int out_features, const float* bias, float* out, int threads) {
  const int panels = (out_features + kPanel - 1) / kPanel;
  run_parts(panels, threads, [&](int panel) {
    thread_local std::vector<uint32_t> packed;
    packed.resize(size_t(in_features / 2) * kPanel);
    const int n0 = panel * kPanel, count = std::min(kPanel, out_features - n0);
    pack_panel(w, w_stride, in_features, n0, count, packed.data());
    const __m512 b0 = bias ? _mm512_maskz_loadu_ps(panel_mask(count, 0), bias + n0) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_maskz_loadu_ps(panel_mask(count, 1), bias + n0 + 16) : _mm512_setzero_ps();
    for (int first = 0; first < rows; first += kPanelRows) {
      const int block = std::min(kPanelRows, rows - first);
      kPackedRowsFns[block - 1](x + size_t(first) * in_features, in_features, packed.data(),
                                in_features / 2, count, b0, b1,
                                out + size_t(first) * out_features + n0, out_features);
    }
  });
}

}  // namespace

void pack_panels(const uint16_t* w, size_t w_stride, int in_features, int out_features,
                 uint32_t* packed) {
  const size_t panel_size = size_t(in_features / 2) * kPanel;
  for (int n0 = 0; n0 < out_features; n0 += kPanel)
    pack_panel(w, w_stride, in_features, n0, std::min(kPanel, out_features - n0),
               packed + size_t(n0 / kPanel) * panel_size);
}

void packed_product(const uint16_t* x, int rows, int x_stride, const uint32_t* packed, int pairs,
                    size_t panel_stride, int out_features, float* out, size_t out_stride) {
  const __m512 zero = _mm512_setzero_ps();
  for (int n0 = 0; n0 < out_features; n0 += kPanel) {
    const uint32_t* panel = packed + size_t(n0 / kPanel) * panel_stride;
    const int count = std::min(kPanel, out_features - n0);
    for (int first = 0; first < rows; first += kPanelRows) {
      const int block = std::min(kPanelRows, rows - first);
      kPackedRowsFns[block - 1](x + size_t(first) * x_stride, x_stride, panel, pairs, count, zero,
                                zero, out + size_t(first) * out_stride + n0, out_stride);
    }
  }
}

// Output features in tiles small enough to stay in a core's L2 cache while
// every block of 8 rows of x passes; the threads take tiles as they get free.
// From kPanelMinRows rows on (even K) the packed panels above.
void dense(const uint16_t* x, int rows, const uint16_t* w, size_t w_stride, int in_features,
           int out_features, const float* bias, float* out, int threads) {
  if (rows >= kPanelMinRows && in_features % 2 == 0)
    return dense_panels(x, rows, w, w_stride, in_features, out_features, bias, out, threads);
  constexpr size_t kTileBytes = 512 << 10;
  const int tile = std::max<int>(16, kTileBytes / (size_t(in_features) * 2));
  const int tiles = (out_features + tile - 1) / tile;
  run_parts(tiles, threads, [&](int i) {
    const int begin = i * tile, end = std::min(out_features, begin + tile);
    for (int first = 0; first < rows; first += kMaxRows) {
      const int block = std::min(kMaxRows, rows - first);
      kDenseRows[block - 1](x + size_t(first) * in_features, in_features, w, w_stride,
                            in_features, begin, end, bias, out + size_t(first) * out_features,
                            out_features);
    }
  });
}
#endif

bool has_dense_bf16() {
#ifdef QMV_AVX512_BF16
  return true;
#else
  return false;
#endif
}

mx::array matmul_bf16(const mx::array& x, const mx::array& w, std::optional<mx::array> bias,
                      int threads, std::optional<mx::Dtype> dtype, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (!has_dense_bf16())
    throw std::invalid_argument("matmul_bf16: this build has no AVX-512 BF16 path");
  if (stream.device != mx::Device::cpu)
    throw std::invalid_argument("matmul_bf16: a CPU stream is required");
  if (x.dtype() != mx::bfloat16 || w.dtype() != mx::bfloat16 || x.ndim() < 1 || w.ndim() != 2)
    throw std::invalid_argument("matmul_bf16: expected bfloat16 x [..., K] and w [N, K]");
  if (x.shape(-1) != w.shape(1))
    throw std::invalid_argument("matmul_bf16: x [..., K] and w [N, K] disagree in K");
  if (bias && (bias->ndim() != 1 || bias->shape(0) != w.shape(0)))
    throw std::invalid_argument("matmul_bf16: bias must be [N]");
  if (threads < 1 || threads > 256)
    throw std::invalid_argument("matmul_bf16: threads must be between 1 and 256");
  const mx::Dtype out_dtype = dtype.value_or(mx::bfloat16);
  if (out_dtype != mx::float32 && out_dtype != mx::float16 && out_dtype != mx::bfloat16)
    throw std::invalid_argument("matmul_bf16: dtype must be float32, float16 or bfloat16");
  auto out_shape = x.shape();
  out_shape.back() = w.shape(0);
  std::vector<mx::array> inputs = {x, w};
  if (bias) inputs.push_back(*bias);
  auto check = [](const std::vector<mx::array>& in) {
    if (in[1].strides(-1) != 1)
      throw std::invalid_argument("matmul_bf16: the rows of w must be contiguous");
  };
  auto fn = [threads](const std::vector<mx::array>& in, mx::array& out) {
    matmul_bf16_into(in, out, threads);
  };
  return mx::array(out_shape, out_dtype,
                   std::make_shared<CpuOp>(stream, "DenseMatmulBf16", fn, check),
                   std::move(inputs));
}

const char* kernel_name() {
#ifdef QMV_AVX512_BF16
  return "avx512-bf16";
#else
  return "generic";
#endif
}

}  // namespace qwen3vl
