// Schemas of the kernel-level primitives (see scnet_fused/ops/_dispatch.py for their contract).
// CPU kernels register in csrc/cpu/, CUDA kernels in csrc/cuda/.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "sc_gate_math.h"
#include "sc_index.h"

namespace scnet_fused {

// The nearest-upsampling source index of every output index, as int64 (for tests of the C++ math).
at::Tensor nearest_index(int64_t out_size, int64_t in_size) {
  TORCH_CHECK(out_size > 0 && in_size > 0, "nearest_index: sizes must be positive, got out=", out_size,
              ", in=", in_size);
  auto out = at::empty({out_size}, at::kLong);
  auto* p = out.data_ptr<int64_t>();
  const float scale = nearest_scale(in_size, out_size);
  for (int64_t i = 0; i < out_size; ++i) p[i] = nearest_source(i, scale, in_size, out_size);
  return out;
}

// One source index, for checking the index math at sizes too large to tabulate.
int64_t nearest_source_one(int64_t i, int64_t out_size, int64_t in_size) {
  TORCH_CHECK(out_size > 0 && in_size > 0, "_nearest_source: sizes must be positive, got out=", out_size,
              ", in=", in_size);
  TORCH_CHECK(i >= 0 && i < out_size, "_nearest_source: index ", i, " is outside [0, ", out_size, ")");
  return nearest_source(i, nearest_scale(in_size, out_size), in_size, out_size);
}

// First output index whose source index is >= a (a in [0, in_size]); the cell of source a is
// [start(a), start(a + 1)).
int64_t cell_start_one(int64_t a, int64_t out_size, int64_t in_size) {
  TORCH_CHECK(out_size > 0 && in_size > 0, "_cell_start: sizes must be positive, got out=", out_size,
              ", in=", in_size);
  TORCH_CHECK(a >= 0 && a <= in_size, "_cell_start: source index ", a, " is outside [0, ", in_size, "]");
  return cell_start(a, nearest_scale(in_size, out_size), in_size, out_size);
}

namespace {

constexpr uint64_t kDigestPrime = 0x9E3779B97F4A7C15ull;

uint64_t digest_mix(uint64_t h) {  // a bijective 64-bit finalizer (xor-shift-multiply)
  h ^= h >> 31;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 29;
  h *= 0x94D049BB133111EBull;
  return h ^ (h >> 32);
}

// One chunk's digest: the 8-byte words spread over 8 lanes, each lane h = (h ^ word) * prime in order
// (independent chains the core overlaps), the tail bytes as one zero-padded word, then the lanes folded.
uint64_t digest_chunk(const uint8_t* p, int64_t n) {
  uint64_t lane[8];
  for (int k = 0; k < 8; ++k) lane[k] = kDigestPrime * static_cast<uint64_t>(k + 1);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    for (int k = 0; k < 8; ++k) {
      uint64_t w;
      std::memcpy(&w, p + i + 8 * k, 8);
      lane[k] = (lane[k] ^ w) * kDigestPrime;
    }
  }
  for (int k = 0; i < n; ++k, i += 8) {
    uint64_t w = 0;
    std::memcpy(&w, p + i, static_cast<size_t>(std::min<int64_t>(8, n - i)));
    lane[k] = (lane[k] ^ w) * kDigestPrime;
  }
  uint64_t h = static_cast<uint64_t>(n);
  for (int k = 0; k < 8; ++k) h = digest_mix(h ^ lane[k]);
  return h;
}

}  // namespace

// A 64-bit digest of a CPU tensor's bytes (the elements in memory order of a dense tensor, else of its
// contiguous copy), with its dtype and shape: what the inference filter cache compares on every call
// to see an edit its version counter misses (an edit through .data). Fixed 256 KiB chunks digested in
// parallel and folded in order, so the value does not depend on the thread count.
int64_t bits_digest(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "_bits_digest: expected a CPU tensor, got one on ", t.device());
  const at::Tensor d = t.is_non_overlapping_and_dense() ? t : t.contiguous();
  const auto* p = static_cast<const uint8_t*>(d.data_ptr());
  const int64_t bytes = d.numel() * static_cast<int64_t>(d.element_size());
  constexpr int64_t kChunk = 256 * 1024;
  const int64_t chunks = (bytes + kChunk - 1) / kChunk;
  std::vector<uint64_t> part(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      part[static_cast<size_t>(c)] = digest_chunk(p + c * kChunk, std::min(kChunk, bytes - c * kChunk));
  });
  uint64_t h = digest_mix(static_cast<uint64_t>(static_cast<int>(d.scalar_type())) * kDigestPrime);
  for (int64_t s : d.sizes()) h = digest_mix(h ^ static_cast<uint64_t>(s));
  for (const uint64_t v : part) h = digest_mix(h ^ v) * kDigestPrime;
  return static_cast<int64_t>(h);
}

}  // namespace scnet_fused

TORCH_LIBRARY(scnet_fused, m) {
  m.def("_nearest_index(int out_size, int in_size) -> Tensor");
  m.def("_gate_forward(Tensor x, Tensor small, Tensor k3, Tensor? scale, Tensor? shift, Tensor? small_scale=None, "
        "Tensor? small_shift=None) -> Tensor");
  m.def("_gate_backward(Tensor dy, Tensor x, Tensor small, Tensor k3, Tensor? scale, Tensor? shift, "
        "Tensor? center, bool need_dk3, Tensor? small_scale=None, Tensor? small_shift=None, bool need_sums=True) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("_gate_backward_k3(Tensor dy, Tensor x, Tensor small, Tensor k3, Tensor p, Tensor q, Tensor r, "
        "Tensor? small_scale=None, Tensor? small_shift=None) -> Tensor");
  m.def("_channel_stats(Tensor t) -> (Tensor, Tensor)");
  m.def("_avgpool(Tensor x, int r) -> Tensor");
  m.def("_avgpool_backward(Tensor dy, int H, int W, int r, bool channels_last) -> Tensor");
  m.def("_affine_relu(Tensor t, Tensor scale, Tensor shift) -> Tensor");
  m.def("_affine_relu_out(Tensor t, Tensor scale, Tensor shift, Tensor(a!) out) -> ()");
  m.def("_affine_add_relu(Tensor t, Tensor residual, Tensor scale, Tensor shift) -> Tensor");
  m.def("_affine_relu_backward_sums(Tensor dy, Tensor t, Tensor scale, Tensor shift, Tensor center) "
        "-> (Tensor, Tensor)");
  m.def("_affine_relu_backward_apply(Tensor dy, Tensor t, Tensor scale, Tensor shift, Tensor p, Tensor q, "
        "Tensor r) -> Tensor");
  m.def("_add_channel_affine_(Tensor(a!) d, Tensor t, Tensor q, Tensor r) -> ()");
  m.def("_bn_relu_train_backward(Tensor dy, Tensor t, Tensor weight, Tensor bias, Tensor mean, Tensor var, "
        "float eps) -> (Tensor, Tensor, Tensor)");
  m.def("_gate_bn_train_backward(Tensor dy, Tensor x, Tensor small, Tensor k3, Tensor weight, Tensor bias, "
        "Tensor mean, Tensor var, float eps, Tensor? small_scale=None, Tensor? small_shift=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("_gate_bn_train_forward(Tensor x, Tensor small, Tensor k3, Tensor weight, Tensor bias, float eps, "
        "Tensor? small_scale=None, Tensor? small_shift=None) -> (Tensor, Tensor, Tensor)");
  m.def("_bn_relu_train_out(Tensor t, Tensor weight, Tensor bias, float eps, Tensor(a!) out) -> (Tensor, Tensor)");
  m.def("_bn_train_out(Tensor t, Tensor weight, Tensor bias, float eps, Tensor(a!) out) -> (Tensor, Tensor)");
  m.def("_bn_train_backward(Tensor dy, Tensor t, Tensor weight, Tensor bias, Tensor mean, Tensor var, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("_bn_add_relu_train_forward(Tensor t, Tensor residual, Tensor weight, Tensor bias, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("_bn_add_relu_train_backward(Tensor dy, Tensor y, Tensor t, Tensor weight, Tensor bias, Tensor mean, "
        "Tensor var, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_max_pool2d_nchw(Tensor x, int kH, int kW, int sH, int sW, int pH, int pW, bool need_indices) "
        "-> (Tensor, Tensor)");
  m.def("_wino_input(Tensor x, int TH, int TW) -> Tensor");
  m.def("_wino_output(Tensor m, int N, int H, int W, Tensor? bias=None) -> Tensor");
  m.def("_wino_output_adjoint(Tensor dy, int TH, int TW) -> Tensor");
  m.def("_wino_input_nhwc(Tensor x, int TH, int TW) -> Tensor");
  m.def("_wino_output_nhwc(Tensor m, int N, int H, int W, Tensor? bias=None, bool nchw=False) -> Tensor");
  m.def("_wino_output_adjoint_nhwc(Tensor dy, int TH, int TW) -> Tensor");
  m.def("_wino_filter(Tensor weight, bool flip=False, bool in_major=False) -> Tensor");
  m.def("_wino_filter_adjoint(Tensor du) -> Tensor");
  m.def("_wino_bmm(Tensor a, Tensor b, bool a_transposed=False) -> Tensor");
  m.def("_wino_conv(Tensor x, Tensor u, Tensor? bias=None, int block=0, bool split_k=True) -> Tensor");
  m.def("_wino_conv_w(Tensor x, Tensor weight, Tensor? bias=None, bool flip=False, int tile_groups=0) -> Tensor");
  m.def("_wino_wgrad(Tensor z, Tensor v, int cpart=0) -> Tensor");
  m.def("_wino_wgrad_x(Tensor dy, Tensor x, int chunks=0) -> Tensor");
  m.def("_centre_taps_wgrad(Tensor dy, Tensor x) -> Tensor");
  m.def("_nearest_source(int i, int out_size, int in_size) -> int", &scnet_fused::nearest_source_one);
  m.def("_cell_start(int a, int out_size, int in_size) -> int", &scnet_fused::cell_start_one);
  m.def("_bits_digest(Tensor t) -> int");
}

TORCH_LIBRARY_IMPL(scnet_fused, CompositeExplicitAutograd, m) {
  m.impl("_nearest_index", &scnet_fused::nearest_index);
}

TORCH_LIBRARY_IMPL(scnet_fused, CPU, m) {
  m.impl("_bits_digest", &scnet_fused::bits_digest);
}
