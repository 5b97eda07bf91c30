// Weight-only quantized GEMM: y[M, N] = x[M, K] W^T (+ bias), float32 activations, W kept as small integers with
// a float scale (and min) per group of `group` values along k (workers/layers/quantized.py packs it).
//
// Layout, per 16-wide block b of output rows (the blocked float GEMM's interleave) and group g:
//   int8:  q[b][k][16] int8                                    value = q
//   uint4: q[b][k / 2][16] uint8: k even low nibble, k odd high  value = 0..15
//   scales[b][g][16], mins[b][g][16] float32 (mins may be absent)
// weight = fma(scale, value, min): one rounding, the same one every GGUF type we keep performs when it dequantizes,
// so the weights are the dequantized checkpoint's bits. Each output is then the blocked float GEMM's FMA chain
// over k in order (blocked_tiles.h): a row's result equals the float32 path on the dequantized weights, whatever
// else is in the batch. One row dequantizes in registers (memory-bound: a quarter to an eighth of float32's bytes
// per token); several rows dequantize each column block once into a float panel that the float tiles then read.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "blocked_tiles.h"

extern "C" void blocked_linear_f32(float* y, const float* x, const float* w, const float* bias, int64_t M, int64_t N,
                                   int64_t K, int64_t x_stride);

namespace {

// A packed weight as the Python side describes it (one int64 table, so the decode stack can hold its address).
enum WeightFormat : int64_t { kFloatBlocked = 0, kInt8 = 1, kUint4 = 2 };
enum WeightField : int64_t { kFormat, kData, kScales, kMins, kGroup };

constexpr int64_t kParallelMinElements = 1 << 15;

struct Quantized {
  const uint8_t* q;
  const float* scales;
  const float* mins;  // null: every min is 0
  int64_t group;
  int64_t K;
};

template <int64_t Format>
constexpr int64_t q_block_bytes(int64_t K) { return Format == kUint4 ? K / 2 * 16 : K * 16; }

// One weight, scalar: the reference the vector paths must equal bit for bit.
template <int64_t Format>
inline float weight_at(const Quantized& w, int64_t n, int64_t k) {
  const int64_t b = n / 16, lane = n % 16, g = k / w.group, groups = w.K / w.group;
  const uint8_t* block = w.q + b * q_block_bytes<Format>(w.K);
  float value;
  if constexpr (Format == kUint4) {
    const uint8_t byte = block[(k / 2) * 16 + lane];
    value = static_cast<float>(k % 2 == 0 ? byte & 0x0F : byte >> 4);
  } else {
    value = static_cast<float>(static_cast<int8_t>(block[k * 16 + lane]));
  }
  const int64_t at = (b * groups + g) * 16 + lane;
  return std::fma(w.scales[at], value, w.mins ? w.mins[at] : 0.f);
}

#if defined(__AVX2__) && defined(__FMA__)
using conveyor_tiles::kPanelRows;
inline void rows_avx2(int64_t r, float* y, int64_t ys, const float* x, int64_t xs, const float* w, int64_t K,
                      int64_t nv, const float* b) {
  conveyor_tiles::rows(r, y, ys, x, xs, w, K, nv, b);
}
using conveyor_tiles::store16;
using conveyor_tiles::valid;

inline __m256 low8(__m128i bytes, bool is_signed) {
  return _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes));
}
inline __m256 high8(__m128i bytes, bool is_signed) { return low8(_mm_unpackhi_epi64(bytes, bytes), is_signed); }

// The 16 weights of one k of one block, given its group's scales/mins: fma(scale, value, min) per lane.
template <bool HasMin>
inline void dequant16(__m128i values, bool is_signed, const float* s, const float* m, __m256& lo, __m256& hi) {
  const __m256 m_lo = HasMin ? _mm256_loadu_ps(m) : _mm256_setzero_ps();
  const __m256 m_hi = HasMin ? _mm256_loadu_ps(m + 8) : _mm256_setzero_ps();
  lo = _mm256_fmadd_ps(_mm256_loadu_ps(s), low8(values, is_signed), m_lo);
  hi = _mm256_fmadd_ps(_mm256_loadu_ps(s + 8), high8(values, is_signed), m_hi);
}

inline void split_nibbles(const uint8_t* p, __m128i& even, __m128i& odd) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  even = _mm_and_si128(bytes, mask);
  odd = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
}

// Column block b dequantized into panel [K][16].
template <int64_t Format, bool HasMin>
void dequant_panel(float* panel, const Quantized& w, int64_t b) {
  const int64_t groups = w.K / w.group;
  const uint8_t* q = w.q + b * q_block_bytes<Format>(w.K);
  const float* s = w.scales + b * groups * 16;
  const float* m = HasMin ? w.mins + b * groups * 16 : nullptr;
  for (int64_t g = 0; g < groups; ++g, s += 16, m = HasMin ? m + 16 : nullptr) {
    for (int64_t k = g * w.group; k < (g + 1) * w.group;) {
      __m256 lo, hi;
      if constexpr (Format == kUint4) {
        __m128i even, odd;
        split_nibbles(q + (k / 2) * 16, even, odd);
        dequant16<HasMin>(even, false, s, m, lo, hi);
        _mm256_storeu_ps(panel + k * 16, lo), _mm256_storeu_ps(panel + k * 16 + 8, hi);
        dequant16<HasMin>(odd, false, s, m, lo, hi);
        _mm256_storeu_ps(panel + (k + 1) * 16, lo), _mm256_storeu_ps(panel + (k + 1) * 16 + 8, hi);
        k += 2;
      } else {
        dequant16<HasMin>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k * 16)), true, s, m, lo, hi);
        _mm256_storeu_ps(panel + k * 16, lo), _mm256_storeu_ps(panel + k * 16 + 8, hi);
        k += 1;
      }
    }
  }
}

// One row of x against B (1-4) column blocks from b on, dequantizing in registers: 2B independent FMA chains.
template <int64_t Format, bool HasMin, int B>
void gemv_blocks(float* y, const float* x, const Quantized& w, int64_t b, int64_t n_valid, const float* bias) {
  const int64_t groups = w.K / w.group, q_stride = q_block_bytes<Format>(w.K), s_stride = groups * 16;
  const uint8_t* q = w.q + b * q_stride;
  const float* scales = w.scales + b * s_stride;
  const float* mins = HasMin ? w.mins + b * s_stride : nullptr;
  __m256 acc[2 * B];
  for (int j = 0; j < 2 * B; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t group_at = g * 16;
    for (int64_t k = g * w.group; k < (g + 1) * w.group;) {
      if constexpr (Format == kUint4) {
        const __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x + k + 1);
#pragma GCC unroll 4
        for (int j = 0; j < B; ++j) {
          const float* s = scales + j * s_stride + group_at;
          const float* m = HasMin ? mins + j * s_stride + group_at : nullptr;
          __m128i even, odd;
          __m256 lo, hi;
          split_nibbles(q + j * q_stride + (k / 2) * 16, even, odd);
          dequant16<HasMin>(even, false, s, m, lo, hi);
          acc[2 * j] = _mm256_fmadd_ps(x0, lo, acc[2 * j]);
          acc[2 * j + 1] = _mm256_fmadd_ps(x0, hi, acc[2 * j + 1]);
          dequant16<HasMin>(odd, false, s, m, lo, hi);
          acc[2 * j] = _mm256_fmadd_ps(x1, lo, acc[2 * j]);
          acc[2 * j + 1] = _mm256_fmadd_ps(x1, hi, acc[2 * j + 1]);
        }
        k += 2;
      } else {
        const __m256 x0 = _mm256_broadcast_ss(x + k);
#pragma GCC unroll 4
        for (int j = 0; j < B; ++j) {
          const float* s = scales + j * s_stride + group_at;
          const float* m = HasMin ? mins + j * s_stride + group_at : nullptr;
          __m256 lo, hi;
          dequant16<HasMin>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j * q_stride + k * 16)), true, s, m,
                            lo, hi);
          acc[2 * j] = _mm256_fmadd_ps(x0, lo, acc[2 * j]);
          acc[2 * j + 1] = _mm256_fmadd_ps(x0, hi, acc[2 * j + 1]);
        }
        k += 1;
      }
    }
  }
  for (int j = 0; j < B; ++j)
    store16(y + j * 16, acc[2 * j], acc[2 * j + 1], valid(n_valid, j * 16), bias ? bias + j * 16 : nullptr);
}

#if defined(__AVX512F__)
// The GEMV with 16-lane vectors (one column block per register; its scales and mins held in registers for a group):
// the same fma(scale, value, min) and the same per-lane chain over k, so the same bits as the 8-lane code.
inline void store_block(float* y, __m512 acc, int64_t count, const float* bias) {
  alignas(64) float out[16];
  _mm512_store_ps(out, acc);
  if (bias != nullptr)
    for (int64_t i = 0; i < count; ++i) out[i] += bias[i];
  std::memcpy(y, out, count * sizeof(float));
}

template <int64_t Format, bool HasMin, int B>
void gemv_blocks_512(float* y, const float* x, const Quantized& w, int64_t b, int64_t n_valid, const float* bias) {
  const int64_t groups = w.K / w.group, q_stride = q_block_bytes<Format>(w.K), s_stride = groups * 16;
  const uint8_t* q = w.q + b * q_stride;
  const float* scales = w.scales + b * s_stride;
  const float* mins = HasMin ? w.mins + b * s_stride : nullptr;
  const __m128i mask = _mm_set1_epi8(0x0F);
  __m512 acc[B], s[B], m[B];
  for (int j = 0; j < B; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
#pragma GCC unroll 8
    for (int j = 0; j < B; ++j) {
      s[j] = _mm512_loadu_ps(scales + j * s_stride + g * 16);
      m[j] = HasMin ? _mm512_loadu_ps(mins + j * s_stride + g * 16) : _mm512_setzero_ps();
    }
    for (int64_t k = g * w.group; k < (g + 1) * w.group;) {
      if constexpr (Format == kUint4) {
        const __m512 x0 = _mm512_set1_ps(x[k]), x1 = _mm512_set1_ps(x[k + 1]);
#pragma GCC unroll 8
        for (int j = 0; j < B; ++j) {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j * q_stride + (k / 2) * 16));
          const __m128i even = _mm_and_si128(bytes, mask), odd = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
          const __m512 w0 = _mm512_fmadd_ps(s[j], _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(even)), m[j]);
          acc[j] = _mm512_fmadd_ps(x0, w0, acc[j]);
          const __m512 w1 = _mm512_fmadd_ps(s[j], _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(odd)), m[j]);
          acc[j] = _mm512_fmadd_ps(x1, w1, acc[j]);
        }
        k += 2;
      } else {
        const __m512 x0 = _mm512_set1_ps(x[k]);
#pragma GCC unroll 8
        for (int j = 0; j < B; ++j) {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j * q_stride + k * 16));
          const __m512 w0 = _mm512_fmadd_ps(s[j], _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), m[j]);
          acc[j] = _mm512_fmadd_ps(x0, w0, acc[j]);
        }
        k += 1;
      }
    }
  }
  for (int j = 0; j < B; ++j) store_block(y + j * 16, acc[j], valid(n_valid, j * 16), bias ? bias + j * 16 : nullptr);
}

// R rows of x against one dequantized 16-wide panel: one accumulator register per row (up to 12 of the 32).
template <int R>
inline void panel_rows_512(float* y, int64_t y_stride, const float* x, int64_t x_stride, const float* w, int64_t K,
                           int64_t n_valid, const float* bias) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 wk = _mm512_loadu_ps(w + k * 16);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * x_stride + k]), wk, acc[r]);
  }
  const int64_t count = valid(n_valid, 0);
  for (int r = 0; r < R; ++r) store_block(y + r * y_stride, acc[r], count, bias);
}
constexpr int64_t kPanelTileRows = 12;
template <int R>
inline void panel_rows(int64_t rows, float* y, int64_t ys, const float* x, int64_t xs, const float* w, int64_t K,
                       int64_t nv, const float* b) {
  if (rows == R) return panel_rows_512<R>(y, ys, x, xs, w, K, nv, b);
  if constexpr (R > 1) panel_rows<R - 1>(rows, y, ys, x, xs, w, K, nv, b);
}
#else
constexpr int64_t kPanelTileRows = 6;
template <int R>
inline void panel_rows(int64_t rows, float* y, int64_t ys, const float* x, int64_t xs, const float* w, int64_t K,
                       int64_t nv, const float* b) {
  rows_avx2(rows, y, ys, x, xs, w, K, nv, b);
}
#endif

template <int64_t Format, bool HasMin>
void quant_linear(float* y, const float* x, const Quantized& w, const float* bias, int64_t M, int64_t N,
                  int64_t x_stride) {
  const int64_t blocks = (N + 15) / 16, K = w.K;
  if (M == 1) {  // a GEMV: each thread an equal run of column blocks
#pragma omp parallel if (N * K >= kParallelMinElements)
    {
      const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
      const int64_t end = blocks * (thread + 1) / threads;
      int64_t b = blocks * thread / threads;
#if defined(__AVX512F__)
      for (; b + 8 <= end; b += 8)
        gemv_blocks_512<Format, HasMin, 8>(y + b * 16, x, w, b, N - b * 16, bias ? bias + b * 16 : nullptr);
      for (; b < end; ++b)
        gemv_blocks_512<Format, HasMin, 1>(y + b * 16, x, w, b, N - b * 16, bias ? bias + b * 16 : nullptr);
#else
      for (; b + 4 <= end; b += 4)
        gemv_blocks<Format, HasMin, 4>(y + b * 16, x, w, b, N - b * 16, bias ? bias + b * 16 : nullptr);
      for (; b < end; ++b)
        gemv_blocks<Format, HasMin, 1>(y + b * 16, x, w, b, N - b * 16, bias ? bias + b * 16 : nullptr);
#endif
    }
    return;
  }
#pragma omp parallel if (M * N * K >= kParallelMinElements)
  {
    std::vector<float> panel(K * 16);
    for (int64_t m0 = 0; m0 < M; m0 += kPanelRows) {
      const int64_t m1 = M - m0 > kPanelRows ? m0 + kPanelRows : M;
#pragma omp for schedule(static)
      for (int64_t b = 0; b < blocks; ++b) {
        dequant_panel<Format, HasMin>(panel.data(), w, b);
        const float* bb = bias ? bias + b * 16 : nullptr;
        for (int64_t m = m0; m < m1; m += kPanelTileRows)
          panel_rows<kPanelTileRows>(m1 - m >= kPanelTileRows ? kPanelTileRows : m1 - m, y + m * N + b * 16, N,
                                     x + m * x_stride, x_stride, panel.data(), K, N - b * 16, bb);
      }
    }
  }
}
#else  // the same chain per output, one weight at a time
template <int64_t Format, bool HasMin>
void quant_linear(float* y, const float* x, const Quantized& w, const float* bias, int64_t M, int64_t N,
                  int64_t x_stride) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.f;
      for (int64_t k = 0; k < w.K; ++k) acc = std::fma(x[m * x_stride + k], weight_at<Format>(w, n, k), acc);
      y[m * N + n] = acc + (bias ? bias[n] : 0.f);
    }
}
#endif

}  // namespace

extern "C" {

// y [M, N] (contiguous) = x [M, K] (rows x_stride apart) times the packed weight described by `weight` (+ bias).
void packed_linear_f32(float* y, const float* x, const int64_t* weight, const float* bias, int64_t M, int64_t N,
                       int64_t K, int64_t x_stride) {
  const Quantized w{reinterpret_cast<const uint8_t*>(weight[kData]), reinterpret_cast<const float*>(weight[kScales]),
                    reinterpret_cast<const float*>(weight[kMins]), weight[kGroup], K};
  switch (weight[kFormat]) {
    case kInt8:
      return w.mins ? quant_linear<kInt8, true>(y, x, w, bias, M, N, x_stride)
                    : quant_linear<kInt8, false>(y, x, w, bias, M, N, x_stride);
    case kUint4:
      return w.mins ? quant_linear<kUint4, true>(y, x, w, bias, M, N, x_stride)
                    : quant_linear<kUint4, false>(y, x, w, bias, M, N, x_stride);
    default:
      return blocked_linear_f32(y, x, reinterpret_cast<const float*>(weight[kData]), bias, M, N, K, x_stride);
  }
}

// weight [N, K] dequantized (row-major): the packed weight's values as the GEMM sees them (tests, fallbacks).
void dequantize_packed_f32(float* out, const int64_t* weight, int64_t N, int64_t K) {
  const Quantized w{reinterpret_cast<const uint8_t*>(weight[kData]), reinterpret_cast<const float*>(weight[kScales]),
                    reinterpret_cast<const float*>(weight[kMins]), weight[kGroup], K};
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      out[n * K + k] = weight[kFormat] == kUint4 ? weight_at<kUint4>(w, n, k) : weight_at<kInt8>(w, n, k);
}

}  // extern "C"
