// Work sharing for the CPU handlers, with no XLA types: items 0 .. n-1 are claimed
// one at a time from an atomic counter by the calling thread and by up to `helpers`
// tasks handed to `schedule` (the FFI handler passes XLA's intra-op thread pool).
// The caller returns once every item is done. Every claimed item belongs to a task
// that is running, so the wait always ends; a task that starts after all items are
// claimed returns at once, touching only the counters it co-owns. So a pool that runs
// tasks late, inline, or never is fine. Each item must write its own outputs only:
// then the result does not depend on which thread ran which item.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

namespace jax_moe {

template <typename Schedule, typename Fn>
void ParallelFor(int64_t n, int64_t helpers, Schedule&& schedule, Fn&& fn) {
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto c = std::make_shared<Counters>();
  auto work = [c, n, &fn] {
    for (int64_t i = c->next.fetch_add(1); i < n; i = c->next.fetch_add(1)) {
      fn(i);
      c->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t tasks = std::min(helpers, n - 1);
  for (int64_t h = 0; h < tasks; ++h) schedule(work);
  work();
  while (c->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Runs every item in the calling thread.
struct SerialRunner {
  template <typename Fn>
  void operator()(int64_t n, Fn&& fn) const {
    for (int64_t i = 0; i < n; ++i) fn(i);
  }
};

}  // namespace jax_moe
