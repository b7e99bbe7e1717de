#pragma once
// The sliding-window schedule of CBQ: windows of B consecutive blocks with overlap O (stride
// S = B − O): [0, B−1], [S, S+B−1], …, the last window ending exactly at block K−1 (it may
// overlap its predecessor by more than O). After a window trains, the blocks that no later
// window contains are hard-rounded and frozen, and the quantized path advances through them.
#include <cstdint>
#include <vector>

#include "cbq/core/error.hpp"

namespace cbq {

// How a pass cuts its units into windows: CBQ's sliding window (window_schedule below), or
// ACBQ's adaptive groups from measured dependencies (pass/adaptive_groups.hpp).
enum class WindowKind { sliding, adaptive };

struct Window {
  int64_t first = 0;     // first block of the window
  int64_t last = 0;      // last block (inclusive)
  int64_t finalize = 0;  // blocks [first, finalize) leave their last window after this one
  int64_t size() const { return last - first + 1; }
};

inline std::vector<Window> window_schedule(int64_t num_blocks, int64_t blocks_per_window,
                                           int64_t overlap) {
  CBQ_CHECK(blocks_per_window >= 1, "sliding window: {} blocks per window (must be ≥ 1)",
            blocks_per_window);
  CBQ_CHECK(overlap >= 0 && overlap < blocks_per_window,
            "sliding window: overlap {} must be in [0, {}) for windows of {} blocks", overlap,
            blocks_per_window, blocks_per_window);
  CBQ_CHECK(blocks_per_window <= num_blocks,
            "sliding window: windows of {} blocks but the model has only {} blocks",
            blocks_per_window, num_blocks);
  const int64_t stride = blocks_per_window - overlap;
  std::vector<Window> windows;
  for (int64_t first = 0;; first += stride) {
    if (first + blocks_per_window >= num_blocks) {
      windows.push_back({num_blocks - blocks_per_window, num_blocks - 1, num_blocks});
      break;
    }
    windows.push_back({first, first + blocks_per_window - 1, 0});
  }
  for (size_t w = 0; w + 1 < windows.size(); ++w) windows[w].finalize = windows[w + 1].first;
  return windows;
}

}  // namespace cbq
