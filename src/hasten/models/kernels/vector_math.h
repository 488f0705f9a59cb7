// Small AVX-512 helpers the kernels share: e^x over 16 lanes, silu, and 16 horizontal sums at
// once. Ours, so every path that uses them (attention weights, the MLP's silu) computes the
// same bits on every AVX-512 machine, whatever library versions are installed.
#pragma once
#if defined(__AVX512F__)
#include <immintrin.h>

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
#endif
