// The Python module scnet_fused._C: loading it registers the op schemas (TORCH_LIBRARY in
// csrc/ops.cpp), the C++ autograd twins and, in a CUDA build, the CUDA kernels. The CPU kernels are
// built once per instruction set into modules of their own (csrc/cpu/isa_module.cpp).
#include <pybind11/pybind11.h>

#include <string>
#include <utility>

#include "cpu/sc_isa.h"
#ifdef SCNET_FUSED_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>

#include "cuda/sc_cuda_load.h"
#endif

namespace py = pybind11;

#ifdef SCNET_FUSED_WITH_CUDA
namespace {

// "" when CUDA device `index` loads the kernels of every CUDA file of this build, else why it does not
// (the runtime's error, naming the file). The device is selected and restored the way torch's own
// guards do it (c10::cuda::CUDAGuard: the previous device is set back only where it has a context, so
// a probe of cuda:1 from a process that never touched cuda:0 creates no context there), and a failed
// probe's error is taken off the runtime's last-error slot so that the next launch check does not
// report it.
std::string cuda_kernel_problem(int index) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || index < 0 || index >= count) {
    cudaGetLastError();
    return "no CUDA device " + std::to_string(index) + " (" + std::to_string(count) + " visible)";
  }
  std::string problem;
  try {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(index));
    using Probe = cudaError_t (*)();
    const std::pair<const char*, Probe> probes[] = {{"sc_gate_cuda.cu", &scnet_fused::gate_kernels_load_status},
                                                    {"sc_pool_cuda.cu", &scnet_fused::pool_kernels_load_status},
                                                    {"sc_bn_relu_cuda.cu", &scnet_fused::bn_relu_kernels_load_status}};
    for (const auto& [file, probe] : probes) {
      if (const cudaError_t err = probe(); err != cudaSuccess) {
        problem = std::string("the kernels of ") + file + " do not load: " + cudaGetErrorString(err);
        cudaGetLastError();
        break;
      }
    }
  } catch (const c10::Error& e) {
    problem = "selecting CUDA device " + std::to_string(index) + ": " + e.what_without_backtrace();
    cudaGetLastError();
  }
  return problem;
}

}  // namespace
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "scnet_fused compiled kernels (ops live in torch.ops.scnet_fused)";
#ifdef SCNET_FUSED_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_arch_list") = std::string(scnet_fused::cuda_arch_list());
  m.def("cuda_kernel_problem", &cuda_kernel_problem, py::arg("device"),
        "'' when CUDA device `device` can load this build's CUDA kernels, else why it cannot.");
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_supports_isa", &scnet_fused::cpu_supports_isa, py::arg("isa"),
        "Whether this CPU runs CPU kernels built for `isa` ('default', 'avx2' or 'avx512').");
}
