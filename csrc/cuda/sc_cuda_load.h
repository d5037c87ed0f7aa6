// Whether the running GPU can load the CUDA kernels of this build. A build carries SASS for the
// architectures of TORCH_CUDA_ARCH_LIST and PTX for the last one (setup.py: "8.0;9.0+PTX"), which the
// driver compiles for newer GPUs; a GPU older than every architecture of the build has no image at all,
// and a launch there fails. Host code only; not part of the host model of csrc/emu/.
#pragma once
#ifndef SCNET_FUSED_CUDA_EMU
#include <cuda_runtime_api.h>

namespace scnet_fused {

// cudaSuccess when the current device loads a kernel of that file, else the runtime's error
// (cudaErrorNoKernelImageForDevice). Defined in csrc/cuda/sc_*_cuda.cu.
cudaError_t gate_kernels_load_status();
cudaError_t pool_kernels_load_status();
cudaError_t bn_relu_kernels_load_status();

// The compute capabilities the CUDA kernels were compiled for, from nvcc's __CUDA_ARCH_LIST__
// ("800,900"; every file of the build has the same).
const char* cuda_arch_list();

}  // namespace scnet_fused
#endif  // SCNET_FUSED_CUDA_EMU
