// The x86-64 instruction sets the CPU kernels are built for, and whether this CPU runs them.
//
// csrc/cpu/*.cpp are compiled once per instruction set, each build into a module of its own
// (scnet_fused._cpu_default / _cpu_avx2 / _cpu_avx512; libscnet_fused_cpu_<isa> in CMake) with the
// flags of setup.py / CMakeLists.txt. A process loads one of them: the best this CPU runs.
// Separate shared objects keep the builds apart: no inline function compiled for AVX-512 can be
// picked by the linker for code that must run on a CPU without it.
#pragma once

#include <string>

namespace scnet_fused {

// The instruction set of this translation unit's build.
#if defined(CPU_CAPABILITY_AVX512)
inline constexpr const char* kBuildIsa = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
inline constexpr const char* kBuildIsa = "avx2";
#else
inline constexpr const char* kBuildIsa = "default";
#endif

// Whether this CPU (and its OS: the vector registers' state saved on context switches) runs code
// built for `isa`: "default" always; "avx2" needs AVX2 and FMA (every such CPU has F16C);
// "avx512" needs AVX-512 F, BW, VL and DQ (ATen's AVX512 level). False for unknown names.
static inline bool cpu_supports_isa(const std::string& isa) {
  if (isa == "default") return true;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
#endif
  return false;
}

}  // namespace scnet_fused
