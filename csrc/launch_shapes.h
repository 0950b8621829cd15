// Launch-shape heuristics of the CUDA kernels, as plain host functions: no CUDA, no torch, so that
// bindings.cpp can expose them to Python (tests check the block counts of EDM2 shapes on machines
// without a GPU) and the .cu launchers use the very same code.
#pragma once

#include <algorithm>
#include <cstdint>

namespace mpk {
namespace launch {

// Grid for `work` items at `threads` per block, capped at 2^20 blocks: a kernel launched with it
// must loop (grid-stride) over the items past grid * threads.
inline unsigned grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(blocks, 1), int64_t(1) << 20));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads per block of the NCHW pixel-norm kernels: `px` threads across the pixels of a tile times
// 256 / px channel groups.
constexpr int kPixelNormThreads = 256;

// NCHW pixel norm (csrc/norms.cu): a block normalises a tile of px * unit pixels of one image over a
// chunk of channels. With one chunk (splits == 1) a block holds all C channels and, forward, keeps
// the tile in shared memory between the reduction and the output pass (x read once). When that
// grid is too small for the GPU (EDM2's 8x8 and 16x16 levels at batch 32: 32-128 blocks on 132
// SMs), C is split into chunks over more blocks, in two phases: partial sums of squares (forward)
// or of g * x (backward) per chunk, then every chunk block combines them (same order everywhere:
// deterministic) and writes its channels.
struct PixelNormPlan {
  int px = 8;           // threads across pixels (8, 4, 2 or 1)
  int64_t tiles = 1;    // pixel tiles per image: ceil(L / (px * unit))
  int64_t splits = 1;   // channel chunks (> 1: two phases)
  int64_t chunk = 0;    // channels per chunk
  bool cache = false;   // forward, one phase: tile kept in shared memory
  int64_t smem = 0;     // forward, one phase: dynamic shared memory bytes
  int64_t blocks = 0;   // N * tiles * splits
};

// unit: pixels per vector access (8 when the 16-byte path applies, else 1); elem_bytes: 4 or 2;
// sm_count, smem_budget: of the device (bytes of dynamic shared memory a block may take).
inline PixelNormPlan plan_pixel_norm_nchw(int64_t N, int64_t C, int64_t L, int unit, int elem_bytes, int sm_count,
                                          int64_t smem_budget, bool forward) {
  PixelNormPlan p;
  const int64_t target = 2 * static_cast<int64_t>(std::max(sm_count, 1));  // two waves of blocks
  // Enough blocks for two waves, or as many as keep every thread busy with at least one access.
  const int64_t busy = ceil_div(N * C * ceil_div(L, unit), kPixelNormThreads);
  const int64_t goal = std::max<int64_t>(1, std::min(target, busy));
  // Narrowest tile: one 32-byte sector per channel row (full sectors, coalesced loads).
  int min_px = 1;
  while (min_px < 8 && min_px * unit * elem_bytes < 32) min_px *= 2;
  auto smem_for = [&](int px) {
    const int64_t tw = static_cast<int64_t>(px) * unit;
    // partial sums [256 * unit], reduction scratch [256], 1 / (eps + rms) [tw], the tile [C][tw]
    return (kPixelNormThreads * unit + kPixelNormThreads + tw) * 4 + C * tw * elem_bytes;
  };
  p.px = 8;
  if (forward)  // narrower tiles until the tile fits in shared memory: x is then read once
    while (p.px > min_px && smem_for(p.px) > smem_budget) p.px /= 2;
  p.tiles = ceil_div(L, static_cast<int64_t>(p.px) * unit);
  const int64_t base = N * p.tiles;
  if (base < goal) {
    const int64_t groups = kPixelNormThreads / p.px;  // every channel group keeps >= 1 channel
    p.splits = std::max<int64_t>(1, std::min(ceil_div(goal, base), C / groups));
  }
  p.chunk = ceil_div(C, p.splits);
  p.splits = ceil_div(C, p.chunk);
  p.blocks = base * p.splits;
  if (forward && p.splits == 1) {
    p.cache = smem_for(p.px) <= smem_budget;
    const int64_t tw = static_cast<int64_t>(p.px) * unit;
    p.smem = p.cache ? smem_for(p.px) : (kPixelNormThreads * unit + kPixelNormThreads + tw) * 4;
  }
  return p;
}

// NCHW modulated_mp_silu backward (csrc/elementwise.cu): each (n, channel) row of L pixels is
// reduced by a group of `row_threads` threads (8, 32 or 128) of a 128-thread block, so that short
// rows (64 pixels = 8 vector accesses at 8x8) do not leave 120 of 128 threads idle.
constexpr int kModulatedRowBlock = 128;

struct ModulatedRowsPlan {
  int row_threads = kModulatedRowBlock;  // threads per row
  int rows_per_block = 1;
  int64_t blocks = 0;
};

inline ModulatedRowsPlan plan_modulated_rows(int64_t N, int64_t C, int64_t L, int unit) {
  ModulatedRowsPlan p;
  const int64_t units = ceil_div(L, unit);  // accesses per row
  p.row_threads = units <= 8 ? 8 : (units <= 64 ? 32 : kModulatedRowBlock);
  p.rows_per_block = kModulatedRowBlock / p.row_threads;
  p.blocks = ceil_div(N * C, p.rows_per_block);
  return p;
}

}  // namespace launch
}  // namespace mpk
