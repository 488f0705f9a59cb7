// How the matmul kernels walk an [M rows of x] x [N weight rows] product: threads split N
// (`grain` weight rows at least each: waking threads costs more than a small layer), each
// thread takes its rows in chunks (64 by default) that stay in L2 while every row tile passes over them,
// and the rows of x go in balanced tiles of at most `max_rows` (9 rows as 5 + 4, not 8 + 1: a
// one-row tile would read the weights again for one row).
//
// fn(c0, c1, r0, rows, next_chunk): weight rows [c0, c1) against x rows [r0, r0 + rows);
// next_chunk: this is the chunk's first tile and the thread has a next chunk, which it may
// prefetch (one chunk further on) while it computes.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace hasten_kernels {

constexpr int64_t CHUNK = 64;

template <typename F>
void over_tiles(int64_t M, int64_t N, int64_t grain, int64_t max_rows, const F& fn,
                int64_t chunk = CHUNK) {
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    const int64_t count = (M + max_rows - 1) / max_rows;
    for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
      const int64_t c1 = std::min(n1, c0 + chunk);
      for (int64_t t = 0, r0 = 0, rows = 0; t < count; ++t, r0 += rows) {
        rows = M / count + (t < M % count);
        fn(c0, c1, r0, rows, r0 == 0 && c1 + chunk <= n1);
      }
    }
  });
}

}  // namespace hasten_kernels
