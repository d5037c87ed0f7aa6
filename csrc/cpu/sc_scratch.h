// Per-thread scratch memory for the CPU kernels' tasks (host code only).
#pragma once
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>

namespace scnet_fused {
namespace cpu_scratch {

// The scratch memory of the calling thread: one 64-byte aligned block kept for the thread's life, used
// as a stack by the tasks' Scratch buffers. A kernel's task gets the memory its thread had on the last
// call, which no other thread has written; memory freed to malloc comes back to whichever thread asks
// next. On the virtual machine measured (AMD EPYC, two vCPUs, at times apparently on two core
// complexes) writing lines the other core had touched was several times slower than writing the
// thread's own: with per-call heap buffers the fused SCConv training step at 8x256x7x7 took 12.3 ms,
// with this stack 11.3 ms (median of 200 interleaved rounds, one process; 14.0 vs 11.7 ms in the rounds
// of that state). A request that does not fit goes to the heap, and the block grows to the deepest use
// seen once the stack is empty again: it keeps what one task of the largest kernel needed (2.4 MB for
// _wino_conv_w at 8x256x7x7), at most 8 MiB a thread (what lies beyond comes from the heap each time).
class ThreadStack {
 public:
  static ThreadStack& local() {
    thread_local ThreadStack stack;
    return stack;
  }
  float* push(int64_t n, bool* heap) {
    const int64_t m = size(n);
    if (top_ + m <= cap_) {
      *heap = false;
      float* p = block_.get() + top_;
      top_ += m;
      depth_ += m;
      peak_ = std::max(peak_, depth_);
      return p;
    }
    float* p = alloc(m);  // (may throw: nothing counted yet)
    *heap = true;
    ++heap_live_;
    depth_ += m;
    peak_ = std::max(peak_, depth_);
    return p;
  }
  void pop(float* p, int64_t n, bool heap) {
    const int64_t m = size(n);
    depth_ -= m;
    if (heap) {
      std::free(p);
      --heap_live_;
    } else {
      TORCH_INTERNAL_ASSERT(p == block_.get() + top_ - m, "scratch buffers released out of order");
      top_ -= m;
    }
    if (depth_ == 0 && heap_live_ == 0 && std::min(peak_, kKeepMax) > cap_) {
      // (no exception from here, a destructor's path: without the memory the old block stays)
      if (float* grown = try_alloc(std::min(peak_, kKeepMax))) {
        block_.reset(grown);
        cap_ = std::min(peak_, kKeepMax);
      }
    }
  }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  static constexpr int64_t kKeepMax = (int64_t{8} << 20) / 4;  // floats: at most 8 MiB kept per thread
  static int64_t size(int64_t n) { return (std::max<int64_t>(n, 1) + 15) / 16 * 16; }  // whole cache lines
  static float* try_alloc(int64_t m) {  // m: a multiple of 16 floats (aligned_alloc's size rule)
    return static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(m) * sizeof(float)));
  }
  static float* alloc(int64_t m) {
    float* p = try_alloc(m);
    TORCH_CHECK(p != nullptr, "scnet_fused: out of memory allocating ", m * sizeof(float), " bytes of scratch");
    return p;
  }
  std::unique_ptr<float[], Free> block_;
  int64_t cap_ = 0, top_ = 0, depth_ = 0, peak_ = 0, heap_live_ = 0;
};

// A task's scratch floats from the thread's stack (ThreadStack), not initialized: every element is
// written before it is read (a std::vector's zero fill of the per-task buffers, up to 1.2 MB for
// _wino_conv_w, had shown as memset in the profile of the 8x256x7x7 training step). Locals only:
// released in the reverse order of their making.
class Scratch {
 public:
  explicit Scratch(int64_t n) : n_(n), p_(ThreadStack::local().push(n, &heap_)) {}
  ~Scratch() { ThreadStack::local().pop(p_, n_, heap_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data() const { return p_; }

 private:
  int64_t n_;
  bool heap_ = false;
  float* p_;
};

}  // namespace cpu_scratch
}  // namespace scnet_fused
