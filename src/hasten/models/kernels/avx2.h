// quant_matmul.cpp's float32 kernels for CPUs with AVX2 + FMA + F16C and no AVX-512 (AMD Zen
// 1-3, Intel before Ice Lake, most laptops): 8 lanes where the AVX-512 code has 16, 16 vector
// registers where it has 32, otherwise its structure. Row invariance as there: every output is
// one fixed sequence of operations over its own inputs, whatever the row count, the tiling or
// the threads; the bits are this build's own (other sums than the AVX-512 build's).
#pragma once
#include "vector_math.h"
#if defined(HASTEN_AVX2)
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace hasten_avx2 {

constexpr int64_t QK = 32;

inline float half_fast(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);  // F16C: exact
}

// The 32 weights of one block as four vectors (weights 0..7, 8..15, 16..23, 24..31), the
// file's values: Q4_1 d * q + m with one rounding (as numpy), Q8_0 d * q, dense float32 as is.
inline void dequant_q4_1(const uint8_t* blk, __m256 (&w)[4]) {
  const __m256 d = _mm256_set1_ps(half_fast(blk)), m = _mm256_set1_ps(half_fast(blk + 2));
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
  const __m256i b0 = _mm256_cvtepu8_epi32(bytes), b1 = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
  const __m256i low = _mm256_set1_epi32(0x0F);
  w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b0, low)), d, m);
  w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b1, low)), d, m);
  w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), d, m);
  w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4)), d, m);
}

inline void dequant_q8_0(const uint8_t* blk, __m256 (&w)[4]) {
  const __m256 d = _mm256_set1_ps(half_fast(blk));
  for (int i = 0; i < 4; ++i) {
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + 8 * i));
    w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
  }
}

inline void load_f32(const uint8_t* blk, __m256 (&w)[4]) {
  const float* p = reinterpret_cast<const float*>(blk);
  for (int i = 0; i < 4; ++i) w[i] = _mm256_loadu_ps(p + 8 * i);
}

// R rows of x against C consecutive weight rows, y[r * ldy + c] = sum_k x[r, k] * w_c[k]: per
// output two accumulators (even and odd quarters of each block, so a block adds two short
// chains, not one of four), summed and reduced at the end. `ahead`: as in quant_matmul.cpp.
template <int R, int C, void (*Dequant)(const uint8_t*, __m256 (&)[4]), int64_t BYTES>
inline void dot_tile(const float* x, int64_t ldx, const uint8_t* wrow, int64_t row_bytes,
                     int64_t nb, float* y, int64_t ldy, int64_t ahead) {
  __m256 a[R][C][2];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) a[r][c][0] = a[r][c][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if (ahead)
      for (int c = 0; c < C; ++c)
        for (int64_t line = 0; line < BYTES; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(wrow + ahead + c * row_bytes + b * BYTES + line), _MM_HINT_T1);
    for (int c = 0; c < C; ++c) {
      __m256 w[4];
      Dequant(wrow + c * row_bytes + b * BYTES, w);
      for (int r = 0; r < R; ++r) {
        const float* xb = x + r * ldx + b * QK;
        a[r][c][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xb), w[0], a[r][c][0]);
        a[r][c][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), w[1], a[r][c][1]);
        a[r][c][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 16), w[2], a[r][c][0]);
        a[r][c][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 24), w[3], a[r][c][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      y[r * ldy + c] = hasten_kernels::reduce_add8(_mm256_add_ps(a[r][c][0], a[r][c][1]));
}

// Weight rows [n0, n1) against `rows` (1..8) rows of x: 8 accumulators per tile where the
// registers allow, then one weight row at a time.
template <void (*Dequant)(const uint8_t*, __m256 (&)[4]), int64_t BYTES>
void tile(const float* x, int64_t ldx, int rows, const uint8_t* w, int64_t row_bytes,
          int64_t n0, int64_t n1, int64_t nb, float* y, int64_t ldy, int64_t ahead) {
  int64_t n = n0;
#define HASTEN_TILE(R, C)                                                                      \
  for (; n + C <= n1; n += C)                                                                  \
    dot_tile<R, C, Dequant, BYTES>(x, ldx, w + n * row_bytes, row_bytes, nb, y + n, ldy, ahead); \
  for (; n < n1; ++n)                                                                          \
    dot_tile<R, 1, Dequant, BYTES>(x, ldx, w + n * row_bytes, row_bytes, nb, y + n, ldy, ahead); \
  break;
  switch (rows) {
    case 1: HASTEN_TILE(1, 4)
    case 2: HASTEN_TILE(2, 2)
    case 3: HASTEN_TILE(3, 1)
    case 4: HASTEN_TILE(4, 1)
    case 5: HASTEN_TILE(5, 1)
    case 6: HASTEN_TILE(6, 1)
    case 7: HASTEN_TILE(7, 1)
    default: HASTEN_TILE(8, 1)
  }
#undef HASTEN_TILE
}

// 8 cached values as float32: a float32 cache as it is, a float16 one converted (exact).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// One (kv head, query) of `logical_attention`, or one part of its keys, for the G query heads
// of the kv head (queries qs [G, D], already scaled; D a multiple of 8): quant_matmul.cpp's
// `attend_fixed` contract, arguments and outputs. Per head: each score is the fused
// multiply-adds of its D / 8 chunks from zero, then one horizontal sum (`reduce8`, 8 keys at
// once); their max; e^(s - max) over chunks of 8 counted from key 0 (the tail to `stride`
// padded with -inf); the sum of weights key after key; each output lane sums its keys one
// after another.
template <typename KV>
void attend(const float* qs, const KV* kbase, const KV* vbase, const int64_t* st, int64_t n,
            int64_t cap, int64_t D, int64_t G, float* scores, int64_t stride, float* const* outs,
            float* part) {
  const int64_t DV = D / 8;
  auto slot = [&](int64_t j) { return std::min(std::max<int64_t>(st[j], 0), cap - 1); };
  for (int64_t g = 0; g < G; ++g) {
    const float* q = qs + g * D;
    float* sg = scores + g * stride;
    float top = -INFINITY;
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
      __m256 acc[8];
      for (int64_t jj = 0; jj < 8; ++jj) {
        acc[jj] = _mm256_setzero_ps();
        if (j0 + jj >= n) continue;
        const KV* kj = kbase + slot(j0 + jj) * D;
        for (int64_t c = 0; c < DV; ++c)
          acc[jj] = _mm256_fmadd_ps(_mm256_loadu_ps(q + c * 8), load8(kj + c * 8), acc[jj]);
      }
      _mm256_storeu_ps(sg + j0, hasten_kernels::reduce8(acc));
      for (int64_t j = j0; j < std::min(n, j0 + 8); ++j) top = std::max(top, sg[j]);
    }
    for (int64_t j = n; j < stride; ++j) sg[j] = -INFINITY;
    const __m256 mv = _mm256_set1_ps(top);
    for (int64_t c = 0; c < (n + 7) / 8; ++c)
      _mm256_storeu_ps(sg + c * 8, hasten_kernels::exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + c * 8), mv)));
    float total = 0.f;
    for (int64_t j = 0; j < n; ++j) total += sg[j];
    float* pg = part != nullptr ? part + g * (D + 2) : nullptr;
    if (pg != nullptr) {
      pg[0] = top;
      pg[1] = total;
    }
    for (int64_t c0 = 0; c0 < DV; c0 += 8) {  // the outputs, 8 chunks (64 values) at a time
      const int64_t cn = std::min<int64_t>(8, DV - c0);
      __m256 acc[8];
      for (int64_t c = 0; c < cn; ++c) acc[c] = _mm256_setzero_ps();
      for (int64_t j = 0; j < n; ++j) {
        const KV* vj = vbase + slot(j) * D + c0 * 8;
        const __m256 w = _mm256_set1_ps(sg[j]);
        for (int64_t c = 0; c < cn; ++c) acc[c] = _mm256_fmadd_ps(w, load8(vj + c * 8), acc[c]);
      }
      for (int64_t c = 0; c < cn; ++c) {
        if (pg != nullptr)
          _mm256_storeu_ps(pg + 2 + (c0 + c) * 8, acc[c]);
        else
          _mm256_storeu_ps(outs[g] + (c0 + c) * 8, _mm256_div_ps(acc[c], _mm256_set1_ps(total)));
      }
    }
  }
}

// quant_matmul.cpp's `combine_parts` in 8 lanes: one query head's np parts (max, sum, D output
// sums each), in order, each rescaled by e^(its max - the overall max), summed, normalised.
inline void combine_parts(const float* part, int64_t np, int64_t pstride, int64_t D, float* out) {
  float top = -INFINITY;
  for (int64_t p = 0; p < np; ++p) top = std::max(top, part[p * pstride]);
  __m256 acc[32];
  for (int64_t c = 0; c < D / 8; ++c) acc[c] = _mm256_setzero_ps();
  float total = 0.f;
  for (int64_t p = 0; p < np; ++p) {
    const float* pp = part + p * pstride;
    const __m256 scale = hasten_kernels::exp8(_mm256_set1_ps(pp[0] - top));
    total = std::fma(_mm256_cvtss_f32(scale), pp[1], total);
    for (int64_t c = 0; c < D / 8; ++c)
      acc[c] = _mm256_fmadd_ps(scale, _mm256_loadu_ps(pp + 2 + c * 8), acc[c]);
  }
  const __m256 inv = _mm256_set1_ps(total);
  for (int64_t c = 0; c < D / 8; ++c) _mm256_storeu_ps(out + c * 8, _mm256_div_ps(acc[c], inv));
}

}  // namespace hasten_avx2
#endif
