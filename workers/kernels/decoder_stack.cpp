// A whole Llama-family decoder stack for one decode step (one new token per sequence), in one call.
//
// In a decode step each layer's work is small (a few rows against each weight), so the Python between the
// kernels (module calls, views, ctypes) cost as much as a third of the forward on a 2-core CPU. This runs the same
// kernels of cpu_kernels.cpp in the same order on the same buffers layer after layer, so its results have the
// same bits as the layer-by-layer path (workers/models/llama.py), which keeps every other step (prefill, mixed
// batches). Under tensor parallel on one host a layer's two all-reduces go through the shared-memory collective
// (shm_collectives.cpp) at the same points as in the modules.
#include <cstdint>
#include <cstring>

extern "C" {
void rms_norm_f32(float* out, const float* x, const float* weight, int64_t rows, int64_t hidden, int64_t x_stride,
                  float eps);
void fused_add_rms_norm_f32(float* x, float* residual, const float* weight, int64_t rows, int64_t hidden, float eps);
void rotary_neox_f32(float* q, float* k, const int64_t* positions, const float* cos_sin, int64_t tokens,
                     int64_t num_q_heads, int64_t num_k_heads, int64_t head_dim, int64_t q_stride, int64_t k_stride);
void silu_and_mul_f32(float* out, const float* gate_up, int64_t tokens, int64_t d);
void write_kv_cache_f32(float* k_cache, float* v_cache, const float* k, const float* v, const int64_t* slots,
                        int64_t tokens, int64_t row_size, int64_t k_stride, int64_t v_stride);
void write_kv_cache_bf16(uint16_t* k_cache, uint16_t* v_cache, const float* k, const float* v, const int64_t* slots,
                         int64_t tokens, int64_t row_size, int64_t k_stride, int64_t v_stride);
void paged_decode_attention_f32(float* out, const float* q, const float* k_cache, const float* v_cache,
                                const int64_t* block_tables, const int64_t* seq_lens, int64_t seqs, int64_t num_heads,
                                int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                                int64_t q_stride, float scale);
void paged_decode_attention_bf16(float* out, const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
                                 const int64_t* block_tables, const int64_t* seq_lens, int64_t seqs, int64_t num_heads,
                                 int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                                 int64_t q_stride, float scale);
void packed_linear_f32(float* y, const float* x, const int64_t* weight, const float* bias, int64_t M, int64_t N,
                       int64_t K, int64_t x_stride);
int64_t shm_all_reduce_f32(char* segment, int64_t world, int64_t rank, int64_t slot_bytes, int64_t sequence,
                           float* data, int64_t count);
}

namespace {

// One row of the layer table (int64 addresses, 0 for an absent bias; a projection's is its weight table, see
// quant_gemm.cpp); the order is workers/models/llama_decode.py's.
enum LayerSlot : int64_t {
  kInputNorm, kQkv, kQkvBias, kO, kOBias, kPostNorm, kGateUp, kGateUpBias, kDown, kDownBias, kKCache, kVCache,
  kLayerSlots
};
// The shape vector, same order as the Python side.
enum Dim : int64_t {
  kHidden, kHeads, kKvHeads, kHeadDim, kIntermediate, kBlockSize, kMaxBlocks, kCacheBf16, kDims
};

template <typename T>
inline T* at(const int64_t* layer, LayerSlot slot) {
  return reinterpret_cast<T*>(layer[slot]);
}

// The tensor-parallel group's shared segment, as workers/distributed/shm_comm.py holds it; null with one rank.
enum CollectiveField : int64_t { kSegment, kWorld, kRank, kSlotBytes, kSequence };

// A row-parallel projection's output: the ranks' partial sums added (tensor parallel), then the bias, the order
// RowParallelLinear keeps. Returns false when a peer rank died (collective[kSequence] then holds its code).
bool reduce_and_add_bias(float* y, const float* bias, int64_t tokens, int64_t width, int64_t* collective) {
  if (collective != nullptr) {
    const int64_t sequence =
        shm_all_reduce_f32(reinterpret_cast<char*>(collective[kSegment]), collective[kWorld], collective[kRank],
                           collective[kSlotBytes], collective[kSequence], y, tokens * width);
    collective[kSequence] = sequence;
    if (sequence < 0) return false;
  }
  if (bias != nullptr)
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = 0; i < width; ++i) y[t * width + i] = y[t * width + i] + bias[i];
  return true;
}

}  // namespace

extern "C" {

// hidden [tokens, hidden]: the embedded tokens in, the final-normed hidden states out (the model's output).
// residual [tokens, hidden] and scratch [tokens, qkv + q + 3 * intermediate] are work space.
// layers [num_layers, kLayerSlots]; positions/slots [tokens]; block_tables [tokens, max_blocks]; seq_lens [tokens].
// collective: CollectiveField values (kSequence updated), or null for one rank. Returns 0, or -(1 + the rank
// found dead during an all-reduce).
int64_t llama_decode_stack_f32(float* hidden, float* residual, float* scratch, const int64_t* layers,
                               int64_t num_layers, const int64_t* dims, const float* final_norm,
                               const float* cos_sin, const int64_t* positions, const int64_t* slots,
                               const int64_t* block_tables, const int64_t* seq_lens, int64_t tokens, float eps,
                               float scale, int64_t* collective) {
  const int64_t hidden_size = dims[kHidden], heads = dims[kHeads], kv_heads = dims[kKvHeads];
  const int64_t head_dim = dims[kHeadDim], intermediate = dims[kIntermediate];
  const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim, qkv_size = q_size + 2 * kv_size;
  float* qkv = scratch;                                // [tokens, qkv_size]
  float* attention = qkv + tokens * qkv_size;          // [tokens, q_size]
  float* gate_up = attention + tokens * q_size;        // [tokens, 2 * intermediate]
  float* activated = gate_up + tokens * 2 * intermediate;  // [tokens, intermediate]

  std::memcpy(residual, hidden, tokens * hidden_size * sizeof(float));
  for (int64_t l = 0; l < num_layers; ++l) {
    const int64_t* layer = layers + l * kLayerSlots;
    if (l == 0)
      rms_norm_f32(hidden, residual, at<const float>(layer, kInputNorm), tokens, hidden_size, hidden_size, eps);
    else
      fused_add_rms_norm_f32(hidden, residual, at<const float>(layer, kInputNorm), tokens, hidden_size, eps);

    packed_linear_f32(qkv, hidden, at<const int64_t>(layer, kQkv), at<const float>(layer, kQkvBias), tokens, qkv_size,
                       hidden_size, hidden_size);
    float *q = qkv, *k = qkv + q_size, *v = k + kv_size;
    rotary_neox_f32(q, k, positions, cos_sin, tokens, heads, kv_heads, head_dim, qkv_size, qkv_size);
    if (dims[kCacheBf16]) {
      auto *k_cache = at<uint16_t>(layer, kKCache), *v_cache = at<uint16_t>(layer, kVCache);
      write_kv_cache_bf16(k_cache, v_cache, k, v, slots, tokens, kv_size, qkv_size, qkv_size);
      paged_decode_attention_bf16(attention, q, k_cache, v_cache, block_tables, seq_lens, tokens, heads, kv_heads,
                                  head_dim, dims[kBlockSize], dims[kMaxBlocks], qkv_size, scale);
    } else {
      auto *k_cache = at<float>(layer, kKCache), *v_cache = at<float>(layer, kVCache);
      write_kv_cache_f32(k_cache, v_cache, k, v, slots, tokens, kv_size, qkv_size, qkv_size);
      paged_decode_attention_f32(attention, q, k_cache, v_cache, block_tables, seq_lens, tokens, heads, kv_heads,
                                 head_dim, dims[kBlockSize], dims[kMaxBlocks], qkv_size, scale);
    }
    packed_linear_f32(hidden, attention, at<const int64_t>(layer, kO), nullptr, tokens, hidden_size, q_size, q_size);
    if (!reduce_and_add_bias(hidden, at<const float>(layer, kOBias), tokens, hidden_size, collective))
      return collective[kSequence];

    fused_add_rms_norm_f32(hidden, residual, at<const float>(layer, kPostNorm), tokens, hidden_size, eps);
    packed_linear_f32(gate_up, hidden, at<const int64_t>(layer, kGateUp), at<const float>(layer, kGateUpBias), tokens,
                       2 * intermediate, hidden_size, hidden_size);
    silu_and_mul_f32(activated, gate_up, tokens, intermediate);
    packed_linear_f32(hidden, activated, at<const int64_t>(layer, kDown), nullptr, tokens, hidden_size, intermediate,
                       intermediate);
    if (!reduce_and_add_bias(hidden, at<const float>(layer, kDownBias), tokens, hidden_size, collective))
      return collective[kSequence];
  }
  fused_add_rms_norm_f32(hidden, residual, final_norm, tokens, hidden_size, eps);
  return 0;
}

}  // extern "C"
