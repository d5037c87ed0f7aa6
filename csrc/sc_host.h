// Host-side glue shared by the CPU and CUDA kernels: output allocation (with the NaN-poison debug
// mode), memory layouts, argument checks and the dtype switch. Host code only.
#pragma once
#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace scnet_fused {
namespace host {

// SCNET_FUSED_POISON set and not "0": every output (and every per-block partial buffer of the CUDA
// reductions) is NaN-filled before a kernel writes it.
inline bool poison_enabled() {
  const char* e = std::getenv("SCNET_FUSED_POISON");
  return e != nullptr && e[0] != '\0' && std::strcmp(e, "0") != 0;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts,
                             at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  at::Tensor t = at::empty(sizes, opts.memory_format(fmt));
  if (poison_enabled()) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

enum class Layout { NCHW, NHWC };

inline Layout layout_of(const at::Tensor& x) {
  if (x.is_contiguous()) return Layout::NCHW;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::NHWC;
  return Layout::NCHW;  // anything else is copied to NCHW
}

inline at::MemoryFormat format_of(Layout l) {
  return l == Layout::NHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline at::Tensor in_layout(const at::Tensor& t, Layout l) { return t.contiguous(format_of(l)); }

// The channel pitch of a 4-D tensor that is a channel slice [c0, c0 + C) of a dense (N, Cp, H, W)
// buffer in layout l (a half of a concatenation): NCHW strides (Cp*H*W, H*W, W, 1), NHWC strides
// (H*W*Cp, 1, W*Cp, Cp). Element (n, c, p) of the slice is at n*Cp*HW + c*HW + p (NCHW) or
// (n*HW + p)*Cp + c (NHWC) from its data pointer. 0 when t is no such slice (strides checked
// literally: size-1 dimensions with other strides are copied, never guessed).
inline int64_t channel_pitch(const at::Tensor& t, Layout l) {
  if (t.dim() != 4) return 0;
  const int64_t C = t.size(1), H = t.size(2), W = t.size(3);
  const auto s = t.strides();
  if (l == Layout::NCHW) {
    if (s[3] != 1 || s[2] != W || s[1] != H * W || H * W == 0 || s[0] % (H * W) != 0) return 0;
    const int64_t cp = s[0] / (H * W);
    return cp >= C ? cp : 0;
  }
  const int64_t cp = s[3];
  if (s[1] != 1 || cp < C || s[2] != W * cp || s[0] != H * W * cp) return 0;
  return cp;
}

// t as the kernels read it: in place when it is dense in layout l or a channel slice of such a buffer
// (*pitch = its channel pitch), else a dense copy in layout l (*pitch = C).
inline at::Tensor in_layout_or_slice(const at::Tensor& t, Layout l, int64_t* pitch) {
  const int64_t cp = channel_pitch(t, l);
  if (cp > 0) {
    *pitch = cp;
    return t;
  }
  *pitch = t.size(1);
  return in_layout(t, l);
}

// The layout in which t is read to write `out`: t's own, or, when t is dense in both layouts (one
// channel, or 1x1 maps) and `out` is dense or a channel slice only in the other one, that one.
inline Layout layout_for_out(const at::Tensor& t, const at::Tensor& out) {
  const Layout L = layout_of(t);
  if (channel_pitch(out, L) > 0 || !t.is_contiguous() || !t.is_contiguous(at::MemoryFormat::ChannelsLast)) return L;
  const Layout other = L == Layout::NCHW ? Layout::NHWC : Layout::NCHW;
  return channel_pitch(out, other) > 0 ? other : L;
}

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_full(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", t.sizes());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
}

// x on a device of type `device` (CPU or CUDA); k3 like x; small (N, C, h, w) with 1 <= h <= H, 1 <= w <= W.
inline void check_gate(const char* op, const at::Tensor& x, const at::Tensor& small, const at::Tensor& k3,
                       c10::DeviceType device) {
  TORCH_CHECK(x.device().type() == device, op, ": x must be a ", c10::DeviceTypeName(device), " tensor, got ",
              x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(supported_dtype(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  check_full(op, "k3", k3, x);
  TORCH_CHECK(small.device() == x.device(), op, ": small must be on x's device ", x.device(), ", got ",
              small.device());
  TORCH_CHECK(small.dim() == 4, op, ": small must be 4-D (N, C, h, w), got ", small.sizes());
  TORCH_CHECK(small.scalar_type() == x.scalar_type(), op, ": small must have x's dtype ", x.scalar_type(), ", got ",
              small.scalar_type());
  TORCH_CHECK(small.size(0) == x.size(0) && small.size(1) == x.size(1), op,
              ": small must have x's batch and channel sizes, got small ", small.sizes(), " for x ", x.sizes());
  TORCH_CHECK(small.size(2) >= 1 && small.size(3) >= 1 && small.size(2) <= x.size(2) && small.size(3) <= x.size(3),
              op, ": small's spatial size must be in [1, x's], got small ", small.sizes(), " for x ", x.sizes());
}

// A tensor the pool kernels take (x, or dy of the backward) on a `device`-type device, pooled at rate r.
inline void check_pool(const char* op, const at::Tensor& t, int64_t r, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, op, ": expected a ", c10::DeviceTypeName(device), " tensor, got ",
              t.device());
  TORCH_CHECK(t.dim() == 4, op, ": expected a 4-D (N, C, H, W) tensor, got ", t.sizes());
  TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": expected float32, float16 or bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(r >= 1, op, ": the pooling rate must be >= 1, got ", r);
}

// Calls f(T{}) with T the storage type of `t` (float, at::Half, at::BFloat16).
template <typename F>
void dispatch_dtype(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(at::Half{});
      break;
    case at::kBFloat16:
      f(at::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t, " (float32, float16 or bfloat16)");
  }
}

}  // namespace host
}  // namespace scnet_fused
