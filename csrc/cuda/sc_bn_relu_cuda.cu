// CUDA kernels of BatchNorm + ReLU with batch statistics (contract: scnet_fused/ops/_dispatch.py; the
// math is stated in csrc/cpu/sc_bn_relu_cpu.cpp).
//
//   pointwise_kernel   y = relu(t * scale + shift) (+ a residual inside the ReLU: `_affine_add_relu`), or
//                      dt = p * g + q * t + r: a 16-byte vector per thread where the layout and
//                      alignment allow (else one element), grid-stride, channel from the flat index
//                      (NCHW or NHWC); y (`_affine_relu_out`) and dy may be channel slices of a
//                      concatenation buffer (channel pitch).
//   sums_kernel        NCHW: per (channel, chunk of N*H*W positions) block: sum g and g * (t - center)
//                      in float per thread, double across the block in a fixed tree order; a 16-byte
//                      Pack of t and of dy per step where HW and the pointers allow.
//   sums_nhwc_pack_kernel
//                      NHWC where C and dy's channel pitch are multiples of a 16-byte Pack (at most 256
//                      Packs a position) and t and dy are aligned: per chunk of positions, a thread reads
//                      a Pack of V channels of t and of dy per position (a warp 512 consecutive bytes);
//                      lanes summed in double in a fixed order.
//   sums_nhwc_kernel   NHWC otherwise: per (32 channels, chunk of positions) block, the channels on
//                      threadIdx.x so a warp reads 32 consecutive values; lanes summed likewise.
//   finalize_kernel    per channel: the chunks summed in order. Deterministic, no atomics.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "sc_cuda_common.cuh"
#include "sc_cuda_load.h"
#include "sc_host.h"

namespace scnet_fused {
namespace cuda_bn_relu {
namespace {

using namespace ::scnet_fused::host;
using namespace ::scnet_fused::cuda_common;

__device__ __forceinline__ float relu_f(float z) { return z <= 0.0f ? 0.0f : z; }  // NaN stays NaN
__device__ __forceinline__ float mask_f(float dy, float z) { return z <= 0.0f ? 0.0f : dy; }

template <typename T>
struct Params {
  const T* t;
  const T* dy;
  T* out;
  const float *A, *B, *P, *Q, *R, *K;
  int64_t C, HW;
  int64_t dyP, outP;  // channel pitch of dy and of out (C when dense; more for a slice of a concatenation)
};

// The element at flat index i (memory order of the dense (N, C, H, W) tensor, NCHW or NHWC): its
// channel, and its offset in a tensor of channel pitch `pitch` (i itself when pitch == C). The
// quotients are taken once per element (64-bit divisions are calls).
template <typename I, bool kNHWC>
struct Site {
  I i, c, q, n;  // NHWC: q = i / C (the position); NCHW: q = i / HW (the plane), n = q / C
  __device__ __forceinline__ Site(I i_, I C, I HW) : i(i_) {
    if (kNHWC) {
      q = i / C;
      c = i - q * C;
      n = 0;
    } else {
      q = i / HW;
      n = q / C;
      c = q - n * C;
    }
  }
  __device__ __forceinline__ I offset(I C, I HW, I pitch) const {
    if (pitch == C) return i;
    return kNHWC ? q * pitch + c : (n * pitch + c) * HW + (i - q * HW);
  }
};

// V per-channel values from c on: one value for all V (NCHW: the V elements share their channel), or
// channels c .. c + V - 1 (NHWC), read as float4 packs when V is a multiple of 4 (c is then a
// multiple of V and the vectors are 16-byte aligned: vec_of).
template <bool kNHWC, int V, typename I>
__device__ __forceinline__ void channel_vals(const float* a, I c, float (&out)[V]) {
  if constexpr (!kNHWC || V == 1) {
    const float v = a[c];
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = v;
  } else if constexpr (V % 4 == 0) {
#pragma unroll
    for (int k = 0; k < V; k += 4) {
      const Pack<float, 4> pk = load_pack<float, 4>(a + c + k);
#pragma unroll
      for (int e = 0; e < 4; ++e) out[k + e] = pk.v[e];
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = a[c + static_cast<I>(e)];
  }
}

// V consecutive elements per thread (one Pack of 16 bytes when V > 1), grid-stride over the nvec
// vectors. The V elements of a vector share their channel (NCHW: HW % V == 0) or are V consecutive
// channels of one position (NHWC: C % V == 0, and the pitches of dy and out multiples of V), so a
// vector is contiguous in a channel slice too; the launcher picks V > 1 only then, with every
// pointer 16-byte aligned.
template <typename T, typename I, bool kNHWC, bool kApply, int V>
__global__ void __launch_bounds__(kThreads) pointwise_kernel(const Params<T> p, const I nvec) {
  const I C = static_cast<I>(p.C), HW = static_cast<I>(p.HW);
  const I stride = static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
  for (I v = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x); v < nvec;
       v += stride) {
    const I i = v * static_cast<I>(V);
    const Site<I, kNHWC> at(i, C, HW);
    const I c = at.c;
    float tv[V], a[V], b[V], o[V];
    load_f<T, V>(p.t + i, tv);
    channel_vals<kNHWC, V>(p.A, c, a);
    channel_vals<kNHWC, V>(p.B, c, b);
    // dense dy / out (pitch C, the usual case): offset i, no index arithmetic
    if (kApply) {
      const I dyP = static_cast<I>(p.dyP);
      float d[V], pp[V], qq[V], rr[V];
      load_f<T, V>(p.dy + at.offset(C, HW, dyP), d);
      channel_vals<kNHWC, V>(p.P, c, pp);
      channel_vals<kNHWC, V>(p.Q, c, qq);
      channel_vals<kNHWC, V>(p.R, c, rr);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float g = mask_f(d[e], tv[e] * a[e] + b[e]);
        o[e] = pp[e] * g + qq[e] * tv[e] + rr[e];
      }
      store_f<T, V>(p.out + i, o);
    } else {
      const I outP = static_cast<I>(p.outP);
      // the residual (`_affine_add_relu`) comes in dy's place, dense in t's layout
      float res[V];
      if (p.dy) {
        load_f<T, V>(p.dy + i, res);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) res[e] = 0.0f;
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float z = tv[e] * a[e] + b[e];
        o[e] = relu_f(p.dy ? z + res[e] : z);
      }
      store_f<T, V>(p.out + at.offset(C, HW, outP), o);
    }
  }
}

// NCHW. part: [C, nchunk, 2] doubles. A block per (channel, chunk of `chunk` vectors of V values); V > 1
// (one 16-byte Pack) when HW is a multiple of V and t and dy are aligned.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) sums_kernel(const Params<T> p, int64_t N, int64_t chunk, double* part) {
  __shared__ double smem[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t k = blockIdx.y;
  const int64_t nchunk = gridDim.y;
  const int64_t C = p.C, HWv = p.HW / V, Mv = N * HWv;
  const int64_t u0 = k * chunk + threadIdx.x;
  const int64_t u1 = k * chunk + chunk < Mv ? k * chunk + chunk : Mv;
  const float a = p.A[c], b = p.B[c], kc = p.K[c];
  float s1 = 0.0f, s2 = 0.0f;
  if (u0 < u1) {
    ChannelWalk w(u0, HWv, kThreads);
    for (int64_t u = u0; u < u1; u += kThreads, w.advance()) {
      float tv[V], d[V];
      load_f<T, V>(p.t + w.offset<V>(c, C), tv);
      load_f<T, V>(p.dy + w.offset<V>(c, p.dyP), d);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float g = mask_f(d[e], tv[e] * a + b);
        s1 += g;
        s2 += g * (tv[e] - kc);
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

// NHWC: a block covers kColCh consecutive channels (threadIdx.x: coalesced reads along C) and a
// chunk of positions (kColLanes lanes on threadIdx.y); per-thread float partials, the lanes summed in
// double in a fixed order. Same part layout as sums_kernel.
template <typename T>
__global__ void __launch_bounds__(kColCh* kColLanes) sums_nhwc_kernel(const Params<T> p, int64_t P, int64_t chunk,
                                                                       double* part) {
  const int64_t C = p.C;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColCh + threadIdx.x;
  const int64_t k = blockIdx.y;
  const int64_t nchunk = gridDim.y;
  const int64_t q0 = k * chunk;
  const int64_t q1 = q0 + chunk < P ? q0 + chunk : P;
  float s1 = 0.0f, s2 = 0.0f;
  if (c < C) {
    const float a = p.A[c], b = p.B[c], kc = p.K[c];
    for (int64_t q = q0 + threadIdx.y; q < q1; q += kColLanes) {
      const float tv = static_cast<float>(p.t[q * C + c]);
      const float g = mask_f(static_cast<float>(p.dy[q * p.dyP + c]), tv * a + b);
      s1 += g;
      s2 += g * (tv - kc);
    }
  }
  double a1, a2;
  if (column_sums(s1, s2, a1, a2) && c < C) {
    part[(c * nchunk + k) * 2 + 0] = a1;
    part[(c * nchunk + k) * 2 + 1] = a2;
  }
}

// NHWC by 16-byte Packs of t and dy (PackRows: C and dy's channel pitch multiples of V, at most
// kThreads Packs a position, both aligned): one block per chunk of `chunk` positions, each thread V
// channels of float partials. Same part layout as sums_kernel.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) sums_nhwc_pack_kernel(const Params<T> p, int64_t P, int64_t chunk,
                                                                  double* part) {
  const PackRows r(p.C, V);
  const int64_t c0 = static_cast<int64_t>(r.g) * V;
  float s1[V] = {}, s2[V] = {}, a[V], b[V], kc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {  // (every channel index below C: g < G for the idle threads too)
    a[e] = p.A[c0 + e];
    b[e] = p.B[c0 + e];
    kc[e] = p.K[c0 + e];
  }
  walk_positions(r, chunk, P, [&](int64_t q) {
    float tv[V], d[V];
    load_f<T, V>(p.t + q * p.C + c0, tv);
    load_f<T, V>(p.dy + q * p.dyP + c0, d);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float g = mask_f(d[e], tv[e] * a[e] + b[e]);
      s1[e] += g;
      s2[e] += g * (tv[e] - kc[e]);
    }
  });
  store_group_sums<V>(r, s1, s2, part);
}

__global__ void __launch_bounds__(kThreads) finalize_kernel(const double* part, int64_t C, int64_t nchunk, float* sum_g,
                                                            float* sum_gc) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= C) return;
  double a1 = 0.0, a2 = 0.0;
  for (int64_t k = 0; k < nchunk; ++k) {
    a1 += part[(c * nchunk + k) * 2 + 0];
    a2 += part[(c * nchunk + k) * 2 + 1];
  }
  sum_g[c] = static_cast<float>(a1);
  sum_gc[c] = static_cast<float>(a2);
}

at::Tensor vec_of(const char* op, const char* name, const at::Tensor& v, const at::Tensor& t) {
  TORCH_CHECK(v.device() == t.device() && v.dim() == 1 && v.size(0) == t.size(1), op, ": ", name,
              " must be a 1-D tensor of C=", t.size(1), " values on ", t.device(), ", got ", v.sizes(), " on ",
              v.device());
  at::Tensor f = v.to(at::kFloat).contiguous();
  // the kernels read channel vectors as float4 packs (NHWC): a view that is not 16-byte aligned is copied
  return aligned16(f.data_ptr<float>()) ? f : f.clone();
}

void check_full(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": expected CUDA tensors, got ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": expected a 4-D (N, C, H, W) tensor, got ", t.sizes());
  TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": expected float32, float16 or bfloat16, got ",
              t.scalar_type());
}

template <typename T, bool kNHWC, bool kApply, int V>
void launch_pointwise(const Params<T>& p, int64_t numel, bool idx32, cudaStream_t stream) {
  const int64_t nvec = numel / V;
  const dim3 grid(static_cast<unsigned>(blocks_for(nvec)));
  if (idx32) {
    pointwise_kernel<T, uint32_t, kNHWC, kApply, V><<<grid, kThreads, 0, stream>>>(p, static_cast<uint32_t>(nvec));
  } else {
    pointwise_kernel<T, int64_t, kNHWC, kApply, V><<<grid, kThreads, 0, stream>>>(p, nvec);
  }
}

// kApply false: y = relu(affine(t)) into `out_in` when given (dense in t's format or a channel slice
// of a concatenation buffer), else into a new tensor; with `dy_in`, the residual added before the ReLU
// (read dense in t's format). kApply true: dt from dy (dense or a slice).
template <bool kApply>
at::Tensor pointwise_op(const char* op, const at::Tensor& t_in, const at::Tensor* dy_in, const at::Tensor& scale,
                        const at::Tensor& shift, const at::Tensor* pqr, const at::Tensor* out_in = nullptr) {
  check_full(op, t_in);
  const c10::cuda::CUDAGuard guard(t_in.device());
  const Layout L = out_in ? layout_for_out(t_in, *out_in) : layout_of(t_in);
  const at::Tensor t = in_layout(t_in, L);
  int64_t dyP = t.size(1);
  const at::Tensor dy = !dy_in ? at::Tensor() : kApply ? in_layout_or_slice(*dy_in, L, &dyP) : in_layout(*dy_in, L);
  if (dy_in) {
    TORCH_CHECK(dy.sizes() == t.sizes() && dy.scalar_type() == t.scalar_type() && dy.device() == t.device(), op,
                kApply ? ": dy" : ": residual", " must match t's shape, dtype and device");
  }
  int64_t outP = t.size(1);
  if (out_in) {
    TORCH_CHECK(out_in->device() == t.device() && out_in->sizes() == t.sizes() &&
                out_in->scalar_type() == t.scalar_type(), op, ": out must match t's shape, dtype and device");
    outP = channel_pitch(*out_in, L);
    TORCH_CHECK(outP > 0, op, ": out must be dense in t's memory format or a channel slice of such a tensor, got "
                "strides ", out_in->strides());
  }
  const at::Tensor A = vec_of(op, "scale", scale, t), B = vec_of(op, "shift", shift, t);
  at::Tensor P, Q, R;
  if (pqr) {
    P = vec_of(op, "p", pqr[0], t);
    Q = vec_of(op, "q", pqr[1], t);
    R = vec_of(op, "r", pqr[2], t);
  }
  at::Tensor out = out_in ? *out_in : new_output(t.sizes(), t.options(), format_of(L));
  const int64_t numel = t.numel();
  if (numel == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
  dispatch_dtype(t.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    Params<T> p{t.data_ptr<T>(),
                dy.defined() ? dy.data_ptr<T>() : nullptr,
                out.data_ptr<T>(),
                A.data_ptr<float>(),
                B.data_ptr<float>(),
                P.defined() ? P.data_ptr<float>() : nullptr,
                Q.defined() ? Q.data_ptr<float>() : nullptr,
                R.defined() ? R.data_ptr<float>() : nullptr,
                nullptr,
                t.size(1),
                t.size(2) * t.size(3),
                dyP,
                outP};
    const bool nhwc = L == Layout::NHWC;
    // 32-bit indices only when every offset fits, the pitched tensors' included
    const int64_t span = t.size(0) * std::max(dyP, outP) * t.size(2) * t.size(3);
    const bool idx32 = fits_int32(numel) && fits_int32(span);
    // 16-byte vectors: a vector's elements share their channel (NCHW) or are neighbouring channels of
    // one position, also in the pitched tensors (NHWC), and every pointer is aligned
    constexpr int kVec = kPackOf<T>;
    const bool vec = (nhwc ? t.size(1) % kVec == 0 && dyP % kVec == 0 && outP % kVec == 0
                           : (t.size(2) * t.size(3)) % kVec == 0) &&
                     aligned16(p.t) && aligned16(p.dy) && aligned16(p.out);
    if (vec) {
      nhwc ? launch_pointwise<T, true, kApply, kVec>(p, numel, idx32, stream)
           : launch_pointwise<T, false, kApply, kVec>(p, numel, idx32, stream);
    } else {
      nhwc ? launch_pointwise<T, true, kApply, 1>(p, numel, idx32, stream)
           : launch_pointwise<T, false, kApply, 1>(p, numel, idx32, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor affine_relu(const at::Tensor& t, const at::Tensor& scale, const at::Tensor& shift) {
  return pointwise_op<false>("scnet_fused::_affine_relu (cuda)", t, nullptr, scale, shift, nullptr);
}

void affine_relu_out(const at::Tensor& t, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  pointwise_op<false>("scnet_fused::_affine_relu_out (cuda)", t, nullptr, scale, shift, nullptr, &out);
}

at::Tensor affine_add_relu(const at::Tensor& t, const at::Tensor& residual, const at::Tensor& scale,
                           const at::Tensor& shift) {
  return pointwise_op<false>("scnet_fused::_affine_add_relu (cuda)", t, &residual, scale, shift, nullptr);
}

at::Tensor affine_relu_backward_apply(const at::Tensor& dy, const at::Tensor& t, const at::Tensor& scale,
                                      const at::Tensor& shift, const at::Tensor& p, const at::Tensor& q,
                                      const at::Tensor& r) {
  const at::Tensor pqr[3] = {p, q, r};
  return pointwise_op<true>("scnet_fused::_affine_relu_backward_apply (cuda)", t, &dy, scale, shift, pqr);
}

std::tuple<at::Tensor, at::Tensor> affine_relu_backward_sums(const at::Tensor& dy_in, const at::Tensor& t_in,
                                                             const at::Tensor& scale, const at::Tensor& shift,
                                                             const at::Tensor& center) {
  const char* op = "scnet_fused::_affine_relu_backward_sums (cuda)";
  check_full(op, t_in);
  const c10::cuda::CUDAGuard guard(t_in.device());
  const Layout L = layout_of(t_in);
  int64_t dyP = 0;
  const at::Tensor t = in_layout(t_in, L), dy = in_layout_or_slice(dy_in, L, &dyP);
  TORCH_CHECK(dy.sizes() == t.sizes() && dy.scalar_type() == t.scalar_type() && dy.device() == t.device(), op,
              ": dy must match t's shape, dtype and device");
  const at::Tensor A = vec_of(op, "scale", scale, t), B = vec_of(op, "shift", shift, t);
  const at::Tensor K = vec_of(op, "center", center, t);
  const int64_t N = t.size(0), C = t.size(1), HW = t.size(2) * t.size(3), M = N * HW;
  at::Tensor sum_g = at::zeros({C}, t.options().dtype(at::kFloat));
  at::Tensor sum_gc = at::zeros({C}, t.options().dtype(at::kFloat));
  if (t.numel() == 0) return {sum_g, sum_gc};
  TORCH_CHECK(C <= 2147483647, op, ": more than 2^31-1 channels");
  // About 16 blocks of work per channel, at least 16 positions per thread.
  const int64_t chunk = std::max<int64_t>(16 * kThreads, (M + 15) / 16);
  int64_t nchunk = std::min<int64_t>((M + chunk - 1) / chunk, 65535);
  at::Tensor part;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
  dispatch_dtype(t.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    Params<T> p{t.data_ptr<T>(), dy.data_ptr<T>(), nullptr, A.data_ptr<float>(), B.data_ptr<float>(),
                nullptr, nullptr, nullptr, K.data_ptr<float>(), C, HW, dyP, C};
    constexpr int kVec = kPackOf<T>;
    if (L == Layout::NHWC && pack_rows_fit(C, kVec) && dyP % kVec == 0 && aligned16(p.t) && aligned16(p.dy)) {
      const int64_t chunk_rows = pack_rows_chunk(M, C, kVec);
      nchunk = (M + chunk_rows - 1) / chunk_rows;
      part = new_output({C, nchunk, 2}, t.options().dtype(at::kDouble));
      sums_nhwc_pack_kernel<T, kVec><<<static_cast<unsigned>(nchunk), kThreads, 0, stream>>>(
          p, M, chunk_rows, part.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    part = new_output({C, nchunk, 2}, t.options().dtype(at::kDouble));
    if (L == Layout::NHWC) {
      const int64_t chunk_fit = (M + nchunk - 1) / nchunk;
      const dim3 grid(static_cast<unsigned>((C + kColCh - 1) / kColCh), static_cast<unsigned>(nchunk));
      const dim3 block(kColCh, kColLanes);
      sums_nhwc_kernel<T><<<grid, block, 0, stream>>>(p, M, chunk_fit, part.data_ptr<double>());
    } else {
      // a vector stays in one plane when HW is a multiple of it (dy's slice offsets are then too)
      const bool vec = HW % kVec == 0 && aligned16(p.t) && aligned16(p.dy);
      const int64_t Mv = vec ? M / kVec : M;
      const int64_t chunk_fit = (Mv + nchunk - 1) / nchunk;  // in vectors
      const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(nchunk));
      if (vec) {
        sums_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(p, N, chunk_fit, part.data_ptr<double>());
      } else {
        sums_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p, N, chunk_fit, part.data_ptr<double>());
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const unsigned fblocks = static_cast<unsigned>((C + kThreads - 1) / kThreads);
  finalize_kernel<<<fblocks, kThreads, 0, stream>>>(part.data_ptr<double>(), C, nchunk, sum_g.data_ptr<float>(),
                                                    sum_gc.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sum_g, sum_gc};
}

}  // namespace
}  // namespace cuda_bn_relu

#ifndef SCNET_FUSED_CUDA_EMU
cudaError_t bn_relu_kernels_load_status() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, cuda_bn_relu::finalize_kernel);
}
#endif

}  // namespace scnet_fused

TORCH_LIBRARY_IMPL(scnet_fused, CUDA, m) {
  m.impl("_affine_relu", &scnet_fused::cuda_bn_relu::affine_relu);
  m.impl("_affine_relu_out", &scnet_fused::cuda_bn_relu::affine_relu_out);
  m.impl("_affine_add_relu", &scnet_fused::cuda_bn_relu::affine_add_relu);
  m.impl("_affine_relu_backward_sums", &scnet_fused::cuda_bn_relu::affine_relu_backward_sums);
  m.impl("_affine_relu_backward_apply", &scnet_fused::cuda_bn_relu::affine_relu_backward_apply);
}
