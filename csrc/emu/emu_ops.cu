// Control ops of the host CUDA model (cuda_emu.h) and kernels that check the model itself: built only
// into the emulation library by tests/_cuda_emu.py, never by nvcc. Registered in the library's own
// op namespace next to the kernels of csrc/cuda/ (which the build registers there as CPU kernels).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "sc_cuda_common.cuh"

namespace scnet_fused {
namespace cuda_emu_ops {
namespace {

using namespace ::scnet_fused::cuda_common;

void configure(int64_t max_blocks, bool index64, bool reverse) {
  TORCH_CHECK(max_blocks >= 0, "_emu_configure: max_blocks must be >= 0 (0: no cap), got ", max_blocks);
  ::cuda_emu::config() = ::cuda_emu::Config{max_blocks, index64, reverse};
}

// The kernels launched since the last call, with their launch counts; clears the record.
std::tuple<std::vector<std::string>, std::vector<int64_t>> take_log() {
  std::vector<std::string> names;
  std::vector<int64_t> counts;
  for (const auto& kv : ::cuda_emu::launch_log()) {
    names.push_back(kv.first);
    counts.push_back(kv.second);
  }
  ::cuda_emu::launch_log().clear();
  return {names, counts};
}

// out[b, t] = in[b, blockDim.x - 1 - t] through shared memory; with sync = false the barrier between
// the write and the read is missing, which the model must expose (stale reads).
__global__ void reverse_kernel(const float* in, float* out, bool sync) {
  __shared__ float buf[1024];
  const unsigned t = threadIdx.x, n = blockDim.x;
  buf[t] = in[blockIdx.x * n + t];
  if (sync) __syncthreads();
  out[blockIdx.x * n + t] = buf[n - 1 - t];
}

at::Tensor selftest_reverse(const at::Tensor& in, bool sync) {
  TORCH_CHECK(in.dim() == 2 && in.scalar_type() == at::kFloat && in.is_contiguous() && in.size(1) <= 1024,
              "_emu_selftest_reverse: expected a contiguous float32 (blocks, threads <= 1024) tensor");
  at::Tensor out = at::empty_like(in);
  reverse_kernel<<<static_cast<unsigned>(in.size(0)), static_cast<unsigned>(in.size(1))>>>(
      in.data_ptr<float>(), out.data_ptr<float>(), sync);
  return out;
}

// 16-byte Pack copies from in + offset to out + offset (offsets in elements): misaligned unless the
// offset is a multiple of 4, which the model must report.
__global__ void pack_copy_kernel(const float* in, float* out) {
  store_pack<float, 4>(out + 4 * threadIdx.x, load_pack<float, 4>(in + 4 * threadIdx.x));
}

at::Tensor selftest_pack_copy(const at::Tensor& in, int64_t offset) {
  TORCH_CHECK(in.dim() == 1 && in.scalar_type() == at::kFloat && in.is_contiguous() && offset >= 0 &&
                  (in.size(0) - offset) % 4 == 0 && in.size(0) - offset > 0,
              "_emu_selftest_pack_copy: expected a contiguous float32 vector of offset + 4k elements");
  at::Tensor out = at::empty_like(in);
  out.zero_();
  const unsigned threads = static_cast<unsigned>((in.size(0) - offset) / 4);
  pack_copy_kernel<<<1, threads>>>(in.data_ptr<float>() + offset, out.data_ptr<float>() + offset);
  return out;
}

// A launch with the given grid, one thread a block, that writes nothing: launch-limit checks.
__global__ void empty_kernel() {}

void selftest_launch(int64_t gx, int64_t gy, int64_t gz, int64_t threads) {
  empty_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz)),
                 static_cast<unsigned>(threads)>>>();
}

}  // namespace
}  // namespace cuda_emu_ops
}  // namespace scnet_fused

TORCH_LIBRARY_FRAGMENT(scnet_fused, m) {
  m.def("_emu_configure(int max_blocks, bool index64, bool reverse) -> ()", &scnet_fused::cuda_emu_ops::configure);
  m.def("_emu_take_log() -> (str[], int[])", &scnet_fused::cuda_emu_ops::take_log);
  m.def("_emu_selftest_reverse(Tensor input, bool sync) -> Tensor", &scnet_fused::cuda_emu_ops::selftest_reverse);
  m.def("_emu_selftest_pack_copy(Tensor input, int offset) -> Tensor", &scnet_fused::cuda_emu_ops::selftest_pack_copy);
  m.def("_emu_selftest_launch(int gx, int gy, int gz, int threads) -> ()", &scnet_fused::cuda_emu_ops::selftest_launch);
}
