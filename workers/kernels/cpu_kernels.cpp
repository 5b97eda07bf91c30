// Fused float32 CPU kernels for the decoder layers (built by workers/kernels/build.py, called through ctypes).
//
// Each kernel replaces several torch ops whose intermediate tensors and per-op dispatch dominate a decode step
// on CPU: RMSNorm with the residual add, rotary embedding in place, the paged KV-cache write, and decode
// attention that reads K/V straight from the cache blocks (no gathered copy) with grouped query heads sharing
// one pass over their KV head. The elementwise kernels follow the torch reference op by op (float32 throughout, no
// FMA contraction: the build passes -ffp-contract=off) so results stay within a few ulps of it; the dot products
// (attention, GEMM) use explicit FMA chains in a fixed order, so a row's result never depends on its batch. The
// build also
// passes -fno-trapping-math: without it GCC will not vectorize loops with comparisons (the exp clamps).
//
// Threads come from the OpenMP runtime torch already loaded (same libgomp soname), so torch.set_num_threads
// governs these kernels too; small problems stay on the calling thread.
#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__)
#define CONVEYOR_AVX2_FMA 1
#include <immintrin.h>

#include "blocked_tiles.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kParallelMinElements = 1 << 15;  // below this, thread start-up costs more than it saves
constexpr int64_t kPrefetchTokens = 16;  // how far ahead the attention loops ask for cached rows

// The KV cache holds float32 or bfloat16 (uint16_t: the high half of a float32); kernels read either as float32.
inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) { return __builtin_bit_cast(float, static_cast<uint32_t>(x) << 16); }

// float32 -> bfloat16 rounding to nearest even, as torch's .to(torch.bfloat16) does (NaN stays a quiet NaN).
inline uint16_t to_bfloat16(float x) {
  if (x != x) return 0x7FC0;
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

inline void store_row(float* out, const float* x, int64_t n) { std::memcpy(out, x, n * sizeof(float)); }
inline void store_row(uint16_t* out, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_bfloat16(x[i]);
}

template <typename Cache>
inline float dot(const float* a, const Cache* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * to_float(b[i]);
  return acc;
}

// Asks for `bytes` from `p` on into L1 ahead of use: a cached token row sits in a block scattered in memory, so
// the hardware prefetcher loses the stream at every block boundary and the attention loops would wait on DRAM.
template <typename Cache>
inline void prefetch(const Cache* p, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t offset = 0; offset < count * static_cast<int64_t>(sizeof(Cache)); offset += 64)
    __builtin_prefetch(bytes + offset);
}

#if CONVEYOR_AVX2_FMA
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m256i widened = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(widened, 16));
}

// Scores of one query head against four key rows at once: four independent FMA chains hide the latency that a
// single dot product waits on, and one shuffle tree reduces all four (n: a multiple of 8).
template <typename Cache>
inline __m128 dot4(const float* q, const Cache* k0, const Cache* k1, const Cache* k2, const Cache* k3, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    a0 = _mm256_fmadd_ps(qv, load8(k0 + i), a0);
    a1 = _mm256_fmadd_ps(qv, load8(k1 + i), a1);
    a2 = _mm256_fmadd_ps(qv, load8(k2 + i), a2);
    a3 = _mm256_fmadd_ps(qv, load8(k3 + i), a3);
  }
  const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));  // [a0, a1, a2, a3] summed
}

// acc[0, n) += p0 * v0 + p1 * v1 + p2 * v2 + p3 * v3, one FMA chain per element in token order (n: a multiple of 8).
template <typename Cache>
inline void accumulate4(float* acc, const float* p, const Cache* v0, const Cache* v1, const Cache* v2,
                        const Cache* v3, int64_t n) {
  const __m256 p0 = _mm256_set1_ps(p[0]), p1 = _mm256_set1_ps(p[1]), p2 = _mm256_set1_ps(p[2]),
               p3 = _mm256_set1_ps(p[3]);
  for (int64_t i = 0; i < n; i += 8) {
    __m256 a = _mm256_loadu_ps(acc + i);
    a = _mm256_fmadd_ps(p0, load8(v0 + i), a);
    a = _mm256_fmadd_ps(p1, load8(v1 + i), a);
    a = _mm256_fmadd_ps(p2, load8(v2 + i), a);
    a = _mm256_fmadd_ps(p3, load8(v3 + i), a);
    _mm256_storeu_ps(acc + i, a);
  }
}
#endif

// expf to about 2 ulp (Cephes polynomial on a ln2-reduced argument), written so that loops of it vectorize.
inline float exp_approx(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.7f ? 88.7f : x;
  const float z = x * 1.44269504088896341f;
  const int32_t n_int = static_cast<int32_t>(z + (z >= 0.f ? 0.5f : -0.5f));  // nearest integer
  const float n = static_cast<float>(n_int);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  return y * __builtin_bit_cast(float, (n_int + 127) << 23);
}

inline void rms_norm_row(float* out, const float* x, const float* weight, int64_t hidden, float eps) {
  float sum_sq = 0.f;
#pragma omp simd reduction(+ : sum_sq)
  for (int64_t i = 0; i < hidden; ++i) sum_sq += x[i] * x[i];
  const float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(hidden) + eps);
#pragma omp simd
  for (int64_t i = 0; i < hidden; ++i) out[i] = weight[i] * (x[i] * inv_rms);
}

// Writes each token's K and V ([tokens, kv_heads * head_dim] rows `k_stride`/`v_stride` floats apart) into
// cache slot `slots[t]` of k_cache/v_cache ([slots, kv_heads * head_dim] contiguous).
template <typename Cache>
void write_kv_cache(Cache* k_cache, Cache* v_cache, const float* k, const float* v, const int64_t* slots,
                    int64_t tokens, int64_t row_size, int64_t k_stride, int64_t v_stride) {
#pragma omp parallel for if (tokens * row_size >= kParallelMinElements)
  for (int64_t t = 0; t < tokens; ++t) {
    store_row(k_cache + slots[t] * row_size, k + t * k_stride, row_size);
    store_row(v_cache + slots[t] * row_size, v + t * v_stride, row_size);
  }
}

// One query token per sequence against its paged context.
//   out [seqs, num_heads, head_dim] contiguous; q [seqs, num_heads, head_dim], rows `q_stride` floats apart;
//   k_cache/v_cache [blocks, block_size, num_kv_heads, head_dim]; block_tables [seqs, max_blocks];
//   seq_lens [seqs] (tokens of context, the new one included).
// A task is one sequence and a range of its KV heads: one pass over the keys scores every query head of the
// range, then one softmax per head, then one pass over the values. With enough sequences to keep every thread
// busy a task takes all KV heads, so each cached token row is read whole and once (memory order); with fewer,
// tasks split by KV head.
template <typename Cache>
void paged_decode_attention(float* out, const float* q, const Cache* k_cache, const Cache* v_cache,
                            const int64_t* block_tables, const int64_t* seq_lens, int64_t seqs, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                            int64_t q_stride, float scale) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t token_stride = num_kv_heads * head_dim;
  const int64_t block_stride = block_size * token_stride;
  int64_t total_context = 0;
  for (int64_t s = 0; s < seqs; ++s) total_context += seq_lens[s];
  const bool parallel = total_context * num_heads * head_dim >= kParallelMinElements;
  const int64_t heads_per_task = (parallel && seqs < omp_get_max_threads()) ? 1 : num_kv_heads;
  const int64_t tasks_per_seq = num_kv_heads / heads_per_task;
#pragma omp parallel if (parallel)
  {
    std::vector<float> scores;
    std::vector<int64_t> rows;  // element offset of each context token's first K/V value of this task
    std::vector<float> acc(num_heads * head_dim);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < seqs * tasks_per_seq; ++task) {
      const int64_t s = task / tasks_per_seq;
      const int64_t first_kv_head = (task % tasks_per_seq) * heads_per_task;
      const int64_t first_head = first_kv_head * group, task_heads = heads_per_task * group;
      const int64_t context = seq_lens[s];
      const int64_t* blocks = block_tables + s * max_blocks;
      const float* q_task = q + s * q_stride + first_head * head_dim;
      scores.resize(task_heads * context);
      // Row addresses once per task, by counting through the blocks: a division per token in the loops below
      // cost more than their arithmetic.
      rows.resize(context + kPrefetchTokens);
      for (int64_t t = 0, block = 0, in_block = 0; t < context; ++t) {
        rows[t] = blocks[block] * block_stride + in_block * token_stride + first_kv_head * head_dim;
        if (++in_block == block_size) in_block = 0, ++block;
      }
      std::fill(rows.begin() + context, rows.end(), rows[context - 1]);  // prefetches past the end: harmless
      const int64_t row_width = heads_per_task * head_dim;
      int64_t t = 0;
#if CONVEYOR_AVX2_FMA
      if (head_dim % 8 == 0) {
        for (; t + 4 <= context; t += 4) {
          const Cache *k0 = k_cache + rows[t], *k1 = k_cache + rows[t + 1], *k2 = k_cache + rows[t + 2],
                      *k3 = k_cache + rows[t + 3];
          for (int64_t j = t + kPrefetchTokens; j < t + kPrefetchTokens + 4; ++j) prefetch(k_cache + rows[j], row_width);
          for (int64_t h = 0; h < task_heads; ++h) {
            const int64_t offset = (h / group) * head_dim;
            const __m128 dots = dot4(q_task + h * head_dim, k0 + offset, k1 + offset, k2 + offset, k3 + offset,
                                     head_dim);
            _mm_storeu_ps(scores.data() + h * context + t, _mm_mul_ps(dots, _mm_set1_ps(scale)));
          }
        }
      }
#endif
      for (; t < context; ++t) {
        const Cache* keys = k_cache + rows[t];
        for (int64_t h = 0; h < task_heads; ++h)
          scores[h * context + t] = dot(q_task + h * head_dim, keys + (h / group) * head_dim, head_dim) * scale;
      }
      for (int64_t h = 0; h < task_heads; ++h) {
        float* row = scores.data() + h * context;
        float max_score = -INFINITY;
        for (int64_t t = 0; t < context; ++t) max_score = std::max(max_score, row[t]);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < context; ++t) {
          row[t] = exp_approx(row[t] - max_score);
          total += row[t];
        }
        const float inv_total = 1.0f / total;
#pragma omp simd
        for (int64_t t = 0; t < context; ++t) row[t] *= inv_total;
      }
      for (int64_t j = 0; j < kPrefetchTokens && j < context; ++j) prefetch(v_cache + rows[j], row_width);
      std::fill(acc.begin(), acc.begin() + task_heads * head_dim, 0.f);
      // Four value rows per pass over the accumulators (a quarter of the accumulator loads and stores).
      t = 0;
#if CONVEYOR_AVX2_FMA
      for (; head_dim % 8 == 0 && t + 4 <= context; t += 4) {
        const Cache *v0 = v_cache + rows[t], *v1 = v_cache + rows[t + 1], *v2 = v_cache + rows[t + 2],
                    *v3 = v_cache + rows[t + 3];
        for (int64_t j = t + kPrefetchTokens; j < t + kPrefetchTokens + 4; ++j) prefetch(v_cache + rows[j], row_width);
        for (int64_t h = 0; h < task_heads; ++h) {
          const int64_t offset = (h / group) * head_dim;
          accumulate4(acc.data() + h * head_dim, scores.data() + h * context + t, v0 + offset, v1 + offset,
                      v2 + offset, v3 + offset, head_dim);
        }
      }
#endif
      for (; t < context; ++t) {
        const Cache* values = v_cache + rows[t];
        for (int64_t h = 0; h < task_heads; ++h) {
          const float p = scores[h * context + t];
          const Cache* value = values + (h / group) * head_dim;
          float* a = acc.data() + h * head_dim;
#pragma omp simd
          for (int64_t i = 0; i < head_dim; ++i) a[i] = std::fma(p, to_float(value[i]), a[i]);
        }
      }
      std::memcpy(out + (s * num_heads + first_head) * head_dim, acc.data(), task_heads * head_dim * sizeof(float));
    }
  }
}



}  // namespace

extern "C" {

// out[r] = weight * x[r] / rms(x[r]) for rows of a [rows, hidden] matrix (x rows `x_stride` floats apart).
void rms_norm_f32(float* out, const float* x, const float* weight, int64_t rows, int64_t hidden, int64_t x_stride,
                  float eps) {
#pragma omp parallel for if (rows * hidden >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) rms_norm_row(out + r * hidden, x + r * x_stride, weight, hidden, eps);
}

// In place, both contiguous [rows, hidden]: residual += x; x = rms_norm(residual) (the pre-norm layer pattern).
void fused_add_rms_norm_f32(float* x, float* residual, const float* weight, int64_t rows, int64_t hidden,
                            float eps) {
#pragma omp parallel for if (rows * hidden >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) {
    float* res = residual + r * hidden;
    float* row = x + r * hidden;
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i) res[i] = row[i] + res[i];
    rms_norm_row(row, res, weight, hidden, eps);
  }
}

// GPT-NeoX ("rotate half") rotary embedding in place on q [tokens, num_q_heads, head_dim] and k [tokens,
// num_k_heads, head_dim] (heads contiguous, token rows `q_stride`/`k_stride` floats apart). cos_sin: [positions,
// head_dim] holding cos then sin of each frequency.
void rotary_neox_f32(float* q, float* k, const int64_t* positions, const float* cos_sin, int64_t tokens,
                     int64_t num_q_heads, int64_t num_k_heads, int64_t head_dim, int64_t q_stride,
                     int64_t k_stride) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for if (tokens * (num_q_heads + num_k_heads) * head_dim >= kParallelMinElements)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* cos = cos_sin + positions[t] * head_dim;
    const float* sin = cos + half;
    for (int64_t h = 0; h < num_q_heads + num_k_heads; ++h) {
      float* x = h < num_q_heads ? q + t * q_stride + h * head_dim : k + t * k_stride + (h - num_q_heads) * head_dim;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos[i] - x2 * sin[i];
        x[i + half] = x2 * cos[i] + x1 * sin[i];
      }
    }
  }
}

// out [tokens, d] = silu(gate) * up for gate_up [tokens, 2 * d] (gate then up, as the fused projection emits).
void silu_and_mul_f32(float* out, const float* gate_up, int64_t tokens, int64_t d) {
#pragma omp parallel for if (tokens * d >= kParallelMinElements)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* gate = gate_up + t * 2 * d;
    const float* up = gate + d;
    float* row = out + t * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) row[i] = gate[i] / (1.0f + exp_approx(-gate[i])) * up[i];
  }
}

void write_kv_cache_f32(float* k_cache, float* v_cache, const float* k, const float* v, const int64_t* slots,
                        int64_t tokens, int64_t row_size, int64_t k_stride, int64_t v_stride) {
  write_kv_cache(k_cache, v_cache, k, v, slots, tokens, row_size, k_stride, v_stride);
}

void write_kv_cache_bf16(uint16_t* k_cache, uint16_t* v_cache, const float* k, const float* v, const int64_t* slots,
                         int64_t tokens, int64_t row_size, int64_t k_stride, int64_t v_stride) {
  write_kv_cache(k_cache, v_cache, k, v, slots, tokens, row_size, k_stride, v_stride);
}

void paged_decode_attention_f32(float* out, const float* q, const float* k_cache, const float* v_cache,
                                const int64_t* block_tables, const int64_t* seq_lens, int64_t seqs, int64_t num_heads,
                                int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                                int64_t q_stride, float scale) {
  paged_decode_attention(out, q, k_cache, v_cache, block_tables, seq_lens, seqs, num_heads, num_kv_heads, head_dim,
                         block_size, max_blocks, q_stride, scale);
}

void paged_decode_attention_bf16(float* out, const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
                                 const int64_t* block_tables, const int64_t* seq_lens, int64_t seqs, int64_t num_heads,
                                 int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                                 int64_t q_stride, float scale) {
  paged_decode_attention(out, q, k_cache, v_cache, block_tables, seq_lens, seqs, num_heads, num_kv_heads, head_dim,
                         block_size, max_blocks, q_stride, scale);
}

void blocked_linear_f32(float* y, const float* x, const float* w, const float* bias, int64_t M, int64_t N,
                        int64_t K, int64_t x_stride) {
#if CONVEYOR_AVX2_FMA
  using namespace conveyor_tiles;
  const int64_t blocks = (N + 15) / 16;
  if (M == 1) {  // a GEMV: each thread an equal run of column blocks (memory-bound: balance is what counts)
#pragma omp parallel if (N * K >= kParallelMinElements)
    {
      const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
      const int64_t end = blocks * (thread + 1) / threads;
      int64_t b = blocks * thread / threads;
      for (; b + 4 <= end; b += 4)  // four blocks per pass where the run allows
        tile_gemv(y + b * 16, x, w + b * K * 16, K, N - b * 16, bias ? bias + b * 16 : nullptr);
      for (; b < end; ++b)
        tile_rows<1>(y + b * 16, N, x, x_stride, w + b * K * 16, K, N - b * 16, bias ? bias + b * 16 : nullptr);
    }
    return;
  }
#pragma omp parallel if (M * N * K >= kParallelMinElements)
  for (int64_t m0 = 0; m0 < M; m0 += kPanelRows) {
    const int64_t m1 = M - m0 > kPanelRows ? m0 + kPanelRows : M;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* wb = w + b * K * 16;
      const float* bb = bias ? bias + b * 16 : nullptr;
      for (int64_t m = m0; m < m1; m += 6)
        rows(m1 - m >= 6 ? 6 : m1 - m, y + m * N + b * 16, N, x + m * x_stride, x_stride, wb, K, N - b * 16, bb);
    }
  }
#else  // the same FMA chain per output, one lane at a time (Conveyor picks this GEMM only on AVX2 CPUs)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const float* wn = w + (n / 16) * K * 16 + n % 16;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(x[m * x_stride + k], wn[k * 16], acc);
      y[m * N + n] = acc + (bias ? bias[n] : 0.f);
    }
#endif
}

}  // extern "C"
