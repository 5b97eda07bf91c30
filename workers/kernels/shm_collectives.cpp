// Tensor-parallel collectives between ranks on one host through a shared memory segment (float32).
//
// gloo sends every all-reduce through TCP loopback: tens to hundreds of microseconds per call, several calls per
// layer. Here each rank copies its part into its own slot of a segment every rank has mapped, announces the
// call's sequence number, waits until every rank has announced it, and reads the others' slots directly.
//
// Segment layout (set up by workers/distributed/shm_comm.py):
//   header: per rank, a 64-byte line holding [announced sequence (int64), pid (int64)]
//   data:   2 (sequence parity) x world slots of `slot_bytes`
// Two parities make one barrier per call enough: a rank writes parity p again only at call seq + 2, after every
// rank announced seq + 1, so every rank has finished reading call seq by then.
//
// Reductions add the ranks' parts in rank order, so every rank computes the same bits. A waiting rank spins
// briefly, then yields its core (ranks may share cores with each other and with their own threads), and checks
// that the ranks it waits for are alive: a dead peer makes the call fail instead of hanging.
#include <sched.h>
#include <signal.h>
#include <sys/types.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>

namespace {

constexpr int64_t kHeaderLine = 64;
constexpr int kSpinsBeforeYield = 2000;
constexpr int kYieldsBetweenLivenessChecks = 1000;

struct RankLine {
  int64_t sequence;
  int64_t pid;
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

inline RankLine* rank_line(char* segment, int64_t rank) { return reinterpret_cast<RankLine*>(segment + rank * kHeaderLine); }

inline char* slot(char* segment, int64_t world, int64_t slot_bytes, int64_t sequence, int64_t rank) {
  return segment + world * kHeaderLine + ((sequence & 1) * world + rank) * slot_bytes;
}

// A process that no longer runs: gone, or a zombie its parent has not reaped yet.
bool process_gone(int64_t pid) {
  if (kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return true;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%lld/stat", static_cast<long long>(pid));
  FILE* stat = std::fopen(path, "r");
  if (stat == nullptr) return false;  // no procfs: trust kill()
  char buffer[512];
  const size_t length = std::fread(buffer, 1, sizeof(buffer) - 1, stat);
  std::fclose(stat);
  buffer[length] = '\0';
  const char* after_name = std::strrchr(buffer, ')');  // "pid (name) S ...": the name may hold spaces
  return after_name != nullptr && (after_name[2] == 'Z' || after_name[2] == 'X');
}

// Announces `sequence` for `rank` and waits until every rank has announced it. Returns 0, or 1 + the rank
// found dead.
int64_t barrier(char* segment, int64_t world, int64_t rank, int64_t sequence) {
  __atomic_store_n(&rank_line(segment, rank)->sequence, sequence, __ATOMIC_RELEASE);
  for (int64_t other = 0; other < world; ++other) {
    RankLine* line = rank_line(segment, other);
    int64_t spins = 0;
    while (__atomic_load_n(&line->sequence, __ATOMIC_ACQUIRE) < sequence) {
      if (++spins < kSpinsBeforeYield) {
        cpu_relax();
        continue;
      }
      sched_yield();
      // Read the announcement again after finding the peer gone: it may have announced, finished the call and
      // exited while this rank was yielding, which is no failure.
      if (spins % kYieldsBetweenLivenessChecks == 0 && process_gone(line->pid) &&
          __atomic_load_n(&line->sequence, __ATOMIC_ACQUIRE) < sequence)
        return 1 + other;
    }
  }
  return 0;
}

}  // namespace

extern "C" {

// Sums `count` floats of `data` over the ranks, in place, in chunks of at most slot_bytes. `sequence` is the
// number of calls (chunks) this group made before; returns the new count, or -(1 + dead rank).
int64_t shm_all_reduce_f32(char* segment, int64_t world, int64_t rank, int64_t slot_bytes, int64_t sequence,
                           float* data, int64_t count) {
  const int64_t chunk = slot_bytes / static_cast<int64_t>(sizeof(float));
  for (int64_t start = 0; start < count; start += chunk) {
    const int64_t n = count - start < chunk ? count - start : chunk;
    ++sequence;
    std::memcpy(slot(segment, world, slot_bytes, sequence, rank), data + start, n * sizeof(float));
    if (const int64_t dead = barrier(segment, world, rank, sequence)) return -dead;
    float* out = data + start;
    const float* first = reinterpret_cast<const float*>(slot(segment, world, slot_bytes, sequence, 0));
    std::memcpy(out, first, n * sizeof(float));
    for (int64_t other = 1; other < world; ++other) {
      const float* part = reinterpret_cast<const float*>(slot(segment, world, slot_bytes, sequence, other));
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] += part[i];
    }
  }
  return sequence;
}

// out [world, count] (contiguous bytes) = every rank's `count`-byte `data`, rank order. Parts larger than a slot
// go in chunks. Same sequence convention as shm_all_reduce_f32.
int64_t shm_all_gather(char* segment, int64_t world, int64_t rank, int64_t slot_bytes, int64_t sequence,
                       const char* data, char* out, int64_t count) {
  for (int64_t start = 0; start < count; start += slot_bytes) {
    const int64_t n = count - start < slot_bytes ? count - start : slot_bytes;
    ++sequence;
    std::memcpy(slot(segment, world, slot_bytes, sequence, rank), data + start, n);
    if (const int64_t dead = barrier(segment, world, rank, sequence)) return -dead;
    for (int64_t other = 0; other < world; ++other)
      std::memcpy(out + other * count + start, slot(segment, world, slot_bytes, sequence, other), n);
  }
  return sequence;
}

}  // extern "C"
