// CPU kernels of the k2 average pool (contract: scnet_fused/ops/_dispatch.py, `avgpool` and
// `avgpool_backward`).
//
//   y[n, c, p, q] = (1 / r^2) * sum over the r x r window at (p * r, q * r) of x      (h = H / r, w = W / r)
//   dx[n, c, i, j] = dy[n, c, i / r, j / r] / r^2  where i < h * r and j < w * r, 0 elsewhere
//
// (the pool's windows are regular: integer division is exact here; it is the upsampling of the gate
// whose index map is irregular). NCHW and NHWC read and written in place; float32 math for float32,
// float16 and bfloat16 storage; vectorized along W (NCHW) or C (NHWC) with at::vec::Vectorized<float>,
// threaded over output rows with at::parallel_for (NCHW planes holding one window, H and W < 2r: over
// planes, each a run of whole vectors). No reduction crosses a task: the result does not depend on the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "sc_cpu_vec.h"
#include "sc_host.h"

namespace scnet_fused {
namespace cpu_pool {
namespace {

using namespace ::scnet_fused::host;

using namespace ::scnet_fused::cpu_vec;

// Grain of the row loops: about 32k elements of x per task.

// acc[0, len) = sum of r rows of `src` (row stride `stride`), in float.
template <typename T>
inline void sum_rows(const T* src, int64_t stride, int64_t r, int64_t len, float* acc) {
  int64_t j = 0;
  for (; j + kV <= len; j += kV) {
    Vec s = load_f(src + j);
    for (int64_t di = 1; di < r; ++di) s = s + load_f(src + di * stride + j);
    s.store(acc + j);
  }
  if (j < len) {  // the row's tail as one partial vector (16-float vectors leave up to 15 of a row)
    const int64_t n = len - j;
    Vec s = load_f(src + j, n);
    for (int64_t di = 1; di < r; ++di) s = s + load_f(src + di * stride + j, n);
    s.store(acc + j, n);
  }
}

// ---------------------------------------------------------------------------------------------
// NCHW: one task item = one output row (plane, p).
// ---------------------------------------------------------------------------------------------
template <typename T, int R>
inline void hsum_row(const float* acc, int64_t w, int64_t r, float inv, T* out) {
  if constexpr (R > 0) {
    for (int64_t q = 0; q < w; ++q) {
      float s = 0.0f;
      for (int dj = 0; dj < R; ++dj) s += acc[q * R + dj];
      out[q] = static_cast<T>(s * inv);
    }
  } else {
    for (int64_t q = 0; q < w; ++q) {
      float s = 0.0f;
      for (int64_t dj = 0; dj < r; ++dj) s += acc[q * r + dj];
      out[q] = static_cast<T>(s * inv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// NCHW with one window per plane (h = w = 1: r <= H, W < 2r, as SCNet's 7x7 maps at r = 4). The
// forward sums the window's r rows of r elements straight from x (the row-wise kernel below would
// stage them in a buffer and sum it in a second loop). The backward writes each plane of H*W elements
// as one run of whole vectors (unaligned: planes are H*W apart): the scaled gradient ANDed with a bit
// mask of the window, so nothing of an infinity or NaN in dy reaches the zeros outside it. The default
// build (no AVX: ATen's generic vector type, whose AND is a byte loop) fills the rows instead.
// ---------------------------------------------------------------------------------------------
// R > 0: the rate as a constant (r == R), so the window's loops unroll (with r a variable, the AVX
// builds vectorize the r-element rows and pay their loop checks: half again the time of the default
// build's plain loop at 7x7, r = 4).
template <typename T, int R>
void forward_nchw_one_window(const T* x, T* y, int64_t planes, int64_t H, int64_t W, int64_t r_) {
  const int64_t r = R > 0 ? R : r_, hw = H * W;
  const float inv = 1.0f / static_cast<float>(r * r);
  at::parallel_for(0, planes, grain_for(hw), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const T* src = x + p * hw;
      float s = 0.0f;
      for (int64_t i = 0; i < r; ++i)
        for (int64_t j = 0; j < r; ++j) s += static_cast<float>(src[i * W + j]);
      y[p] = static_cast<T>(s * inv);
    }
  });
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kMaskedPlanes = true;
#else
constexpr bool kMaskedPlanes = false;
#endif

template <typename T>
void backward_nchw_one_window(const T* dy, T* dx, int64_t planes, int64_t H, int64_t W, int64_t r) {
  const int64_t hw = H * W;
  const float inv = 1.0f / static_cast<float>(r * r);
  std::vector<float> mask;  // the window's bit mask, where the masked stores use it
  if constexpr (kMaskedPlanes) {
    mask.resize(static_cast<size_t>(hw));
    const uint32_t ones = 0xFFFFFFFFu, none = 0u;
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) std::memcpy(&mask[i * W + j], (i < r && j < r) ? &ones : &none, sizeof(float));
  }
  at::parallel_for(0, planes, grain_for(hw), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      T* out = dx + p * hw;
      if constexpr (kMaskedPlanes) {
        const Vec v(static_cast<float>(dy[p]) * inv);
        int64_t k = 0;
        for (; k + kV <= hw; k += kV) store_f(out + k, v & Vec::loadu(mask.data() + k));
        if (k < hw) store_f(out + k, v & Vec::loadu(mask.data() + k, hw - k), hw - k);
      } else {
        const T v = static_cast<T>(static_cast<float>(dy[p]) * inv);
        std::fill(out, out + hw, T(0.0f));
        for (int64_t i = 0; i < r; ++i) std::fill(out + i * W, out + i * W + r, v);
      }
    }
  });
}

template <typename T, int R>
void forward_nchw(const T* x, T* y, int64_t planes, int64_t H, int64_t W, int64_t r) {
  const int64_t h = H / r, w = W / r, len = w * r;
  const float inv = 1.0f / static_cast<float>(r * r);
  at::parallel_for(0, planes * h, grain_for(r * W), [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(static_cast<size_t>(len));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t plane = t / h, p = t - plane * h;
      sum_rows(x + (plane * H + p * r) * W, W, r, len, acc.data());
      hsum_row<T, R>(acc.data(), w, r, inv, y + t * w);
    }
  });
}

// One task item = one pooled row (plane, p): writes dx rows p*r .. p*r+r-1, and the dropped
// trailing rows h*r .. H-1 (zeros) with the last pooled row of the plane.
template <typename T>
void backward_nchw(const T* dy, T* dx, int64_t planes, int64_t H, int64_t W, int64_t r) {
  const int64_t h = H / r, w = W / r, len = w * r;
  const float inv = 1.0f / static_cast<float>(r * r);
  at::parallel_for(0, planes * h, grain_for(r * W), [&](int64_t t0, int64_t t1) {
    std::vector<float> row(static_cast<size_t>(W));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t plane = t / h, p = t - plane * h;
      const T* src = dy + t * w;
      for (int64_t q = 0; q < w; ++q) {
        const float v = static_cast<float>(src[q]) * inv;
        for (int64_t dj = 0; dj < r; ++dj) row[q * r + dj] = v;
      }
      std::fill(row.begin() + len, row.end(), 0.0f);
      T* base = dx + plane * H * W;
      const int64_t i1 = p == h - 1 ? H : (p + 1) * r;
      for (int64_t i = p * r; i < i1; ++i) {
        T* out = base + i * W;
        if (i >= h * r) {
          std::fill(out, out + W, T(0.0f));
          continue;
        }
        int64_t j = 0;
        for (; j + kV <= W; j += kV) store_f(out + j, Vec::loadu(row.data() + j));
        if (j < W) store_f(out + j, Vec::loadu(row.data() + j, W - j), W - j);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// NHWC: one task item = one output row (n, p), all w pixels and C channels.
// ---------------------------------------------------------------------------------------------
template <typename T>
void forward_nhwc(const T* x, T* y, int64_t N, int64_t C, int64_t H, int64_t W, int64_t r) {
  const int64_t h = H / r, w = W / r;
  const float inv = 1.0f / static_cast<float>(r * r);
  const Vec vinv(inv);
  at::parallel_for(0, N * h, grain_for(r * W * C), [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(static_cast<size_t>(C));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / h, p = t - n * h;
      const T* rows = x + ((n * H + p * r) * W) * C;
      T* out = y + t * w * C;
      for (int64_t q = 0; q < w; ++q) {
        int64_t c = 0;
        for (; c + kV <= C; c += kV) {
          Vec s(0.0f);
          for (int64_t di = 0; di < r; ++di) {
            const T* px = rows + (di * W + q * r) * C + c;
            for (int64_t dj = 0; dj < r; ++dj) s = s + load_f(px + dj * C);
          }
          store_f(out + q * C + c, s * vinv);
        }
        for (; c < C; ++c) {
          float s = 0.0f;
          for (int64_t di = 0; di < r; ++di)
            for (int64_t dj = 0; dj < r; ++dj) s += static_cast<float>(rows[(di * W + q * r + dj) * C + c]);
          out[q * C + c] = static_cast<T>(s * inv);
        }
      }
    }
  });
}

template <typename T>
void backward_nhwc(const T* dy, T* dx, int64_t N, int64_t C, int64_t H, int64_t W, int64_t r) {
  const int64_t h = H / r, w = W / r, len = w * r;
  const float inv = 1.0f / static_cast<float>(r * r);
  const Vec vinv(inv);
  at::parallel_for(0, N * h, grain_for(r * W * C), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / h, p = t - n * h;
      const T* src = dy + t * w * C;
      T* base = dx + n * H * W * C;
      const int64_t i1 = p == h - 1 ? H : (p + 1) * r;
      for (int64_t i = p * r; i < i1; ++i) {
        T* out = base + i * W * C;
        const int64_t zero_from = i >= h * r ? 0 : len;
        for (int64_t j = 0; j < zero_from; ++j) {
          const T* s = src + (j / r) * C;
          int64_t c = 0;
          for (; c + kV <= C; c += kV) store_f(out + j * C + c, load_f(s + c) * vinv);
          for (; c < C; ++c) out[j * C + c] = static_cast<T>(static_cast<float>(s[c]) * inv);
        }
        std::fill(out + zero_from * C, out + W * C, T(0.0f));
      }
    }
  });
}

at::Tensor avgpool(const at::Tensor& x_in, int64_t r) {
  const char* op = "scnet_fused::_avgpool (cpu)";
  check_pool(op, x_in, r, c10::DeviceType::CPU);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  TORCH_CHECK(H >= r && W >= r, op, ": H and W (", H, "x", W, ") must be at least the pooling rate ", r);
  const Layout L = layout_of(x_in);
  const at::Tensor x = in_layout(x_in, L);
  at::Tensor y = new_output({N, C, H / r, W / r}, x.options(), format_of(L));
  if (y.numel() == 0) return y;
  dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    if (L == Layout::NHWC) {
      forward_nhwc<T>(xp, yp, N, C, H, W, r);
    } else if (H < 2 * r && W < 2 * r) {
      if (r == 4) {
        forward_nchw_one_window<T, 4>(xp, yp, N * C, H, W, r);
      } else if (r == 2) {
        forward_nchw_one_window<T, 2>(xp, yp, N * C, H, W, r);
      } else {
        forward_nchw_one_window<T, 0>(xp, yp, N * C, H, W, r);
      }
    } else if (r == 2) {
      forward_nchw<T, 2>(xp, yp, N * C, H, W, r);
    } else if (r == 4) {
      forward_nchw<T, 4>(xp, yp, N * C, H, W, r);
    } else {
      forward_nchw<T, 0>(xp, yp, N * C, H, W, r);
    }
  });
  return y;
}

at::Tensor avgpool_backward(const at::Tensor& dy_in, int64_t H, int64_t W, int64_t r, bool channels_last) {
  const char* op = "scnet_fused::_avgpool_backward (cpu)";
  check_pool(op, dy_in, r, c10::DeviceType::CPU);
  TORCH_CHECK(H >= r && W >= r, op, ": H and W (", H, "x", W, ") must be at least the pooling rate ", r);
  TORCH_CHECK(dy_in.size(2) == H / r && dy_in.size(3) == W / r, op, ": dy must be (N, C, ", H / r, ", ", W / r,
              ") for a ", H, "x", W, " input at rate ", r, ", got ", dy_in.sizes());
  const Layout L = channels_last ? Layout::NHWC : Layout::NCHW;
  const at::Tensor dy = in_layout(dy_in, L);
  const int64_t N = dy.size(0), C = dy.size(1);
  at::Tensor dx = new_output({N, C, H, W}, dy.options(), format_of(L));
  if (dx.numel() == 0) return dx;
  dispatch_dtype(dy.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    if (L == Layout::NHWC) {
      backward_nhwc<T>(dy.data_ptr<T>(), dx.data_ptr<T>(), N, C, H, W, r);
    } else if (H < 2 * r && W < 2 * r) {
      backward_nchw_one_window<T>(dy.data_ptr<T>(), dx.data_ptr<T>(), N * C, H, W, r);
    } else {
      backward_nchw<T>(dy.data_ptr<T>(), dx.data_ptr<T>(), N * C, H, W, r);
    }
  });
  return dx;
}

}  // namespace
}  // namespace cpu_pool
}  // namespace scnet_fused

TORCH_LIBRARY_IMPL(scnet_fused, CPU, m) {
  m.impl("_avgpool", &scnet_fused::cpu_pool::avgpool);
  m.impl("_avgpool_backward", &scnet_fused::cpu_pool::avgpool_backward);
}
