// The Python module scnet_fused._cpu_<isa>: the CPU kernels of this directory built for one
// instruction set (sc_isa.h). Importing it registers them for the CPU dispatch key of the ops that
// scnet_fused._C defines; scnet_fused.ops._cpp imports the best one this CPU runs, and only that one
// (a second would register the same kernels again).
#include <ATen/cpu/vec/vec.h>
#include <pybind11/pybind11.h>

#include <string>

#include "sc_isa.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "scnet_fused CPU kernels for one instruction set (ops live in torch.ops.scnet_fused)";
  m.attr("isa") = std::string(scnet_fused::kBuildIsa);
  m.attr("vector_floats") = static_cast<int>(at::vec::Vectorized<float>::size());
}
