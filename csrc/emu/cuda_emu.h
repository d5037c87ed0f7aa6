// A host model of the CUDA execution the kernels of csrc/cuda/ rely on, so that their device code runs
// on a machine without a GPU: the kernels are compiled as C++ against this header (the launches
// rewritten by tests/_cuda_emu.py) and run on CPU tensors.
//
// What is modelled:
//   - a launch runs every block of the grid, one after the other, and every thread of a block as a
//     fiber with its own threadIdx; blockIdx, blockDim and gridDim as CUDA sets them;
//   - __syncthreads() is a barrier: a thread that reaches it waits until every thread of its block
//     has reached it or exited, so a missing barrier shows up as a stale shared-memory read;
//   - __shared__ variables are shared by the threads of a block (thread_local function statics: the
//     fibers of a block run on one OS thread);
//   - launch limits (at most 1024 threads a block, grid y and z at most 65535) and the alignment of
//     vector accesses (Pack loads and stores) are checked and reported as errors;
//   - knobs that move a kernel off its usual path: a cap on the grid size (grid-stride loops), 64-bit
//     index math at any size, and the order in which threads and blocks run.
// What is not: concurrency between blocks, warps and their lockstep execution, memory coalescing and
// speed. Device-only intrinsics fall back to their host meaning (std::exp for __expf).
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct CUstream_emu;
using cudaStream_t = CUstream_emu*;

namespace cuda_emu {

// Run-time settings, process-wide (the tests set them between calls).
struct Config {
  int64_t max_blocks = 0;   // > 0: blocks_for() launches at most this many blocks (grid-stride loops)
  bool index64 = false;     // fits_int32() answers false: the 64-bit index path at any size
  bool reverse = false;     // run the threads of a block, and the blocks, in reverse order
};

inline Config& config() {
  static Config c;
  return c;
}

// Kernel name -> launches since the last take_log().
inline std::map<std::string, int64_t>& launch_log() {
  static std::map<std::string, int64_t> log;
  return log;
}

namespace detail {

constexpr size_t kStackBytes = 64 * 1024;

// Context switch between fibers. On x86-64 a few instructions (csrc/emu/cuda_emu.cpp: the callee-saved
// registers pushed, the stack pointer swapped); elsewhere ucontext, whose swapcontext also saves the
// signal mask with a system call on every switch.
#if defined(__x86_64__)
extern "C" void scnet_emu_switch(void** save_sp, void* load_sp);
struct Context {
  void* sp = nullptr;
};
inline void switch_to(Context& from, Context& to) { scnet_emu_switch(&from.sp, to.sp); }
inline void init_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  // A frame scnet_emu_switch can pop: six zeroed callee-saved registers, then entry as the return
  // address; entry starts with the stack aligned as after a call (rsp % 16 == 8).
  auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top) - 8;
  for (int k = 0; k < 6; ++k) sp[k] = nullptr;
  sp[6] = reinterpret_cast<void*>(entry);
  sp[7] = nullptr;
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void init_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Fiber {
  Context ctx;
  std::unique_ptr<char[]> stack;
  uint3 tid;
  bool done = false;
};

// The state of the launch running on this OS thread. Fibers and their stacks are kept from launch
// to launch.
struct Block {
  Context sched;
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
  uint3 block_idx{0, 0, 0};
  uint3 block_dim{1, 1, 1};
  uint3 grid_dim{1, 1, 1};
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::exception_ptr error;
  bool active = false;
};

inline Block& tls_block() {
  static thread_local Block b;
  return b;
}

inline Block& block() {
  Block& b = tls_block();
  if (!b.active) throw std::logic_error("cuda_emu: device code called outside a kernel launch");
  return b;
}

[[noreturn]] inline void fiber_entry() {
  Block& b = tls_block();
  for (;;) {  // one thread of one block per pass; the scheduler re-initializes the context for the next
    try {
      b.body(b.body_arg);
    } catch (...) {
      if (!b.error) b.error = std::current_exception();
    }
    b.cur->done = true;
    switch_to(b.cur->ctx, b.sched);
  }
}

// Runs the threads of one block to completion, barrier phase by barrier phase.
inline void run_block(Block& b) {
  const unsigned nthreads = b.block_dim.x * b.block_dim.y * b.block_dim.z;
  if (b.fibers.size() < nthreads) b.fibers.resize(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = b.fibers[t];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    f.done = false;
    f.tid = uint3{t % b.block_dim.x, (t / b.block_dim.x) % b.block_dim.y, t / (b.block_dim.x * b.block_dim.y)};
    init_context(f.ctx, f.stack.get(), kStackBytes, fiber_entry);
  }
  const bool rev = config().reverse;
  for (;;) {
    // One phase: every live thread runs until it reaches a barrier or exits.
    bool live = false;
    for (unsigned k = 0; k < nthreads; ++k) {
      Fiber& f = b.fibers[rev ? nthreads - 1 - k : k];
      if (f.done) continue;
      b.cur = &f;
      switch_to(b.sched, f.ctx);
      live = live || !f.done;
    }
    b.cur = nullptr;
    if (!live) break;  // every thread exited; otherwise all live threads wait at a barrier: release it
  }
}

// "K = <kernel>" out of the signature of launch<K>.
inline std::string kernel_name(std::string_view pretty) {
  const size_t k = pretty.find("K = ");
  if (k == std::string_view::npos) return std::string(pretty);
  const size_t start = k + 4;
  size_t end = pretty.find(';', start);
  if (end == std::string_view::npos) end = pretty.find(']', start);
  std::string name(pretty.substr(start, end - start));
  const std::string anon = "{anonymous}::";
  for (size_t p; (p = name.find(anon)) != std::string::npos;) name.erase(p, anon.size());
  return name;
}

template <typename F>
void trampoline(void* f) {
  (*static_cast<F*>(f))();
}

}  // namespace detail

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(s), stream(st) {}
};

// kernel<<<cfg>>>(args...) as rewritten: launch<&kernel>(LaunchConfig(cfg), args...).
template <auto K, typename... A>
void launch(const LaunchConfig& cfg, A&&... args) {
  const std::string name = detail::kernel_name(__PRETTY_FUNCTION__);
  const dim3 g = cfg.grid, bd = cfg.block;
  const uint64_t nthreads = uint64_t(bd.x) * bd.y * bd.z;
  if (nthreads == 0 || nthreads > 1024 || bd.z > 64)
    throw std::runtime_error("cuda_emu: invalid block (" + std::to_string(bd.x) + ", " + std::to_string(bd.y) + ", " +
                             std::to_string(bd.z) + ") for " + name);
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535 || g.z > 65535)
    throw std::runtime_error("cuda_emu: invalid grid (" + std::to_string(g.x) + ", " + std::to_string(g.y) + ", " +
                             std::to_string(g.z) + ") for " + name);
  if (cfg.smem != 0) throw std::runtime_error("cuda_emu: dynamic shared memory is not modelled (" + name + ")");
  launch_log()[name] += 1;

  auto body = [&]() { K(args...); };
  detail::Block& b = detail::tls_block();
  if (b.active) throw std::logic_error("cuda_emu: a kernel launch from device code is not modelled (" + name + ")");
  b.block_dim = uint3{bd.x, bd.y, bd.z};
  b.grid_dim = uint3{g.x, g.y, g.z};
  b.body = &detail::trampoline<decltype(body)>;
  b.body_arg = &body;
  b.error = nullptr;
  b.active = true;
  const uint64_t nblocks = uint64_t(g.x) * g.y * g.z;
  const bool rev = config().reverse;
  for (uint64_t k = 0; k < nblocks && !b.error; ++k) {
    const uint64_t id = rev ? nblocks - 1 - k : k;
    b.block_idx = uint3{unsigned(id % g.x), unsigned((id / g.x) % g.y), unsigned(id / (uint64_t(g.x) * g.y))};
    detail::run_block(b);
  }
  b.active = false;
  b.body = nullptr;
  b.body_arg = nullptr;
  if (b.error) {
    std::exception_ptr e = b.error;
    b.error = nullptr;
    std::rethrow_exception(e);
  }
}

inline void syncthreads() {
  detail::Block& b = detail::block();
  detail::switch_to(b.cur->ctx, b.sched);
}

// A vector access of `bytes` bytes at p must be aligned to `bytes`, as on the device.
inline void check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    throw std::runtime_error(std::string("cuda_emu: misaligned ") + std::to_string(bytes) + "-byte " + what +
                             " at address " + std::to_string(reinterpret_cast<uintptr_t>(p)));
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::detail::block().cur->tid)
#define blockIdx (::cuda_emu::detail::block().block_idx)
#define blockDim (::cuda_emu::detail::block().block_dim)
#define gridDim (::cuda_emu::detail::block().grid_dim)
#define __syncthreads() ::cuda_emu::syncthreads()

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline float __expf(float x) { return std::exp(x); }
using std::isfinite;
using std::isinf;

// The host side of the CUDA runtime the kernels' launchers use.
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(const c10::Device&) {}
};
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
