// The selections of history_topk: the state's k-entry heaps, a thread's private top-k and last-k lists
// with their floors (the key a row must reach to enter), and the merge of a thread's lists into the state.
// The total order is (key desc, row asc), so the result depends neither on the threads nor on the chunks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "blocks.h"

namespace metaclm::topk {
namespace {  // internal linkage: parts of history_topk.cpp (see there)

constexpr int64_t kPadIndex = std::numeric_limits<int64_t>::max();

inline bool better(float av, int64_t ai, float bv, int64_t bi) { return av > bv || (av == bv && ai < bi); }

// A k-entry heap whose root is the worst kept entry; keys and indices in two parallel arrays.
struct Heap {
  float* key;
  int64_t* index;
  int64_t k;

  // Replaces the root if (v, i) is better than it. Returns true if it did.
  bool offer(float v, int64_t i) {
    if (!better(v, i, key[0], index[0])) return false;
    int64_t pos = 0;
    for (;;) {
      int64_t child = 2 * pos + 1;
      if (child >= k) break;
      if (child + 1 < k && better(key[child], index[child], key[child + 1], index[child + 1])) ++child;
      if (!better(v, i, key[child], index[child])) break;  // the worse child is worse than v: stop
      key[pos] = key[child];
      index[pos] = index[child];
      pos = child;
    }
    key[pos] = v;
    index[pos] = i;
    return true;
  }
};

// A thread's private selection of the k best (key, index) pairs, worst_key() the key a candidate must
// reach. For k <= kSortedMaxK a list sorted best first: a candidate enters at the back and shifts past
// the few entries it beats (most enter just above the worst), cheaper than a heap's sift-down with its
// unpredictable branches. For larger k, a heap.
constexpr int64_t kSortedMaxK = 32;

struct LocalTopK {
  float* key;
  int64_t* index;
  int64_t k;

  bool offer(float v, int64_t i) {
    if (k > kSortedMaxK) return Heap{key, index, k}.offer(v, i);
    if (!better(v, i, key[k - 1], index[k - 1])) return false;
    int64_t pos = k - 1;
    for (; pos > 0 && better(v, i, key[pos - 1], index[pos - 1]); --pos) {
      key[pos] = key[pos - 1];
      index[pos] = index[pos - 1];
    }
    key[pos] = v;
    index[pos] = i;
    return true;
  }
  float worst_key() const { return k > kSortedMaxK ? key[0] : key[k - 1]; }
};

// Private selections of one thread: [QH, k] keys and indices for top and last. They start full of
// placeholders (index kPadIndex) at the worst key of the heaps passed in, so a row that cannot beat
// the state of earlier chunks is never offered (without them every chunk and every thread would
// refill its selections from -inf). Placeholders are skipped when the thread's selections are merged.
// The floors (top worst key, -last worst key) sit together in a small [H][2][padded Q] array, so a scan
// reads adjacent floors (16 queries' floors are one vector) rather than lists scattered over megabytes.
// Queries past nq (padding of the last vector of queries) get floors no score reaches.
struct ThreadSelections {
  // Each selection is one slot of whole cache lines, k indices then k keys: for k <= 10 two lines,
  // which the two prefetches of an offer (below) cover.
  std::vector<int64_t> storage;
  int64_t* slots;           // 64-byte aligned start of slot 0
  int64_t slot_words;       // int64 words per slot
  std::vector<float> floors;
  int64_t nh, k, padded_nq;
  ThreadSelections(int64_t nq, int64_t nh, int64_t k, const float* in_top_key, const float* in_last_key)
      : slot_words((k * 12 + 63) / 64 * 8), nh(nh), k(k), padded_nq((nq + kLanes - 1) / kLanes * kLanes) {
    storage.resize(2 * nq * nh * slot_words + 8);
    slots = storage.data() + (8 - reinterpret_cast<uintptr_t>(storage.data()) / 8 % 8) % 8;
    floors.resize(2 * nh * padded_nq);
    for (int64_t h = 0; h < nh; ++h) {
      std::fill_n(top_floors(h), padded_nq, std::numeric_limits<float>::infinity());
      std::fill_n(last_floors(h), padded_nq, -std::numeric_limits<float>::infinity());
    }
    for (int64_t q = 0; q < nq; ++q) {
      for (int64_t h = 0; h < nh; ++h) {
        const int64_t j = q * nh + h;
        for (auto [sel, in_key] : {std::pair{top(j), in_top_key}, std::pair{last(j), in_last_key}}) {
          std::fill_n(sel.key, k, in_key[j * k]);  // [0] is a heap's worst entry
          std::fill_n(sel.index, k, kPadIndex);
        }
        top_floors(h)[q] = in_top_key[j * k];
        last_floors(h)[q] = -in_last_key[j * k];
      }
    }
  }
  LocalTopK slot(int64_t i) {
    int64_t* base = slots + i * slot_words;
    return {reinterpret_cast<float*>(base + k), base, k};
  }
  LocalTopK top(int64_t qh) { return slot(2 * qh); }
  LocalTopK last(int64_t qh) { return slot(2 * qh + 1); }
  float* top_floors(int64_t h) { return floors.data() + 2 * h * padded_nq; }   // [padded Q] of head h
  float* last_floors(int64_t h) { return floors.data() + (2 * h + 1) * padded_nq; }

  // Offers of the query-vector scan wait in a short queue, their selection's lines prefetched when
  // queued, so an offer applied kOfferDelay offers later finds them in cache instead of stalling on a
  // miss (the selections of thousands of queries span megabytes). A floor then lags its selection by
  // the few offers queued, which only lets a few more candidates through to the exact check. flush()
  // before reading the selections.
  static constexpr int kOfferDelay = 8;
  struct Offer {
    float key;  // the score for top, its negation for last
    int32_t q, h;
    bool last;
    int64_t row;
  };
  Offer queued[kOfferDelay];
  int n_queued = 0;

  void offer(int64_t q, int64_t h, bool last, float key, int64_t row) {
    const int64_t* slot_start = slots + (2 * (q * nh + h) + last) * slot_words;
    __builtin_prefetch(slot_start);
    __builtin_prefetch(slot_start + slot_words - 1);
    Offer& entry = queued[n_queued < kOfferDelay ? n_queued++ : apply_oldest()];
    entry = {key, static_cast<int32_t>(q), static_cast<int32_t>(h), last, row};
  }
  void flush() {
    for (int i = 0; i < n_queued; ++i) apply(queued[i]);
    n_queued = oldest = 0;
  }

 private:
  int oldest = 0;
  // Applies the oldest queued offer and returns its place for the new one.
  int apply_oldest() {
    const int at = oldest;
    apply(queued[at]);
    oldest = (oldest + 1) % kOfferDelay;
    return at;
  }
  void apply(const Offer& o) {
    LocalTopK sel = slot(2 * (o.q * nh + o.h) + o.last);
    if (!sel.offer(o.key, o.row)) return;
    if (o.last) last_floors(o.h)[o.q] = -sel.worst_key();
    else top_floors(o.h)[o.q] = sel.worst_key();
  }
};


// Offers one exact score of `row` to a query's top and last selections; returns true if a floor moved.
inline bool offer_score(float score, int64_t row, LocalTopK& top, LocalTopK& last, float& top_floor, float& last_floor) {
  bool moved = false;
  if (score >= top_floor && top.offer(score, row)) top_floor = top.worst_key(), moved = true;  // the floors
  if (score <= last_floor && last.offer(-score, row)) last_floor = -last.worst_key(), moved = true;  // first: spare a miss
  return moved;
}

// The selections of queries qi .. qi+QB-1 of head h while a scan of the row-vector layout passes one
// block: their lists, local copies of their floors (store() writes them back), and how many of the
// block's rows each may take (its limit can cut the block).
template <int QB>
struct QueryGroup {
  LocalTopK top[QB], last[QB];
  float top_floor[QB], last_floor[QB];
  int64_t n_valid[QB];
  int64_t n_max = 0;  // rows of the block below some query's limit
  QueryGroup(ThreadSelections& selections, int64_t h, int64_t qi, int64_t nh, const int64_t* limit, int64_t rows,
             int64_t base_row) {
    for (int b = 0; b < QB; ++b) {
      const int64_t qh = (qi + b) * nh + h;
      top[b] = selections.top(qh);
      last[b] = selections.last(qh);
      top_floor[b] = selections.top_floors(h)[qi + b];
      last_floor[b] = selections.last_floors(h)[qi + b];
      n_valid[b] = std::min(rows, limit[qi + b] - base_row);
      n_max = std::max(n_max, n_valid[b]);
    }
  }
  void store(ThreadSelections& selections, int64_t h, int64_t qi) const {
    for (int b = 0; b < QB; ++b) {
      selections.top_floors(h)[qi + b] = top_floor[b];
      selections.last_floors(h)[qi + b] = last_floor[b];
    }
  }
};


// Folds a thread's selections (flushed; placeholders skipped) into the state's heaps [QH, k].
inline void merge_into_state(ThreadSelections& local, int64_t qh, float* top_keys, int64_t* top_indices,
                             float* last_keys, int64_t* last_indices) {
  const int64_t k = local.k;
  for (int64_t j = 0; j < qh; ++j) {
    Heap top{top_keys + j * k, top_indices + j * k, k}, last{last_keys + j * k, last_indices + j * k, k};
    const LocalTopK ltop = local.top(j), llast = local.last(j);
    for (int64_t e = 0; e < k; ++e) {
      if (ltop.index[e] != kPadIndex) top.offer(ltop.key[e], ltop.index[e]);
      if (llast.index[e] != kPadIndex) last.offer(llast.key[e], llast.index[e]);
    }
  }
}

}  // namespace
}  // namespace metaclm::topk
