// What every scan of history_topk shares about blocks of history rows: the vector width, the queries
// and limits a block is scored against, the 16 x 16 register transpose that lays rows out by dimension,
// and the prefetch of a thread's next block.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace metaclm::topk {
namespace {  // internal linkage: parts of history_topk.cpp (see there)

constexpr int64_t kLanes = 16;

// The queries of one merge: fp32 [Q, H, Dh], each with its limit (rows t < limit[q] are candidates).
struct ScanQueries {
  const float* queries;
  const int64_t* limit;
  int64_t nq, nh, dh;
};

#if defined(__AVX512F__)
// Permute indices for transpose16: at stage s (block size b = 8 >> s), lo picks row i's own columns
// without bit b and row i+b's columns shifted down by b; hi the converse.
struct TransposeIndex {
  alignas(64) int32_t lo[4][16], hi[4][16];
  TransposeIndex() {
    for (int s = 0, b = 8; s < 4; ++s, b >>= 1) {
      for (int c = 0; c < 16; ++c) {
        lo[s][c] = (c & b) ? 16 + c - b : c;
        hi[s][c] = (c & b) ? 16 + c : c + b;
      }
    }
  }
};
const TransposeIndex kTransposeIndex;

// In-place transpose of a 16x16 fp32 tile held as 16 rows: swap the off-diagonal b x b blocks for
// b = 8, 4, 2, 1 (each swap is two two-source permutes per row pair).
__attribute__((always_inline)) inline void transpose16(__m512 (&r)[16], const __m512i (&lo)[4], const __m512i (&hi)[4]) {
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) {
    const int b = 8 >> s;
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      if (i & b) continue;
      const __m512 top = r[i], bottom = r[i + b];
      r[i] = _mm512_permutex2var_ps(top, lo[s], bottom);
      r[i + b] = _mm512_permutex2var_ps(top, hi[s], bottom);
    }
  }
}
#endif

// Pulls the thread's next block of rows into L2 a few lines per step while the current block is scored
// (a step: one tile group of the scan), so loading it afterwards reads from cache rather than waiting
// on memory: a core streams rows far slower than it scores them in cache.
class NextBlockPrefetch {
 public:
  void start(const void* next, int64_t bytes, int64_t steps) {
    at_ = static_cast<const char*>(next);
    end_ = at_ + (next ? bytes : 0);
    per_step_ = ((bytes + 63) / 64 + steps - 1) / std::max<int64_t>(steps, 1) * 64;
  }
  void step() {
    const char* stop = std::min(end_, at_ + per_step_);
    for (; at_ < stop; at_ += 64) __builtin_prefetch(at_, 0, 2);  // prefetcht1: into L2
  }

 private:
  const char* at_ = nullptr;
  const char* end_ = nullptr;
  int64_t per_step_ = 0;
};

}  // namespace
}  // namespace metaclm::topk
