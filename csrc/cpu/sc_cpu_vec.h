// Vector helpers shared by the CPU kernels: full- and partial-vector float loads and stores of the
// storage types (float, at::Half, at::BFloat16) and a lane sum in a fixed order. Host code only,
// compiled with the CPU capability flags of setup.py / CMakeLists.txt.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

// The per-plane and per-chunk bodies of the kernels are inlined into every loop that walks them: GCC
// kept them out of line where two loops use them, a call per plane of 49 or 196 elements at the small
// stages.
#if defined(__GNUC__) || defined(__clang__)
#define SCNET_FUSED_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SCNET_FUSED_ALWAYS_INLINE inline
#endif

namespace scnet_fused {
namespace cpu_vec {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();

// kV elements of T at p, as float.
template <typename T>
inline Vec load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}

// kV floats stored to p as T.
template <typename T>
inline void store_f(T* p, const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, kV);
  }
}

// The first n (< kV) elements of T at p, as float; the other lanes are 0. Nothing past p + n is read.
template <typename T>
inline Vec load_f(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, n);
  } else {
    float buf[kV] = {};
    for (int64_t e = 0; e < n; ++e) buf[e] = static_cast<float>(p[e]);
    return Vec::loadu(buf);
  }
}

// The first n (< kV) lanes of v stored to p as T. Nothing past p + n is written.
template <typename T>
inline void store_f(T* p, const Vec& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
    float buf[kV];
    v.store(buf);
    for (int64_t e = 0; e < n; ++e) p[e] = static_cast<T>(buf[e]);
  }
}

// Sum of the lanes in a fixed order, in double: the two halves widened to double and added lane by
// lane, then a pairwise tree (a short dependency chain: this runs once per plane in the gate backward).
inline double hsum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__) && defined(__AVX512DQ__)
  const __m512 f = v;
  const __m512d s = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(f)),
                                  _mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1)));
  const __m256d q = _mm256_add_pd(_mm512_castpd512_pd256(s), _mm512_extractf64x4_pd(s, 1));
  const __m128d d = _mm_add_pd(_mm256_castpd256_pd128(q), _mm256_extractf128_pd(q, 1));
  return _mm_cvtsd_f64(_mm_add_sd(d, _mm_unpackhi_pd(d, d)));
#elif defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
  const __m256 f = v;
  const __m256d s = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(f)), _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
  const __m128d d = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  return _mm_cvtsd_f64(_mm_add_sd(d, _mm_unpackhi_pd(d, d)));
#else
  float buf[kV];
  v.store(buf);
  double s = 0.0;
  for (int64_t e = 0; e < kV; ++e) s += buf[e];
  return s;
#endif
}

// The grain of at::parallel_for for items of `elems_per_item` elements each: at least 32768 elements
// (ATen's grain) per task, so that a small tensor runs on one thread instead of waking the pool for
// a few microseconds of work.
inline int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elems_per_item));
}

// Channel chunks of the NHWC kernels, whose per-channel values stay in registers over a run of pixels:
// up to four vectors with 32 vector registers (AVX-512), up to two with 16.
constexpr int kChunkVecs = kV >= 16 ? 4 : 2;

// Calls f(e, m, std::integral_constant<int, NV>, std::bool_constant<kTail>) over the chunks of cn
// channels: chunks of kChunkVecs vectors, then one of two (AVX-512), single vectors, and a last
// partial vector of m lanes (kTail, NV = 1).
template <typename F>
SCNET_FUSED_ALWAYS_INLINE void for_chunks(int64_t cn, F&& f) {
  int64_t e = 0;
  for (; e + kChunkVecs * kV <= cn; e += kChunkVecs * kV) {
    f(e, kV, std::integral_constant<int, kChunkVecs>{}, std::false_type{});
  }
  if constexpr (kChunkVecs > 2) {
    if (e + 2 * kV <= cn) {
      f(e, kV, std::integral_constant<int, 2>{}, std::false_type{});
      e += 2 * kV;
    }
  }
  for (; e + kV <= cn; e += kV) f(e, kV, std::integral_constant<int, 1>{}, std::false_type{});
  if (e < cn) f(e, cn - e, std::integral_constant<int, 1>{}, std::true_type{});
}

}  // namespace cpu_vec
}  // namespace scnet_fused
