// CPU kernels of BatchNorm + ReLU with batch statistics (contract: scnet_fused/ops/_dispatch.py,
// `affine_relu`, `affine_relu_backward_sums`, `affine_relu_backward_apply`).
//
//   z = t * scale[c] + shift[c]          (the BatchNorm folded to a per-channel affine)
//   y = relu(z)                          (NaN stays NaN, as torch.relu)
//   y = relu(z + res)                    (`_affine_add_relu`: with a residual of t's shape, a bottleneck's end)
//   g = dy where !(z <= 0), else 0        (torch's threshold_backward: a NaN z passes the gradient)
//   sums:  sum_g[c] = sum g,  sum_gc[c] = sum g * (t - center[c])
//   apply: dt = p[c] * g + q[c] * t + r[c]   (BatchNorm's input gradient)
//   add:   d += q[c] * t + r[c]               (`_add_channel_affine_`, in place, no mask: the same
//                                             input gradient when d already holds p * dy)
//   whole: the fold, the sums, q and r from them, the apply (`_bn_relu_train_backward`, p = scale):
//          NCHW channel by channel, each channel's planes read again while they are in cache
//   train: the batch statistics, the BatchNorm folded to scale and shift, y (`_bn_relu_train_out`):
//          NCHW channel by channel too
//   without the ReLU (`_bn_train_out`, `_bn_train_backward`: a BatchNorm alone): y = z, g = dy
//   with a residual (`_bn_add_relu_train_forward` / `_backward`): y = relu(z + res); the backward's
//          mask comes from y (g = dy where !(y <= 0): torch's ReLU backward from its output), g is
//          also the residual's gradient (written out), and dt = p * g + q * t + r unmasked
//
// NCHW and NHWC read in place; dy (backward) and out (`_affine_relu_out`) may also be a channel slice
// of a concatenation buffer, read and written in place (channel pitch, csrc/sc_host.h). float32 math
// for float32 / float16 / bfloat16 storage; vectorized with at::vec::Vectorized<float> (full vectors,
// scalar tails), threaded with at::parallel_for. The
// sums are split into tasks fixed by the shape and added in a fixed order: deterministic and
// independent of the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "sc_cpu_stats.h"
#include "sc_cpu_vec.h"
#include "sc_host.h"

namespace scnet_fused {
namespace cpu_bn_relu {
namespace {

using namespace ::scnet_fused::host;

using namespace ::scnet_fused::cpu_vec;
using ::scnet_fused::cpu_stats::bn_fold_one;
using ::scnet_fused::cpu_stats::bn_input_affine;

inline Vec relu_v(const Vec& z) { return Vec::blendv(z, Vec(0.0f), z <= Vec(0.0f)); }
inline Vec mask_v(const Vec& dy, const Vec& z) { return Vec::blendv(dy, Vec(0.0f), z <= Vec(0.0f)); }
inline float relu_s(float z) { return z <= 0.0f ? 0.0f : z; }
inline float mask_s(float dy, float z) { return z <= 0.0f ? 0.0f : dy; }

struct Shape {
  int64_t N, C, HW;
  int64_t dyP, outP;  // channel pitch of dy and of out (C when dense; more for a slice of a concatenation)
};

std::vector<float> vec_of(const char* op, const char* name, const at::Tensor& t, int64_t C) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == C, op, ": ", name,
              " must be a 1-D CPU tensor of C=", C, " values, got ", t.sizes(), " on ", t.device());
  at::Tensor f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + C);
}

void check_full(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected CPU tensors, got ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": expected a 4-D (N, C, H, W) tensor, got ", t.sizes());
  TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": expected float32, float16 or bfloat16, got ",
              t.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// One NCHW plane (HW values of one image and channel)
// ---------------------------------------------------------------------------------------------

// dt = p * g + q * t + r over a plane; g = dy masked by relu(a * t + b) (kMask) or dy itself.
template <typename T, bool kMask>
inline void apply_plane(const T* tp, const T* dp, T* op, int64_t HW, float a, float b, float p, float q, float r) {
  const Vec av(a), bv(b), pv(p), qv(q), rv(r);
  int64_t e = 0;
  for (; e + kV <= HW; e += kV) {
    const Vec tv = load_f(tp + e);
    const Vec d = load_f(dp + e);
    const Vec g = kMask ? mask_v(d, at::vec::fmadd(tv, av, bv)) : d;
    store_f(op + e, at::vec::fmadd(pv, g, at::vec::fmadd(qv, tv, rv)));
  }
  for (; e < HW; ++e) {
    const float tv = static_cast<float>(tp[e]);
    const float d = static_cast<float>(dp[e]);
    const float g = kMask ? mask_s(d, tv * a + b) : d;
    op[e] = static_cast<T>(p * g + (q * tv + r));
  }
}

// y = relu(a * t + b) over a plane; with kAdd, y = relu(a * t + b + res); without kRelu no ReLU.
template <typename T, bool kAdd = false, bool kRelu = true>
inline void relu_plane(const T* tp, const T* rp, T* op, int64_t HW, float a, float b) {
  const Vec av(a), bv(b);
  int64_t e = 0;
  for (; e + kV <= HW; e += kV) {
    Vec z = at::vec::fmadd(load_f(tp + e), av, bv);
    if constexpr (kAdd) z = z + load_f(rp + e);
    store_f(op + e, kRelu ? relu_v(z) : z);
  }
  for (; e < HW; ++e) {
    float z = static_cast<float>(tp[e]) * a + b;
    if constexpr (kAdd) z += static_cast<float>(rp[e]);
    op[e] = static_cast<T>(kRelu ? relu_s(z) : z);
  }
}

// sum g and sum g * (t - k) over a plane, g = dy masked by relu(a * t + b): float partials over at most
// 1024 values, added in double in order. kOut: g = dy masked by the output y (!(y <= 0)) instead, and
// written to gp (a, b unused).
template <typename T, bool kOut = false>
inline void plane_sums(const T* tp, const T* dp, int64_t HW, float a, float b, float k, double* sg, double* sgc,
                       const T* yp = nullptr, T* gp = nullptr) {
  const Vec av(a), bv(b), kv(k);
  double a1 = 0.0, a2 = 0.0;
  for (int64_t f0 = 0; f0 < HW; f0 += 1024) {
    const int64_t f1 = std::min(HW, f0 + 1024);
    Vec v1(0.0f), v2(0.0f);
    int64_t e = f0;
    for (; e + kV <= f1; e += kV) {
      const Vec tv = load_f(tp + e);
      Vec g;
      if constexpr (kOut) {
        g = mask_v(load_f(dp + e), load_f(yp + e));
        store_f(gp + e, g);
      } else {
        g = mask_v(load_f(dp + e), at::vec::fmadd(tv, av, bv));
      }
      v1 = v1 + g;
      v2 = at::vec::fmadd(g, tv - kv, v2);
    }
    a1 += hsum(v1);
    a2 += hsum(v2);
    for (; e < f1; ++e) {
      const float tv = static_cast<float>(tp[e]);
      float g;
      if constexpr (kOut) {
        g = mask_s(static_cast<float>(dp[e]), static_cast<float>(yp[e]));
        gp[e] = static_cast<T>(g);
      } else {
        g = mask_s(static_cast<float>(dp[e]), tv * a + b);
      }
      a1 += g;
      a2 += static_cast<double>(g) * (tv - k);
    }
  }
  *sg = a1;
  *sgc = a2;
}

// ---------------------------------------------------------------------------------------------
// Elementwise: y = relu(affine(t))  (kApply false; with kAdd, relu(affine(t) + dy), dy then the
// residual, dense in t's layout) or dt = p * g + q * t + r  (kApply true), with g the ReLU-masked dy
// (kMask) or dy itself (then A, B are unused and out may be dy: each element is read before it is
// written). A, B: scale, shift; P, Q, R: p, q, r (apply only). Without kRelu, y = affine(t).
// ---------------------------------------------------------------------------------------------
template <typename T, bool kApply, bool kMask = true, bool kAdd = false, bool kRelu = true>
void pointwise(const T* t, const T* dy, T* out, const float* A, const float* B, const float* P, const float* Q,
               const float* R, const Shape& s, Layout L) {
  if (L == Layout::NCHW) {
    const int64_t HW = s.HW;
    at::parallel_for(0, s.N * s.C, grain_for(HW), [&](int64_t p0, int64_t p1) {
      for (int64_t plane = p0; plane < p1; ++plane) {
        const int64_t n = plane / s.C, c = plane - n * s.C;
        const T* tp = t + plane * HW;
        T* op = out + (n * s.outP + c) * HW;
        if constexpr (kApply) {
          apply_plane<T, kMask>(tp, dy + (n * s.dyP + c) * HW, op, HW, A[c], B[c], P[c], Q[c], R[c]);
        } else {
          relu_plane<T, kAdd, kRelu>(tp, kAdd ? dy + plane * HW : nullptr, op, HW, A[c], B[c]);
        }
      }
    });
    return;
  }
  const int64_t C = s.C, P_ = s.N * s.HW;
  at::parallel_for(0, P_, grain_for(C), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const T* tp = t + q * C;
      T* op = out + q * s.outP;
      int64_t c = 0;
      if constexpr (kApply) {
        const T* dp = dy + q * s.dyP;
        for (; c + kV <= C; c += kV) {
          const Vec tv = load_f(tp + c);
          const Vec d = load_f(dp + c);
          const Vec g = kMask ? mask_v(d, at::vec::fmadd(tv, Vec::loadu(A + c), Vec::loadu(B + c))) : d;
          store_f(op + c, at::vec::fmadd(Vec::loadu(P + c), g, at::vec::fmadd(Vec::loadu(Q + c), tv, Vec::loadu(R + c))));
        }
        for (; c < C; ++c) {
          const float tv = static_cast<float>(tp[c]);
          const float d = static_cast<float>(dp[c]);
          const float g = kMask ? mask_s(d, tv * A[c] + B[c]) : d;
          op[c] = static_cast<T>(P[c] * g + (Q[c] * tv + R[c]));
        }
      } else {
        const T* rp = kAdd ? dy + q * C : nullptr;
        for (; c + kV <= C; c += kV) {
          Vec z = at::vec::fmadd(load_f(tp + c), Vec::loadu(A + c), Vec::loadu(B + c));
          if constexpr (kAdd) z = z + load_f(rp + c);
          store_f(op + c, kRelu ? relu_v(z) : z);
        }
        for (; c < C; ++c) {
          float z = static_cast<float>(tp[c]) * A[c] + B[c];
          if constexpr (kAdd) z += static_cast<float>(rp[c]);
          op[c] = static_cast<T>(kRelu ? relu_s(z) : z);
        }
      }
    }
  });
}

// g = dy where !(y <= 0), else 0 (torch's ReLU backward from its output: a NaN y passes the gradient)
// over n dense values, in one streaming pass.
template <typename T>
void mask_by_output(const T* dy, const T* y, T* g, int64_t n) {
  at::parallel_for(0, n, grain_for(1), [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    for (; i + kV <= i1; i += kV) store_f(g + i, mask_v(load_f(dy + i), load_f(y + i)));
    for (; i < i1; ++i) g[i] = static_cast<T>(mask_s(static_cast<float>(dy[i]), static_cast<float>(y[i])));
  });
}

// The NHWC sums of `sums` over the pixels [q0, q1) (one float partial) of the channels
// [e, e + NV * kV) (the last vector m lanes wide when kTail; NV is then 1), in registers, then added to
// the double partials d1, d2 (indexed by channel).
template <typename T, bool kOut, int NV, bool kTail>
inline void nhwc_sums_chunk(const T* t, const T* dy, int64_t dyP, const float* A, const float* B, const float* K,
                            int64_t C, int64_t q0, int64_t q1, int64_t e, int64_t m, double* d1, double* d2,
                            const T* y, T* g) {
  auto ld = [&](const float* q) { return kTail ? Vec::loadu(q, m) : Vec::loadu(q); };
  auto lt = [&](const T* q) { return kTail ? load_f(q, m) : load_f(q); };
  Vec av[NV], bv[NV], kv[NV], v1[NV], v2[NV];
  for (int v = 0; v < NV; ++v) {
    if constexpr (!kOut) {
      av[v] = ld(A + e + v * kV);
      bv[v] = ld(B + e + v * kV);
    }
    kv[v] = ld(K + e + v * kV);
    v1[v] = Vec(0.0f);
    v2[v] = Vec(0.0f);
  }
  for (int64_t q = q0; q < q1; ++q) {
    for (int v = 0; v < NV; ++v) {
      const int64_t o = q * C + e + v * kV;
      const Vec tv = lt(t + o);
      Vec gv;
      if constexpr (kOut) {
        gv = mask_v(lt(dy + q * dyP + e + v * kV), lt(y + o));
        if (kTail) store_f(g + o, gv, m);
        else store_f(g + o, gv);
      } else {
        gv = mask_v(lt(dy + q * dyP + e + v * kV), at::vec::fmadd(tv, av[v], bv[v]));
      }
      v1[v] = v1[v] + gv;
      v2[v] = at::vec::fmadd(gv, tv - kv[v], v2[v]);
    }
  }
  cpu_stats::add_lanes<NV>(v1, v2, kTail ? m : NV * kV, d1 + e, d2 + e);
}

// ---------------------------------------------------------------------------------------------
// Sums of g and g * (t - center) per channel.
// ---------------------------------------------------------------------------------------------
// kOut (the residual op's backward): g = dy masked by the output y instead of by the affine of t, and
// written to g (dy then dense: dyP = C); A, B unused.
template <typename T, bool kOut = false>
void sums(const T* t, const T* dy, const float* A, const float* B, const float* K, const Shape& s, Layout L,
          float* sum_g, float* sum_gc, const T* y = nullptr, T* g = nullptr) {
  const int64_t C = s.C;
  if (L == Layout::NCHW) {
    const int64_t HW = s.HW;
    std::vector<double> s1(s.N * C), s2(s.N * C);
    at::parallel_for(0, s.N * C, grain_for(HW), [&](int64_t p0, int64_t p1) {
      for (int64_t plane = p0; plane < p1; ++plane) {
        const int64_t n = plane / C, c = plane - n * C;
        if constexpr (kOut) {
          plane_sums<T, true>(t + plane * HW, dy + plane * HW, HW, 0.0f, 0.0f, K[c], &s1[plane], &s2[plane],
                              y + plane * HW, g + plane * HW);
        } else {
          plane_sums(t + plane * HW, dy + (n * s.dyP + c) * HW, HW, A[c], B[c], K[c], &s1[plane], &s2[plane]);
        }
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      double a1 = 0.0, a2 = 0.0;
      for (int64_t n = 0; n < s.N; ++n) {
        a1 += s1[n * C + c];
        a2 += s2[n * C + c];
      }
      sum_g[c] = static_cast<float>(a1);
      sum_gc[c] = static_cast<float>(a2);
    }
    return;
  }
  // NHWC: the statistics' tasks and runs (cpu_stats::for_nhwc_runs), channel chunks summed in registers
  const int64_t P = s.N * s.HW;
  const int64_t ntask = cpu_stats::nhwc_reduce_tasks(P);
  std::vector<double> s1(ntask * C, 0.0), s2(ntask * C, 0.0);
  cpu_stats::for_nhwc_runs(P, C, [&](int64_t k, int64_t r0, int64_t r1) {
    for_chunks(C, [&](int64_t c, int64_t m, auto nv, auto tail) {
      nhwc_sums_chunk<T, kOut, decltype(nv)::value, decltype(tail)::value>(t, dy, s.dyP, A, B, K, C, r0, r1, c, m,
                                                                           s1.data() + k * C, s2.data() + k * C, y, g);
    });
  });
  for (int64_t c = 0; c < C; ++c) {
    double a1 = 0.0, a2 = 0.0;
    for (int64_t k = 0; k < ntask; ++k) {
      a1 += s1[k * C + c];
      a2 += s2[k * C + c];
    }
    sum_g[c] = static_cast<float>(a1);
    sum_gc[c] = static_cast<float>(a2);
  }
}

// ---------------------------------------------------------------------------------------------
// The whole backward, NCHW, channel by channel: the channel's N planes are summed (as in `sums`: the
// same partials added in the same order) and then read again for dt while they are still in cache,
// so t and dy cross the memory bus once instead of twice. Threads split the channels. kOut (the
// residual op): g = dy masked by the output y, written to g (dy dense), and dt from g unmasked.
// ---------------------------------------------------------------------------------------------
template <typename T, bool kOut = false>
void backward_by_channel(const T* t, const T* dy, T* dt, const float* A, const float* B, const float* K,
                         const float* IS, const Shape& s, float* sum_g, float* sum_gc, const T* y = nullptr,
                         T* g = nullptr, const float* P = nullptr) {
  const int64_t C = s.C, HW = s.HW, N = s.N;
  const float m = static_cast<float>(static_cast<double>(N * HW));
  at::parallel_for(0, C, grain_for(N * HW), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double a1 = 0.0, a2 = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t off = (n * C + c) * HW;
        double p1, p2;
        if constexpr (kOut) {
          plane_sums<T, true>(t + off, dy + off, HW, 0.0f, 0.0f, K[c], &p1, &p2, y + off, g + off);
        } else {
          plane_sums(t + off, dy + (n * s.dyP + c) * HW, HW, A[c], B[c], K[c], &p1, &p2);
        }
        a1 += p1;
        a2 += p2;
      }
      sum_g[c] = static_cast<float>(a1);
      sum_gc[c] = static_cast<float>(a2);
      float q, r;
      const float pc = P ? P[c] : A[c];  // the BatchNorm's scale (A[c] unless A, B only mask)
      bn_input_affine(sum_g[c], sum_gc[c], pc, IS[c], K[c], m, &q, &r);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t off = (n * C + c) * HW;
        if constexpr (kOut) {
          apply_plane<T, false>(t + off, g + off, dt + off, HW, 0.0f, 0.0f, pc, q, r);
        } else {
          apply_plane<T, true>(t + off, dy + (n * s.dyP + c) * HW, dt + off, HW, A[c], B[c], pc, q, r);
        }
      }
    }
  });
}

// Whether a channel-by-channel kernel suits the shape: every thread gets a channel, and what one channel
// reads twice (bytes_per_value per value: t and dy in the backward, t in the forward) fits comfortably
// in a core's L2 (at most 1 MiB: half of a 2 MiB L2, twice a 512 KiB one, where the second read comes
// from L3, still not from memory). Measured on a 2 MiB-L2 Xeon, backward in one process: channel by
// channel 1.19x the two passes at 784 KiB per channel, 0.93x-1.07x at 1.5-3 MiB.
bool by_channel(const Shape& s, int64_t bytes_per_value) {
  constexpr int64_t kChannelBytes = int64_t(1) << 20;
  return s.C >= at::get_num_threads() && s.N * s.HW * bytes_per_value <= kChannelBytes;
}

// The forward, NCHW, channel by channel: the channel's statistics (`cpu_stats::channel_moments`, the
// same bits as `_channel_stats`), the fold, and y while the planes are in cache. W, Bi: weight, bias.
// With kAdd, y = relu(z + res), res dense NCHW.
template <typename T, bool kAdd = false, bool kRelu = true>
void forward_by_channel(const T* t, const T* res, T* out, const float* W, const float* Bi, float eps, const Shape& s,
                        float* mean, float* var) {
  const int64_t C = s.C, HW = s.HW, N = s.N;
  at::parallel_for(0, C, grain_for(N * HW), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      cpu_stats::channel_moments(t + c * HW, N, C * HW, HW, mean + c, var + c);
      float a, b;
      bn_fold_one(W[c], Bi[c], mean[c], var[c], eps, &a, &b);
      for (int64_t n = 0; n < N; ++n)
        relu_plane<T, kAdd, kRelu>(t + (n * C + c) * HW, kAdd ? res + (n * C + c) * HW : nullptr,
                            out + (n * s.outP + c) * HW, HW, a, b);
    }
  });
}

// The training forward: the batch statistics (`_channel_stats`' bits), the fold, y = relu(z) (with
// kAdd, relu(z + res); without kRelu, z); NCHW channel by channel where a channel fits in cache.
template <typename T, bool kAdd = false, bool kRelu = true>
void train_forward(const T* t, const T* res, T* out, const float* W, const float* Bi, float eps, const Shape& s,
                   Layout L, float* mean, float* var) {
  const int64_t N = s.N, C = s.C, HW = s.HW;
  if (L == Layout::NCHW && by_channel(s, sizeof(T))) {
    forward_by_channel<T, kAdd, kRelu>(t, res, out, W, Bi, eps, s, mean, var);
    return;
  }
  if (L == Layout::NCHW) {
    cpu_stats::stats_nchw<T>(t, N, C, HW, mean, var);
  } else {
    cpu_stats::stats_nhwc<T>(t, N, C, HW, mean, var);
  }
  std::vector<float> A(C), B(C);
  for (int64_t c = 0; c < C; ++c) bn_fold_one(W[c], Bi[c], mean[c], var[c], eps, &A[c], &B[c]);
  pointwise<T, false, true, kAdd, kRelu>(t, res, out, A.data(), B.data(), nullptr, nullptr, nullptr, s, L);
}

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

// The backward passes' inputs: t in its layout L, dy checked against it and read in place when it is
// dense in L or a channel slice of such a buffer (dyP: its channel pitch), else copied.
struct BackwardInputs {
  Layout L;
  at::Tensor t, dy;
  int64_t dyP;
};

BackwardInputs backward_inputs(const char* op, const at::Tensor& dy_in, const at::Tensor& t_in) {
  check_full(op, t_in);
  TORCH_CHECK(dy_in.sizes() == t_in.sizes() && dy_in.scalar_type() == t_in.scalar_type() &&
                  dy_in.device() == t_in.device(),
              op, ": dy must match t's shape, dtype and device, got ", dy_in.sizes(), " ", dy_in.scalar_type(),
              " on ", dy_in.device());
  BackwardInputs in;
  in.L = layout_of(t_in);
  in.t = in_layout(t_in, in.L);
  in.dy = in_layout_or_slice(dy_in, in.L, &in.dyP);
  return in;
}
// The channel pitch of `out`, checked: t's shape, dtype and device, dense in layout L or a channel slice
// of such a tensor.
int64_t out_pitch(const char* op, const at::Tensor& out, const at::Tensor& t, Layout L) {
  TORCH_CHECK(out.device() == t.device() && out.sizes() == t.sizes() && out.scalar_type() == t.scalar_type(), op,
              ": out must match t's shape, dtype and device, got ", out.sizes(), " ", out.scalar_type(), " on ",
              out.device());
  const int64_t outP = channel_pitch(out, L);
  TORCH_CHECK(outP > 0, op, ": out must be dense in t's memory format or a channel slice of such a tensor, got "
              "strides ", out.strides());
  return outP;
}

// y = relu(t * scale + shift) written into `out`: t's shape, dtype and layout, dense or a channel
// slice of a concatenation buffer (written in place).
void affine_relu_into(const char* op, const at::Tensor& t_in, const at::Tensor& scale, const at::Tensor& shift,
                      const at::Tensor& out) {
  check_full(op, t_in);
  const Layout L = layout_for_out(t_in, out);
  const at::Tensor t = in_layout(t_in, L);
  const int64_t C = t.size(1);
  const int64_t outP = out_pitch(op, out, t, L);
  const auto A = vec_of(op, "scale", scale, C), B = vec_of(op, "shift", shift, C);
  if (t.numel() == 0) return;
  const Shape s{t.size(0), C, t.size(2) * t.size(3), C, outP};
  dispatch_dtype(t.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    pointwise<T, false>(t.data_ptr<T>(), nullptr, out.data_ptr<T>(), A.data(), B.data(), nullptr, nullptr, nullptr,
                        s, L);
  });
}

at::Tensor affine_relu(const at::Tensor& t, const at::Tensor& scale, const at::Tensor& shift) {
  const char* op = "scnet_fused::_affine_relu (cpu)";
  check_full(op, t);
  at::Tensor y = new_output(t.sizes(), t.options(), format_of(layout_of(t)));
  affine_relu_into(op, t, scale, shift, y);
  return y;
}

void affine_relu_out(const at::Tensor& t, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  affine_relu_into("scnet_fused::_affine_relu_out (cpu)", t, scale, shift, out);
}

// The residual checked against t (its shape, dtype and device), dense in layout L (copied there when
// it is in another).
at::Tensor residual_in_layout(const char* op, const at::Tensor& t, const at::Tensor& res, Layout L) {
  TORCH_CHECK(res.sizes() == t.sizes() && res.scalar_type() == t.scalar_type() && res.device() == t.device(), op,
              ": residual must match t's shape, dtype and device, got ", res.sizes(), " ", res.scalar_type(), " on ",
              res.device());
  return in_layout(res, L);
}

// y = relu(t * scale + shift + residual): residual of t's shape, dtype and device, read in t's layout
// (copied there when it is in another); y in t's layout.
at::Tensor affine_add_relu(const at::Tensor& t_in, const at::Tensor& res_in, const at::Tensor& scale,
                           const at::Tensor& shift) {
  const char* op = "scnet_fused::_affine_add_relu (cpu)";
  check_full(op, t_in);
  const Layout L = layout_of(t_in);
  const at::Tensor t = in_layout(t_in, L), res = residual_in_layout(op, t_in, res_in, L);
  const int64_t C = t.size(1);
  const auto A = vec_of(op, "scale", scale, C), B = vec_of(op, "shift", shift, C);
  at::Tensor y = new_output(t.sizes(), t.options(), format_of(L));
  if (t.numel() == 0) return y;
  const Shape s{t.size(0), C, t.size(2) * t.size(3), C, C};
  dispatch_dtype(t.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    pointwise<T, false, true, true>(t.data_ptr<T>(), res.data_ptr<T>(), y.data_ptr<T>(), A.data(), B.data(), nullptr,
                                    nullptr, nullptr, s, L);
  });
  return y;
}

// relu(batch_norm(t)) with batch statistics written into `out` (t's shape, dtype and layout, dense or a
// channel slice of a concatenation buffer); returns the float32 (mean, biased var). The statistics are
// `_channel_stats`' bits; then `_affine_relu_out` with bn_fold's scale and shift, in one call.
// The batch statistics (float32 mean, biased var) of t (dense in layout L, elements in every channel)
// and `train_forward` writing y into out (channel pitch outP); res: the residual (dense in L) or undefined.
std::tuple<at::Tensor, at::Tensor> train_forward_into(const char* op, const at::Tensor& t, const at::Tensor& res,
                                                      const at::Tensor& out, int64_t outP, const at::Tensor& weight,
                                                      const at::Tensor& bias, double eps, Layout L, bool relu = true) {
  const int64_t N = t.size(0), C = t.size(1), HW = t.size(2) * t.size(3);
  const auto W = vec_of(op, "weight", weight, C), Bi = vec_of(op, "bias", bias, C);
  at::Tensor mean = new_output({C}, t.options().dtype(at::kFloat));
  at::Tensor var = new_output({C}, t.options().dtype(at::kFloat));
  if (C == 0) return {mean, var};
  const Shape s{N, C, HW, C, outP};
  const float epsf = static_cast<float>(eps);
  float* mp = mean.data_ptr<float>();
  float* vp = var.data_ptr<float>();
  dispatch_dtype(t.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    if (res.defined()) {
      train_forward<T, true>(t.data_ptr<T>(), res.data_ptr<T>(), out.data_ptr<T>(), W.data(), Bi.data(), epsf, s, L,
                             mp, vp);
    } else if (relu) {
      train_forward<T>(t.data_ptr<T>(), nullptr, out.data_ptr<T>(), W.data(), Bi.data(), epsf, s, L, mp, vp);
    } else {
      train_forward<T, false, false>(t.data_ptr<T>(), nullptr, out.data_ptr<T>(), W.data(), Bi.data(), epsf, s, L,
                                     mp, vp);
    }
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> train_out(const char* op, const at::Tensor& t_in, const at::Tensor& weight,
                                             const at::Tensor& bias, double eps, const at::Tensor& out, bool relu) {
  check_full(op, t_in);
  const Layout L = layout_for_out(t_in, out);
  const at::Tensor t = in_layout(t_in, L);
  TORCH_CHECK(t.size(0) * t.size(2) * t.size(3) > 0, op, ": t has no elements per channel, shape ", t.sizes());
  return train_forward_into(op, t, at::Tensor(), out, out_pitch(op, out, t, L), weight, bias, eps, L, relu);
}

std::tuple<at::Tensor, at::Tensor> bn_relu_train_out(const at::Tensor& t, const at::Tensor& weight,
                                                     const at::Tensor& bias, double eps, const at::Tensor& out) {
  return train_out("scnet_fused::_bn_relu_train_out (cpu)", t, weight, bias, eps, out, true);
}

// batch_norm(t) with batch statistics (no activation) written into `out`, as `_bn_relu_train_out`.
std::tuple<at::Tensor, at::Tensor> bn_train_out(const at::Tensor& t, const at::Tensor& weight,
                                                const at::Tensor& bias, double eps, const at::Tensor& out) {
  return train_out("scnet_fused::_bn_train_out (cpu)", t, weight, bias, eps, out, false);
}

std::tuple<at::Tensor, at::Tensor> affine_relu_backward_sums(const at::Tensor& dy_in, const at::Tensor& t_in,
                                                             const at::Tensor& scale, const at::Tensor& shift,
                                                             const at::Tensor& center) {
  const char* op = "scnet_fused::_affine_relu_backward_sums (cpu)";
  const BackwardInputs in = backward_inputs(op, dy_in, t_in);
  const Layout L = in.L;
  const at::Tensor &t = in.t, &dy = in.dy;
  const int64_t dyP = in.dyP, C = t.size(1);
  const auto A = vec_of(op, "scale", scale, C), B = vec_of(op, "shift", shift, C), K = vec_of(op, "center", center, C);
  at::Tensor sum_g = at::zeros({C}, t.options().dtype(at::kFloat));
  at::Tensor sum_gc = at::zeros({C}, t.options().dtype(at::kFloat));
  if (t.numel() == 0) return {sum_g, sum_gc};
  const Shape s{t.size(0), C, t.size(2) * t.size(3), dyP, C};
  dispatch_dtype(t.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    sums<T>(t.data_ptr<T>(), dy.data_ptr<T>(), A.data(), B.data(), K.data(), s, L, sum_g.data_ptr<float>(),
            sum_gc.data_ptr<float>());
  });
  return {sum_g, sum_gc};
}

at::Tensor affine_relu_backward_apply(const at::Tensor& dy_in, const at::Tensor& t_in, const at::Tensor& scale,
                                      const at::Tensor& shift, const at::Tensor& p, const at::Tensor& q,
                                      const at::Tensor& r) {
  const char* op = "scnet_fused::_affine_relu_backward_apply (cpu)";
  const BackwardInputs in = backward_inputs(op, dy_in, t_in);
  const Layout L = in.L;
  const at::Tensor &t = in.t, &dy = in.dy;
  const int64_t dyP = in.dyP, C = t.size(1);
  const auto A = vec_of(op, "scale", scale, C), B = vec_of(op, "shift", shift, C);
  const auto P = vec_of(op, "p", p, C), Q = vec_of(op, "q", q, C), R = vec_of(op, "r", r, C);
  at::Tensor dt = new_output(t.sizes(), t.options(), format_of(L));
  if (t.numel() == 0) return dt;
  const Shape s{t.size(0), C, t.size(2) * t.size(3), dyP, C};
  dispatch_dtype(t.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    pointwise<T, true>(t.data_ptr<T>(), dy.data_ptr<T>(), dt.data_ptr<T>(), A.data(), B.data(), P.data(), Q.data(),
                       R.data(), s, L);
  });
  return dt;
}

// What the BatchNorm backwards need per channel: the batch mean K, the fold's scale A and shift B, and
// invstd IS (bn_fold's expressions).
struct BackwardFold {
  std::vector<float> K, A, B, IS;
};

BackwardFold backward_fold(const char* op, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
                           const at::Tensor& var, double eps, int64_t C) {
  const auto W = vec_of(op, "weight", weight, C), Bi = vec_of(op, "bias", bias, C);
  BackwardFold f{vec_of(op, "mean", mean, C), std::vector<float>(C), std::vector<float>(C), std::vector<float>(C)};
  const auto V = vec_of(op, "var", var, C);
  for (int64_t c = 0; c < C; ++c)
    bn_fold_one(W[c], Bi[c], f.K[c], V[c], static_cast<float>(eps), &f.A[c], &f.B[c], &f.IS[c]);
  return f;
}

// (dt, dweight, dbias) of relu(batch_norm(t)) (relu) or batch_norm(t) with the batch statistics (mean,
// biased var; float32 dweight and dbias): BatchNorm folded to scale and shift (bn_fold), the sums,
// dweight = sum_gc * invstd, dbias = sum_g, then dt = scale * g + q * t + r with q, r from the sums. One
// call for what `affine_relu_backward_sums` and `_apply` do with the per-channel algebra in ATen in
// between. Without the ReLU the mask is one that never applies (0 * t + 1 is never <= 0, NaN neither).
std::tuple<at::Tensor, at::Tensor, at::Tensor> train_backward(const char* op, const at::Tensor& dy_in,
                                                              const at::Tensor& t_in, const at::Tensor& weight,
                                                              const at::Tensor& bias, const at::Tensor& mean,
                                                              const at::Tensor& var, double eps, bool relu) {
  const BackwardInputs in = backward_inputs(op, dy_in, t_in);
  const Layout L = in.L;
  const at::Tensor &t = in.t, &dy = in.dy;
  const int64_t C = t.size(1);
  const BackwardFold f = backward_fold(op, weight, bias, mean, var, eps, C);
  const std::vector<float>&A = f.A, &B = f.B, &K = f.K, &IS = f.IS;
  std::vector<float> off, on;
  if (!relu) off.assign(C, 0.0f), on.assign(C, 1.0f);
  const float* MA = relu ? A.data() : off.data();  // the mask: relu(MA * t + MB)
  const float* MB = relu ? B.data() : on.data();
  at::Tensor dweight = at::zeros({C}, t.options().dtype(at::kFloat));
  at::Tensor dbias = at::zeros({C}, t.options().dtype(at::kFloat));
  at::Tensor dt = new_output(t.sizes(), t.options(), format_of(L));
  if (t.numel() == 0) return {dt, dweight, dbias};
  const Shape s{t.size(0), C, t.size(2) * t.size(3), in.dyP, C};
  std::vector<float> sgc(C);
  float* sg = dbias.data_ptr<float>();  // dbias = sum g
  dispatch_dtype(t.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    if (L == Layout::NCHW && by_channel(s, 2 * sizeof(T))) {
      backward_by_channel<T>(t.data_ptr<T>(), dy.data_ptr<T>(), dt.data_ptr<T>(), MA, MB, K.data(), IS.data(), s, sg,
                             sgc.data(), nullptr, nullptr, A.data());
      return;
    }
    sums<T>(t.data_ptr<T>(), dy.data_ptr<T>(), MA, MB, K.data(), s, L, sg, sgc.data());
    const float m = static_cast<float>(static_cast<double>(s.N * s.HW));
    std::vector<float> Q(C), R(C);
    for (int64_t c = 0; c < C; ++c) bn_input_affine(sg[c], sgc[c], A[c], IS[c], K[c], m, &Q[c], &R[c]);
    pointwise<T, true>(t.data_ptr<T>(), dy.data_ptr<T>(), dt.data_ptr<T>(), MA, MB, A.data(), Q.data(), R.data(), s,
                       L);
  });
  float* dw = dweight.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) dw[c] = sgc[c] * IS[c];
  return {dt, dweight, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_backward(const at::Tensor& dy, const at::Tensor& t,
                                                                      const at::Tensor& weight, const at::Tensor& bias,
                                                                      const at::Tensor& mean, const at::Tensor& var,
                                                                      double eps) {
  return train_backward("scnet_fused::_bn_relu_train_backward (cpu)", dy, t, weight, bias, mean, var, eps, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_backward(const at::Tensor& dy, const at::Tensor& t,
                                                                 const at::Tensor& weight, const at::Tensor& bias,
                                                                 const at::Tensor& mean, const at::Tensor& var,
                                                                 double eps) {
  return train_backward("scnet_fused::_bn_train_backward (cpu)", dy, t, weight, bias, mean, var, eps, false);
}

// d += q * t + r per channel, in place: d dense in t's memory format, of t's shape, dtype and device.
void add_channel_affine_(const at::Tensor& d, const at::Tensor& t_in, const at::Tensor& q, const at::Tensor& r) {
  const char* op = "scnet_fused::_add_channel_affine_ (cpu)";
  check_full(op, t_in);
  TORCH_CHECK(d.sizes() == t_in.sizes() && d.scalar_type() == t_in.scalar_type() && d.device() == t_in.device(), op,
              ": d must match t's shape, dtype and device, got ", d.sizes(), " ", d.scalar_type(), " on ", d.device());
  const Layout L = layout_of(t_in);
  TORCH_CHECK(d.is_contiguous(format_of(L)), op, ": d is written in place and must be dense in t's memory format (",
              L == Layout::NCHW ? "contiguous" : "channels_last", "), got strides ", d.strides());
  const at::Tensor t = in_layout(t_in, L);
  const int64_t C = t.size(1);
  const auto Q = vec_of(op, "q", q, C), R = vec_of(op, "r", r, C);
  if (t.numel() == 0) return;
  const std::vector<float> P(C, 1.0f);
  const Shape s{t.size(0), C, t.size(2) * t.size(3), C, C};
  dispatch_dtype(t.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    // No mask: scale and shift are not read (P stands in for them).
    pointwise<T, true, false>(t.data_ptr<T>(), d.data_ptr<T>(), d.data_ptr<T>(), P.data(), P.data(), P.data(),
                              Q.data(), R.data(), s, L);
  });
}

// relu(batch_norm(t) + residual) with batch statistics: (y, mean, var), y in t's layout, the residual
// read in it (copied there if it is in another). The statistics are `_channel_stats`' bits.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_add_relu_train_forward(const at::Tensor& t_in,
                                                                         const at::Tensor& res_in,
                                                                         const at::Tensor& weight,
                                                                         const at::Tensor& bias, double eps) {
  const char* op = "scnet_fused::_bn_add_relu_train_forward (cpu)";
  check_full(op, t_in);
  const Layout L = layout_of(t_in);
  const at::Tensor t = in_layout(t_in, L), res = residual_in_layout(op, t_in, res_in, L);
  TORCH_CHECK(t.size(0) * t.size(2) * t.size(3) > 0, op, ": t has no elements per channel, shape ", t.sizes());
  at::Tensor y = new_output(t.sizes(), t.options(), format_of(L));
  auto [mean, var] = train_forward_into(op, t, res, y, t.size(1), weight, bias, eps, L);
  return {y, mean, var};
}

// (dt, dweight, dbias, dresidual) of relu(batch_norm(t) + residual) from its output y: g = dy where
// !(y <= 0) (= dresidual), BatchNorm's sums of g, dweight = sum_gc * invstd, dbias = sum_g, then
// dt = scale * g + q * t + r. NCHW channel by channel where a channel fits in cache.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_relu_train_backward(
    const at::Tensor& dy_in, const at::Tensor& y_in, const at::Tensor& t_in, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var, double eps) {
  const char* op = "scnet_fused::_bn_add_relu_train_backward (cpu)";
  check_full(op, t_in);
  for (const at::Tensor* v : {&dy_in, &y_in}) {
    TORCH_CHECK(v->sizes() == t_in.sizes() && v->scalar_type() == t_in.scalar_type() && v->device() == t_in.device(),
                op, ": dy and y must match t's shape, dtype and device, got ", v->sizes(), " ", v->scalar_type(),
                " on ", v->device());
  }
  const Layout L = layout_of(t_in);
  const at::Tensor t = in_layout(t_in, L), dy = in_layout(dy_in, L), y = in_layout(y_in, L);
  const int64_t C = t.size(1);
  const BackwardFold f = backward_fold(op, weight, bias, mean, var, eps, C);
  const std::vector<float>&A = f.A, &B = f.B, &K = f.K, &IS = f.IS;
  at::Tensor dweight = at::zeros({C}, t.options().dtype(at::kFloat));
  at::Tensor dbias = at::zeros({C}, t.options().dtype(at::kFloat));
  at::Tensor dt = new_output(t.sizes(), t.options(), format_of(L));
  at::Tensor g = new_output(t.sizes(), t.options(), format_of(L));
  if (t.numel() == 0) return {dt, dweight, dbias, g};
  const Shape s{t.size(0), C, t.size(2) * t.size(3), C, C};
  std::vector<float> sgc(C);
  const std::vector<float> one(C, 1.0f), zero(C, 0.0f);  // the NHWC sums' mask that never applies
  float* sg = dbias.data_ptr<float>();
  dispatch_dtype(t.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    if (L == Layout::NCHW && by_channel(s, 3 * sizeof(T))) {
      backward_by_channel<T, true>(t.data_ptr<T>(), dy.data_ptr<T>(), dt.data_ptr<T>(), A.data(), B.data(), K.data(),
                                   IS.data(), s, sg, sgc.data(), y.data_ptr<T>(), g.data_ptr<T>());
      return;
    }
    if (L == Layout::NCHW) {
      sums<T, true>(t.data_ptr<T>(), dy.data_ptr<T>(), nullptr, nullptr, K.data(), s, L, sg, sgc.data(),
                    y.data_ptr<T>(), g.data_ptr<T>());
    } else {
      // NHWC: g in a streaming pass of its own, then the sums of g with a mask that never applies
      // (0 * t + 1), the same arithmetic and so the same bits as `sums<T, true>`. Writing g inside
      // the sums' channel chunks (each chunk walks a run of pixel rows C values apart) took 3.4 ms at
      // 8x1024x14x14 where the three passes take 1.2 (Intel Xeon).
      mask_by_output<T>(dy.data_ptr<T>(), y.data_ptr<T>(), g.data_ptr<T>(), s.N * s.C * s.HW);
      sums<T>(t.data_ptr<T>(), g.data_ptr<T>(), zero.data(), one.data(), K.data(), s, L, sg, sgc.data());
    }
    const float m = static_cast<float>(static_cast<double>(s.N * s.HW));
    std::vector<float> Q(C), R(C);
    for (int64_t c = 0; c < C; ++c) bn_input_affine(sg[c], sgc[c], A[c], IS[c], K[c], m, &Q[c], &R[c]);
    // unmasked (g is already masked): scale and shift are not read
    pointwise<T, true, false>(t.data_ptr<T>(), g.data_ptr<T>(), dt.data_ptr<T>(), A.data(), A.data(), A.data(),
                              Q.data(), R.data(), s, L);
  });
  float* dw = dweight.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) dw[c] = sgc[c] * IS[c];
  return {dt, dweight, dbias, g};
}

}  // namespace
}  // namespace cpu_bn_relu
}  // namespace scnet_fused

TORCH_LIBRARY_IMPL(scnet_fused, CPU, m) {
  m.impl("_affine_relu", &scnet_fused::cpu_bn_relu::affine_relu);
  m.impl("_affine_relu_out", &scnet_fused::cpu_bn_relu::affine_relu_out);
  m.impl("_affine_add_relu", &scnet_fused::cpu_bn_relu::affine_add_relu);
  m.impl("_affine_relu_backward_sums", &scnet_fused::cpu_bn_relu::affine_relu_backward_sums);
  m.impl("_affine_relu_backward_apply", &scnet_fused::cpu_bn_relu::affine_relu_backward_apply);
  m.impl("_add_channel_affine_", &scnet_fused::cpu_bn_relu::add_channel_affine_);
  m.impl("_bn_relu_train_backward", &scnet_fused::cpu_bn_relu::bn_relu_train_backward);
  m.impl("_bn_relu_train_out", &scnet_fused::cpu_bn_relu::bn_relu_train_out);
  m.impl("_bn_train_backward", &scnet_fused::cpu_bn_relu::bn_train_backward);
  m.impl("_bn_train_out", &scnet_fused::cpu_bn_relu::bn_train_out);
  m.impl("_bn_add_relu_train_forward", &scnet_fused::cpu_bn_relu::bn_add_relu_train_forward);
  m.impl("_bn_add_relu_train_backward", &scnet_fused::cpu_bn_relu::bn_add_relu_train_backward);
}
