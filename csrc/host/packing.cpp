// Token-budget packing (best-fit decreasing) and k-way Karmarkar-Karp balancing.
// See packing.h for the contracts; kernels/packing/reference.py is the Python twin.
#include "packing.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <queue>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>

#include "registry.h"

namespace qwenlong::packing {
namespace {

void check_k(int64_t k) {
  if (k <= 0) throw std::invalid_argument("k must be a positive number of partitions, got " + std::to_string(k));
}

int64_t total_tokens(const int64_t* lengths, const std::vector<int64_t>& items) {
  int64_t total = 0;
  for (int64_t i : items) total += lengths[i];
  return total;
}

// (value, index) pairs sorted largest value first, lower index first on ties. The values
// travel with the indices so the hot loops never chase values[index] through memory.
template <typename T>
std::vector<std::pair<T, int64_t>> largest_first(const T* values, const std::vector<int64_t>& items) {
  std::vector<std::pair<T, int64_t>> keyed(items.size());
  for (size_t j = 0; j < items.size(); ++j) keyed[j] = {values[items[j]], items[j]};
  std::sort(keyed.begin(), keyed.end(),
            [](const auto& a, const auto& b) { return a.first != b.first ? a.first > b.first : a.second < b.second; });
  return keyed;
}

// A subset inside a Karmarkar-Karp tuple: its weight and its representative item. Merged
// subsets are recorded union-find style (parent[absorbed root] = surviving root), which
// makes a merge O(1) and the final labelling a cache-friendly pass in item order.
struct Subset {
  double sum;
  int64_t root;
};

// Heaviest first; the lower root first on equal weight (roots are distinct items).
bool heavier(const Subset& a, const Subset& b) { return a.sum != b.sum ? a.sum > b.sum : a.root < b.root; }

// Spread of a k-tuple whose non-empty subsets are `parts` (sorted heaviest first); the
// missing subsets are empty and weigh 0.
double spread(const std::vector<Subset>& parts, int64_t k) {
  const double lightest = static_cast<int64_t>(parts.size()) < k ? 0.0 : parts.back().sum;
  return parts.front().sum - lightest;
}

int64_t find_root(std::vector<int64_t>& parent, int64_t i) {
  int64_t root = i;
  while (parent[root] != root) root = parent[root];
  while (parent[i] != root) i = std::exchange(parent[i], root);  // path compression
  return root;
}

// A tuple waiting to be merged: singletons (slot -1) are the item `id` alone; merged
// tuples keep their subsets in slots[slot]. Ids order ties: items first, then merge order.
struct Candidate {
  double spread;
  int64_t id;
  int64_t slot;
};

// std::priority_queue pops the "largest": the largest spread, then the smallest id.
struct SmallerSpread {
  bool operator()(const Candidate& a, const Candidate& b) const {
    return a.spread != b.spread ? a.spread < b.spread : a.id > b.id;
  }
};

// Halves one micro-batch: longest sequence first, each into the half with fewer tokens
// (the first half on ties).
std::pair<std::vector<int64_t>, std::vector<int64_t>> halve(const int64_t* lengths, const std::vector<int64_t>& items) {
  std::vector<int64_t> first, second;
  int64_t first_tokens = 0, second_tokens = 0;
  for (const auto& [length, i] : largest_first(lengths, items)) {
    if (first_tokens <= second_tokens) {
      first.push_back(i);
      first_tokens += length;
    } else {
      second.push_back(i);
      second_tokens += length;
    }
  }
  std::sort(first.begin(), first.end());
  std::sort(second.begin(), second.end());
  return {std::move(first), std::move(second)};
}

}  // namespace

void check_lengths(const int64_t* lengths, int64_t n, int64_t budget) {
  if (budget <= 0)
    throw std::invalid_argument("budget must be a positive number of tokens, got " + std::to_string(budget));
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] < 0)
      throw std::invalid_argument("lengths[" + std::to_string(i) + "] is negative (" + std::to_string(lengths[i]) +
                                  ")");
    if (lengths[i] > budget)
      throw std::invalid_argument("sequence " + std::to_string(i) + " has " + std::to_string(lengths[i]) +
                                  " tokens, more than the budget of " + std::to_string(budget) +
                                  ": raise the budget or truncate it");
  }
}

Groups pack_best_fit_decreasing(const int64_t* lengths, const std::vector<int64_t>& items, int64_t budget) {
  Groups bins;
  std::set<std::pair<int64_t, int64_t>> free_room;  // (free tokens, micro-batch index)
  for (const auto& [length, i] : largest_first(lengths, items)) {
    auto it = free_room.lower_bound({length, -1});
    if (it == free_room.end()) {
      free_room.insert({budget - length, static_cast<int64_t>(bins.size())});
      bins.push_back({i});
    } else {
      auto node = free_room.extract(it);  // re-keyed in place: no allocation per item
      bins[node.value().second].push_back(i);
      node.value().first -= length;
      free_room.insert(std::move(node));
    }
  }
  for (auto& bin : bins) std::sort(bin.begin(), bin.end());
  return bins;
}

Groups partition_karmarkar_karp(const double* weights, int64_t n, int64_t k) {
  check_k(k);
  for (int64_t i = 0; i < n; ++i)
    if (!(weights[i] >= 0.0) || std::isinf(weights[i]))
      // std::to_string prints a NaN with its sign bit set as "-nan"; Python (the reference) says "nan"
      throw std::invalid_argument("weights[" + std::to_string(i) + "] must be finite and non-negative, got " +
                                  (std::isnan(weights[i]) ? std::string("nan") : std::to_string(weights[i])));
  Groups groups(k);
  if (k == 1) {  // every spread is 0: one group with everything
    groups[0].resize(n);
    std::iota(groups[0].begin(), groups[0].end(), 0);
    return groups;
  }
  if (n == 0) return groups;

  // A singleton tuple's spread is its weight (the other k-1 subsets are empty), so the
  // singletons are visited from a sorted list; only merged tuples go through the heap and
  // own storage (`slots`, recycled through `free_slots`).
  std::vector<int64_t> all(n);
  std::iota(all.begin(), all.end(), 0);
  const auto singletons = largest_first(weights, all);
  size_t next_singleton = 0;
  std::priority_queue<Candidate, std::vector<Candidate>, SmallerSpread> merged_tuples;
  std::vector<std::vector<Subset>> slots;
  std::vector<int64_t> free_slots;
  std::vector<int64_t> parent(std::move(all));  // every item starts as its own root

  auto pop_largest = [&]() -> Candidate {
    if (next_singleton < singletons.size()) {
      const auto [weight, item] = singletons[next_singleton];
      const Candidate single{weight, item, -1};
      if (merged_tuples.empty() || SmallerSpread()(merged_tuples.top(), single)) {
        ++next_singleton;
        return single;
      }
    }
    const Candidate top = merged_tuples.top();
    merged_tuples.pop();
    return top;
  };

  std::vector<Subset> merged;
  int64_t next_id = n;
  for (int64_t remaining = n; remaining > 1; --remaining) {
    const Candidate a = pop_largest(), b = pop_largest();
    const Subset single_a{a.spread, a.id}, single_b{b.spread, b.id};
    const Subset* a_parts = a.slot >= 0 ? slots[a.slot].data() : &single_a;
    const Subset* b_parts = b.slot >= 0 ? slots[b.slot].data() : &single_b;
    const int64_t na = a.slot >= 0 ? slots[a.slot].size() : 1;
    const int64_t nb = b.slot >= 0 ? slots[b.slot].size() : 1;

    // Padded to k entries, subset i of the result joins a[i] and b[k-1-i]; only the indices
    // where one of them is non-empty are visited: i < na or i >= k - nb.
    merged.clear();
    for (int64_t i = 0; i < k; i = (i + 1 == na) ? std::max(na, k - nb) : i + 1) {
      const Subset* from_a = i < na ? &a_parts[i] : nullptr;
      const Subset* from_b = k - 1 - i < nb ? &b_parts[k - 1 - i] : nullptr;
      if (from_a && from_b) {
        parent[from_b->root] = from_a->root;
        merged.push_back({from_a->sum + from_b->sum, from_a->root});
      } else {
        merged.push_back(from_a ? *from_a : *from_b);
      }
    }
    std::sort(merged.begin(), merged.end(), heavier);

    int64_t slot = a.slot >= 0 ? a.slot : b.slot;
    if (a.slot >= 0 && b.slot >= 0) free_slots.push_back(b.slot);
    if (slot < 0 && !free_slots.empty()) {
      slot = free_slots.back();
      free_slots.pop_back();
    } else if (slot < 0) {
      slot = slots.size();
      slots.emplace_back();
    }
    slots[slot].swap(merged);  // the old storage comes back as the next scratch buffer
    merged_tuples.push({spread(slots[slot], k), next_id++, slot});
  }

  const Candidate last = pop_largest();
  std::vector<int64_t> group_of_root(n, -1);
  if (last.slot < 0) group_of_root[last.id] = 0;  // a single item
  else
    for (size_t g = 0; g < slots[last.slot].size(); ++g) group_of_root[slots[last.slot][g].root] = g;
  for (int64_t i = 0; i < n; ++i) groups[group_of_root[find_root(parent, i)]].push_back(i);
  return groups;
}

void split_to_count(const int64_t* lengths, Groups& micro_batches, size_t count) {
  // (tokens, -index): the heaviest splittable micro-batch, the earliest on ties.
  std::priority_queue<std::pair<int64_t, int64_t>> splittable;
  for (size_t b = 0; b < micro_batches.size(); ++b)
    if (micro_batches[b].size() >= 2)
      splittable.push({total_tokens(lengths, micro_batches[b]), -static_cast<int64_t>(b)});
  while (micro_batches.size() < count && !splittable.empty()) {
    const size_t b = -splittable.top().second;
    splittable.pop();
    auto [first, second] = halve(lengths, std::move(micro_batches[b]));
    micro_batches[b] = std::move(first);
    micro_batches.push_back(std::move(second));
    for (size_t part : {b, micro_batches.size() - 1})
      if (micro_batches[part].size() >= 2)
        splittable.push({total_tokens(lengths, micro_batches[part]), -static_cast<int64_t>(part)});
  }
  micro_batches.resize(std::max(micro_batches.size(), count));
}

void sort_by_tokens(const int64_t* lengths, Groups& micro_batches) {
  std::vector<std::pair<int64_t, int64_t>> keys;  // (tokens, first index or n for empty)
  keys.reserve(micro_batches.size());
  for (const auto& mb : micro_batches)
    keys.push_back({total_tokens(lengths, mb), mb.empty() ? INT64_MAX : mb.front()});
  std::vector<size_t> order(micro_batches.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return keys[a].first != keys[b].first ? keys[a].first > keys[b].first : keys[a].second < keys[b].second;
  });
  Groups sorted;
  sorted.reserve(order.size());
  for (size_t b : order) sorted.push_back(std::move(micro_batches[b]));
  micro_batches = std::move(sorted);
}

std::vector<Groups> balance_and_pack(const int64_t* lengths, const double* weights, int64_t n, int64_t k,
                                     int64_t budget, bool equal_micro_batches) {
  check_k(k);
  check_lengths(lengths, n, budget);
  Groups groups = partition_karmarkar_karp(weights, n, k);
  std::vector<Groups> ranks;
  ranks.reserve(k);
  size_t most = 0;
  for (auto& group : groups) {
    ranks.push_back(pack_best_fit_decreasing(lengths, group, budget));
    most = std::max(most, ranks.back().size());
  }
  for (auto& micro_batches : ranks) {
    if (equal_micro_batches) split_to_count(lengths, micro_batches, most);
    sort_by_tokens(lengths, micro_batches);
  }
  return ranks;
}

}  // namespace qwenlong::packing

namespace {

namespace py = pybind11;
namespace pk = qwenlong::packing;
using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

template <typename Array>
int64_t length_of(const Array& array, const char* name) {
  if (array.ndim() != 1)
    throw std::invalid_argument(std::string(name) + " must be 1-D, got " + std::to_string(array.ndim()) +
                                " dimensions");
  return array.shape(0);
}

// Lists of Python ints, built with the C API: pybind11's generic STL caster costs more
// than the packing itself at a million items.
py::list to_python(const pk::Groups& groups) {
  py::list out(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    py::list group(groups[g].size());
    for (size_t j = 0; j < groups[g].size(); ++j) {
      PyObject* index = PyLong_FromLongLong(groups[g][j]);
      if (index == nullptr) throw py::error_already_set();
      PyList_SET_ITEM(group.ptr(), j, index);
    }
    PyList_SET_ITEM(out.ptr(), g, group.release().ptr());
  }
  return out;
}

qwenlong::Registrar register_packing([](py::module_& m) {
  m.def(
      "pack_by_token_budget",
      [](const Int64Array& lengths, int64_t budget) {
        const int64_t n = length_of(lengths, "lengths");
        pk::Groups micro_batches;
        {
          py::gil_scoped_release release;
          pk::check_lengths(lengths.data(), n, budget);
          std::vector<int64_t> items(n);
          std::iota(items.begin(), items.end(), 0);
          micro_batches = pk::pack_best_fit_decreasing(lengths.data(), items, budget);
        }
        return to_python(micro_batches);
      },
      py::arg("lengths"), py::arg("budget"),
      "Best-fit decreasing packing: lists of sequence indices, each list within `budget` tokens.");
  m.def(
      "balance_partitions",
      [](const DoubleArray& weights, int64_t k) {
        const int64_t n = length_of(weights, "weights");
        pk::Groups groups;
        {
          py::gil_scoped_release release;
          groups = pk::partition_karmarkar_karp(weights.data(), n, k);
        }
        return to_python(groups);
      },
      py::arg("weights"), py::arg("k"), "Karmarkar-Karp k-way partition of item indices balancing `weights`.");
  m.def(
      "balance_and_pack",
      [](const Int64Array& lengths, const DoubleArray& weights, int64_t k, int64_t budget, bool equal_micro_batches) {
        const int64_t n = length_of(lengths, "lengths");
        if (length_of(weights, "weights") != n)
          throw std::invalid_argument("weights must have one entry per length (" + std::to_string(n) + "), got " +
                                      std::to_string(weights.shape(0)));
        std::vector<pk::Groups> ranks;
        {
          py::gil_scoped_release release;
          ranks = pk::balance_and_pack(lengths.data(), weights.data(), n, k, budget, equal_micro_batches);
        }
        py::list out(ranks.size());
        for (size_t r = 0; r < ranks.size(); ++r) PyList_SET_ITEM(out.ptr(), r, to_python(ranks[r]).release().ptr());
        return out;
      },
      py::arg("lengths"), py::arg("weights"), py::arg("k"), py::arg("budget"), py::arg("equal_micro_batches"),
      "Karmarkar-Karp across k ranks, then best-fit decreasing micro-batches per rank.");
});

}  // namespace
