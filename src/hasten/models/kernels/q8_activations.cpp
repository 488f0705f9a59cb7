// y = x @ W.T for W the GGUF file's Q4_1 / Q8_0 weights, with each row of x rounded to int8
// blocks of 32 (scale d = max|x| / 127, one float32 per block), as llama.cpp computes: per
// block an integer dot product (exact), then float32 scaling. The weights stay the file's
// values (`unpack` gives them back bit for bit); only the activations are rounded.
//
// Why: with float32 activations each extra row of a verify costs a dequantize-and-FMA pass
// over every weight (compute-bound: 1 + 8 tokens cost 2.4x one token on a 2-core AVX-512
// AMD). AVX-512 VNNI multiplies 64 byte pairs per instruction, so extra rows cost little
// and a tree verify costs about what a plain step does.
//
// Layout (`pack`): the blocks of a weight row are grouped (16 blocks per group, a tail of 8, 4
// or 2; a row with an odd block count gets one zero block). In a group of g blocks every
// block owns L = 16 / g of the 16 int32 lanes of a vector, each lane 2g consecutive weights,
// so g / 2 `vpdpbusd` steps (4 bytes per lane each) leave one partial dot product per lane.
// Converting and scaling then costs one multiply-add per 16 lanes, not per block. A group is
// its g scales d (float16), for Q4_1 its g minimums m (float16; added in each block's first
// lane), then its step vectors: Q8_0 q + 128 as unsigned bytes; Q4_1
// nibbles, two steps per 64 bytes (low nibble: step t, high: t + 1; an odd last step in 32
// bytes, low: its bytes 0..31, high: 32..63). Activations are laid out in the same steps.
//
// Per block: Q4_1: y += d dx S + m dx sum(qx) (w = d q + m); Q8_0 (q + 128 unsigned):
// y += d dx (S' - 128 sum(qx)). Row invariance by construction, as in quant_matmul.cpp:
// every output is one fixed sequence of operations over its row of x and of W, whatever the
// row count, the tiling or the threads.
#include "q8_activations.h"
#include "schedule.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HASTEN_VNNI 1
#include <immintrin.h>
#endif

namespace hasten_q8 {
namespace {

constexpr int64_t QK = 32;
constexpr int64_t Q4_1 = 0, Q8_0 = 1;

struct Group {
  int64_t b0;        // its first block
  int64_t g;         // its blocks: 16, 8, 4 or 2
  int64_t offset;    // where it starts in a packed weight row (bytes)
  int64_t x_offset;  // where its steps start in a quantized activation row (bytes)
};

int64_t header_bytes(int64_t kind, int64_t g) { return kind == Q4_1 ? 4 * g : 2 * g; }
int64_t payload_bytes(int64_t kind, int64_t g) { return kind == Q4_1 ? g * 16 : g * 32; }
int64_t padded_blocks(int64_t K) { return (K / QK + 1) / 2 * 2; }

std::vector<Group> groups_of(int64_t K, int64_t kind, int64_t* row_bytes) {
  std::vector<Group> out;
  const int64_t nbp = padded_blocks(K);
  int64_t b = 0, off = 0, xoff = 0;
  for (int64_t g : {16, 8, 4, 2})
    while (nbp - b >= g && (g == 16 || ((nbp - b) & g))) {
      out.push_back({b, g, off, xoff});
      b += g;
      off += header_bytes(kind, g) + payload_bytes(kind, g);
      xoff += g * 32;
    }
  *row_bytes = off;
  return out;
}

// Where element e (0..31) of block bi of a group of g lies in a 64-byte step vector: its step
// t and byte j (lane j / 4). Lane bi * L + p holds the block's elements p * 2g .. p * 2g + 2g - 1.
inline void slot(int64_t g, int64_t bi, int64_t e, int64_t* t, int64_t* j) {
  const int64_t L = 16 / g, p = e / (2 * g), w = e % (2 * g);
  *t = w / 4;
  *j = 4 * (bi * L + p) + w % 4;
}

// Q4_1 payload: the byte and shift of the nibble for step t, byte j, in a group of S steps.
inline void nibble_at(int64_t S, int64_t t, int64_t j, int64_t* byte, int* shift) {
  const int64_t pairs = S / 2;
  if (t < 2 * pairs) {
    *byte = (t / 2) * 64 + j;
    *shift = static_cast<int>(t & 1) * 4;
  } else {
    *byte = pairs * 64 + (j & 31);
    *shift = j >= 32 ? 4 : 0;
  }
}

inline float half_bits(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }

// Where a quantized activation row puts each block: the byte offset of each of its 8 runs of
// 4 elements (element 4c..4c+3 is step t's lane), its first lane and its lanes per block.
struct RowLayout {
  std::vector<int32_t> run_at;  // [padded blocks * 8]
  std::vector<int32_t> lane0, lanes;  // [padded blocks]
};

RowLayout row_layout(const std::vector<Group>& groups) {
  RowLayout out;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const Group& G = groups[gi];
    for (int64_t bi = 0; bi < G.g; ++bi) {
      for (int64_t c = 0; c < 8; ++c) {
        int64_t t, j;
        slot(G.g, bi, 4 * c, &t, &j);
        out.run_at.push_back(static_cast<int32_t>(G.x_offset + t * 64 + j));
      }
      out.lane0.push_back(static_cast<int32_t>(gi * 16 + bi * (16 / G.g)));
      out.lanes.push_back(static_cast<int32_t>(16 / G.g));
    }
  }
  return out;
}

// Both layouts of one (K, kind), built once per thread and kept: a step makes ~120 matmuls
// over a few shapes, and building them per call cost about a microsecond each.
struct Layout {
  std::vector<Group> groups;
  int64_t row_bytes;
  RowLayout rows;
};

const Layout& layout_of(int64_t K, int64_t kind) {
  thread_local std::deque<std::pair<int64_t, Layout>> known;  // deque: references stay valid
  const int64_t key = 2 * K + kind;
  for (const auto& entry : known)
    if (entry.first == key) return entry.second;
  Layout made;
  made.groups = groups_of(K, kind, &made.row_bytes);
  made.rows = row_layout(made.groups);
  known.emplace_back(key, std::move(made));
  return known.back().second;
}

// One row of activations rounded to int8 blocks (d = max|x| / 127, q = round-to-even(x / d))
// into its steps, with lane scales dx, Q4_1's lane terms sx = dx * sum(q) and Q8_0's lane
// corrections cx = 128 * sum(q) (each block's first lane; 0 in its others).
void quantize_row(const float* x, int64_t K, const RowLayout& layout, uint8_t* q, float* dx,
                  float* sx, int32_t* cx) {
  const int64_t nb = K / QK, nbp = padded_blocks(K);
  for (int64_t b = 0; b < nbp; ++b) {
    float d = 0.f;
    int32_t sum = 0;
    alignas(16) int8_t qs[QK] = {0};
    if (b < nb) {
      const float* xb = x + b * QK;
#if defined(HASTEN_VNNI)
      const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      d = amax / 127.f;
      const __m512 id = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));  // round to nearest even
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
      sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      _mm_store_si128(reinterpret_cast<__m128i*>(qs), _mm512_cvtsepi32_epi8(q0));
      _mm_store_si128(reinterpret_cast<__m128i*>(qs + 16), _mm512_cvtsepi32_epi8(q1));
#else
      float amax = 0.f;
      for (int64_t e = 0; e < QK; ++e) amax = std::max(amax, std::fabs(xb[e]));
      d = amax / 127.f;
      const float id = d > 0.f ? 1.f / d : 0.f;
      for (int64_t e = 0; e < QK; ++e) {
        qs[e] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(xb[e] * id))));
        sum += qs[e];
      }
#endif
    }
    for (int64_t c = 0; c < 8; ++c) std::memcpy(q + layout.run_at[b * 8 + c], qs + 4 * c, 4);
    for (int32_t p = 0; p < layout.lanes[b]; ++p) {
      const int32_t lane = layout.lane0[b] + p;
      dx[lane] = d;
      sx[lane] = p == 0 ? d * static_cast<float>(sum) : 0.f;
      cx[lane] = p == 0 ? 128 * sum : 0;
    }
  }
}

#if defined(HASTEN_VNNI)
// One group of g = 2S blocks for R rows of quantized x against C packed weight rows (`grp`
// points at the first row's group, rows `row_bytes` apart): acc[r][c] += its terms. S is a
// template argument so the steps unroll: one weight row's S step vectors stay in registers
// while the R rows' steps are read from L1 as memory operands.
template <bool Q4, int R, int C, int S>
__attribute__((always_inline)) inline void group_dot(
    __m512 (&acc)[R][C], const uint8_t* grp, int64_t row_bytes, const uint8_t* xq, int64_t ldq,
    const float* dx, const float* sx, const int32_t* cx, int64_t lds, int64_t ahead) {
  constexpr int g = 2 * S;
  constexpr int64_t group_bytes = (Q4 ? 4 * g : 2 * g) + (Q4 ? g * 16 : g * 32);
  // Lane l takes the scale of block l / L: the group's g scales spread over 16 lanes.
  constexpr int shift = g == 16 ? 0 : g == 8 ? 1 : g == 4 ? 2 : 3;
  constexpr __mmask16 first = g == 16 ? 0xFFFF : g == 8 ? 0x5555 : g == 4 ? 0x1111 : 0x0101;
  const __m512i spread = _mm512_srli_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), shift);
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int c = 0; c < C; ++c) {
    const uint8_t* wg = grp + c * row_bytes;
    if (ahead)
      for (int64_t line = 0; line < group_bytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(wg + ahead + line), _MM_HINT_T1);
    // (32-byte loads of g < 16 scales read on into the group's payload; those lanes go unused.)
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg)));
    const __m512 dw = g == 16 ? d : _mm512_permutexvar_ps(spread, d);
    __m512 mw = _mm512_setzero_ps();
    __m512i wv[S];
    if (Q4) {
      mw = _mm512_maskz_permutexvar_ps(first, spread, _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 2 * g))));
      const uint8_t* payload = wg + 4 * g;
      for (int p = 0; p < S / 2; ++p) {
        const __m512i v = _mm512_loadu_si512(payload + p * 64);
        wv[2 * p] = _mm512_and_si512(v, low);
        wv[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
      if (S & 1) {  // the odd last step: 32 bytes, low nibbles then high nibbles
        const __m512i v = _mm512_castsi256_si512(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(payload + (S / 2) * 64)));
        wv[S - 1] = _mm512_and_si512(_mm512_inserti64x4(v, _mm512_castsi512_si256(_mm512_srli_epi16(v, 4)), 1), low);
      }
    } else {
      for (int t = 0; t < S; ++t) wv[t] = _mm512_loadu_si512(wg + 2 * g + t * 64);
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* xr = xq + r * ldq;
      // Two integer chains (exact, so their split changes no bit) halve the latency.
      __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
      for (int t = 0; t + 1 < S; t += 2) {
        s0 = _mm512_dpbusd_epi32(s0, wv[t], _mm512_loadu_si512(xr + t * 64));
        s1 = _mm512_dpbusd_epi32(s1, wv[t + 1], _mm512_loadu_si512(xr + t * 64 + 64));
      }
      if (S & 1) s0 = _mm512_dpbusd_epi32(s0, wv[S - 1], _mm512_loadu_si512(xr + (S - 1) * 64));
      __m512i s = _mm512_add_epi32(s0, s1);
      if (!Q4) s = _mm512_sub_epi32(s, _mm512_loadu_si512(cx + r * lds));
      acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_loadu_ps(dx + r * lds)), acc[r][c]);
      if (Q4) acc[r][c] = _mm512_fmadd_ps(mw, _mm512_loadu_ps(sx + r * lds), acc[r][c]);
    }
  }
}

// R rows of quantized x against C consecutive packed weight rows. `ahead` as in
// quant_matmul.cpp: the same rows that many bytes on, fetched into L2 during the arithmetic.
template <bool Q4, int R, int C>
void tile(const uint8_t* xq, int64_t ldq, const float* dx, const float* sx, const int32_t* cx,
          int64_t lds, const uint8_t* w, int64_t row_bytes, const std::vector<Group>& groups,
          float* y, int64_t ldy, int64_t ahead) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const Group& G = groups[gi];
#define HASTEN_GROUP(S)                                                                        \
  group_dot<Q4, R, C, S>(acc, w + G.offset, row_bytes, xq + G.x_offset, ldq, dx + gi * 16,     \
                         sx + gi * 16, cx + gi * 16, lds, ahead);                              \
  break;
    switch (G.g) {
      case 16: HASTEN_GROUP(8)
      case 8: HASTEN_GROUP(4)
      case 4: HASTEN_GROUP(2)
      default: HASTEN_GROUP(1)
    }
#undef HASTEN_GROUP
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[r * ldy + c] = _mm512_reduce_add_ps(acc[r][c]);
}

template <bool Q4>
void tiles(int rows, const uint8_t* xq, int64_t ldq, const float* dx, const float* sx,
           const int32_t* cx, int64_t lds, const uint8_t* w, int64_t row_bytes,
           const std::vector<Group>& groups, int64_t n0, int64_t n1, float* y, int64_t ldy,
           int64_t ahead) {
  int64_t n = n0;
#define HASTEN_Q8_TILE(R, C)                                                                   \
  for (; n + C <= n1; n += C)                                                                  \
    tile<Q4, R, C>(xq, ldq, dx, sx, cx, lds, w + n * row_bytes, row_bytes, groups, y + n, ldy, ahead); \
  for (; n < n1; ++n)                                                                          \
    tile<Q4, R, 1>(xq, ldq, dx, sx, cx, lds, w + n * row_bytes, row_bytes, groups, y + n, ldy, ahead); \
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

// The scalar reference: the same integer sums and lane terms, the lanes summed in order.
float scalar_dot(int64_t kind, const uint8_t* xq, const float* dx, const float* sx,
                 const int32_t* cx, const uint8_t* wrow, const std::vector<Group>& groups) {
  float lanes[16] = {0.f};
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const Group& G = groups[gi];
    const int64_t S = G.g / 2;
    const uint8_t* grp = wrow + G.offset;
    const uint8_t* payload = grp + header_bytes(kind, G.g);
    const int64_t L = 16 / G.g;
    for (int64_t l = 0; l < 16; ++l) {
      int32_t s = 0;
      for (int64_t t = 0; t < S; ++t)
        for (int64_t i = 0; i < 4; ++i) {
          const int64_t j = 4 * l + i;
          int32_t wq;
          if (kind == Q4_1) {
            int64_t byte;
            int shift;
            nibble_at(S, t, j, &byte, &shift);
            wq = (payload[byte] >> shift) & 15;
          } else {
            wq = payload[t * 64 + j];
          }
          s += wq * static_cast<int8_t>(xq[G.x_offset + t * 64 + j]);
        }
      if (kind == Q8_0) s -= cx[gi * 16 + l];
      uint16_t bits;
      std::memcpy(&bits, grp + 2 * (l / L), 2);
      lanes[l] = std::fma(static_cast<float>(s), half_bits(bits) * dx[gi * 16 + l], lanes[l]);
      if (kind == Q4_1) {
        std::memcpy(&bits, grp + 2 * G.g + 2 * (l / L), 2);
        lanes[l] = std::fma(l % L == 0 ? half_bits(bits) : 0.f, sx[gi * 16 + l], lanes[l]);
      }
    }
  }
  float y = 0.f;
  for (float v : lanes) y += v;
  return y;
}

int64_t block_bytes(int64_t kind) { return kind == Q4_1 ? 20 : 34; }

void check_kind(int64_t kind, int64_t K) {
  TORCH_CHECK(kind == Q4_1 || kind == Q8_0, "kind must be 0 (Q4_1) or 1 (Q8_0)");
  TORCH_CHECK(K > 0 && K % QK == 0, "K must be a positive multiple of 32");
}

}  // namespace

torch::Tensor pack(const torch::Tensor& blocks, int64_t kind, int64_t K) {
  check_kind(kind, K);
  const int64_t nb = K / QK, bb = block_bytes(kind);
  TORCH_CHECK(blocks.scalar_type() == torch::kUInt8 && blocks.dim() == 2 && blocks.is_contiguous() &&
              blocks.size(1) == nb * bb, "blocks must be contiguous uint8 [N, K / 32 * block bytes]");
  int64_t row_bytes;
  const auto groups = groups_of(K, kind, &row_bytes);
  const int64_t N = blocks.size(0);
  // Q8_0 stores q + 128: a zero weight (the padding block's) is 128.
  auto out = torch::full({N, row_bytes}, kind == Q8_0 ? 128 : 0, blocks.options());
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (const Group& G : groups) {
        uint8_t* grp = dst + n * row_bytes + G.offset;
        std::memset(grp, 0, header_bytes(kind, G.g));  // the padding block's d and m are 0
        const int64_t S = G.g / 2;
        uint8_t* payload = grp + header_bytes(kind, G.g);
        for (int64_t bi = 0; bi < G.g && G.b0 + bi < nb; ++bi) {
          const uint8_t* blk = src + n * nb * bb + (G.b0 + bi) * bb;
          std::memcpy(grp + 2 * bi, blk, 2);
          if (kind == Q4_1) std::memcpy(grp + 2 * G.g + 2 * bi, blk + 2, 2);
          for (int64_t e = 0; e < QK; ++e) {
            int64_t t, j;
            slot(G.g, bi, e, &t, &j);
            if (kind == Q8_0) {
              payload[t * 64 + j] = static_cast<uint8_t>(blk[2 + e] ^ 0x80);
            } else {
              const uint8_t q = e < 16 ? blk[4 + e] & 15 : blk[4 + e - 16] >> 4;
              int64_t byte;
              int shift;
              nibble_at(S, t, j, &byte, &shift);
              payload[byte] |= static_cast<uint8_t>(q << shift);
            }
          }
        }
      }
  });
  return out;
}

torch::Tensor unpack(const torch::Tensor& packed, int64_t kind, int64_t K) {
  check_kind(kind, K);
  int64_t row_bytes;
  const auto groups = groups_of(K, kind, &row_bytes);
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 2 && packed.is_contiguous() &&
              packed.size(1) == row_bytes, "packed must be contiguous uint8 [N, ", row_bytes, "] for K = ", K);
  const int64_t N = packed.size(0), nb = K / QK;
  auto out = torch::empty({N, K}, packed.options().dtype(torch::kFloat32));
  const uint8_t* src = packed.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (const Group& G : groups) {
      const uint8_t* grp = src + n * row_bytes + G.offset;
      const uint8_t* payload = grp + header_bytes(kind, G.g);
      const int64_t S = G.g / 2;
      for (int64_t bi = 0; bi < G.g && G.b0 + bi < nb; ++bi) {
        uint16_t bits;
        std::memcpy(&bits, grp + 2 * bi, 2);
        const float d = half_bits(bits);
        std::memcpy(&bits, grp + 2 * G.g + 2 * bi, 2);
        const float m = kind == Q4_1 ? half_bits(bits) : 0.f;
        for (int64_t e = 0; e < QK; ++e) {
          int64_t t, j;
          slot(G.g, bi, e, &t, &j);
          float w;
          if (kind == Q8_0) {
            w = static_cast<float>(static_cast<int8_t>(payload[t * 64 + j] ^ 0x80)) * d;
          } else {
            int64_t byte;
            int shift;
            nibble_at(S, t, j, &byte, &shift);
            w = std::fma(static_cast<float>((payload[byte] >> shift) & 15), d, m);  // as numpy
          }
          dst[n * K + (G.b0 + bi) * QK + e] = w;
        }
      }
    }
  return out;
}

torch::Tensor matmul(const torch::Tensor& x, const torch::Tensor& packed, int64_t kind) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1);
  check_kind(kind, K);
  const Layout& plan = layout_of(K, kind);
  const std::vector<Group>& groups = plan.groups;
  const int64_t row_bytes = plan.row_bytes;
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 2 && packed.is_contiguous() &&
              packed.size(1) == row_bytes, "packed weights [N, ", row_bytes, "] for K = ", K,
              " expected (hasten_q8 pack of the same K)");
  const int64_t N = packed.size(0), ng = static_cast<int64_t>(groups.size());
  const int64_t ldq = padded_blocks(K) * QK, lds = ng * 16;
  std::vector<uint8_t> xq(M * ldq);
  std::vector<float> dx(M * lds), sx(M * lds);
  std::vector<int32_t> cx(M * lds);
  const float* xp = x.data_ptr<float>();
  const RowLayout& layout = plan.rows;
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      quantize_row(xp + r * K, K, layout, xq.data() + r * ldq, dx.data() + r * lds,
                   sx.data() + r * lds, cx.data() + r * lds);
  });
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  // Threads get ~512k multiply-adds at least; row tiles of up to 4 rows (`schedule.h`).
  const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 19) / std::max<int64_t>(1, K * M));
  hasten_kernels::over_tiles(M, N, grain, 4, [&](int64_t c0, int64_t c1, int64_t r0, int64_t rows, bool next_chunk) {
#if defined(HASTEN_VNNI)
    const int64_t ahead = next_chunk ? hasten_kernels::CHUNK * row_bytes : 0;
    if (kind == Q4_1)
      tiles<true>(static_cast<int>(rows), xq.data() + r0 * ldq, ldq, dx.data() + r0 * lds,
                  sx.data() + r0 * lds, cx.data() + r0 * lds, lds, wp, row_bytes, groups, c0,
                  c1, yp + r0 * N, N, ahead);
    else
      tiles<false>(static_cast<int>(rows), xq.data() + r0 * ldq, ldq, dx.data() + r0 * lds,
                   sx.data() + r0 * lds, cx.data() + r0 * lds, lds, wp, row_bytes, groups, c0,
                   c1, yp + r0 * N, N, ahead);
#else
    for (int64_t n = c0; n < c1; ++n)
      for (int64_t r = r0; r < r0 + rows; ++r)
        yp[r * N + n] = scalar_dot(kind, xq.data() + r * ldq, dx.data() + r * lds,
                                   sx.data() + r * lds, cx.data() + r * lds,
                                   wp + n * row_bytes, groups);
#endif
  });
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
