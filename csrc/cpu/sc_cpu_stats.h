// Per-channel batch statistics (mean and biased variance over N, H, W) for the CPU kernels: the
// `_channel_stats` primitive (sc_gate_cpu.cpp) and the BatchNorm + ReLU forward that applies them while
// each channel is in cache (sc_bn_relu_cpu.cpp) share these, so both give the same bits. Also the
// per-channel BatchNorm algebra of the one-call kernels (the fold, and the input gradient's q and r).
//
// Values are shifted by the channel's first value K to keep E[x^2] - E[x]^2 exact enough; float
// partials over at most 1024 values (NCHW: of one plane, or of a run of whole planes of one channel
// when planes are smaller; NHWC: 16 pixels) are added in double, in an order fixed by the shape alone
// (independent of the thread count). Host code only, compiled with the CPU capability flags of
// setup.py / CMakeLists.txt.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "sc_cpu_vec.h"

namespace scnet_fused {
namespace cpu_stats {

using cpu_vec::for_chunks;
using cpu_vec::grain_for;
using cpu_vec::hsum;
using cpu_vec::kV;
using cpu_vec::load_f;
using cpu_vec::Vec;

// Mean and biased variance from sums of (x - K) and (x - K)^2 over M values. A channel whose sums are
// not finite gets the mean as torch's CPU BatchNorm computes it, the plain sum over M (plain_sum(), in
// double: +-inf for infinities of one sign, NaN for a NaN or both signs; the shifted sums have lost it),
// and a variance of NaN if a value is not finite, else +inf: finite values 2^64 from K (whose float32
// squares overflow) or near the float32 maximum (whose float32 sums do) give +inf, as ATen's float32
// accumulation does there (the BatchNorm's output is then its bias).
template <typename PlainSum>
inline void finalize_stats(float K, double a1, double a2, double M, float* mean, float* var, PlainSum plain_sum) {
  if (!std::isfinite(a1) || !std::isfinite(a2) || !std::isfinite(K)) {
    const double s = plain_sum();  // finite exactly when every value is (a double sum of floats)
    *mean = static_cast<float>(s / M);
    *var = std::isfinite(s) ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const double m1 = a1 / M;
  *mean = static_cast<float>(static_cast<double>(K) + m1);
  *var = static_cast<float>(std::max(0.0, a2 / M - m1 * m1));
}

// x as a float32 value of its own. GCC contracts a product and a later sum, across statements, into
// one fused multiply-add where FMA is enabled (-ffp-contract=fast), which ATen's separate operations
// never do; a volatile round trip keeps the product rounded, so the per-channel algebra below gives
// ATen's bits.
inline float rounded(float x) {
  volatile float v = x;
  return v;
}

// BatchNorm's input gradient as q * t + r (with p = scale) from the sums, in float32, the expressions of
// scnet_fused/ops/bn_relu.py and scnet_fused/ops/sc_gate.py:
//   dweight = sum_gc * invstd;  q = -scale * invstd * dweight / m;  r = -q * mean - scale * sum_g / m
inline void bn_input_affine(float sum_g, float sum_gc, float scale, float invstd, float mean, float m, float* q,
                            float* r) {
  const float dweight = sum_gc * invstd;
  const float qq = -scale * invstd * dweight / m;
  const float t1 = rounded(-qq * mean);
  const float t2 = scale * sum_g / m;
  *q = qq;
  *r = t1 - t2;
}

// BatchNorm folded to y = t * scale + shift, float32, the expressions of bn_fold
// (scnet_fused/ops/sc_gate.py): invstd = rsqrt(var + eps), scale = weight * invstd,
// shift = bias - mean * scale.
inline void bn_fold_one(float weight, float bias, float mean, float var, float eps, float* scale, float* shift,
                        float* invstd = nullptr) {
  const float is = 1.0f / std::sqrt(var + eps);
  const float sc = weight * is;
  const float ms = rounded(mean * sc);
  *scale = sc;
  *shift = bias - ms;
  if (invstd != nullptr) *invstd = is;
}

// Values a float partial sums at most (then it is added in double).
constexpr int64_t kFlush = 1024;

// Adds (x - K) and (x - K)^2 over xp[e0, e1) to the lanes of v1, v2: whole vectors, then one partial
// vector whose other lanes add 0.
template <typename T>
inline void add_moments(const T* xp, int64_t e0, int64_t e1, const Vec& K, Vec& v1, Vec& v2) {
  int64_t e = e0;
  for (; e + kV <= e1; e += kV) {
    const Vec d = load_f(xp + e) - K;
    v1 = v1 + d;
    v2 = at::vec::fmadd(d, d, v2);
  }
  if (e < e1) {
    const int64_t n = e1 - e;
    const Vec d = Vec::set(Vec(0.0f), load_f(xp + e, n) - K, n);
    v1 = v1 + d;
    v2 = at::vec::fmadd(d, d, v2);
  }
}

// Sums of (x - K) and (x - K)^2 over one NCHW plane of HW values.
template <typename T>
inline void plane_moments(const T* xp, int64_t HW, float k, double* s1, double* s2) {
  const Vec K(k);
  double a1 = 0.0, a2 = 0.0;
  for (int64_t f0 = 0; f0 < HW; f0 += kFlush) {
    Vec v1(0.0f), v2(0.0f);
    add_moments(xp, f0, std::min(HW, f0 + kFlush), K, v1, v2);
    a1 += hsum(v1);
    a2 += hsum(v2);
  }
  *s1 = a1;
  *s2 = a2;
}

// Planes of one NCHW channel per run: as many whole planes as fit in kFlush values (at least one).
// Small planes (7x7, 14x14) share their float partials, and their horizontal sums, that way: at 7x7
// one sum per channel and batch of 20 planes instead of one per plane.
inline int64_t planes_per_run(int64_t HW) { return HW >= kFlush ? 1 : std::max<int64_t>(1, kFlush / HW); }

// Sums of (x - K) and (x - K)^2 over the planes [n0, n1) of one NCHW channel (plane n at
// t + n * plane_stride), a run of planes_per_run(HW) planes or the channel's last, shorter one.
template <typename T>
inline void run_moments(const T* t, int64_t n0, int64_t n1, int64_t plane_stride, int64_t HW, float k, double* s1,
                        double* s2) {
  if (n1 - n0 == 1) return plane_moments(t + n0 * plane_stride, HW, k, s1, s2);
  const Vec K(k);
  Vec v1(0.0f), v2(0.0f);
  for (int64_t n = n0; n < n1; ++n) add_moments(t + n * plane_stride, 0, HW, K, v1, v2);
  *s1 = hsum(v1);
  *s2 = hsum(v2);
}

// The plain sum of one NCHW channel's values (the non-finite case of finalize_stats).
template <typename T>
double nchw_channel_sum(const T* t, int64_t N, int64_t plane_stride, int64_t HW) {
  double s = 0.0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t e = 0; e < HW; ++e) s += static_cast<double>(static_cast<float>(t[n * plane_stride + e]));
  return s;
}

// One NCHW channel's statistics from its N planes (plane n at t + n * plane_stride): the runs' sums
// added in n order.
template <typename T>
inline void channel_moments(const T* t, int64_t N, int64_t plane_stride, int64_t HW, float* mean, float* var) {
  const float K = static_cast<float>(t[0]);
  const int64_t R = planes_per_run(HW);
  double a1 = 0.0, a2 = 0.0;
  for (int64_t n0 = 0; n0 < N; n0 += R) {
    double p1, p2;
    run_moments(t, n0, std::min(N, n0 + R), plane_stride, HW, K, &p1, &p2);
    a1 += p1;
    a2 += p2;
  }
  finalize_stats(K, a1, a2, static_cast<double>(N * HW), mean, var,
                 [&] { return nchw_channel_sum(t, N, plane_stride, HW); });
}

// All channels, parallel over (run, channel): the same runs and order as channel_moments, so the
// same bits.
template <typename T>
void stats_nchw(const T* t, int64_t N, int64_t C, int64_t HW, float* mean, float* var) {
  const int64_t R = planes_per_run(HW);
  const int64_t runs = (N + R - 1) / R;
  std::vector<double> s1(runs * C), s2(runs * C);
  at::parallel_for(0, runs * C, grain_for(std::min(N, R) * HW), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t c = u % C, n0 = (u / C) * R;
      run_moments(t + c * HW, n0, std::min(N, n0 + R), C * HW, HW, static_cast<float>(t[c * HW]), &s1[u], &s2[u]);
    }
  });
  const double M = static_cast<double>(N * HW);
  for (int64_t c = 0; c < C; ++c) {
    double a1 = 0.0, a2 = 0.0;
    for (int64_t r = 0; r < runs; ++r) {
      a1 += s1[r * C + c];
      a2 += s2[r * C + c];
    }
    finalize_stats(static_cast<float>(t[c * HW]), a1, a2, M, mean + c, var + c,
                   [&] { return nchw_channel_sum(t + c * HW, N, C * HW, HW); });
  }
}

// d1[l] += v1's lane l and d2[l] += v2's lane l (in double) for the first `width` lanes of the NV
// vectors taken end to end.
template <int NV>
inline void add_lanes(const Vec (&v1)[NV], const Vec (&v2)[NV], int64_t width, double* d1, double* d2) {
  float b1[NV * kV], b2[NV * kV];
  for (int v = 0; v < NV; ++v) {
    v1[v].store(b1 + v * kV);
    v2[v].store(b2 + v * kV);
  }
  for (int64_t l = 0; l < width; ++l) {
    d1[l] += static_cast<double>(b1[l]);
    d2[l] += static_cast<double>(b2[l]);
  }
}

// The NHWC reductions (the statistics here, the BatchNorm backward's sums in sc_bn_relu_cpu.cpp): the
// P pixels in at most 64 tasks of at least 64 pixels, fixed by the shape (the bits do not depend on
// how the tasks are split among threads); each task's partials per channel in double, from float
// partials over runs of at most kNhwcRun pixels.
constexpr int64_t kNhwcRun = 16;

inline int64_t nhwc_reduce_tasks(int64_t P) { return std::max<int64_t>(1, std::min<int64_t>(64, (P + 63) / 64)); }

// f(k, r0, r1) for every run [r0, r1) of every task k of the nhwc_reduce_tasks(P) tasks, the tasks
// spread over the threads (C channels a pixel: the grain).
template <typename F>
void for_nhwc_runs(int64_t P, int64_t C, F&& f) {
  const int64_t ntask = nhwc_reduce_tasks(P);
  const int64_t per = (P + ntask - 1) / ntask;
  at::parallel_for(0, ntask, grain_for(per * C), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t q1 = std::min(P, (k + 1) * per);
      for (int64_t r0 = k * per; r0 < q1; r0 += kNhwcRun) f(k, r0, std::min(q1, r0 + kNhwcRun));
    }
  });
}

// Sums of (x - K) and (x - K)^2 over the NHWC pixels [q0, q1) (one float partial) of the channels
// [e, e + NV * kV) (the last vector m lanes wide when kTail; NV is then 1), in registers, then added
// to the double partials d1, d2 (indexed by channel).
template <typename T, int NV, bool kTail>
inline void nhwc_moments_chunk(const T* t, int64_t C, int64_t q0, int64_t q1, int64_t e, int64_t m, const float* K,
                               double* d1, double* d2) {
  Vec k[NV], v1[NV], v2[NV];
  for (int v = 0; v < NV; ++v) {
    k[v] = kTail ? Vec::loadu(K + e, m) : Vec::loadu(K + e + v * kV);
    v1[v] = Vec(0.0f);
    v2[v] = Vec(0.0f);
  }
  for (int64_t q = q0; q < q1; ++q) {
    const T* xp = t + q * C + e;
    for (int v = 0; v < NV; ++v) {
      const Vec d = (kTail ? load_f(xp, m) : load_f(xp + v * kV)) - k[v];
      v1[v] = v1[v] + d;
      v2[v] = at::vec::fmadd(d, d, v2[v]);
    }
  }
  add_lanes<NV>(v1, v2, kTail ? m : NV * kV, d1 + e, d2 + e);
}

// NHWC statistics: tasks and runs of for_nhwc_runs, each run going through the channels in chunks
// (for_chunks) summed in registers.
template <typename T>
void stats_nhwc(const T* t, int64_t N, int64_t C, int64_t HW, float* mean, float* var) {
  const int64_t P = N * HW;  // pixels
  const int64_t ntask = nhwc_reduce_tasks(P);
  std::vector<float> K(C);
  for (int64_t c = 0; c < C; ++c) K[c] = static_cast<float>(t[c]);
  std::vector<double> s1(ntask * C, 0.0), s2(ntask * C, 0.0);
  for_nhwc_runs(P, C, [&](int64_t k, int64_t r0, int64_t r1) {
    for_chunks(C, [&](int64_t e, int64_t m, auto nv, auto tail) {
      nhwc_moments_chunk<T, decltype(nv)::value, decltype(tail)::value>(t, C, r0, r1, e, m, K.data(),
                                                                        s1.data() + k * C, s2.data() + k * C);
    });
  });
  const double M = static_cast<double>(P);
  for (int64_t c = 0; c < C; ++c) {
    double a1 = 0.0, a2 = 0.0;
    for (int64_t k = 0; k < ntask; ++k) {
      a1 += s1[k * C + c];
      a2 += s2[k * C + c];
    }
    finalize_stats(K[c], a1, a2, M, mean + c, var + c, [&] {
      double s = 0.0;
      for (int64_t q = 0; q < P; ++q) s += static_cast<double>(static_cast<float>(t[q * C + c]));
      return s;
    });
  }
}

}  // namespace cpu_stats
}  // namespace scnet_fused
