// The Python module scnet_fused._C: loading it registers the ops (TORCH_LIBRARY in csrc/ops.cpp).
#include <pybind11/pybind11.h>
#include <string>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "scnet_fused compiled kernels (ops live in torch.ops.scnet_fused)";
#ifdef SCNET_FUSED_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef CPU_CAPABILITY_AVX2
  m.attr("cpu_capability") = std::string("avx2");
#else
  m.attr("cpu_capability") = std::string("default");
#endif
}
