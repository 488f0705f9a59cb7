// Small vector helpers the kernels share: e^x, silu, and many horizontal sums at once, over
// 16 lanes (AVX-512) or 8 (AVX2 + FMA + F16C, CPUs without AVX-512). Ours, so every path that
// uses them (attention weights, the MLP's silu) computes the same bits on every machine of one
// kind, whatever library versions are installed.
//
// HASTEN_AVX2: the 8-lane versions of the kernels are compiled (quant_matmul.cpp,
// q8_activations.cpp); an AVX-512 build never takes them.
#pragma once
#if defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HASTEN_AVX2 1
#include <immintrin.h>
#endif
#if defined(__AVX512F__)

#include <cstdint>

namespace hasten_kernels {

// e^x: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two, so r is exact to float32), e^r by
// its Taylor polynomial to r^7 (remainder < 6e-9 relative), times 2^n. Within 2 ulp of expf;
// 0 for x below about -103 (e^-inf included), e^88.7 at most.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2's first 16 bits
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);     // and the rest
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// silu(x) = x / (1 + e^-x).
inline __m512 silu16(__m512 x) {
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// The horizontal sums of a[0..15], lane k holding a[k]'s: each sum in the same pairs as
// _mm512_reduce_add_ps (lane e + lane e + 8, then e + e + 4, then 0 + 2 and 1 + 3, then 0 + 1),
// so the same bits, in 46 instructions for all 16 instead of ~10 each.
inline __m512 reduce16(const __m512 (&a)[16]) {
  __m512 t[8], s[4], w[2];
  for (int i = 0; i < 8; ++i)  // 128-bit chunks 0 + 2 and 1 + 3 of a[2i] and of a[2i + 1]
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)  // chunk j of s[i]: a[4i + j]'s 4 partial sums
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)  // chunk j of w[i]: a[8i + j]'s 2, then a[8i + 4 + j]'s 2
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // Lane 4j + m: a[4m + j]'s sum; put lane k's in lane k.
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

}  // namespace hasten_kernels
#elif defined(HASTEN_AVX2)

namespace hasten_kernels {

// e^x over 8 lanes: exp16's steps (the same polynomial and range), with its final scaling by
// 2^n done as two exact powers of two (AVX2 has no scalef): p * 2^(n - n/2) rounds only
// where the result is subnormal, as scalef does.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.f)), _mm256_set1_ps(88.7f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i k = _mm256_cvtps_epi32(n);  // -150 .. 128: each half within 2^-75 .. 2^64
  const __m256i k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
  auto pow2 = [](__m256i e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  };
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2(k1)), pow2(k2));
}

// One horizontal sum in a fixed order: lane e + lane e + 4, then 0 + 2 and 1 + 3, then 0 + 1.
inline float reduce_add8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The horizontal sums of a[0..7], lane k holding a[k]'s, in reduce_add8's pairs (so its bits).
inline __m256 reduce8(const __m256 (&a)[8]) {
  __m256 t[4], s[2];
  for (int i = 0; i < 4; ++i)  // halves added: low 128 bits a[2i]'s 4 partial sums, high a[2i + 1]'s
    t[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x20),
                         _mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x31));
  for (int i = 0; i < 2; ++i)  // 0 + 2, 1 + 3: per 128 bits two of one sum, then two of another
    s[i] = _mm256_add_ps(_mm256_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // 0 + 1: lanes hold the sums of a[0, 2, 4, 6, 1, 3, 5, 7]; put lane k's in lane k.
  const __m256 r = _mm256_add_ps(_mm256_shuffle_ps(s[0], s[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm256_shuffle_ps(s[0], s[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

}  // namespace hasten_kernels
#endif
