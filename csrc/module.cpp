// The Python module scnet_fused._C: loading it registers the op schemas (TORCH_LIBRARY in
// csrc/ops.cpp), the C++ autograd twins and, in a CUDA build, the CUDA kernels. The CPU kernels are
// built once per instruction set into modules of their own (csrc/cpu/isa_module.cpp).
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/sc_isa.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "scnet_fused compiled kernels (ops live in torch.ops.scnet_fused)";
#ifdef SCNET_FUSED_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_supports_isa", &scnet_fused::cpu_supports_isa, py::arg("isa"),
        "Whether this CPU runs CPU kernels built for `isa` ('default', 'avx2' or 'avx512').");
}
