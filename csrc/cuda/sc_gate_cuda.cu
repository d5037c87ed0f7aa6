// CUDA kernels of the gate primitives (contract: scnet_fused/ops/_dispatch.py).
//
// Layouts NCHW (contiguous) and NHWC (channels_last), read in place; float32 math for float32,
// float16 and bfloat16 storage; 16-byte vector loads and stores where the row (NCHW) or the pixel
// (NHWC) length and the pointers allow, one element per step otherwise; 32-bit index math below
// 2^31 elements, 64-bit above.
//
// Kernels:
//   pointwise_kernel        gate forward (y = affine(k3) * s) and the BN-training dk3
//                           (p * dy * s + q * k3 + r): one thread per V consecutive elements.
//   backward_cells_kernel   gate backward: one thread per upsampling cell (n, c, a, b) (NHWC: V
//                           channels per thread; NCHW maps whose column runs are all 4 long and start
//                           at multiples of 4, as 56 -> 14: a cell row as one Pack of 4). It owns
//                           dsmall[n, c, a, b] and writes that cell's partial sums of g and
//                           g * (k3 - center); no atomics.
//   channel_sum_kernel      per-channel sums of the cell partials, in a fixed order.
//   stats_*_kernel          per-channel shifted sums (x - K, (x - K)^2) per chunk, a 16-byte Pack per
//                           step where the pointer allows and (NCHW) HW or (NHWC, stats_nhwc_pack_kernel)
//                           C is a multiple of it (NHWC: at most 256 Packs a position), then
//   stats_finalize_kernel   mean and biased variance, chunks summed in a fixed order.
// Every reduction order depends on the shape and on whether the pointers allow 16-byte Packs (a view
// at an odd offset sums in another grouping than its copy), never on timing: a run repeats bit for bit.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "sc_cuda_common.cuh"
#include "sc_gate_math.h"
#include "sc_cuda_load.h"
#include "sc_host.h"

namespace scnet_fused {
namespace cuda {
namespace {

using namespace ::scnet_fused::host;

using namespace ::scnet_fused::cuda_common;

// ------------------------------------------------------------------------------------------------
// Pointwise: gate forward and BN-training dk3.
// ------------------------------------------------------------------------------------------------
template <typename T>
struct PointwiseParams {
  const T* x;
  const T* dy;  // dk3 mode only
  const T* k;
  const T* small;
  T* out;
  const float* A;  // forward: scale (nullptr: 1); dk3: p
  const float* B;  // forward: shift (nullptr: 0); dk3: q
  const float* R;  // dk3: r (nullptr: 0)
  const float* small_scale;  // the pooled branch's affine (nullptr: none)
  const float* small_shift;
  int64_t C, H, W, h, w;
  float scale_h, scale_w;
  bool k3_mode;
};

template <typename T, typename I, bool kNHWC, int V>
__global__ void __launch_bounds__(kThreads) pointwise_kernel(const PointwiseParams<T> p, const I nvec) {
  const I C = static_cast<I>(p.C), H = static_cast<I>(p.H), W = static_cast<I>(p.W);
  const I h = static_cast<I>(p.h), w = static_cast<I>(p.w);
  const I stride = static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
  for (I v = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x); v < nvec;
       v += stride) {
    const I base = v * static_cast<I>(V);
    // The V elements share (n, c, i) in NCHW (W % V == 0) or (n, i, j) in NHWC (C % V == 0).
    I n, c, i, j;
    unflatten<kNHWC>(base, C, H, W, n, c, i, j);
    const I ra = static_cast<I>(nearest_source(static_cast<int64_t>(i), p.scale_h, p.h, p.H));
    float xv[V], kv[V], dv[V], o[V];
    load_f<T, V>(p.x + base, xv);
    load_f<T, V>(p.k + base, kv);
    if (p.k3_mode) {
      load_f<T, V>(p.dy + base, dv);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) dv[e] = 0.0f;
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const I ce = kNHWC ? c + static_cast<I>(e) : c;
      const I je = kNHWC ? j : j + static_cast<I>(e);
      const I cb = static_cast<I>(nearest_source(static_cast<int64_t>(je), p.scale_w, p.w, p.W));
      float u = static_cast<float>(p.small[((n * C + ce) * h + ra) * w + cb]);
      if (p.small_scale) u = small_affine_apply(u, p.small_scale[ce], p.small_shift[ce]);
      const float s = gate_sigmoid(xv[e] + u);
      const float A = p.A ? p.A[ce] : 1.0f;
      const float B = p.B ? p.B[ce] : 0.0f;
      if (p.k3_mode) {
        const float R = p.R ? p.R[ce] : 0.0f;
        o[e] = bn_train_input_grad(A, gate_grad_a(dv[e], s), B, kv[e], R);
      } else {
        // without scale and shift: k3 * s (k3 = -0 gives -0, as the CPU kernels and eager)
        o[e] = gate_value(p.A || p.B ? affine_apply(kv[e], A, B) : kv[e], s);
      }
    }
    store_f<T, V>(p.out + base, o);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward: one thread per cell.
// ------------------------------------------------------------------------------------------------
template <typename T>
struct BackwardParams {
  const T* dy;
  const T* x;
  const T* small;
  const T* k;
  T* dx;
  T* dsmall;
  T* dk3;               // nullptr when not needed
  const float* scale;   // nullptr: 1
  const float* shift;   // nullptr: 0
  const float* center;  // nullptr: 0
  const float* small_scale;  // the pooled branch's affine (nullptr: none)
  const float* small_shift;
  float* part_g;        // [N, C, h, w]: sum of g over the cell (nullptr: not needed)
  float* part_gk;       // [N, C, h, w]: sum of g * (k3 - center) over the cell (nullptr: not needed)
  int64_t C, H, W, h, w;
  float scale_h, scale_w;
};

// One element of the gate backward: dx (dz) and dk3 (g * scale) out, the cell's sums of dz, g and
// g * (k3 - center) advanced.
__device__ __forceinline__ void backward_element(float xv, float kv, float dv, float up, float sc, float sf, float ct,
                                                 float& dxo, float& dko, float& acc_dz, float& acc_g, float& acc_gk) {
  const float s = gate_sigmoid(xv + up);
  const float g = gate_grad_a(dv, s);
  const float dz = gate_grad_z(dv, affine_apply(kv, sc, sf), s);
  dxo = dz;
  dko = g * sc;
  acc_dz += dz;
  acc_g += g;
  acc_gk += g * (kv - ct);
}

// The V elements at offset off (one Pack of x, k3 and dy in, one of dx and dk3 out): element(e, x, k3,
// dy, dx, dk3) computes each (the caller's per-channel constants and cell sums).
template <typename T, int V, typename I, typename F>
__device__ __forceinline__ void backward_pack(const BackwardParams<T>& p, I off, F&& element) {
  float xv[V], kv[V], dv[V], dxo[V], dko[V];
  load_f<T, V>(p.x + off, xv);
  load_f<T, V>(p.k + off, kv);
  load_f<T, V>(p.dy + off, dv);
#pragma unroll
  for (int e = 0; e < V; ++e) element(e, xv[e], kv[e], dv[e], dxo[e], dko[e]);
  store_f<T, V>(p.dx + off, dxo);
  if (p.dk3 != nullptr) store_f<T, V>(p.dk3 + off, dko);
}

template <typename T, typename I, bool kNHWC, int V>
__global__ void __launch_bounds__(kThreads) backward_cells_kernel(const BackwardParams<T> p, const I nunits) {
  const I C = static_cast<I>(p.C), H = static_cast<I>(p.H), W = static_cast<I>(p.W);
  const I h = static_cast<I>(p.h), w = static_cast<I>(p.w);
  const I stride = static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
  for (I u = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x); u < nunits;
       u += stride) {
    // NCHW units: (n, c, ra, cb) with cb fastest. NHWC units: (n, ra, cb, channel group) with the
    // channel group fastest, so neighbouring threads read neighbouring channels.
    I n, c0, ra, cb;
    if (kNHWC) {  // units are (n, ra, cb, channel group of V): unflatten over C / V groups
      unflatten<true>(u, C / static_cast<I>(V), h, w, n, c0, ra, cb);
      c0 *= static_cast<I>(V);
    } else {
      unflatten<false>(u, C, h, w, n, c0, ra, cb);
    }
    const I i0 = static_cast<I>(cell_start(static_cast<int64_t>(ra), p.scale_h, p.h, p.H));
    const I i1 = static_cast<I>(cell_start(static_cast<int64_t>(ra) + 1, p.scale_h, p.h, p.H));
    if constexpr (!kNHWC && V > 1) {
      // NCHW cells whose column runs are all V long and start at multiples of V (the launcher checks
      // the map): a cell row is one Pack. One channel per unit; the same terms added in the same order
      // as the one-element path, so the same bits.
      const I c = c0, j0 = cb * static_cast<I>(V);
      const I sidx = ((n * C + c) * h + ra) * w + cb;
      float up = static_cast<float>(p.small[sidx]);
      if (p.small_scale) up = small_affine_apply(up, p.small_scale[c], p.small_shift[c]);
      const float sc = p.scale ? p.scale[c] : 1.0f;
      const float sf = p.shift ? p.shift[c] : 0.0f;
      const float ct = p.center ? p.center[c] : 0.0f;
      float acc_dz = 0.0f, acc_g = 0.0f, acc_gk = 0.0f;
      for (I i = i0; i < i1; ++i) {
        backward_pack<T, V>(p, ((n * C + c) * H + i) * W + j0,
                            [&](int, float xv, float kv, float dv, float& dxo, float& dko) {
                              backward_element(xv, kv, dv, up, sc, sf, ct, dxo, dko, acc_dz, acc_g, acc_gk);
                            });
      }
      p.dsmall[sidx] = static_cast<T>(acc_dz);
      if (p.part_g != nullptr) {
        p.part_g[sidx] = acc_g;
        p.part_gk[sidx] = acc_gk;
      }
      continue;
    }
    const I j0 = static_cast<I>(cell_start(static_cast<int64_t>(cb), p.scale_w, p.w, p.W));
    const I j1 = static_cast<I>(cell_start(static_cast<int64_t>(cb) + 1, p.scale_w, p.w, p.W));

    float up[V], sc[V], sf[V], ct[V], acc_dz[V], acc_g[V], acc_gk[V];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const I ce = c0 + static_cast<I>(e);
      up[e] = static_cast<float>(p.small[((n * C + ce) * h + ra) * w + cb]);
      if (p.small_scale) up[e] = small_affine_apply(up[e], p.small_scale[ce], p.small_shift[ce]);
      sc[e] = p.scale ? p.scale[ce] : 1.0f;
      sf[e] = p.shift ? p.shift[ce] : 0.0f;
      ct[e] = p.center ? p.center[ce] : 0.0f;
      acc_dz[e] = 0.0f;
      acc_g[e] = 0.0f;
      acc_gk[e] = 0.0f;
    }
    for (I i = i0; i < i1; ++i) {
      for (I j = j0; j < j1; ++j) {
        const I off = kNHWC ? ((n * H + i) * W + j) * C + c0 : ((n * C + c0) * H + i) * W + j;
        backward_pack<T, V>(p, off, [&](int e, float xv, float kv, float dv, float& dxo, float& dko) {
          backward_element(xv, kv, dv, up[e], sc[e], sf[e], ct[e], dxo, dko, acc_dz[e], acc_g[e], acc_gk[e]);
        });
      }
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const I sidx = ((n * C + c0 + static_cast<I>(e)) * h + ra) * w + cb;
      p.dsmall[sidx] = static_cast<T>(acc_dz[e]);
      if (p.part_g != nullptr) {
        p.part_g[sidx] = acc_g[e];
        p.part_gk[sidx] = acc_gk[e];
      }
    }
  }
}

// sum_g[c] = sum over (n, cell) of part_g[n, c, cell]; one block of kThreads per channel.
__global__ void __launch_bounds__(kThreads) channel_sum_kernel(const float* part_g, const float* part_gk, int64_t N,
                                                               int64_t C, int64_t hw, float* sum_g, float* sum_gk) {
  __shared__ double smem[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t M = N * hw;
  double sg = 0.0, sgk = 0.0;
  ChannelWalk at(threadIdx.x, hw, kThreads);
  for (int64_t m = threadIdx.x; m < M; m += kThreads, at.advance()) {
    const int64_t idx = at.offset<1>(c, C);
    sg += static_cast<double>(part_g[idx]);
    sgk += static_cast<double>(part_gk[idx]);
  }
  const double tg = block_sum(sg, smem);
  const double tgk = block_sum(sgk, smem);
  if (threadIdx.x == 0) {
    sum_g[c] = static_cast<float>(tg);
    sum_gk[c] = static_cast<float>(tgk);
  }
}

// ------------------------------------------------------------------------------------------------
// Channel statistics. Values are shifted by K[c] (the channel's first element) before summing.
// part: [C, nchunk, 2] doubles.
// ------------------------------------------------------------------------------------------------
// NCHW: one block per (channel, chunk of `chunk` vectors of V values); V = 16 / sizeof(T) (one 16-byte
// Pack) when HW is a multiple of it and t is aligned, else 1.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) stats_nchw_kernel(const T* t, int64_t N, int64_t C, int64_t HW,
                                                              int64_t chunk, double* part) {
  __shared__ double smem[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t k = blockIdx.y;
  const int64_t nchunk = gridDim.y;
  const float K = static_cast<float>(t[c * HW]);
  const int64_t HWv = HW / V, Mv = N * HWv;
  const int64_t u0 = k * chunk + threadIdx.x;
  const int64_t u1 = k * chunk + chunk < Mv ? k * chunk + chunk : Mv;
  float s1 = 0.0f, s2 = 0.0f;
  if (u0 < u1) {
    ChannelWalk w(u0, HWv, kThreads);
    for (int64_t u = u0; u < u1; u += kThreads, w.advance()) {
      float v[V];
      load_f<T, V>(t + w.offset<V>(c, C), v);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float d = v[e] - K;
        s1 += d;
        s2 += d * d;
      }
    }
  }
  const double t1 = block_sum(static_cast<double>(s1), smem);
  const double t2 = block_sum(static_cast<double>(s2), smem);
  if (threadIdx.x == 0) {
    part[(c * nchunk + k) * 2 + 0] = t1;
    part[(c * nchunk + k) * 2 + 1] = t2;
  }
}

template <typename T>
__global__ void __launch_bounds__(kColCh* kColLanes) stats_nhwc_kernel(const T* t, int64_t P, int64_t C,
                                                                         int64_t chunk, double* part) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColCh + threadIdx.x;
  const int64_t k = blockIdx.y;
  const int64_t nchunk = gridDim.y;
  const int64_t p0 = k * chunk;
  const int64_t p1 = p0 + chunk < P ? p0 + chunk : P;
  float s1 = 0.0f, s2 = 0.0f;
  if (c < C) {
    const float K = static_cast<float>(t[c]);
    for (int64_t q = p0 + threadIdx.y; q < p1; q += kColLanes) {
      const float d = static_cast<float>(t[q * C + c]) - K;
      s1 += d;
      s2 += d * d;
    }
  }
  double a1, a2;
  if (column_sums(s1, s2, a1, a2) && c < C) {
    part[(c * nchunk + k) * 2 + 0] = a1;
    part[(c * nchunk + k) * 2 + 1] = a2;
  }
}

// NHWC by 16-byte Packs (PackRows: C a multiple of V, at most kThreads Packs a position, t aligned):
// one block per chunk of `chunk` positions, each thread V channels of float partials.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) stats_nhwc_pack_kernel(const T* t, int64_t P, int64_t C, int64_t chunk,
                                                                   double* part) {
  const PackRows r(C, V);
  const int64_t c0 = static_cast<int64_t>(r.g) * V;
  float s1[V] = {}, s2[V] = {}, K[V];
  load_f<T, V>(t + c0, K);  // position 0 (g < G for the idle threads too)
  walk_positions(r, chunk, P, [&](int64_t q) {
    float v[V];
    load_f<T, V>(t + q * C + c0, v);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float d = v[e] - K[e];
      s1[e] += d;
      s2[e] += d * d;
    }
  });
  store_group_sums<V>(r, s1, s2, part);
}

// K[c] = t[c * kstride]; count = values per channel.
template <typename T>
__global__ void __launch_bounds__(kThreads) stats_finalize_kernel(const T* t, int64_t C, int64_t kstride,
                                                                  int64_t nchunk, double count, const double* part,
                                                                  float* mean, float* var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= C) return;
  double a1 = 0.0, a2 = 0.0;
  for (int64_t k = 0; k < nchunk; ++k) {
    a1 += part[(c * nchunk + k) * 2 + 0];
    a2 += part[(c * nchunk + k) * 2 + 1];
  }
  const float K = static_cast<float>(t[c * kstride]);
  if (isfinite(a1) && isfinite(K) && isinf(a2)) {  // finite values whose float32 squares overflow
    mean[c] = static_cast<float>(static_cast<double>(K) + a1 / count);
    var[c] = __int_as_float(0x7f800000);  // +inf, as the CPU kernels (finalize_stats)
    return;
  }
  // NaN or Inf in the channel: NaN, as torch; so for finite values near the float32 maximum whose
  // per-thread float sums overflow (the CPU kernels, which add in double, give variance +inf there)
  if (!isfinite(a1) || !isfinite(a2) || !isfinite(K)) {
    mean[c] = var[c] = __int_as_float(0x7fc00000);
    return;
  }
  const double m1 = a1 / count;
  const double v = a2 / count - m1 * m1;
  mean[c] = static_cast<float>(static_cast<double>(K) + m1);
  var[c] = static_cast<float>(v > 0.0 ? v : 0.0);
}

// ------------------------------------------------------------------------------------------------
// Host side.
// ------------------------------------------------------------------------------------------------


// A float32 contiguous [C] copy on x's device, or an undefined tensor when absent.
at::Tensor per_channel(const char* op, const char* name, const c10::optional<at::Tensor>& t, const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
              t->device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), op, ": ", name, " must be 1-D with C=", x.size(1),
              " values, got ", t->sizes());
  return t->to(at::kFloat).contiguous();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// The pooled branch's affine as two float32 [C] tensors (both undefined when neither is given; a
// missing one is 1 or 0).
std::pair<at::Tensor, at::Tensor> small_affine(const char* op, const c10::optional<at::Tensor>& sc,
                                               const c10::optional<at::Tensor>& sh, const at::Tensor& x) {
  at::Tensor s = per_channel(op, "small_scale", sc, x), t = per_channel(op, "small_shift", sh, x);
  if (!s.defined() && !t.defined()) return {s, t};
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  return {s.defined() ? s : at::ones({x.size(1)}, f32), t.defined() ? t : at::zeros({x.size(1)}, f32)};
}

template <typename T, bool kNHWC, int V>
void launch_pointwise(const PointwiseParams<T>& p, int64_t numel, cudaStream_t stream) {
  const int64_t nvec = numel / V;
  const dim3 grid(static_cast<unsigned>(blocks_for(nvec)));
  if (fits_int32(numel)) {
    pointwise_kernel<T, uint32_t, kNHWC, V><<<grid, kThreads, 0, stream>>>(p, static_cast<uint32_t>(nvec));
  } else {
    pointwise_kernel<T, int64_t, kNHWC, V><<<grid, kThreads, 0, stream>>>(p, nvec);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor pointwise_op(const char* op, bool k3_mode, const at::Tensor& x_in, const at::Tensor& small_in,
                        const at::Tensor& k_in, const at::Tensor* dy_in, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& R, const std::pair<at::Tensor, at::Tensor>& sa) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Layout L = layout_of(x_in);
  const at::Tensor x = in_layout(x_in, L);
  const at::Tensor k = in_layout(k_in, L);
  const at::Tensor dy = dy_in ? in_layout(*dy_in, L) : at::Tensor();
  const at::Tensor small = small_in.contiguous();
  at::Tensor out = new_output(x.sizes(), x.options(), format_of(L));
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = kPackOf<T>;
    PointwiseParams<T> p;
    p.x = x.data_ptr<T>();
    p.dy = dy.defined() ? dy.data_ptr<T>() : nullptr;
    p.k = k.data_ptr<T>();
    p.small = small.data_ptr<T>();
    p.out = out.data_ptr<T>();
    p.A = ptr_or_null(A);
    p.B = ptr_or_null(B);
    p.R = ptr_or_null(R);
    p.small_scale = ptr_or_null(sa.first);
    p.small_shift = ptr_or_null(sa.second);
    p.C = x.size(1);
    p.H = x.size(2);
    p.W = x.size(3);
    p.h = small.size(2);
    p.w = small.size(3);
    p.scale_h = nearest_scale(p.h, p.H);
    p.scale_w = nearest_scale(p.w, p.W);
    p.k3_mode = k3_mode;
    const int64_t run = L == Layout::NHWC ? p.C : p.W;  // contiguous elements sharing (n, c, i) / (n, i, j)
    const bool vec = run % kVec == 0 && aligned16(p.x) && aligned16(p.dy) && aligned16(p.k) && aligned16(p.out);
    if (L == Layout::NHWC) {
      vec ? launch_pointwise<T, true, kVec>(p, numel, stream) : launch_pointwise<T, true, 1>(p, numel, stream);
    } else {
      vec ? launch_pointwise<T, false, kVec>(p, numel, stream) : launch_pointwise<T, false, 1>(p, numel, stream);
    }
  });
  return out;
}

at::Tensor gate_forward(const at::Tensor& x, const at::Tensor& small, const at::Tensor& k3,
                        const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                        const c10::optional<at::Tensor>& small_scale, const c10::optional<at::Tensor>& small_shift) {
  const char* op = "scnet_fused::_gate_forward (cuda)";
  check_gate(op, x, small, k3, c10::DeviceType::CUDA);
  return pointwise_op(op, false, x, small, k3, nullptr, per_channel(op, "scale", scale, x),
                      per_channel(op, "shift", shift, x), at::Tensor(), small_affine(op, small_scale, small_shift, x));
}

at::Tensor gate_backward_k3(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& small, const at::Tensor& k3,
                            const at::Tensor& p, const at::Tensor& q, const at::Tensor& r,
                            const c10::optional<at::Tensor>& small_scale,
                            const c10::optional<at::Tensor>& small_shift) {
  const char* op = "scnet_fused::_gate_backward_k3 (cuda)";
  check_gate(op, x, small, k3, c10::DeviceType::CUDA);
  check_full(op, "dy", dy, x);
  return pointwise_op(op, true, x, small, k3, &dy, per_channel(op, "p", p, x), per_channel(op, "q", q, x),
                      per_channel(op, "r", r, x), small_affine(op, small_scale, small_shift, x));
}

template <typename T, bool kNHWC, int V>
void launch_backward(const BackwardParams<T>& p, int64_t nunits, int64_t numel, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(blocks_for(nunits)));
  if (fits_int32(numel)) {
    backward_cells_kernel<T, uint32_t, kNHWC, V><<<grid, kThreads, 0, stream>>>(p, static_cast<uint32_t>(nunits));
  } else {
    backward_cells_kernel<T, int64_t, kNHWC, V><<<grid, kThreads, 0, stream>>>(p, nunits);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_backward(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& small_in, const at::Tensor& k3_in,
    const c10::optional<at::Tensor>& scale_in, const c10::optional<at::Tensor>& shift_in,
    const c10::optional<at::Tensor>& center_in, bool need_dk3, const c10::optional<at::Tensor>& small_scale,
    const c10::optional<at::Tensor>& small_shift, bool need_sums) {
  const char* op = "scnet_fused::_gate_backward (cuda)";
  check_gate(op, x_in, small_in, k3_in, c10::DeviceType::CUDA);
  check_full(op, "dy", dy_in, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor scale = per_channel(op, "scale", scale_in, x_in);
  const at::Tensor shift = per_channel(op, "shift", shift_in, x_in);
  const at::Tensor center = per_channel(op, "center", center_in, x_in);
  const auto sa = small_affine(op, small_scale, small_shift, x_in);

  const Layout L = layout_of(x_in);
  const at::Tensor x = in_layout(x_in, L);
  const at::Tensor k = in_layout(k3_in, L);
  const at::Tensor dy = in_layout(dy_in, L);
  const at::Tensor small = small_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor dx = new_output(x.sizes(), x.options(), format_of(L));
  at::Tensor dsmall = new_output(small.sizes(), small.options());
  at::Tensor dk3 = need_dk3 ? new_output(x.sizes(), x.options(), format_of(L)) : at::empty({0}, x.options());
  // Without need_sums the sums are empty and the kernel writes no partials.
  const int64_t nsum = need_sums ? C : 0;
  at::Tensor sum_g = new_output({nsum}, x.options().dtype(at::kFloat));
  at::Tensor sum_gk = new_output({nsum}, x.options().dtype(at::kFloat));
  const int64_t numel = x.numel();
  if (numel == 0) {
    dsmall.zero_();
    sum_g.zero_();
    sum_gk.zero_();
    return {dx, dsmall, dk3, sum_g, sum_gk};
  }
  TORCH_CHECK(C <= std::numeric_limits<int32_t>::max(), op, ": too many channels (", C, ")");
  const int64_t hw = small.size(2) * small.size(3);
  at::Tensor part = new_output({need_sums ? 2 * N * C * hw : 0}, x.options().dtype(at::kFloat));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = kPackOf<T>;
    BackwardParams<T> p;
    p.dy = dy.data_ptr<T>();
    p.x = x.data_ptr<T>();
    p.small = small.data_ptr<T>();
    p.k = k.data_ptr<T>();
    p.dx = dx.data_ptr<T>();
    p.dsmall = dsmall.data_ptr<T>();
    p.dk3 = need_dk3 ? dk3.data_ptr<T>() : nullptr;
    p.scale = ptr_or_null(scale);
    p.shift = ptr_or_null(shift);
    p.center = ptr_or_null(center);
    p.small_scale = ptr_or_null(sa.first);
    p.small_shift = ptr_or_null(sa.second);
    p.part_g = need_sums ? part.data_ptr<float>() : nullptr;
    p.part_gk = need_sums ? p.part_g + N * C * hw : nullptr;
    p.C = C;
    p.H = x.size(2);
    p.W = x.size(3);
    p.h = small.size(2);
    p.w = small.size(3);
    p.scale_h = nearest_scale(p.h, p.H);
    p.scale_w = nearest_scale(p.w, p.W);
    const int64_t cells = N * C * hw;
    if (L == Layout::NHWC) {
      const bool vec = C % kVec == 0 && aligned16(p.dy) && aligned16(p.x) && aligned16(p.k) && aligned16(p.dx) &&
                       aligned16(p.dk3);
      if (vec) {
        launch_backward<T, true, kVec>(p, cells / kVec, numel, stream);
      } else {
        launch_backward<T, true, 1>(p, cells, numel, stream);
      }
    } else if (uniform_cell_runs(4, p.scale_w, p.w, p.W) &&
               aligned_to(sizeof(Pack<T, 4>), p.dy, p.x, p.k, p.dx, p.dk3)) {
      launch_backward<T, false, 4>(p, cells, numel, stream);  // SCNet's 56 -> 14 and 28 -> 7
    } else {
      launch_backward<T, false, 1>(p, cells, numel, stream);
    }
  });
  if (need_sums) {
    channel_sum_kernel<<<static_cast<unsigned>(C), kThreads, 0, stream>>>(
        part.data_ptr<float>(), part.data_ptr<float>() + N * C * hw, N, C, hw, sum_g.data_ptr<float>(),
        sum_gk.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dx, dsmall, dk3, sum_g, sum_gk};
}

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& t_in) {
  const char* op = "scnet_fused::_channel_stats (cuda)";
  TORCH_CHECK(t_in.is_cuda(), op, ": t must be a CUDA tensor, got ", t_in.device());
  TORCH_CHECK(t_in.dim() == 4, op, ": t must be 4-D (N, C, H, W), got ", t_in.sizes());
  TORCH_CHECK(supported_dtype(t_in.scalar_type()), op, ": t must be float32, float16 or bfloat16, got ",
              t_in.scalar_type());
  const c10::cuda::CUDAGuard guard(t_in.device());
  const int64_t N = t_in.size(0), C = t_in.size(1), HW = t_in.size(2) * t_in.size(3);
  TORCH_CHECK(N * HW > 0, op, ": t has no elements per channel, shape ", t_in.sizes());
  at::Tensor mean = new_output({C}, t_in.options().dtype(at::kFloat));
  at::Tensor var = new_output({C}, t_in.options().dtype(at::kFloat));
  if (C == 0) return {mean, var};
  const Layout L = layout_of(t_in);
  const at::Tensor t = in_layout(t_in, L);
  const int64_t M = N * HW;  // values per channel
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
  dispatch_dtype(t.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = kPackOf<T>;
    const T* tp = t.data_ptr<T>();
    int64_t nchunk, kstride;
    at::Tensor part;
    if (L == Layout::NCHW) {
      const bool vec = HW % kVec == 0 && aligned16(tp);
      nchunk = std::min<int64_t>(64, (M + 4095) / 4096);
      const int64_t Mv = vec ? M / kVec : M;
      const int64_t chunk = (Mv + nchunk - 1) / nchunk;  // in vectors
      part = new_output({C * nchunk * 2}, t.options().dtype(at::kDouble));
      TORCH_CHECK(C <= std::numeric_limits<int32_t>::max(), op, ": too many channels (", C, ")");
      const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(nchunk));
      if (vec) {
        stats_nchw_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(tp, N, C, HW, chunk, part.data_ptr<double>());
      } else {
        stats_nchw_kernel<T, 1><<<grid, kThreads, 0, stream>>>(tp, N, C, HW, chunk, part.data_ptr<double>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      kstride = HW;
    } else if (pack_rows_fit(C, kVec) && aligned16(tp)) {
      const int64_t chunk = pack_rows_chunk(M, C, kVec);
      nchunk = (M + chunk - 1) / chunk;
      part = new_output({C * nchunk * 2}, t.options().dtype(at::kDouble));
      stats_nhwc_pack_kernel<T, kVec><<<static_cast<unsigned>(nchunk), kThreads, 0, stream>>>(
          tp, M, C, chunk, part.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      kstride = 1;
    } else {
      nchunk = std::min<int64_t>(64, (M + 255) / 256);
      const int64_t chunk = (M + nchunk - 1) / nchunk;
      part = new_output({C * nchunk * 2}, t.options().dtype(at::kDouble));
      const dim3 grid(static_cast<unsigned>((C + kColCh - 1) / kColCh), static_cast<unsigned>(nchunk));
      const dim3 block(kColCh, kColLanes);
      stats_nhwc_kernel<T><<<grid, block, 0, stream>>>(tp, M, C, chunk, part.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      kstride = 1;
    }
    const unsigned fblocks = static_cast<unsigned>((C + kThreads - 1) / kThreads);
    stats_finalize_kernel<T><<<fblocks, kThreads, 0, stream>>>(tp, C, kstride, nchunk, static_cast<double>(M),
                                                               part.data_ptr<double>(), mean.data_ptr<float>(),
                                                               var.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

}  // namespace
}  // namespace cuda

#ifndef SCNET_FUSED_CUDA_EMU
cudaError_t gate_kernels_load_status() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, cuda::channel_sum_kernel);
}

#define SCNET_FUSED_STR2(...) #__VA_ARGS__
#define SCNET_FUSED_STR(...) SCNET_FUSED_STR2(__VA_ARGS__)
const char* cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return SCNET_FUSED_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}
#endif

}  // namespace scnet_fused

TORCH_LIBRARY_IMPL(scnet_fused, CUDA, m) {
  m.impl("_gate_forward", &scnet_fused::cuda::gate_forward);
  m.impl("_gate_backward", &scnet_fused::cuda::gate_backward);
  m.impl("_gate_backward_k3", &scnet_fused::cuda::gate_backward_k3);
  m.impl("_channel_stats", &scnet_fused::cuda::channel_stats);
}
