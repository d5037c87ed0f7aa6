// Vector helpers shared by the CPU kernels: full- and partial-vector float loads and stores of the
// storage types (float, at::Half, at::BFloat16) and a lane sum in a fixed order. Host code only,
// compiled with the CPU capability flags of setup.py / CMakeLists.txt.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

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

// Sum of the lanes in a fixed order, in double.
inline double hsum(const Vec& v) {
  float buf[kV];
  v.store(buf);
  double s = 0.0;
  for (int64_t e = 0; e < kV; ++e) s += buf[e];
  return s;
}

}  // namespace cpu_vec
}  // namespace scnet_fused
