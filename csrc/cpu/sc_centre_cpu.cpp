// CPU kernel of the filters' gradient of a 3x3 convolution (stride 1, padding 1, one group) of a 1x1 map,
// which sees only the filters' centre taps: k2 on layer4's pooled maps in SCNet-50 (8x256x1x1 with 256
// filters).
//
// `_centre_taps_wgrad(dy, x)`: dy^T x (dy (N, K), x (N, C), float32) written as (K, C, 3, 3) filters, zero
// but the centre taps, one filter row at a time: the row is zeroed and its taps written while it is in
// L1, so its 9 C floats cross the memory bus once. F.pad of the product's (K, C, 1, 1) zero-fills the
// whole tensor and then writes every ninth float of it again (about 0.2 ms inside the 8x256x7x7 SCConv
// training step, Intel Xeon, 2 threads; the step is about 1% faster with this kernel).
// Each output element is one task's alone, summed over N in order: no dependence on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace scnet_fused {
namespace cpu_centre {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();

void check_f32_cpu(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

at::Tensor centre_taps_wgrad(const at::Tensor& dy_in, const at::Tensor& x_in) {
  const char* op = "scnet_fused::_centre_taps_wgrad";
  check_f32_cpu(op, "dy", dy_in, 2);
  check_f32_cpu(op, "x", x_in, 2);
  TORCH_CHECK(dy_in.size(0) == x_in.size(0), op, ": dy and x must have one batch size, got dy ", dy_in.sizes(),
              " and x ", x_in.sizes());
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const int64_t N = dy.size(0), K = dy.size(1), C = x.size(1);
  at::Tensor out = at::empty({K, C, 3, 3}, x.options());
  if (out.numel() == 0) return out;
  const float* dp = dy.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, K, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, C * std::max<int64_t>(N, 1))),
                   [&](int64_t k0, int64_t k1) {
    std::vector<float> r(C);
    for (int64_t k = k0; k < k1; ++k) {
      // r = sum over n of dy[n, k] x[n, :], n in order
      int64_t c = 0;
      for (; c + kV <= C; c += kV) {
        Vec acc(0.0f);
        for (int64_t n = 0; n < N; ++n) acc = at::vec::fmadd(Vec(dp[n * K + k]), Vec::loadu(xp + n * C + c), acc);
        acc.store(r.data() + c);
      }
      for (; c < C; ++c) {
        float acc = 0.0f;
        for (int64_t n = 0; n < N; ++n) acc = std::fma(dp[n * K + k], xp[n * C + c], acc);
        r[c] = acc;
      }
      float* row = o + k * C * 9;
      std::memset(row, 0, sizeof(float) * C * 9);
      for (int64_t j = 0; j < C; ++j) row[j * 9 + 4] = r[j];
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu_centre
}  // namespace scnet_fused

TORCH_LIBRARY_IMPL(scnet_fused, CPU, m) {
  m.impl("_centre_taps_wgrad", &scnet_fused::cpu_centre::centre_taps_wgrad);
}
