// Packing sequences into micro-batches under a token budget, and balancing them across
// data-parallel ranks. Pure C++ (no Python); the bindings live in packing.cpp.
//
// Every result is deterministic and matches kernels/packing/reference.py exactly:
// ties are always broken towards the lower index, so both sides make the same choices.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace qwenlong::packing {

// Groups of item indices. Each group lists its indices in ascending order.
using Groups = std::vector<std::vector<int64_t>>;

// Throws std::invalid_argument (ValueError in Python) for budget <= 0, a negative length,
// or a length above the budget, naming the first offending index.
void check_lengths(const int64_t* lengths, int64_t n, int64_t budget);

// Best-fit decreasing: visit `items` by length, longest first, and put each into the open
// micro-batch with the least free room that still fits it (the earliest such one on ties),
// opening a new micro-batch when none fits. Micro-batches come out in opening order.
// O(n log n) with an ordered set of (free room, micro-batch) pairs.
Groups pack_best_fit_decreasing(const int64_t* lengths, const std::vector<int64_t>& items, int64_t budget);

// Karmarkar-Karp largest differencing, k-way: every item starts as a k-tuple of subsets
// holding only itself; repeatedly the two tuples with the largest spread (max - min subset
// weight) are merged, pairing the heaviest subset of one with the lightest of the other.
// Returns k groups (heaviest first; empty groups last when there are fewer than k items).
// O(n log n + n k log k) worst case, O(n) memory (only non-empty subsets are stored).
Groups partition_karmarkar_karp(const double* weights, int64_t n, int64_t k);

// Splits micro-batches until there are `count`: the one with the most tokens among those
// with two or more sequences is halved (longest first into the lighter half). Appends
// empty micro-batches only when every micro-batch already holds a single sequence.
void split_to_count(const int64_t* lengths, Groups& micro_batches, size_t count);

// Orders micro-batches by token total, largest first (then by first index), so micro-step j
// carries similar work on every rank.
void sort_by_tokens(const int64_t* lengths, Groups& micro_batches);

// k groups balanced on `weights` (Karmarkar-Karp), each packed under `budget` (best-fit
// decreasing) and sorted by tokens; with `equal_micro_batches` every rank gets as many
// micro-batches as the rank that needs the most.
std::vector<Groups> balance_and_pack(const int64_t* lengths, const double* weights, int64_t n, int64_t k,
                                     int64_t budget, bool equal_micro_batches);

}  // namespace qwenlong::packing
