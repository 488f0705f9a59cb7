// y = x @ W.T for W stored as GGUF blocks (Q4_1, Q8_0), x float32: weight-only kernels whose
// weights are exactly the file's dequantized values (gguf's numpy dequantizer, bit for bit).
// Also BitDelta's 1-bit sign matmul (`sign_matmul`), read from the packed bits the same way.
//
// Row invariance by construction: every output y[r, n] is one fixed sequence of float32
// operations over row r of x and row n of W (one 16-lane accumulator over the K blocks, then
// one horizontal sum), whatever the row count M and however rows are tiled or threads split
// N. So a token verified among many rows gets the bits a one-row plain step gets.
//
// Built once per machine by hasten.models.quant_kernels (-march=native); without AVX-512 the
// 8-lane versions in avx2.h run where the CPU has AVX2 + FMA + F16C, else the scalar loops
// below (the same values per row; each build its own bits).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <cmath>
#include <vector>
#include <c10/util/Half.h>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "q8_activations.h"
#include "schedule.h"
#include "vector_math.h"
#include "avx2.h"

namespace {

constexpr int64_t QK = 32;         // weights per block
constexpr int64_t Q4_1_BYTES = 20; // fp16 d, fp16 m, 16 bytes of nibbles: q[j] low, q[j+16] high
constexpr int64_t Q8_0_BYTES = 34; // fp16 d, 32 int8

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

#if defined(__AVX512F__)
// float16 -> float32 in one instruction (F16C; every AVX-512 CPU has it): exact, as above.
inline float half_fast(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);
}

// The 32 weights of one block as two vectors (weights 0..15, 16..31).
inline void dequant_q4_1(const uint8_t* blk, __m512& w0, __m512& w1) {
  const __m512 d = _mm512_set1_ps(half_fast(blk));
  const __m512 m = _mm512_set1_ps(half_fast(blk + 2));
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4)));
  const __m512i lo = _mm512_and_si512(bytes, _mm512_set1_epi32(0x0F));
  const __m512i hi = _mm512_srli_epi32(bytes, 4);
  // d * q is exact in float32 (11 x 4 bits): the fma rounds d * q + m once, as numpy does.
  w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), d, m);
  w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), d, m);
}

// Dense float32 weights (32 per "block"): the float32 reference's weights, in a matmul whose
// rows do not depend on the row count (MKL's do, on some CPUs: see `hasten check`).
inline void load_f32(const uint8_t* blk, __m512& w0, __m512& w1) {
  const float* w = reinterpret_cast<const float*>(blk);
  w0 = _mm512_loadu_ps(w);
  w1 = _mm512_loadu_ps(w + 16);
}

inline void dequant_q8_0(const uint8_t* blk, __m512& w0, __m512& w1) {
  const __m512 d = _mm512_set1_ps(half_fast(blk));
  const __m128i* q = reinterpret_cast<const __m128i*>(blk + 2);
  w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))), d);
  w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))), d);
}

// R rows of x against C consecutive weight rows: y[r * ldy + c] = sum_k x[r, k] * w_c[k].
// Each output has its own accumulator, so its bits do not depend on R or C; several
// outputs at once only hide the latency of each one's chain of multiply-adds.
//
// `ahead` (or null): the same C rows `ahead` bytes further on, fetched into L2 block by block
// while this tile computes, so the next chunk's weights stream in from memory under the
// arithmetic instead of after it (a single core's demand loads alone do not overlap them).
template <int R, int C, void (*Dequant)(const uint8_t*, __m512&, __m512&), int64_t BYTES>
inline void dot_tile(const float* x, int64_t ldx, const uint8_t* wrow, int64_t row_bytes,
                     int64_t nb, float* y, int64_t ldy, int64_t ahead) {
  __m512 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if (ahead)
      for (int c = 0; c < C; ++c)
        for (int64_t line = 0; line < BYTES; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(wrow + ahead + c * row_bytes + b * BYTES + line), _MM_HINT_T1);
    __m512 w0[C], w1[C];
    for (int c = 0; c < C; ++c) Dequant(wrow + c * row_bytes + b * BYTES, w0[c], w1[c]);
    const float* xb = x + b * QK;
    for (int r = 0; r < R; ++r) {
      const __m512 x0 = _mm512_loadu_ps(xb + r * ldx), x1 = _mm512_loadu_ps(xb + r * ldx + 16);
      for (int c = 0; c < C; ++c)
        a[r][c] = _mm512_fmadd_ps(x1, w1[c], _mm512_fmadd_ps(x0, w0[c], a[r][c]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[r * ldy + c] = _mm512_reduce_add_ps(a[r][c]);
}

// Weight rows [n0, n1) against `rows` (1..8) rows of x: as many weight rows at a time as the
// registers allow (8 for one x row, 2 for 5-8), then one at a time.
template <void (*Dequant)(const uint8_t*, __m512&, __m512&), int64_t BYTES>
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
    case 1: HASTEN_TILE(1, 8)
    case 2: HASTEN_TILE(2, 4)
    case 3: HASTEN_TILE(3, 4)
    case 4: HASTEN_TILE(4, 4)
    case 5: HASTEN_TILE(5, 2)
    case 6: HASTEN_TILE(6, 2)
    case 7: HASTEN_TILE(7, 2)
    default: HASTEN_TILE(8, 2)
  }
#undef HASTEN_TILE
}
#endif

// Q4_1_Q8, Q8_0_Q8: the same weights in q8_activations.cpp's layout, activations rounded to
// int8 blocks (its matmul).
enum Kind { Q4_1, Q8_0, F32, Q4_1_Q8, Q8_0_Q8 };
constexpr int64_t F32_BYTES = QK * 4;

// The scalar reference: weights computed as the AVX-512 path does, summed in order.
float scalar_dot(const float* x, const uint8_t* wrow, int64_t nb, Kind kind) {
  float acc = 0.f;
  if (kind == F32) {
    const float* w = reinterpret_cast<const float*>(wrow);
    for (int64_t k = 0; k < nb * QK; ++k) acc = std::fma(x[k], w[k], acc);
    return acc;
  }
  const bool q4_1 = kind == Q4_1;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * (q4_1 ? Q4_1_BYTES : Q8_0_BYTES);
    const float d = half_at(blk);
    for (int64_t j = 0; j < QK; ++j) {
      float w;
      if (q4_1) {
        const uint8_t byte = blk[4 + (j & 15)];
        w = std::fma(static_cast<float>(j < 16 ? (byte & 15) : (byte >> 4)), d, half_at(blk + 2));
      } else {
        w = static_cast<float>(static_cast<int8_t>(blk[2 + j])) * d;
      }
      acc = std::fma(x[b * QK + j], w, acc);
    }
  }
  return acc;
}

torch::Tensor block_matmul(const torch::Tensor& x, const torch::Tensor& blocks, Kind kind) {
  if (kind == Q4_1_Q8 || kind == Q8_0_Q8) return hasten_q8::matmul(x, blocks, kind == Q4_1_Q8 ? 0 : 1);
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 [M, K] tensor");
  const int64_t bytes = kind == Q4_1 ? Q4_1_BYTES : kind == Q8_0 ? Q8_0_BYTES : F32_BYTES;
  const int64_t M = x.size(0), K = x.size(1), N = blocks.size(0), nb = K / QK;
  if (kind == F32) {
    TORCH_CHECK(blocks.scalar_type() == torch::kFloat32 && blocks.dim() == 2 && blocks.is_contiguous() &&
                blocks.size(1) == K && K % QK == 0, "w must be contiguous float32 [N, K], K a multiple of 32");
  } else {
    TORCH_CHECK(blocks.scalar_type() == torch::kUInt8 && blocks.dim() == 2 && blocks.is_contiguous(),
                "blocks must be contiguous uint8 [N, K / 32 * block bytes]");
    TORCH_CHECK(K % QK == 0 && blocks.size(1) == nb * bytes, "x and blocks disagree on K");
  }
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = static_cast<const uint8_t*>(blocks.data_ptr());
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = nb * bytes;
  // Threads get ~256k multiply-adds at least (`schedule.h`). Tiles of up to 8 rows x 2-8
  // weight rows, one accumulator per output (a tile's loads feed twice the multiply-adds of
  // two: Q4_1 one token 8.0 -> 7.5 ms); up to 8 rows in one pass over the weights: 8 rows f32
  // 1.35x -> 1.26x one row (2 threads).
  const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 18) / std::max<int64_t>(1, K * M));
  hasten_kernels::over_tiles(M, N, grain, 8, [&](int64_t c0, int64_t c1, int64_t r0, int64_t rows, bool next_chunk) {
#if defined(__AVX512F__)
    // The first row tile fetches the next chunk: with 2+ rows, a verify of 9 went 1.6x
    // -> 1.35x one row (2 threads); for blocks, one row too (the Q8_0 LM head 1.74 ->
    // 0.43 ms: the hardware prefetcher does not follow its 34-byte blocks). Dense float32
    // rows alone stream as fast without it.
    const int64_t ahead = (M >= 2 || kind != F32) && next_chunk ? hasten_kernels::CHUNK * row_bytes : 0;
    if (kind == Q4_1)
      tile<dequant_q4_1, Q4_1_BYTES>(xp + r0 * K, K, static_cast<int>(rows), wp, row_bytes, c0, c1, nb, yp + r0 * N, N, ahead);
    else if (kind == Q8_0)
      tile<dequant_q8_0, Q8_0_BYTES>(xp + r0 * K, K, static_cast<int>(rows), wp, row_bytes, c0, c1, nb, yp + r0 * N, N, ahead);
    else
      tile<load_f32, F32_BYTES>(xp + r0 * K, K, static_cast<int>(rows), wp, row_bytes, c0, c1, nb, yp + r0 * N, N, ahead);
#elif defined(HASTEN_AVX2)
    const int64_t ahead = (M >= 2 || kind != F32) && next_chunk ? hasten_kernels::CHUNK * row_bytes : 0;
    namespace v8 = hasten_avx2;
    if (kind == Q4_1)
      v8::tile<v8::dequant_q4_1, Q4_1_BYTES>(xp + r0 * K, K, static_cast<int>(rows), wp, row_bytes, c0, c1, nb, yp + r0 * N, N, ahead);
    else if (kind == Q8_0)
      v8::tile<v8::dequant_q8_0, Q8_0_BYTES>(xp + r0 * K, K, static_cast<int>(rows), wp, row_bytes, c0, c1, nb, yp + r0 * N, N, ahead);
    else
      v8::tile<v8::load_f32, F32_BYTES>(xp + r0 * K, K, static_cast<int>(rows), wp, row_bytes, c0, c1, nb, yp + r0 * N, N, ahead);
#else
    for (int64_t n = c0; n < c1; ++n)
      for (int64_t r = 0; r < rows; ++r)
        yp[(r0 + r) * N + n] = scalar_dot(xp + (r0 + r) * K, wp + n * row_bytes, nb, kind);
#endif
  });
  return y;
}

torch::Tensor q4_1_matmul(const torch::Tensor& x, const torch::Tensor& blocks) {
  return block_matmul(x, blocks, Q4_1);
}

torch::Tensor q8_0_matmul(const torch::Tensor& x, const torch::Tensor& blocks) {
  return block_matmul(x, blocks, Q8_0);
}

torch::Tensor f32_matmul(const torch::Tensor& x, const torch::Tensor& w) {
  return block_matmul(x, w, F32);
}

// Keys per part: a query with more keys than this is split at logical positions PART, 2 PART, ...
// (whatever else shares the call), the parts computed independently (spread over the threads:
// one query's 3 kv heads alone would keep one of two threads idle a third of the time) and
// combined in order. A query with at most PART keys runs in one part, as before the split.
constexpr int64_t PART = 512;

#if defined(__AVX512F__)
// One query head's attention weights, in place: its n scores become exp(s - max) (the tail up
// to `stride` padded with -inf, one vectorised exp over whole chunks).
inline void exp_in_place(float* sg, int64_t n, int64_t stride, float top) {
  for (int64_t j = n; j < stride; ++j) sg[j] = -INFINITY;
  const __m512 mv = _mm512_set1_ps(top);
  for (int64_t c = 0; c < (n + 15) / 16; ++c)
    _mm512_storeu_ps(sg + c * 16, hasten_kernels::exp16(_mm512_sub_ps(_mm512_loadu_ps(sg + c * 16), mv)));
}

// The same, returning the weights' sum, key after key.
inline float exp_weights(float* sg, int64_t n, int64_t stride, float top) {
  exp_in_place(sg, n, stride, top);
  float total = 0.f;
  for (int64_t j = 0; j < n; ++j) total += sg[j];
  return total;
}

// 16 cached values as float32: a float32 cache as it is, a float16 one converted (exact).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// One head's scores for keys j0 .. j0 + 15 (those from n on: 0, unused): per key the fused
// multiply-adds of its DV 16-lane chunks from zero, then its horizontal sum (`reduce16`: the
// pairs of _mm512_reduce_add_ps, 16 keys at once). Stored at sg[j0..], their max returned.
template <typename Q, typename KV>
inline float score_block(const Q& q, int64_t DV, const KV* kbase, const int64_t* st,
                         int64_t j0, int64_t n, int64_t cap, float* sg) {
  __m512 acc[16];
  for (int64_t jj = 0; jj < 16; ++jj) {
    acc[jj] = _mm512_setzero_ps();
    if (j0 + jj >= n) continue;
    const KV* kj = kbase + std::min(std::max<int64_t>(st[j0 + jj], 0), cap - 1) * DV * 16;
    for (int64_t c = 0; c < DV; ++c) acc[jj] = _mm512_fmadd_ps(q(c), load16(kj + c * 16), acc[jj]);
  }
  const __m512 sums = hasten_kernels::reduce16(acc);
  _mm512_storeu_ps(sg + j0, sums);
  const __mmask16 valid = static_cast<__mmask16>(n - j0 >= 16 ? 0xFFFF : (1u << (n - j0)) - 1);
  return _mm512_mask_reduce_max_ps(valid, sums);
}

// Keys j0 .. j0 + 15 of one kv head as float32 rows of kf (16 x D; from n on: zeros): each key
// loaded (and converted) once for all the query heads that score it.
template <int64_t D, typename KV>
inline void gather_keys(const KV* kbase, const int64_t* st, int64_t j0, int64_t n, int64_t cap,
                        float* kf) {
  for (int64_t jj = 0; jj < 16; ++jj) {
    const bool valid = j0 + jj < n;
    const KV* kj = kbase + (valid ? std::min(std::max<int64_t>(st[j0 + jj], 0), cap - 1) * D : 0);
    for (int64_t c = 0; c < D / 16; ++c)
      _mm512_store_ps(kf + jj * D + c * 16, valid ? load16(kj + c * 16) : _mm512_setzero_ps());
  }
}

// `score_block` over gathered keys: the same multiply-adds from zero (a missing key's zeros
// give 0, as its skipped sum does), the same `reduce16`, so the same bits.
template <int DV>
inline float score_gathered(const __m512 (&q)[DV], const float* kf, int64_t j0, int64_t n, float* sg) {
  __m512 acc[16];
  for (int64_t jj = 0; jj < 16; ++jj) {
    acc[jj] = _mm512_setzero_ps();
    for (int c = 0; c < DV; ++c)
      acc[jj] = _mm512_fmadd_ps(q[c], _mm512_load_ps(kf + (jj * DV + c) * 16), acc[jj]);
  }
  const __m512 sums = hasten_kernels::reduce16(acc);
  _mm512_storeu_ps(sg + j0, sums);
  const __mmask16 valid = static_cast<__mmask16>(n - j0 >= 16 ? 0xFFFF : (1u << (n - j0)) - 1);
  return _mm512_mask_reduce_max_ps(valid, sums);
}

// One (kv head, query) of `logical_attention` with the head size (DV 16-lane chunks) and the
// query heads per kv head (G) known at compile time, so the queries and the output sums live in
// registers. The same operations in the same order as the general loop below, so the same
// bits: each score is the chunks' fused multiply-adds from zero, then one horizontal sum; each
// output lane sums its keys one after another. Only the loop order differs: the output loop
// runs key after key over all DV x G sums at once (the general loop runs one chunk's G sums
// over all keys, a chain of dependent multiply-adds that waits on their latency), each block
// of 16 keys is converted once for the G heads (`gather_keys`), and the sums of weights run
// inside the value loop. 8 rows x 400 keys of the default model: 25% less time per call.
//
// `part` null: the outputs, normalised, to outs[g]. Else this call is one part of a longer key
// sequence (see PART below): per head its max, its sum of weights and its unnormalised
// output sums go to part[g * (D + 2) ...] as (max, sum, D sums), for `combine_parts`.
template <int DV, int G, typename KV>
void attend_fixed(const float* qs, const KV* kbase, const KV* vbase, const int64_t* st,
                  int64_t n, int64_t cap, float* scores, int64_t stride, float* const* outs,
                  float* part) {
  constexpr int64_t D = DV * 16;
  __m512 qv[G][DV];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < DV; ++c) qv[g][c] = _mm512_loadu_ps(qs + g * D + c * 16);
  float m[G];
  for (int g = 0; g < G; ++g) m[g] = -INFINITY;
  alignas(64) float kf[16 * D];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    gather_keys<D>(kbase, st, j0, n, cap, kf);
    for (int g = 0; g < G; ++g)
      m[g] = std::max(m[g], score_gathered<DV>(qv[g], kf, j0, n, scores + g * stride));
  }
  for (int g = 0; g < G; ++g) exp_in_place(scores + g * stride, n, stride, m[g]);
  // Each head's sum of weights runs key after key, as exp_weights sums, inside the value
  // loop: G short dependency chains beside its multiply-adds instead of G long ones alone.
  float total[G];
  for (int g = 0; g < G; ++g) total[g] = 0.f;
  __m512 acc[DV][G];
  for (int c = 0; c < DV; ++c)
    for (int g = 0; g < G; ++g) acc[c][g] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const KV* vj = vbase + std::min(std::max<int64_t>(st[j], 0), cap - 1) * D;
    __m512 w[G];
    for (int g = 0; g < G; ++g) {
      total[g] += scores[g * stride + j];
      w[g] = _mm512_set1_ps(scores[g * stride + j]);
    }
    for (int c = 0; c < DV; ++c) {
      const __m512 vv = load16(vj + c * 16);
      for (int g = 0; g < G; ++g) acc[c][g] = _mm512_fmadd_ps(w[g], vv, acc[c][g]);
    }
  }
  if (part != nullptr) {
    for (int g = 0; g < G; ++g) {
      float* pg = part + g * (D + 2);
      pg[0] = m[g];
      pg[1] = total[g];
      for (int c = 0; c < DV; ++c) _mm512_storeu_ps(pg + 2 + c * 16, acc[c][g]);
    }
    return;
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < DV; ++c)
      _mm512_storeu_ps(outs[g] + c * 16, _mm512_div_ps(acc[c][g], _mm512_set1_ps(total[g])));
}

template <typename KV>
using AttendFixed = void (*)(const float*, const KV*, const KV*, const int64_t*, int64_t,
                             int64_t, float*, int64_t, float* const*, float*);

// One query head's parts (np of them, `D + 2` floats apart: max, sum, D output sums), in
// order: each rescaled by exp(its max - the overall max), summed, then normalised.
inline void combine_parts(const float* part, int64_t np, int64_t pstride, int64_t D, float* out) {
  float top = -INFINITY;
  for (int64_t p = 0; p < np; ++p) top = std::max(top, part[p * pstride]);
  __m512 acc[16];
  for (int64_t c = 0; c < D / 16; ++c) acc[c] = _mm512_setzero_ps();
  float total = 0.f;
  for (int64_t p = 0; p < np; ++p) {
    const float* pp = part + p * pstride;
    const __m512 scale = hasten_kernels::exp16(_mm512_set1_ps(pp[0] - top));
    total = std::fma(_mm512_cvtss_f32(scale), pp[1], total);
    for (int64_t c = 0; c < D / 16; ++c)
      acc[c] = _mm512_fmadd_ps(scale, _mm512_loadu_ps(pp + 2 + c * 16), acc[c]);
  }
  const __m512 inv = _mm512_set1_ps(total);
  for (int64_t c = 0; c < D / 16; ++c) _mm512_storeu_ps(out + c * 16, _mm512_div_ps(acc[c], inv));
}

// The compiled shapes: head sizes 32, 64, 128 with up to 16 output sums in registers.
template <typename KV>
AttendFixed<KV> attend_for(int64_t DV, int64_t G) {
  switch (DV * 100 + G) {
    case 201: return attend_fixed<2, 1, KV>;
    case 202: return attend_fixed<2, 2, KV>;
    case 203: return attend_fixed<2, 3, KV>;
    case 204: return attend_fixed<2, 4, KV>;
    case 205: return attend_fixed<2, 5, KV>;
    case 206: return attend_fixed<2, 6, KV>;
    case 207: return attend_fixed<2, 7, KV>;
    case 208: return attend_fixed<2, 8, KV>;
    case 401: return attend_fixed<4, 1, KV>;
    case 402: return attend_fixed<4, 2, KV>;
    case 403: return attend_fixed<4, 3, KV>;
    case 404: return attend_fixed<4, 4, KV>;
    case 801: return attend_fixed<8, 1, KV>;
    case 802: return attend_fixed<8, 2, KV>;
    default: return nullptr;
  }
}
#endif

#if defined(HASTEN_AVX2)
using hasten_avx2::combine_parts;
#endif

#if defined(__AVX512F__) || defined(HASTEN_AVX2)
// `logical_attention` on the register-resident loop (`attend_fixed`; AVX2: `hasten_avx2::attend`)
// over a float32 or float16 cache (elements E): work items (kv head, query, part), then each
// split query's parts combined.
template <typename E, typename Fixed>
void attend_cached(const Fixed& fixed, const float* qp, const E* kp, const E* vp,
                   const int64_t* sp, const int64_t* cp, const int64_t* rp, int64_t R, int64_t T,
                   int64_t D, int64_t KV, int64_t cap, int64_t W, int64_t group, double scale,
                   float* op) {
  const bool batched = rp != nullptr;
  const int64_t chunks = (W + 15) / 16;
  // Work items (kv head, query, part); a query's parts past its own count are empty.
  const int64_t parts = std::max<int64_t>(1, (W + PART - 1) / PART), pstride = group * (D + 2);
  std::vector<float> partial(parts > 1 ? KV * T * parts * pstride : 0);
  const int64_t stride = std::min<int64_t>(chunks * 16, PART);  // score slots per head and part
  at::parallel_for(0, KV * T * parts, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(group * stride);
    std::vector<float> qs(group * D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t p = i % parts, kvh = i / parts / T, t = i / parts % T;
      const int64_t n = std::min(cp[t], W), np = (n + PART - 1) / PART;
      if (p >= std::max<int64_t>(np, 1)) continue;
      const int64_t row = batched ? std::min(std::max<int64_t>(rp[t], 0), R - 1) : 0;
      const int64_t kv = row * KV + kvh;
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < D; ++d)
          qs[g * D + d] = qp[((kvh * group + g) * T + t) * D + d] * static_cast<float>(scale);
      float* outs[16];
      for (int64_t g = 0; g < group; ++g) outs[g] = op + ((kvh * group + g) * T + t) * D;
      const int64_t j0 = p * PART;
      fixed(qs.data(), kp + kv * cap * D, vp + kv * cap * D, sp + t * W + j0,
            std::min(n - j0, PART), cap, scores.data(), stride, outs,
            np > 1 ? partial.data() + ((kvh * T + t) * parts + p) * pstride : nullptr);
    }
  });
  if (parts > 1)
    at::parallel_for(0, KV * T, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t kvh = i / T, t = i % T;
        const int64_t np = (std::min(cp[t], W) + PART - 1) / PART;
        if (np < 2) continue;
        for (int64_t g = 0; g < group; ++g)
          combine_parts(partial.data() + i * parts * pstride + g * (D + 2), np, pstride, D,
                        op + ((kvh * group + g) * T + t) * D);
      }
    });
}
#endif

// Attention for float32 queries over their logical keys, in the cache where they lie.
//
// q [H, T, D] (multiplied by `scale` here, as the blocked torch path does first), k and v [KV, capacity, D], slots [T, W] (cache slot of each query's
// j-th logical key), counts [T] (its number of keys). For every (head, query) the same fixed
// sequence runs over its keys in logical order: scores, their max, exp (one vectorised exp
// over chunks of 16 counted from key 0, the tail padded with -inf), the sum of weights and
// the weighted sum of values, key after key. Past PART keys (vector paths) that sequence runs
// per part of PART logical positions and the parts are combined in order (`combine_parts`).
// So a query's output depends on its own keys only: not on how many queries share the call,
// where its keys sit, or what else is cached.
//
// Batched: k and v [R, KV, capacity, D] (a batch of cache rows) with `rows` [T], the cache row of
// each query; `rows` empty: k and v are one row, [KV, capacity, D]. The arithmetic per query is
// the same either way.
torch::Tensor logical_attention(const torch::Tensor& q, const torch::Tensor& k,
                                const torch::Tensor& v, const torch::Tensor& slots,
                                const torch::Tensor& counts, double scale, const torch::Tensor& rows) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.is_contiguous() && q.dim() == 3, "q: float32 [H, T, D]");
  TORCH_CHECK((k.scalar_type() == torch::kFloat32 || k.scalar_type() == torch::kHalf) &&
              v.scalar_type() == k.scalar_type() && k.is_contiguous() && v.is_contiguous() &&
              (k.dim() == 3 || k.dim() == 4), "k, v: float32 or float16 [KV, cap, D] or [R, KV, cap, D]");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.is_contiguous() && counts.scalar_type() == torch::kLong,
              "slots, counts: int64");
  const int64_t H = q.size(0), T = q.size(1), D = q.size(2), KV = k.size(-3), cap = k.size(-2);
  const int64_t W = slots.size(1), group = H / KV;
  TORCH_CHECK(D % 16 == 0 && D <= 256 && H % KV == 0 && k.size(-1) == D, "head_dim must be a multiple of 16, <= 256");
  const bool batched = rows.numel() > 0;
  TORCH_CHECK(batched == (k.dim() == 4) && (!batched || (rows.scalar_type() == torch::kLong &&
              rows.numel() == T && rows.is_contiguous())), "rows: int64 [T], one per query, with 4-D k and v");
  const int64_t* rp = batched ? rows.data_ptr<int64_t>() : nullptr;
  const int64_t R = batched ? k.size(0) : 1;
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* cp = counts.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t chunks = (W + 15) / 16;
#if defined(__AVX512F__)
  // The `group` query heads of one kv head together: each key and value vector is loaded once
  // for all of them. Per (head, query) the arithmetic is the same fixed sequence as below.
  TORCH_CHECK(group <= 16, "at most 16 query heads per kv head");
  const int64_t DV = D / 16;
  if (k.scalar_type() == torch::kHalf) {
    const AttendFixed<c10::Half> fixed = attend_for<c10::Half>(DV, group);
    TORCH_CHECK(fixed != nullptr, "a float16 cache needs head_dim 32/64/128 with few query heads per kv head");
    attend_cached(fixed, qp, k.data_ptr<c10::Half>(), v.data_ptr<c10::Half>(), sp, cp, rp, R, T, D,
                  KV, cap, W, group, scale, op);
    return out;
  }
  const AttendFixed<float> fixed = attend_for<float>(DV, group);
  if (fixed != nullptr) {
    attend_cached(fixed, qp, k.data_ptr<float>(), v.data_ptr<float>(), sp, cp, rp, R, T, D, KV,
                  cap, W, group, scale, op);
    return out;
  }
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  at::parallel_for(0, KV * T, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(group * chunks * 16);
    std::vector<float> qs(group * D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t kvh = i / T, t = i % T;
      const int64_t row = batched ? std::min(std::max<int64_t>(rp[t], 0), R - 1) : 0;
      const int64_t kv = row * KV + kvh;
      const int64_t n = std::min(cp[t], W);
      const int64_t* st = sp + t * W;
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < D; ++d)
          qs[g * D + d] = qp[((kvh * group + g) * T + t) * D + d] * static_cast<float>(scale);
      float m[16];
      for (int64_t g = 0; g < group; ++g) m[g] = -INFINITY;
      for (int64_t j0 = 0; j0 < n; j0 += 16)  // scores: q . k over D in 16-lane chunks, then summed
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qs.data() + g * D;
          m[g] = std::max(m[g], score_block([&](int64_t c) { return _mm512_loadu_ps(qg + c * 16); }, DV,
                                            kp + kv * cap * D, st, j0, n, cap, scores.data() + g * chunks * 16));
        }
      float total[16];
      for (int64_t g = 0; g < group; ++g)
        total[g] = exp_weights(scores.data() + g * chunks * 16, n, chunks * 16, m[g]);
      for (int64_t c = 0; c < DV; ++c) {  // outputs: the weighted values, key after key
        __m512 acc[16];
        for (int64_t g = 0; g < group; ++g) acc[g] = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; ++j) {
          const float* vj = vp + (kv * cap + std::min(std::max<int64_t>(st[j], 0), cap - 1)) * D;
          const __m512 vv = _mm512_loadu_ps(vj + c * 16);
          for (int64_t g = 0; g < group; ++g)
            acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * chunks * 16 + j]), vv, acc[g]);
        }
        for (int64_t g = 0; g < group; ++g)
          _mm512_storeu_ps(op + ((kvh * group + g) * T + t) * D + c * 16,
                           _mm512_div_ps(acc[g], _mm512_set1_ps(total[g])));
      }
    }
  });
#elif defined(HASTEN_AVX2)
  TORCH_CHECK(group <= 16, "at most 16 query heads per kv head");
  auto run = [&](auto* kp, auto* vp) {
    using E = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
    auto fixed = [D, group](const float* qs, const E* kb, const E* vb, const int64_t* st, int64_t n,
                            int64_t cap, float* scores, int64_t stride, float* const* outs, float* part) {
      hasten_avx2::attend(qs, kb, vb, st, n, cap, D, group, scores, stride, outs, part);
    };
    attend_cached<E>(fixed, qp, kp, vp, sp, cp, rp, R, T, D, KV, cap, W, group, scale, op);
  };
  if (k.scalar_type() == torch::kHalf)
    run(k.data_ptr<c10::Half>(), v.data_ptr<c10::Half>());
  else
    run(k.data_ptr<float>(), v.data_ptr<float>());
  (void)chunks;
#else
  TORCH_CHECK(k.scalar_type() == torch::kFloat32, "a float16 cache needs the AVX-512 or AVX2 kernels");
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  at::parallel_for(0, H * T, 4, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(chunks * 16);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h = i / T, t = i % T;
      const int64_t row = batched ? std::min(std::max<int64_t>(rp[t], 0), R - 1) : 0;
      const int64_t kv = row * KV + h / group;  // the (row, kv head) plane of the cache
      const int64_t n = std::min(cp[t], W);
      float qi[256];
      for (int64_t d = 0; d < D; ++d) qi[d] = qp[(h * T + t) * D + d] * static_cast<float>(scale);
      const int64_t* st = sp + t * W;
      float m = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t slot = std::min(std::max<int64_t>(st[j], 0), cap - 1);
        const float* kj = kp + (kv * cap + slot) * D;
        using Vec = at::vec::Vectorized<float>;
        Vec acc(0.f);
        for (int64_t d = 0; d < D; d += Vec::size())
          acc = at::vec::fmadd(Vec::loadu(qi + d), Vec::loadu(kj + d), acc);
        float lanes[Vec::size()];
        acc.store(lanes);
        float sdot = 0.f;
        for (int l = 0; l < Vec::size(); ++l) sdot += lanes[l];
        scores[j] = sdot;
        m = std::max(m, sdot);
      }
      for (int64_t j = n; j < chunks * 16; ++j) scores[j] = -INFINITY;
      float o[256] = {0.f};
      float total = 0.f;
      using Vec = at::vec::Vectorized<float>;
      const Vec mv(m);
      for (int64_t c = 0; c < (n + Vec::size() - 1) / Vec::size(); ++c) {
        (Vec::loadu(scores.data() + c * Vec::size()) - mv).exp().store(scores.data() + c * Vec::size());
      }
      for (int64_t j = 0; j < n; ++j) {
        const float w = scores[j];
        total += w;
        const int64_t slot = std::min(std::max<int64_t>(st[j], 0), cap - 1);
        const float* vj = vp + (kv * cap + slot) * D;
        for (int64_t d = 0; d < D; d += Vec::size())
          at::vec::fmadd(Vec(w), Vec::loadu(vj + d), Vec::loadu(o + d)).store(o + d);
      }
      float* oi = op + (h * T + t) * D;
      for (int64_t d = 0; d < D; ++d) oi[d] = o[d] / total;
    }
  });
#endif
  return out;
}

// RMSNorm of float32 rows x [rows, D]: w * x / sqrt(mean(x^2) + eps), one row at a time in a
// fixed order (so a row's bits do not depend on the other rows), in one call instead of six ops.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32, "float32 only");
  auto xc = x.contiguous();
  const int64_t D = xc.size(-1), rows = xc.numel() / D;
  auto out = torch::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  using Vec = at::vec::Vectorized<float>;
  TORCH_CHECK(D % Vec::size() == 0, "hidden size must be a multiple of the vector width");
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * D;
    Vec acc(0.f);
    for (int64_t d = 0; d < D; d += Vec::size()) {
      const Vec v = Vec::loadu(xr + d);
      acc = at::vec::fmadd(v, v, acc);
    }
    float lanes[Vec::size()];
    acc.store(lanes);
    float sum = 0.f;
    for (int l = 0; l < Vec::size(); ++l) sum += lanes[l];
    const Vec inv(1.f / std::sqrt(sum / static_cast<float>(D) + static_cast<float>(eps)));
    for (int64_t d = 0; d < D; d += Vec::size())
      (Vec::loadu(wp + d) * (Vec::loadu(xr + d) * inv)).store(op + r * D + d);
  }
  return out;
}

// Rotary embedding in place on the q and k parts of fused qkv rows y [rows, (H + 2 KV) * hd]
// (v untouched), cos / sin [rows, hd]: x * cos + rotate_half(x) * sin, element by element.
void rope_qkv_(torch::Tensor& y, const torch::Tensor& cos, const torch::Tensor& sin,
               int64_t heads, int64_t kv_heads, int64_t hd) {
  TORCH_CHECK(y.scalar_type() == torch::kFloat32 && y.is_contiguous() && cos.is_contiguous() &&
              sin.is_contiguous(), "float32, contiguous");
  const int64_t width = y.size(-1), rows = y.numel() / width, half = hd / 2;
  float* yp = y.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cp + r * hd;
    const float* s = sp + r * hd;
    for (int64_t h = 0; h < heads + kv_heads; ++h) {
      float* x = yp + r * width + h * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * c[i] + (-b) * s[i];
        x[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}

// BitDelta: y = x @ S.T for S the +-1 matrix of packed sign bits (bitdelta/pack.py's layout:
// row n of S is `packed[n]`, element k is bit k % 8 of byte k / 8, bit 1 = +1). Never unpacked:
// x @ S.T = 2 * (sum of x where the bit is 1) - sum(x), and the first sum is one masked add per
// 16 weights (two bytes of bits are the lane mask). As above, every output has its own fixed
// chain of operations over row r of x and row n of S, whatever M, the tiling or the threads.
#if defined(__AVX512F__)
template <int R, int C>
inline void sign_tile(const float* x, int64_t K, const uint8_t* bits, int64_t row_bytes,
                      const float* xsum, float* y, int64_t ldy) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t full = K / 16;
  for (int64_t g = 0; g < full; ++g) {
    __mmask16 m[C];
    for (int c = 0; c < C; ++c) {
      uint16_t word;
      std::memcpy(&word, bits + c * row_bytes + 2 * g, 2);
      m[c] = word;
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * K + 16 * g);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_mask_add_ps(acc[r][c], m[c], acc[r][c], xv);
    }
  }
  const int64_t tail = K - 16 * full;  // < 16 inputs left: their bits, read byte by byte
  if (tail) {
    const __mmask16 live = static_cast<__mmask16>((1u << tail) - 1);
    for (int c = 0; c < C; ++c) {
      uint16_t word = bits[c * row_bytes + 2 * full];
      if (tail > 8) word |= static_cast<uint16_t>(bits[c * row_bytes + 2 * full + 1]) << 8;
      const __mmask16 mc = static_cast<__mmask16>(word) & live;
      for (int r = 0; r < R; ++r) {
        const __m512 xv = _mm512_maskz_loadu_ps(live, x + r * K + 16 * full);
        acc[r][c] = _mm512_mask_add_ps(acc[r][c], mc, acc[r][c], xv);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[r * ldy + c] = 2.f * _mm512_reduce_add_ps(acc[r][c]) - xsum[r];
}
#endif

#if defined(HASTEN_AVX2)
// The same in 8 lanes. AVX2 has no mask registers: each byte of bits becomes a lane mask
// (lane i: bit i set), and x & mask is added. Where the bit is clear that adds +0, which
// leaves the sum as it is (it starts at +0 and is never -0), as the masked add does.
template <int R, int C>
inline void sign_tile8(const float* x, int64_t K, const uint8_t* bits, int64_t row_bytes,
                       const float* xsum, float* y, int64_t ldy) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  auto mask_of = [&](uint8_t byte) {
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(byte), lane_bit), lane_bit));
  };
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t full = K / 8, tail = K - 8 * full;  // tail < 8 inputs: x read under a mask
  for (int64_t g = 0; g < full + (tail > 0); ++g) {
    __m256 m[C];
    for (int c = 0; c < C; ++c) m[c] = mask_of(bits[c * row_bytes + g]);
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(g < full ? 8 : tail)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int r = 0; r < R; ++r) {
      const __m256 xv = g < full ? _mm256_loadu_ps(x + r * K + 8 * g) : _mm256_maskload_ps(x + r * K + 8 * g, live);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_add_ps(acc[r][c], _mm256_and_ps(xv, m[c]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[r * ldy + c] = 2.f * hasten_kernels::reduce_add8(acc[r][c]) - xsum[r];
}
#endif

float scalar_sign_dot(const float* x, int64_t K, const uint8_t* bits) {
  float acc = 0.f;
  for (int64_t k = 0; k < K; ++k)
    if ((bits[k >> 3] >> (k & 7)) & 1) acc += x[k];
  return acc;
}

torch::Tensor sign_matmul(const torch::Tensor& x, const torch::Tensor& packed) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 2 && packed.is_contiguous(),
              "packed must be contiguous uint8 [N, ceil(K / 8)]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), row_bytes = packed.size(1);
  TORCH_CHECK(row_bytes == (K + 7) / 8, "x has ", K, " inputs, packed rows hold ", row_bytes * 8);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* bp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  // sum(x) per row, in a fixed order (the same for every output of the row).
  std::vector<float> xsum(M);
  for (int64_t r = 0; r < M; ++r) {
    float s = 0.f;
    for (int64_t k = 0; k < K; ++k) s += xp[r * K + k];
    xsum[r] = s;
  }
  const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 20) / std::max<int64_t>(1, K * M));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t r0 = 0; r0 < M; r0 += 4) {
      const int rows = static_cast<int>(std::min<int64_t>(4, M - r0));
      const float* xr = xp + r0 * K;
      float* yr = yp + r0 * N;
#if defined(__AVX512F__)
      int64_t n = n0;
#define HASTEN_SIGN(R)                                                                        \
  for (; n + 4 <= n1; n += 4) sign_tile<R, 4>(xr, K, bp + n * row_bytes, row_bytes, xsum.data() + r0, yr + n, N); \
  for (; n < n1; ++n) sign_tile<R, 1>(xr, K, bp + n * row_bytes, row_bytes, xsum.data() + r0, yr + n, N);         \
  break;
      switch (rows) {
        case 1: HASTEN_SIGN(1)
        case 2: HASTEN_SIGN(2)
        case 3: HASTEN_SIGN(3)
        default: HASTEN_SIGN(4)
      }
#undef HASTEN_SIGN
#elif defined(HASTEN_AVX2)
      int64_t n = n0;
#define HASTEN_SIGN(R)                                                                        \
  for (; n + 2 <= n1; n += 2) sign_tile8<R, 2>(xr, K, bp + n * row_bytes, row_bytes, xsum.data() + r0, yr + n, N); \
  for (; n < n1; ++n) sign_tile8<R, 1>(xr, K, bp + n * row_bytes, row_bytes, xsum.data() + r0, yr + n, N);         \
  break;
      switch (rows) {
        case 1: HASTEN_SIGN(1)
        case 2: HASTEN_SIGN(2)
        case 3: HASTEN_SIGN(3)
        default: HASTEN_SIGN(4)
      }
#undef HASTEN_SIGN
#else
      for (int64_t n = n0; n < n1; ++n)
        for (int r = 0; r < rows; ++r)
          yr[r * N + n] = 2.f * scalar_sign_dot(xr + r * K, K, bp + n * row_bytes) - xsum[r0 + r];
#endif
    }
  });
  return y;
}

// Whether `attend_fixed` is compiled for this head size and query heads per kv head (what a
// float16 cache needs: `compact.half_cache_fits` asks here, so the shapes have one home).
bool fixed_attention(int64_t head_dim, int64_t group) {
#if defined(__AVX512F__)
  return head_dim % 16 == 0 && attend_for<float>(head_dim / 16, group) != nullptr;
#elif defined(HASTEN_AVX2)
  return head_dim % 16 == 0 && head_dim <= 256 && group <= 16;
#else
  return false;
#endif
}

bool has_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

// Which vector code this build runs: "avx512", "avx2" (8 lanes) or "scalar".
std::string simd() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(HASTEN_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

// a += b for contiguous float32 tensors of one shape (each sum one IEEE addition, as torch's).
void add_into(torch::Tensor& a, const torch::Tensor& b) {
  auto bc = b.contiguous();
  TORCH_CHECK(a.is_contiguous() && a.numel() == bc.numel(), "add_into: two tensors of one shape");
  float* ap = a.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  for (int64_t i = 0; i < a.numel(); ++i) ap[i] += bp[i];
}

// One decoder block for T tokens on the exact float32 path, in one call instead of ~25 torch
// ops and their Python: x [T, d] (the residual stream) -> x after the block. The same kernels
// and torch ops in the same order as the Python block (`CompactBlock`), so the same bits:
// RMSNorm, qkv matmul, rotary in place, K/V written to the cache at (write_rows[t],
// write_slots[t]) (both empty: row 0, slots start..start+T-1), exact attention over each query's logical keys (slots, counts, rows as for
// `logical_attention`; rows empty: the cache's row 0), output projection and residual,
// RMSNorm, gate/up matmul, silu(gate) * up, down projection and residual. kinds: Kind values
// of the four weights (Q4_1, Q8_0 blocks or F32 [N, K]; Q4_1_Q8, Q8_0_Q8 in the q8 layout).
torch::Tensor block_step(const torch::Tensor& x, const torch::Tensor& attn_norm,
                         const torch::Tensor& mlp_norm, double eps, const std::vector<torch::Tensor>& w,
                         const std::vector<int64_t>& kinds, const torch::Tensor& cos,
                         const torch::Tensor& sin, int64_t heads, int64_t kv_heads, int64_t hd,
                         const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                         const torch::Tensor& write_rows, const torch::Tensor& write_slots,
                         int64_t start, const torch::Tensor& slots, const torch::Tensor& counts,
                         const torch::Tensor& rows, double scale) {
  TORCH_CHECK(w.size() == 4 && kinds.size() == 4, "four weights: qkv, o, gate_up, down");
  const bool solo = write_rows.numel() == 0;
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              (solo || (write_rows.numel() == x.size(0) && write_slots.numel() == x.size(0))),
              "k/v caches [R, KV, cap, hd]; one write row and slot per token");
  auto mm = [&](const torch::Tensor& a, int i) { return block_matmul(a.contiguous(), w[i], static_cast<Kind>(kinds[i])); };
  const int64_t T = x.size(0), q_width = heads * hd, kv_width = kv_heads * hd;
  // An empty attn_norm: none (an EAGLE head's layer takes its fused input as it is).
  auto y = mm(attn_norm.numel() ? rms_norm(x, attn_norm, eps) : x.contiguous(), 0);  // [T, (H + 2 KV) hd]
  rope_qkv_(y, cos, sin, heads, kv_heads, hd);
  const int64_t cap = k_cache.size(2), width = y.size(1);
  const float* yp = y.data_ptr<float>();
  const bool half = k_cache.scalar_type() == torch::kHalf;
  TORCH_CHECK((half || k_cache.scalar_type() == torch::kFloat32) && v_cache.scalar_type() == k_cache.scalar_type(),
              "k/v caches: float32 or float16");
  float* kc = half ? nullptr : k_cache.data_ptr<float>();
  float* vc = half ? nullptr : v_cache.data_ptr<float>();
  c10::Half* kh = half ? k_cache.data_ptr<c10::Half>() : nullptr;
  c10::Half* vh = half ? v_cache.data_ptr<c10::Half>() : nullptr;
  const int64_t* wr = solo ? nullptr : write_rows.data_ptr<int64_t>();
  const int64_t* ws = solo ? nullptr : write_slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t row = solo ? 0 : wr[t], slot = solo ? start + t : ws[t];
    TORCH_CHECK(row >= 0 && row < k_cache.size(0) && slot >= 0 && slot < cap, "cache write out of range");
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t at = ((row * kv_heads + h) * cap + slot) * hd;
      const float* kr = yp + t * width + q_width + h * hd;
      const float* vr = kr + kv_width;
      if (half) {  // rounded to nearest even, as torch's float -> float16 copy
        for (int64_t d = 0; d < hd; ++d) {
          kh[at + d] = c10::Half(kr[d]);
          vh[at + d] = c10::Half(vr[d]);
        }
      } else {
        std::memcpy(kc + at, kr, hd * sizeof(float));
        std::memcpy(vc + at, vr, hd * sizeof(float));
      }
    }
  }
  // The rest with plain loops where torch would spend an op each on a few hundred floats (a
  // step of a small model is ~400 such ops): the same IEEE additions and products, so the
  // same bits; silu stays torch's.
  auto q = torch::empty({heads, T, hd}, y.options());  // [H, T, hd] from the fused rows
  float* qp = q.data_ptr<float>();
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t t = 0; t < T; ++t)
      std::memcpy(qp + (h * T + t) * hd, yp + t * width + h * hd, hd * sizeof(float));
  const bool batched = rows.numel() > 0;
  auto attn = logical_attention(q, batched ? k_cache : k_cache[0], batched ? v_cache : v_cache[0],
                                slots, counts, scale, rows);  // [H, T, hd]
  auto rows_of = torch::empty({T, q_width}, y.options());  // -> [T, H hd]
  const float* ap = attn.data_ptr<float>();
  float* rp = rows_of.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < heads; ++h)
      std::memcpy(rp + t * q_width + h * hd, ap + (h * T + t) * hd, hd * sizeof(float));
  auto h1 = mm(rows_of, 1);
  add_into(h1, x);  // x + attention output
  auto gu = mm(rms_norm(h1, mlp_norm, eps), 2);
  const int64_t inner = gu.size(1) / 2;
  auto act = at::silu(gu.narrow(1, 0, inner)).contiguous();  // [T, inner]
  float* cp = act.data_ptr<float>();
  const float* up = gu.data_ptr<float>() + inner;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < inner; ++i) cp[t * inner + i] *= up[t * 2 * inner + i];
  auto out = mm(act, 3);
  add_into(out, h1);  // h1 + MLP output
  return out;
}

// Every decoder block of a step, one after another, in one call (`block_step` per block, the
// same bits): the Python per block is what a small model's step otherwise pays. Block l gets
// norms attn_norms[l] / mlp_norms[l], weights w[4l..4l+3] (kinds likewise) and the caches'
// layer l (k_all, v_all [L, R, KV, cap, hd]).
torch::Tensor blocks_step(const torch::Tensor& x, const std::vector<torch::Tensor>& attn_norms,
                          const std::vector<torch::Tensor>& mlp_norms, double eps,
                          const std::vector<torch::Tensor>& w, const std::vector<int64_t>& kinds,
                          const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads,
                          int64_t kv_heads, int64_t hd, const torch::Tensor& k_all,
                          const torch::Tensor& v_all, const torch::Tensor& write_rows,
                          const torch::Tensor& write_slots, int64_t start, const torch::Tensor& slots,
                          const torch::Tensor& counts, const torch::Tensor& rows, double scale) {
  const size_t L = attn_norms.size();
  TORCH_CHECK(mlp_norms.size() == L && w.size() == 4 * L && kinds.size() == 4 * L &&
              k_all.dim() == 5 && k_all.size(0) == static_cast<int64_t>(L) && v_all.sizes() == k_all.sizes(),
              "one norm pair, four weights and one cache layer per block");
  torch::Tensor h = x;
  for (size_t l = 0; l < L; ++l) {
    const std::vector<torch::Tensor> wl(w.begin() + 4 * l, w.begin() + 4 * l + 4);
    const std::vector<int64_t> kl(kinds.begin() + 4 * l, kinds.begin() + 4 * l + 4);
    h = block_step(h, attn_norms[l], mlp_norms[l], eps, wl, kl, cos, sin, heads, kv_heads, hd,
                   k_all.select(0, l), v_all.select(0, l), write_rows, write_slots, start, slots,
                   counts, rows, scale);
  }
  return h;
}

// Whether at::parallel_for can split work here: it is inline and runs serially unless the
// extension itself was compiled with OpenMP.
bool threaded() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The compute calls let go of the GIL, as torch's own ops do: a server's event loop thread
  // answers and streams while a step computes, instead of waiting for the step to end.
  const auto free_gil = py::call_guard<py::gil_scoped_release>();
  m.def("q4_1_matmul", &q4_1_matmul, free_gil, "x [M, K] float32 @ Q4_1 blocks [N, K/32*20] -> [M, N]");
  m.def("q8_0_matmul", &q8_0_matmul, free_gil, "x [M, K] float32 @ Q8_0 blocks [N, K/32*34] -> [M, N]");
  m.def("logical_attention", &logical_attention, free_gil,
        "float32 attention of q [H, T, D] over each query's logical keys in a k/v cache");
  m.def("rms_norm", &rms_norm, free_gil, "float32 RMSNorm of rows");
  m.def("rope_qkv_", &rope_qkv_, free_gil, "rotary embedding in place on the q and k parts of fused qkv rows");
  m.def("f32_matmul", &f32_matmul, free_gil, "x [M, K] float32 @ W.T, W [N, K] float32, rows independent of M -> [M, N]");
  m.def("sign_matmul", &sign_matmul, free_gil, "x [M, K] float32 @ S.T for packed sign bits [N, ceil(K/8)] -> [M, N]");
  m.def("has_avx512", &has_avx512, "whether the AVX-512 path was compiled");
  m.def("simd", &simd, "the vector code compiled: avx512, avx2 or scalar");
  m.def("fixed_attention", &fixed_attention, "whether the register-resident attention loop exists for (head_dim, query heads per kv head)");
  m.def("block_step", &block_step, free_gil, "one exact float32 decoder block for T tokens (see above)");
  m.def("q8_pack", &hasten_q8::pack, free_gil, "GGUF blocks [N, K/32*bytes] (kind 0 Q4_1, 1 Q8_0) -> the q8 matmul's layout");
  m.def("q8_unpack", &hasten_q8::unpack, "the q8 layout -> float32 [N, K], the file's weights");
  m.def("q8_matmul", &hasten_q8::matmul, free_gil, "x [M, K] float32, rounded to int8 blocks, @ packed W.T -> [M, N]");
  m.def("has_vnni", &hasten_q8::has_vnni, "whether the AVX-512 VNNI path of q8_matmul was compiled");
  m.def("blocks_step", &blocks_step, free_gil, "every decoder block of a step in one call (block_step each)");
  m.def("threaded", &threaded, "whether the kernels split work across torch's threads");
}
