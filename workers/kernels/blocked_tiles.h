// The blocked float32 GEMM's tiles, shared by cpu_kernels.cpp (float weights) and quant_gemm.cpp (weights
// dequantized into the same layout): one FMA chain per output over k in order, whichever tile a row falls in.
#pragma once
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace conveyor_tiles {

// Blocked float32 GEMM: y[M, N] = x[M, K] W^T (+ bias), W packed as [ceil(N/16), K, 16] (16 output rows
// interleaved per k, zero-padded). Every output is one FMA chain over k in order, so a row's result has the same
// bits whatever M is or which tile it falls in (batch-invariant).
constexpr int64_t kPanelRows = 96;  // rows of x kept hot in L2 while every column block streams past them

inline void store16(float* y, __m256 lo, __m256 hi, int64_t count, const float* bias) {
  alignas(32) float out[16];
  _mm256_store_ps(out, lo);
  _mm256_store_ps(out + 8, hi);
  if (bias != nullptr)
    for (int64_t i = 0; i < count; ++i) out[i] += bias[i];
  std::memcpy(y, out, count * sizeof(float));
}
inline int64_t valid(int64_t n_valid, int64_t n0) { return n_valid - n0 >= 16 ? 16 : (n_valid > n0 ? n_valid - n0 : 0); }

// R (1-6) rows of x against one 16-wide column block: 2R accumulators in named registers.
template <int R>
inline void tile_rows(float* y, int64_t y_stride, const float* x, int64_t x_stride, const float* w, int64_t K,
                      int64_t n_valid, const float* bias) {
  __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0, a4 = a0, b4 = a0,
         a5 = a0, b5 = a0;
  const float *x0 = x, *x1 = x + x_stride, *x2 = x + 2 * x_stride, *x3 = x + 3 * x_stride, *x4 = x + 4 * x_stride,
              *x5 = x + 5 * x_stride;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 lo = _mm256_loadu_ps(w + k * 16), hi = _mm256_loadu_ps(w + k * 16 + 8);
    __m256 v = _mm256_broadcast_ss(x0 + k);
    a0 = _mm256_fmadd_ps(v, lo, a0); b0 = _mm256_fmadd_ps(v, hi, b0);
    if constexpr (R > 1) { v = _mm256_broadcast_ss(x1 + k); a1 = _mm256_fmadd_ps(v, lo, a1); b1 = _mm256_fmadd_ps(v, hi, b1); }
    if constexpr (R > 2) { v = _mm256_broadcast_ss(x2 + k); a2 = _mm256_fmadd_ps(v, lo, a2); b2 = _mm256_fmadd_ps(v, hi, b2); }
    if constexpr (R > 3) { v = _mm256_broadcast_ss(x3 + k); a3 = _mm256_fmadd_ps(v, lo, a3); b3 = _mm256_fmadd_ps(v, hi, b3); }
    if constexpr (R > 4) { v = _mm256_broadcast_ss(x4 + k); a4 = _mm256_fmadd_ps(v, lo, a4); b4 = _mm256_fmadd_ps(v, hi, b4); }
    if constexpr (R > 5) { v = _mm256_broadcast_ss(x5 + k); a5 = _mm256_fmadd_ps(v, lo, a5); b5 = _mm256_fmadd_ps(v, hi, b5); }
  }
  const int64_t count = valid(n_valid, 0);
  store16(y, a0, b0, count, bias);
  if constexpr (R > 1) store16(y + y_stride, a1, b1, count, bias);
  if constexpr (R > 2) store16(y + 2 * y_stride, a2, b2, count, bias);
  if constexpr (R > 3) store16(y + 3 * y_stride, a3, b3, count, bias);
  if constexpr (R > 4) store16(y + 4 * y_stride, a4, b4, count, bias);
  if constexpr (R > 5) store16(y + 5 * y_stride, a5, b5, count, bias);
}

// One row of x against four column blocks (a GEMV): 8 independent chains hide the FMA latency.
inline void tile_gemv(float* y, const float* x, const float* w, int64_t K, int64_t n_valid, const float* bias) {
  __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0;
  const float *w0 = w, *w1 = w + K * 16, *w2 = w + 2 * K * 16, *w3 = w + 3 * K * 16;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 v = _mm256_broadcast_ss(x + k);
    a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w0 + k * 16), a0); b0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w0 + k * 16 + 8), b0);
    a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w1 + k * 16), a1); b1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w1 + k * 16 + 8), b1);
    a2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w2 + k * 16), a2); b2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w2 + k * 16 + 8), b2);
    a3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w3 + k * 16), a3); b3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w3 + k * 16 + 8), b3);
  }
  store16(y, a0, b0, valid(n_valid, 0), bias);
  store16(y + 16, a1, b1, valid(n_valid, 16), bias ? bias + 16 : nullptr);
  store16(y + 32, a2, b2, valid(n_valid, 32), bias ? bias + 32 : nullptr);
  store16(y + 48, a3, b3, valid(n_valid, 48), bias ? bias + 48 : nullptr);
}
inline void rows(int64_t r, float* y, int64_t ys, const float* x, int64_t xs, const float* w, int64_t K, int64_t nv,
                 const float* b) {
  switch (r) {
    case 6: tile_rows<6>(y, ys, x, xs, w, K, nv, b); break;
    case 5: tile_rows<5>(y, ys, x, xs, w, K, nv, b); break;
    case 4: tile_rows<4>(y, ys, x, xs, w, K, nv, b); break;
    case 3: tile_rows<3>(y, ys, x, xs, w, K, nv, b); break;
    case 2: tile_rows<2>(y, ys, x, xs, w, K, nv, b); break;
    default: tile_rows<1>(y, ys, x, xs, w, K, nv, b);
  }
}

}  // namespace conveyor_tiles
#endif
