// Device and launch helpers shared by the CUDA kernels: vector packs, launch geometry, alignment and
// index-width checks. Included by csrc/cuda/*.cu only (compiled by nvcc, or as C++ against the host
// model of csrc/emu/cuda_emu.h when SCNET_FUSED_CUDA_EMU is defined).
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>

namespace scnet_fused {
namespace cuda_common {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

// V elements of T moved as one aligned vector (16 bytes when V = 16 / sizeof(T)).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Elements of T in one 16-byte Pack (the launchers' vector width).
template <typename T>
constexpr int kPackOf = static_cast<int>(16 / sizeof(T));

// One Pack read or written at p (p aligned to the Pack, which the launchers check before choosing V > 1;
// the host model of csrc/emu/ checks it at every access).
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
#ifdef SCNET_FUSED_CUDA_EMU
  ::cuda_emu::check_aligned(p, sizeof(Pack<T, V>), "load");
#endif
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& pk) {
#ifdef SCNET_FUSED_CUDA_EMU
  ::cuda_emu::check_aligned(p, sizeof(Pack<T, V>), "store");
#endif
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

template <typename T, int V>
__device__ __forceinline__ void load_f(const T* p, float (&out)[V]) {
  const Pack<T, V> pk = load_pack<T, V>(p);
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = static_cast<float>(pk.v[e]);
}

template <typename T, int V>
__device__ __forceinline__ void store_f(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int e = 0; e < V; ++e) pk.v[e] = static_cast<T>(in[e]);
  store_pack<T, V>(p, pk);
}

// (n, c, i, j) of a flat index into an N x C x H x W tensor stored NCHW, or NHWC when kNHWC. One
// division per level, remainders by multiply-subtract.
template <bool kNHWC, typename I>
__device__ __forceinline__ void unflatten(I flat, I C, I H, I W, I& n, I& c, I& i, I& j) {
  if (kNHWC) {
    const I pix = flat / C;
    c = flat - pix * C;
    const I row = pix / W;
    j = pix - row * W;
    n = row / H;
    i = row - n * H;
  } else {
    const I row = flat / W;
    j = flat - row * W;
    const I plane = row / H;
    i = row - plane * H;
    n = plane / C;
    c = plane - n * C;
  }
}

// The values of one channel of an NCHW tensor, V at a time: vector u (of the channel's N * HW / V, HW a
// multiple of V) lies in plane n at column j * V. A thread starts at its first vector (one division) and
// steps `step` vectors at a time by addition (no 64-bit division per value: those are calls).
struct ChannelWalk {
  int64_t n, j, dn, dj, HWv;
  __device__ __forceinline__ ChannelWalk(int64_t u, int64_t HWv_, int64_t step) : HWv(HWv_) {
    n = u / HWv;
    j = u - n * HWv;
    dn = step / HWv;
    dj = step - dn * HWv;
  }
  // element offset of the current vector in a tensor of channel pitch `pitch` (C when dense)
  template <int V>
  __device__ __forceinline__ int64_t offset(int64_t c, int64_t pitch) const {
    return (n * pitch + c) * (HWv * V) + j * V;
  }
  __device__ __forceinline__ void advance() {
    n += dn;
    j += dj;
    if (j >= HWv) {
      j -= HWv;
      ++n;
    }
  }
};

// Block-wide sum of one double per thread (blockDim.x == kThreads) in a fixed tree order; the result
// is returned to every thread. smem: kThreads doubles of shared memory.
__device__ __forceinline__ double block_sum(double v, double* smem) {
  const int tid = threadIdx.x;
  smem[tid] = v;
  __syncthreads();
  for (int st = kThreads / 2; st > 0; st >>= 1) {
    if (tid < st) smem[tid] += smem[tid + st];
    __syncthreads();
  }
  const double r = smem[0];
  __syncthreads();
  return r;
}

// The NHWC reduction blocks (channel statistics, BatchNorm + ReLU sums): kColCh consecutive channels
// on threadIdx.x (a warp reads 32 neighbouring values), kColLanes lanes of positions on threadIdx.y.
constexpr int kColCh = 32;
constexpr int kColLanes = kThreads / kColCh;

// Column sums of such a (kColCh x kColLanes) block: each thread gives two float partials; the threads
// of lane 0 get their column's sums in double, lanes added in order (deterministic), and return true;
// the others return false.
__device__ __forceinline__ bool column_sums(float s1, float s2, double& a1, double& a2) {
  __shared__ double m1[kColLanes][kColCh];
  __shared__ double m2[kColLanes][kColCh];
  m1[threadIdx.y][threadIdx.x] = s1;
  m2[threadIdx.y][threadIdx.x] = s2;
  __syncthreads();
  if (threadIdx.y != 0) return false;
  a1 = 0.0;
  a2 = 0.0;
  for (int y = 0; y < kColLanes; ++y) {
    a1 += m1[y][threadIdx.x];
    a2 += m2[y][threadIdx.x];
  }
  return true;
}

// NHWC reductions by 16-byte Packs: a tensor of P positions x C channels (C a multiple of V) is P rows
// of G = C / V Packs. A block of kThreads threads takes a chunk of positions; thread tid below
// lanes * G (lanes = kThreads / G, so G <= kThreads) keeps the channel group g = tid % G and walks the
// positions l = tid / G, l + lanes, ... of the chunk: the threads of a warp read consecutive Packs
// (512 bytes). The threads from lanes * G on only join the block's sums.
struct PackRows {
  int G, lanes, g, l;
  __device__ __forceinline__ PackRows(int64_t C, int V)
      : G(static_cast<int>(C / V)), lanes(kThreads / G), g(static_cast<int>(threadIdx.x) % G),
        l(static_cast<int>(threadIdx.x) / G) {}
  __device__ __forceinline__ bool active() const { return l < lanes; }
};

// step(q) for the positions of this thread in chunk blockIdx.x of `chunk` positions (of P); nothing
// for the idle threads. Unrolled by 4 so that several Packs are in flight a thread.
template <typename F>
__device__ __forceinline__ void walk_positions(const PackRows& r, int64_t chunk, int64_t P, F&& step) {
  if (!r.active()) return;
  const int64_t k = blockIdx.x;
  const int64_t q1 = k * chunk + chunk < P ? k * chunk + chunk : P;
#pragma unroll 4
  for (int64_t q = k * chunk + r.l; q < q1; q += r.lanes) step(q);
}

// The sums of a PackRows block per channel: each thread gives V float partials of two sums (zeros from
// the idle threads); thread g < G gets its group's V channel sums over the lanes, in double, lanes added
// in order (deterministic), and returns true; the others return false.
template <int V>
__device__ __forceinline__ bool group_sums(const PackRows& r, const float (&s1)[V], const float (&s2)[V],
                                           double (&a1)[V], double (&a2)[V]) {
  __shared__ double m1[kThreads];
  __shared__ double m2[kThreads];
  const int tid = threadIdx.x;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    m1[tid] = s1[e];
    m2[tid] = s2[e];
    __syncthreads();
    if (tid < r.G) {
      double x1 = 0.0, x2 = 0.0;
      for (int l = 0; l < r.lanes; ++l) {
        x1 += m1[l * r.G + tid];
        x2 += m2[l * r.G + tid];
      }
      a1[e] = x1;
      a2[e] = x2;
    }
    __syncthreads();
  }
  return tid < r.G;
}

// group_sums, then thread g < G writes its channels' sums for chunk blockIdx.x to part[c][chunk][2] (the
// layout the finalize kernels read).
template <int V>
__device__ __forceinline__ void store_group_sums(const PackRows& r, const float (&s1)[V], const float (&s2)[V],
                                                 double* part) {
  double a1[V], a2[V];
  if (!group_sums<V>(r, s1, s2, a1, a2)) return;
  const int64_t k = blockIdx.x, nchunk = gridDim.x;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const int64_t c = static_cast<int64_t>(r.g) * V + e;
    part[(c * nchunk + k) * 2 + 0] = a1[e];
    part[(c * nchunk + k) * 2 + 1] = a2[e];
  }
}

// Positions per block of a PackRows reduction over P positions: at least 16 Packs a thread, at most
// kMaxChunks blocks.
constexpr int64_t kMaxChunks = 256;
inline int64_t pack_rows_chunk(int64_t P, int64_t C, int V) {
  const int64_t lanes = kThreads / (C / V);
  const int64_t nchunk = std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, P / (16 * lanes)));
  return (P + nchunk - 1) / nchunk;
}

// Whether a PackRows reduction can read a tensor of C channels: whole Packs, at most kThreads of them.
inline bool pack_rows_fit(int64_t C, int V) { return C % V == 0 && C / V <= kThreads; }

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Every non-null pointer aligned to `bytes` (a Pack's size).
template <typename... P>
inline bool aligned_to(size_t bytes, const P*... ptrs) {
  return ((ptrs == nullptr || reinterpret_cast<uintptr_t>(ptrs) % bytes == 0) && ...);
}

// Blocks of kThreads for `work` items, grid-stride beyond kMaxBlocks (under the host model: beyond
// its max_blocks setting when set, so the grid-stride loops run at small sizes).
inline int64_t blocks_for(int64_t work) {
  int64_t cap = kMaxBlocks;
#ifdef SCNET_FUSED_CUDA_EMU
  if (::cuda_emu::config().max_blocks > 0) cap = ::cuda_emu::config().max_blocks;
#endif
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, cap));
}

// Whether 32-bit index math covers numel elements (under the host model: false when its index64
// setting is on, so the 64-bit kernels run at small sizes).
inline bool fits_int32(int64_t numel) {
#ifdef SCNET_FUSED_CUDA_EMU
  if (::cuda_emu::config().index64) return false;
#endif
  return numel <= static_cast<int64_t>(std::numeric_limits<int32_t>::max());
}

}  // namespace cuda_common
}  // namespace scnet_fused
