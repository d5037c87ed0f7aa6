// The nearest-upsampling index math shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SCNET_HD __host__ __device__ __forceinline__
#else
#define SCNET_HD inline
#endif

namespace scnet_fused {

// PyTorch's interpolate(mode="nearest", size=...): s = float(in) / out, computed once in float32.
SCNET_HD float nearest_scale(int64_t in_size, int64_t out_size) {
  return static_cast<float>(in_size) / static_cast<float>(out_size);
}

// Source index of output index i: min(floor(float(i) * s), in - 1) (i >> 1 when out == 2 * in: equal).
SCNET_HD int64_t nearest_source(int64_t i, float scale, int64_t in_size, int64_t out_size) {
  if (out_size == in_size) return i;
  if (out_size == 2 * in_size) return i >> 1;
  const int64_t src = static_cast<int64_t>(floorf(static_cast<float>(i) * scale));
  return src < in_size - 1 ? src : in_size - 1;
}

}  // namespace scnet_fused
