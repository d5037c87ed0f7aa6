// CUDA kernels of the k2 average pool (contract: scnet_fused/ops/_dispatch.py, `avgpool` and
// `avgpool_backward`; the math is stated in csrc/cpu/sc_pool_cpu.cpp).
//
//   avgpool_fwd_kernel   one thread per output element (NCHW) or per V output channels (NHWC), the
//                        r x r window summed in float; NHWC loads are 16-byte vectors where C and
//                        the pointers allow; NCHW loads read a window row as one Pack of V = r
//                        values where r == 4, W % 4 == 0 and x is aligned to the Pack (the same sum,
//                        in the same order).
//   avgpool_bwd_kernel   one thread per V consecutive elements of dx (V along W in NCHW, along C in
//                        NHWC): dy / r^2 inside the pooled region, 0 in the dropped trailing rows
//                        and columns. Every element of dx is written exactly once; no atomics.
// 32-bit index math below 2^31 elements, 64-bit above; launched on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "sc_cuda_common.cuh"
#include "sc_cuda_load.h"
#include "sc_host.h"

namespace scnet_fused {
namespace cuda_pool {
namespace {

using namespace ::scnet_fused::host;

using namespace ::scnet_fused::cuda_common;

template <typename T>
struct PoolParams {
  const T* in;
  T* out;
  int64_t C, H, W, h, w, r;
  float inv;
};

// y[n, c, p, q] = inv * sum of the r x r window of x at (p * r, q * r).
template <typename T, typename I, bool kNHWC, int V>
__global__ void __launch_bounds__(kThreads) avgpool_fwd_kernel(const PoolParams<T> p, const I nunits) {
  const I C = static_cast<I>(p.C), H = static_cast<I>(p.H), W = static_cast<I>(p.W);
  const I h = static_cast<I>(p.h), w = static_cast<I>(p.w), r = static_cast<I>(p.r);
  const I stride = static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
  for (I u = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x); u < nunits;
       u += stride) {
    // first output element of this unit, in memory order (NCHW: one output, V the window row's Pack)
    const I o = kNHWC ? u * static_cast<I>(V) : u;
    constexpr int kOut = kNHWC ? V : 1;  // outputs of this unit
    float acc[kOut];
#pragma unroll
    for (int e = 0; e < kOut; ++e) acc[e] = 0.0f;
    I n, c, pr, q;  // output element (n, c, pr, q) of the h x w map
    unflatten<kNHWC>(o, C, h, w, n, c, pr, q);
    if (kNHWC) {
      for (I di = 0; di < r; ++di) {
        const T* src = p.in + ((n * H + pr * r + di) * W + q * r) * C + c;
        for (I dj = 0; dj < r; ++dj) {
          const Pack<T, V> pk = load_pack<T, V>(src + dj * C);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] += static_cast<float>(pk.v[e]);
        }
      }
      Pack<T, V> res;
#pragma unroll
      for (int e = 0; e < V; ++e) res.v[e] = static_cast<T>(acc[e] * p.inv);
      store_pack<T, V>(p.out + o, res);
    } else {
      // NCHW: consecutive threads take consecutive q. V == 1: each dj step of a warp reads a strided
      // set of a few cache lines the next steps reuse. V == r: a window row is one Pack (W and q * r
      // are multiples of V), added in the same order.
      const I plane = n * C + c;
      for (I di = 0; di < r; ++di) {
        const T* src = p.in + (plane * H + pr * r + di) * W + q * r;
        if constexpr (V > 1) {
          const Pack<T, V> pk = load_pack<T, V>(src);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[0] += static_cast<float>(pk.v[e]);
        } else {
          for (I dj = 0; dj < r; ++dj) acc[0] += static_cast<float>(src[dj]);
        }
      }
      p.out[o] = static_cast<T>(acc[0] * p.inv);
    }
  }
}

// dx[n, c, i, j] = dy[n, c, i / r, j / r] * inv inside the pooled region, 0 outside.
template <typename T, typename I, bool kNHWC, int V>
__global__ void __launch_bounds__(kThreads) avgpool_bwd_kernel(const PoolParams<T> p, const I nunits) {
  const I C = static_cast<I>(p.C), H = static_cast<I>(p.H), W = static_cast<I>(p.W);
  const I h = static_cast<I>(p.h), w = static_cast<I>(p.w), r = static_cast<I>(p.r);
  const I stride = static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
  for (I u = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x); u < nunits;
       u += stride) {
    const I base = u * static_cast<I>(V);  // first dx element of this unit, in memory order
    Pack<T, V> res;
    // NHWC: the V elements share the pixel (n, i, j) (C % V == 0); NCHW: the row (n, c, i) (W % V == 0).
    I n, c, i, j;
    unflatten<kNHWC>(base, C, H, W, n, c, i, j);
    const I pr = i / r;
    if (kNHWC) {
      const I q = j / r;
      if (pr < h && q < w) {
        const Pack<T, V> pk = load_pack<T, V>(p.in + ((n * h + pr) * w + q) * C + c);
#pragma unroll
        for (int e = 0; e < V; ++e) res.v[e] = static_cast<T>(static_cast<float>(pk.v[e]) * p.inv);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) res.v[e] = static_cast<T>(0.0f);
      }
    } else {
      const T* src = p.in + ((n * C + c) * h + (pr < h ? pr : 0)) * w;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const I q = (j + static_cast<I>(e)) / r;
        res.v[e] = static_cast<T>(pr < h && q < w ? static_cast<float>(src[q]) * p.inv : 0.0f);
      }
    }
    store_pack<T, V>(p.out + base, res);
  }
}

template <typename T, bool kNHWC, int V>
void launch_fwd(const PoolParams<T>& p, int64_t numel_in, int64_t nunits, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(blocks_for(nunits)));
  if (fits_int32(numel_in)) {
    avgpool_fwd_kernel<T, uint32_t, kNHWC, V><<<grid, kThreads, 0, stream>>>(p, static_cast<uint32_t>(nunits));
  } else {
    avgpool_fwd_kernel<T, int64_t, kNHWC, V><<<grid, kThreads, 0, stream>>>(p, nunits);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool kNHWC, int V>
void launch_bwd(const PoolParams<T>& p, int64_t numel_out, cudaStream_t stream) {
  const int64_t nunits = numel_out / V;
  const dim3 grid(static_cast<unsigned>(blocks_for(nunits)));
  if (fits_int32(numel_out)) {
    avgpool_bwd_kernel<T, uint32_t, kNHWC, V><<<grid, kThreads, 0, stream>>>(p, static_cast<uint32_t>(nunits));
  } else {
    avgpool_bwd_kernel<T, int64_t, kNHWC, V><<<grid, kThreads, 0, stream>>>(p, nunits);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor avgpool(const at::Tensor& x_in, int64_t r) {
  const char* op = "scnet_fused::_avgpool (cuda)";
  check_pool(op, x_in, r, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  TORCH_CHECK(H >= r && W >= r, op, ": H and W (", H, "x", W, ") must be at least the pooling rate ", r);
  const Layout L = layout_of(x_in);
  const at::Tensor x = in_layout(x_in, L);
  at::Tensor y = new_output({N, C, H / r, W / r}, x.options(), format_of(L));
  if (y.numel() == 0) return y;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = kPackOf<T>;
    PoolParams<T> p{x.data_ptr<T>(), y.data_ptr<T>(), C, H, W, H / r, W / r, r, 1.0f / static_cast<float>(r * r)};
    if (L == Layout::NHWC) {
      if (C % kVec == 0 && aligned16(p.in) && aligned16(p.out)) {
        launch_fwd<T, true, kVec>(p, x.numel(), y.numel() / kVec, stream);
      } else {
        launch_fwd<T, true, 1>(p, x.numel(), y.numel(), stream);
      }
    } else if (r == 4 && W % 4 == 0 && aligned_to(sizeof(Pack<T, 4>), p.in)) {
      launch_fwd<T, false, 4>(p, x.numel(), y.numel(), stream);  // SCNet's rate at 56 and 28 px
    } else {
      launch_fwd<T, false, 1>(p, x.numel(), y.numel(), stream);
    }
  });
  return y;
}

at::Tensor avgpool_backward(const at::Tensor& dy_in, int64_t H, int64_t W, int64_t r, bool channels_last) {
  const char* op = "scnet_fused::_avgpool_backward (cuda)";
  check_pool(op, dy_in, r, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(dy_in.device());
  TORCH_CHECK(H >= r && W >= r, op, ": H and W (", H, "x", W, ") must be at least the pooling rate ", r);
  TORCH_CHECK(dy_in.size(2) == H / r && dy_in.size(3) == W / r, op, ": dy must be (N, C, ", H / r, ", ", W / r,
              ") for a ", H, "x", W, " input at rate ", r, ", got ", dy_in.sizes());
  const Layout L = channels_last ? Layout::NHWC : Layout::NCHW;
  const at::Tensor dy = in_layout(dy_in, L);
  const int64_t N = dy.size(0), C = dy.size(1);
  at::Tensor dx = new_output({N, C, H, W}, dy.options(), format_of(L));
  if (dx.numel() == 0) return dx;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dy.device().index()).stream();
  dispatch_dtype(dy.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = kPackOf<T>;
    PoolParams<T> p{dy.data_ptr<T>(), dx.data_ptr<T>(), C, H, W, H / r, W / r, r, 1.0f / static_cast<float>(r * r)};
    const bool aligned = aligned16(p.in) && aligned16(p.out);
    if (L == Layout::NHWC) {
      (C % kVec == 0 && aligned) ? launch_bwd<T, true, kVec>(p, dx.numel(), stream)
                                 : launch_bwd<T, true, 1>(p, dx.numel(), stream);
    } else {
      (W % kVec == 0 && aligned16(p.out)) ? launch_bwd<T, false, kVec>(p, dx.numel(), stream)
                                          : launch_bwd<T, false, 1>(p, dx.numel(), stream);
    }
  });
  return dx;
}

}  // namespace
}  // namespace cuda_pool

#ifndef SCNET_FUSED_CUDA_EMU
cudaError_t pool_kernels_load_status() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, cuda_pool::avgpool_fwd_kernel<float, uint32_t, false, 4>);
}
#endif

}  // namespace scnet_fused

TORCH_LIBRARY_IMPL(scnet_fused, CUDA, m) {
  m.impl("_avgpool", &scnet_fused::cuda_pool::avgpool);
  m.impl("_avgpool_backward", &scnet_fused::cuda_pool::avgpool_backward);
}
