// y = x @ W.T for W the GGUF file's Q4_1 / Q8_0 weights, with each row of x rounded to int8
// blocks of 32 (scale d = max|x| / 127, one float32 per block), as llama.cpp computes: per
// block an integer dot product (exact), then float32 scaling. The weights stay the file's
// values (`unpack` gives them back bit for bit); only the activations are rounded.
//
// Why: with float32 activations each extra row of a verify costs a dequantize-and-FMA pass
// over every weight (compute-bound: 1 + 8 tokens cost 2.4x one token on a 2-core AVX-512
// AMD). AVX-512 VNNI multiplies 64 byte pairs per instruction, so extra rows cost little;
// AVX2 (no VNNI) takes two instructions for 32 pairs (`maddubs`, then `madd`).
//
// Layout (`pack`): weight rows go in groups of 16 (the last group may be narrower), one row per
// 32-bit lane of a vector, so one `vpdpbusd` advances 16 outputs by 4 weights each against 4
// activation bytes broadcast to every lane: no horizontal sums, and one block's scales for 16
// outputs are one vector. A group of w rows stores its blocks one after another, each block
// as: the w rows' scales d (float16), for Q4_1 their minimums m (float16), then the payload.
// Q8_0: 8 steps of 4w bytes, step t holding each row's elements 4t..4t+3 as q + 128 (unsigned
// bytes); Q4_1: 4 vectors of 4w bytes, vector p holding step 2p in its low nibbles and step
// 2p + 1 in its high ones. So a block takes the file's bytes per weight and the packed tensor
// has the blocks' shape [N, K / 32 * block bytes].
//
// Per block: Q8_0: y += (S' - 128 sum(qx)) * (d dx); Q4_1: y += S * (d dx), then
// y += m * (dx sum(qx)) (w = d q + m), with S the block's integer dot product. Row invariance
// by construction, as in quant_matmul.cpp: every output is this one sequence of float32
// operations over its blocks in order, whatever the row count, the tiling or the threads.
#include "q8_activations.h"
#include "schedule.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include "vector_math.h"  // HASTEN_AVX2
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HASTEN_VNNI 1
#include <immintrin.h>
#endif

namespace hasten_q8 {
namespace {

constexpr int64_t QK = 32, STEPS = 8, LANES = 16;
constexpr int64_t Q4_1 = 0, Q8_0 = 1;
// Groups a thread's share is walked in: 4 groups (64 weight rows) stay in L1/L2 while each
// row tile of x passes over them.
constexpr int64_t CHUNK_GROUPS = 4;

constexpr int64_t block_bytes(int64_t kind) { return kind == Q4_1 ? 20 : 34; }
constexpr int64_t scale_bytes(int64_t kind) { return kind == Q4_1 ? 4 : 2; }  // per row: d (and m)

// Where weight row n's block b starts in the packed tensor, and its group's width w.
struct Place {
  int64_t at, lane, w;
};
inline Place place(int64_t n, int64_t b, int64_t N, int64_t nb, int64_t kind) {
  const int64_t g0 = n / LANES * LANES, w = std::min(LANES, N - g0), bb = block_bytes(kind);
  return {g0 * nb * bb + b * w * bb, n - g0, w};
}

// The payload byte of (step t, lane j, byte i) of a block in a group of w rows, and for Q4_1
// its nibble's shift.
inline int64_t payload_byte(int64_t kind, int64_t w, int64_t t, int64_t j, int64_t i, int* shift) {
  const int64_t step = kind == Q4_1 ? t / 2 : t;
  *shift = kind == Q4_1 ? static_cast<int>(t & 1) * 4 : 0;
  return scale_bytes(kind) * w + step * 4 * w + 4 * j + i;
}

inline float half_bits(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// One row of activations rounded to int8 blocks (d = max|x| / 127, q = round-to-even(x / d)),
// in order, with each block's scale dx and its sum's terms: Q4_1's sx = dx * sum(q), Q8_0's
// cx = 128 * sum(q).
void quantize_row(const float* x, int64_t K, int8_t* q, float* dx, float* sx, int32_t* cx) {
  for (int64_t b = 0; b < K / QK; ++b) {
    const float* xb = x + b * QK;
    int8_t* qb = q + b * QK;
    float d;
    int32_t sum = 0;
#if defined(HASTEN_VNNI)
    const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    d = amax / 127.f;
    const __m512 id = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));  // round to nearest even
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
    sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtsepi32_epi8(q1));
#else
    float amax = 0.f;
    for (int64_t e = 0; e < QK; ++e) amax = std::max(amax, std::fabs(xb[e]));
    d = amax / 127.f;
    const float id = d > 0.f ? 1.f / d : 0.f;
    for (int64_t e = 0; e < QK; ++e) {
      qb[e] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(xb[e] * id))));
      sum += qb[e];
    }
#endif
    dx[b] = d;
    sx[b] = d * static_cast<float>(sum);
    cx[b] = 128 * sum;
  }
}

// The rounded rows of x: q [M, K] int8 and per block dx, sx, cx [M, K / 32].
struct Quantized {
  std::vector<int8_t> q;
  std::vector<float> dx, sx;
  std::vector<int32_t> cx;
};

#if defined(HASTEN_VNNI)
// R rows of quantized x against C groups of w weight rows each (`w0` the first group's start,
// groups `stride` bytes apart), their outputs to y[r * ldy + c * 16 + lane]. Per block the C
// groups' steps are loaded once and reused by the R rows; the R x C integer sums are
// independent chains. `ahead`: the same bytes that far on are fetched into L2 meanwhile.
template <bool Q4, int R, int C>
void tile(const Quantized& xq, int64_t r0, int64_t K, const uint8_t* w0, int64_t stride, int64_t w,
          float* y, int64_t ldy, int64_t ahead) {
  constexpr int64_t kind = Q4 ? Q4_1 : Q8_0;
  const int64_t nb = K / QK, block = w * block_bytes(kind);
  const __mmask16 lanes = static_cast<__mmask16>((1u << w) - 1);
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 dw[C], mw[C];
    __m512i s[R][C];
    const uint8_t* blk[C];
    for (int c = 0; c < C; ++c) {
      blk[c] = w0 + c * stride + b * block;
      if (ahead)
        for (int64_t line = 0; line < block; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(blk[c] + ahead + line), _MM_HINT_T1);
      dw[c] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, blk[c]));
      mw[c] = Q4 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, blk[c] + 2 * w)) : _mm512_setzero_ps();
      for (int r = 0; r < R; ++r) s[r][c] = _mm512_setzero_si512();
    }
    const int8_t* xb = xq.q.data() + r0 * K + b * QK;
    for (int t = 0; t < STEPS; ++t) {
      for (int c = 0; c < C; ++c) {
        const uint8_t* pay = blk[c] + scale_bytes(kind) * w;
        __m512i v;
        if (Q4) {  // steps t and t + 1 share a vector (low, high nibbles); reading it again for
                   // t + 1 measured faster than keeping C of them live across steps
          v = _mm512_maskz_loadu_epi32(lanes, pay + (t / 2) * 4 * w);
          v = _mm512_and_si512(t & 1 ? _mm512_srli_epi16(v, 4) : v, low);
        } else {
          v = _mm512_maskz_loadu_epi32(lanes, pay + t * 4 * w);
        }
        for (int r = 0; r < R; ++r)  // each row's 4 bytes of the step, in every lane
          s[r][c] = _mm512_dpbusd_epi32(s[r][c], v, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xb + r * K + 4 * t)));
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t at = (r0 + r) * nb + b;
      const __m512 dx = _mm512_set1_ps(xq.dx[at]);
      for (int c = 0; c < C; ++c) {
        __m512i sum = s[r][c];
        if (!Q4) sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(xq.cx[at]));
        acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dw[c], dx), acc[r][c]);
        if (Q4) acc[r][c] = _mm512_fmadd_ps(mw[c], _mm512_set1_ps(xq.sx[at]), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(y + r * ldy + c * LANES, lanes, acc[r][c]);
}

// Groups [g0, g1) against `rows` rows from r0: C groups at a time, then one by one.
template <bool Q4>
void tiles(int rows, const Quantized& xq, int64_t r0, int64_t K, const uint8_t* w, int64_t N,
           int64_t g0, int64_t g1, float* y, int64_t ldy, int64_t ahead) {
  const int64_t nb = K / QK, stride = LANES * nb * block_bytes(Q4 ? Q4_1 : Q8_0);
  int64_t g = g0;
#define HASTEN_Q8_TILE(R, C)                                                                   \
  for (; g + C <= g1 && (g + C) * LANES <= N; g += C)                                          \
    tile<Q4, R, C>(xq, r0, K, w + g * stride, stride, LANES, y + g * LANES, ldy, ahead);       \
  for (; g < g1; ++g)                                                                          \
    tile<Q4, R, 1>(xq, r0, K, w + g * stride, stride, std::min(LANES, N - g * LANES),          \
                   y + g * LANES, ldy, ahead);                                                 \
  break;
  switch (rows) {
    case 1: HASTEN_Q8_TILE(1, 4)
    case 2: HASTEN_Q8_TILE(2, 4)
    case 3: HASTEN_Q8_TILE(3, 2)
    default: HASTEN_Q8_TILE(4, 2)
  }
#undef HASTEN_Q8_TILE
}
#endif

// The scalar reference: the same integer sums and float32 operations per block, in order.
// So the same bits as the vector tiles, which use it for a last group narrower than 16 rows.
float scalar_dot(int64_t kind, const Quantized& xq, int64_t r, int64_t K, const uint8_t* w,
                 int64_t n, int64_t N) {
  const int64_t nb = K / QK;
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const Place p = place(n, b, N, nb, kind);
    const uint8_t* blk = w + p.at;
    int32_t s = 0;
    for (int64_t t = 0; t < STEPS; ++t)
      for (int64_t i = 0; i < 4; ++i) {
        int shift;
        const int32_t wq = (blk[payload_byte(kind, p.w, t, p.lane, i, &shift)] >> shift) & (kind == Q4_1 ? 15 : 255);
        s += wq * xq.q[r * K + b * QK + 4 * t + i];
      }
    const int64_t at = r * nb + b;
    if (kind == Q8_0) s -= xq.cx[at];
    acc = std::fma(static_cast<float>(s), half_bits(blk + 2 * p.lane) * xq.dx[at], acc);
    if (kind == Q4_1) acc = std::fma(half_bits(blk + 2 * p.w + 2 * p.lane), xq.sx[at], acc);
  }
  return acc;
}

#if defined(HASTEN_AVX2)
// The AVX2 tile: R rows of quantized x against C full groups of 16 weight rows (8 lanes, so
// each group is two halves). AVX2 has no 4-byte dot product: per step `maddubs` multiplies 32
// unsigned x signed byte pairs and adds neighbours into int16, then `madd` adds int16 pairs
// into int32. Both sums are exact, so S (hence every output) is what the VNNI tile computes:
//   Q4_1: nibbles 0..15 times x (|x| <= 127): an int16 sum of 8 steps stays below 8 * 3810,
//         so the steps add in int16 and `madd` runs once per block;
//   Q8_0: the stored q + 128 back to signed q, then |q| times x with q's sign (each pair at
//         most 2 * 128 * 127 = 32512: no saturation), to int32 every step.
template <bool Q4, int R, int C>
void tile_avx2(const Quantized& xq, int64_t r0, int64_t K, const uint8_t* w0, int64_t stride,
               float* y, int64_t ldy, int64_t ahead) {
  constexpr int64_t kind = Q4 ? Q4_1 : Q8_0, block = LANES * block_bytes(kind);
  const int64_t nb = K / QK;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[R][C][2];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* xb = xq.q.data() + r0 * K + b * QK;
    for (int c = 0; c < C; ++c) {
      const uint8_t* blk = w0 + c * stride + b * block;
      if (ahead)
        for (int64_t line = 0; line < block; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(blk + ahead + line), _MM_HINT_T1);
      const uint8_t* pay = blk + scale_bytes(kind) * LANES;
      __m256i s[R][2];
      for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm256_setzero_si256();
      for (int t = 0; t < STEPS; ++t)
        for (int h = 0; h < 2; ++h) {
          const __m256i* at = reinterpret_cast<const __m256i*>(pay + (Q4 ? t / 2 : t) * 4 * LANES + 32 * h);
          __m256i v = _mm256_loadu_si256(at);
          if (Q4) {
            v = _mm256_and_si256(t & 1 ? _mm256_srli_epi16(v, 4) : v, low);
            for (int r = 0; r < R; ++r) {
              const __m256i xv = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(xb + r * K + 4 * t));
              s[r][h] = _mm256_add_epi16(s[r][h], _mm256_maddubs_epi16(v, xv));
            }
          } else {
            v = _mm256_xor_si256(v, flip);
            const __m256i mag = _mm256_abs_epi8(v);
            for (int r = 0; r < R; ++r) {
              const __m256i xv = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(xb + r * K + 4 * t));
              s[r][h] = _mm256_add_epi32(s[r][h], _mm256_madd_epi16(_mm256_maddubs_epi16(mag, _mm256_sign_epi8(xv, v)), ones));
            }
          }
        }
      for (int h = 0; h < 2; ++h) {
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16 * h)));
        const __m256 mw = Q4 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2 * LANES + 16 * h)))
                             : _mm256_setzero_ps();
        for (int r = 0; r < R; ++r) {
          const int64_t at = (r0 + r) * nb + b;
          const __m256i sum = Q4 ? _mm256_madd_epi16(s[r][h], ones) : s[r][h];
          acc[r][c][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(dw, _mm256_set1_ps(xq.dx[at])), acc[r][c][h]);
          if (Q4) acc[r][c][h] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xq.sx[at]), acc[r][c][h]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      for (int h = 0; h < 2; ++h) _mm256_storeu_ps(y + r * ldy + c * LANES + 8 * h, acc[r][c][h]);
}

// Groups [g0, g1) against `rows` rows from r0: C full groups at a time, then one by one; a
// last group narrower than 16 rows by `scalar_dot` (the same bits).
template <bool Q4>
void tiles_avx2(int rows, const Quantized& xq, int64_t r0, int64_t K, const uint8_t* w, int64_t N,
                int64_t g0, int64_t g1, float* y, int64_t ldy, int64_t ahead) {
  const int64_t stride = LANES * (K / QK) * block_bytes(Q4 ? Q4_1 : Q8_0);
  int64_t g = g0;
#define HASTEN_Q8_TILE(R, C)                                                                   \
  for (; g + C <= g1 && (g + C) * LANES <= N; g += C)                                          \
    tile_avx2<Q4, R, C>(xq, r0, K, w + g * stride, stride, y + g * LANES, ldy, ahead);         \
  for (; g < g1 && (g + 1) * LANES <= N; ++g)                                                  \
    tile_avx2<Q4, R, 1>(xq, r0, K, w + g * stride, stride, y + g * LANES, ldy, ahead);         \
  break;
  switch (rows) {
    case 1: HASTEN_Q8_TILE(1, 2)
    case 2: HASTEN_Q8_TILE(2, 2)
    case 3: HASTEN_Q8_TILE(3, 1)
    default: HASTEN_Q8_TILE(4, 1)
  }
#undef HASTEN_Q8_TILE
  for (int64_t n = g * LANES; n < std::min(N, g1 * LANES); ++n)
    for (int64_t r = 0; r < rows; ++r) y[r * ldy + n] = scalar_dot(Q4 ? Q4_1 : Q8_0, xq, r0 + r, K, w, n, N);
}
#endif

void check_kind(int64_t kind, int64_t K) {
  TORCH_CHECK(kind == Q4_1 || kind == Q8_0, "kind must be 0 (Q4_1) or 1 (Q8_0)");
  TORCH_CHECK(K > 0 && K % QK == 0, "K must be a positive multiple of 32");
}

void check_blocks(const torch::Tensor& t, int64_t kind, int64_t K, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kUInt8 && t.dim() == 2 && t.is_contiguous() &&
              t.size(1) == K / QK * block_bytes(kind), what, " must be contiguous uint8 [N, ",
              K / QK * block_bytes(kind), "] for K = ", K);
}

}  // namespace

torch::Tensor pack(const torch::Tensor& blocks, int64_t kind, int64_t K) {
  check_kind(kind, K);
  check_blocks(blocks, kind, K, "blocks");
  const int64_t N = blocks.size(0), nb = K / QK, bb = block_bytes(kind);
  auto out = torch::zeros_like(blocks);
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = src + (n * nb + b) * bb;
        const Place p = place(n, b, N, nb, kind);
        uint8_t* to = dst + p.at;
        std::memcpy(to + 2 * p.lane, blk, 2);
        if (kind == Q4_1) std::memcpy(to + 2 * p.w + 2 * p.lane, blk + 2, 2);
        for (int64_t e = 0; e < QK; ++e) {
          int shift;
          const int64_t byte = payload_byte(kind, p.w, e / 4, p.lane, e % 4, &shift);
          if (kind == Q8_0)
            to[byte] = static_cast<uint8_t>(blk[2 + e] ^ 0x80);
          else
            to[byte] |= static_cast<uint8_t>((e < 16 ? blk[4 + e] & 15 : blk[4 + e - 16] >> 4) << shift);
        }
      }
  });
  return out;
}

torch::Tensor unpack(const torch::Tensor& packed, int64_t kind, int64_t K) {
  check_kind(kind, K);
  check_blocks(packed, kind, K, "packed");
  const int64_t N = packed.size(0), nb = K / QK;
  auto out = torch::empty({N, K}, packed.options().dtype(torch::kFloat32));
  const uint8_t* src = packed.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < nb; ++b) {
      const Place p = place(n, b, N, nb, kind);
      const uint8_t* blk = src + p.at;
      const float d = half_bits(blk + 2 * p.lane);
      const float m = kind == Q4_1 ? half_bits(blk + 2 * p.w + 2 * p.lane) : 0.f;
      for (int64_t e = 0; e < QK; ++e) {
        int shift;
        const uint8_t byte = blk[payload_byte(kind, p.w, e / 4, p.lane, e % 4, &shift)];
        dst[n * K + b * QK + e] = kind == Q8_0
            ? static_cast<float>(static_cast<int8_t>(byte ^ 0x80)) * d
            : std::fma(static_cast<float>((byte >> shift) & 15), d, m);  // as numpy
      }
    }
  return out;
}

torch::Tensor matmul(const torch::Tensor& x, const torch::Tensor& packed, int64_t kind) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1), nb = K / QK;
  check_kind(kind, K);
  check_blocks(packed, kind, K, "packed weights (hasten_q8 pack of the same K)");
  const int64_t N = packed.size(0), groups = (N + LANES - 1) / LANES;
  Quantized xq{std::vector<int8_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb),
               std::vector<int32_t>(M * nb)};
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      quantize_row(xp + r * K, K, xq.q.data() + r * K, xq.dx.data() + r * nb,
                   xq.sx.data() + r * nb, xq.cx.data() + r * nb);
  });
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  // Threads get ~512k multiply-adds at least; row tiles of up to 4 rows (`schedule.h`).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 19) / std::max<int64_t>(1, K * M * LANES));
  hasten_kernels::over_tiles(M, groups, grain, 4, [&](int64_t g0, int64_t g1, int64_t r0, int64_t rows, bool next_chunk) {
#if defined(HASTEN_VNNI)
    const int64_t ahead = next_chunk ? CHUNK_GROUPS * LANES * nb * block_bytes(kind) : 0;
    if (kind == Q4_1)
      tiles<true>(static_cast<int>(rows), xq, r0, K, wp, N, g0, g1, yp + r0 * N, N, ahead);
    else
      tiles<false>(static_cast<int>(rows), xq, r0, K, wp, N, g0, g1, yp + r0 * N, N, ahead);
#elif defined(HASTEN_AVX2)
    const int64_t ahead = next_chunk ? CHUNK_GROUPS * LANES * nb * block_bytes(kind) : 0;
    if (kind == Q4_1)
      tiles_avx2<true>(static_cast<int>(rows), xq, r0, K, wp, N, g0, g1, yp + r0 * N, N, ahead);
    else
      tiles_avx2<false>(static_cast<int>(rows), xq, r0, K, wp, N, g0, g1, yp + r0 * N, N, ahead);
#else
    for (int64_t n = g0 * LANES; n < std::min(N, g1 * LANES); ++n)
      for (int64_t r = r0; r < r0 + rows; ++r) yp[r * N + n] = scalar_dot(kind, xq, r, K, wp, n, N);
#endif
  }, CHUNK_GROUPS);
  return y;
}

bool has_vnni() {
#if defined(HASTEN_VNNI)
  return true;
#else
  return false;
#endif
}

}  // namespace hasten_q8
