// Autograd of the fused ops in C++, for the C++ backends (cpu, cuda).
//
// The public Python functions (scnet_fused.sc_gate, sc_gate_bn_train, sc_avgpool, bn_relu_train,
// bn_relu_cat_train, bn_add_relu_train) are torch.library
// custom ops with Python autograd: that is what torch.compile and torch.export see, and what serves
// the Triton and reference backends. In eager mode, when the backend chosen for the tensors is one of
// the compiled ones, they call the ops below instead: the same kernel-level primitives with the same
// math, saved tensors and outputs, but the autograd node, the backend call and the glue between the
// two backward passes run in C++ (about 100 us less per forward + backward than the Python layers,
// which is what small maps such as SCNet-50's 7x7 stage are made of).
//
//   _sc_gate_ag(x, small, k3, scale?, shift?, small_scale?, small_shift?) -> y
//   _sc_gate_bn_train_ag(x, small, k3, weight, bias, eps) -> (y, mean, var)
//   _sc_gate_bn2_train_ag(x, small, k3, weight, bias, eps, small_weight, small_bias, small_eps)
//       -> (y, mean, var, small_mean, small_var)
//   _sc_avgpool_ag(x, r) -> y
//   _bn_relu_train_ag(t, weight, bias, eps) -> (y, mean, var)
//   _bn_train_ag(t, weight, bias, eps) -> (y, mean, var)   (no activation, CPU: a standalone SCConv's k4 norm)
//   _bn_add_relu_train_ag(t, weight, bias, residual, eps) -> (y, mean, var)
//   _bn_relu_cat_train_ag(ta, wa, ba, eps_a, tb, wb, bb, eps_b) -> (out, mean_a, var_a, mean_b, var_b)
//   _relu_cat_ag(a, b) -> out
//
// and three BatchNorm helpers of the modules, the same ATen calls as their Python forms in one call
// (CompositeImplicitAutograd: differentiable wherever the inputs are, through those ATen ops):
//
//   _bn_affine_fold(weight?, bias?, mean, var, eps, dtype) -> (scale, shift)
//       scale = weight * rsqrt(var + eps), shift = bias - mean * scale in `dtype` (1 and 0 for absent
//       affine parameters)
//   _conv_bn_fold(conv_weight, weight?, bias?, mean, var, eps, dtype) -> (conv_weight * scale, shift)
//       in conv_weight's dtype
//   _update_running_stats_(running_mean!, running_var!, mean, var, factor, unbias)
//       nn.BatchNorm2d's update: running = (1 - factor) * running + factor * batch value, the variance
//       times unbias = M / (M - 1)
//
// Registered for the Autograd keys (the autograd node) and CompositeExplicitAutograd (inference
// mode, where autograd keys are skipped). A backward run with create_graph (a second derivative
// to come) returns gradients that can be differentiated again: the gate, the BatchNorm + ReLU ops and
// relu_cat then compute them through `scnet_fused::_double_vjp`, their forward recomputed in standard
// operators and differentiated by autograd (scnet_fused/ops/_double.py, as the Python path does);
// without that op (the library loaded without its Python package) a second backward raises, naming
// the op. The pool's backward is differentiable (it is linear). relu_cat uses no backend kernel
// (ATen's clamp_min and where on each half): it serves every device.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "sc_host.h"

namespace scnet_fused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---------------------------------------------------------------------------------------------
// The primitives, through the dispatcher (CPU or CUDA kernels).
// ---------------------------------------------------------------------------------------------
// small_scale / small_shift: the pooled branch's affine (its BatchNorm), applied where the kernels
// read the pooled map; the kernels' dsmall is the gradient of that affine's output.
using OptTensor = c10::optional<at::Tensor>;

at::Tensor prim_gate_forward(const at::Tensor& x, const at::Tensor& small, const at::Tensor& k3,
                             const OptTensor& scale, const OptTensor& shift,
                             const OptTensor& small_scale = c10::nullopt, const OptTensor& small_shift = c10::nullopt) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scnet_fused::_gate_forward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                         const OptTensor&, const OptTensor&, const OptTensor&)>();
  return op.call(x, small, k3, scale, shift, small_scale, small_shift);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prim_gate_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& small, const at::Tensor& k3,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
    const c10::optional<at::Tensor>& center, bool need_dk3, const OptTensor& small_scale = c10::nullopt,
    const OptTensor& small_shift = c10::nullopt, bool need_sums = true) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("scnet_fused::_gate_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
              const OptTensor&, const OptTensor&, bool, const OptTensor&, const OptTensor&, bool)>();
  return op.call(dy, x, small, k3, scale, shift, center, need_dk3, small_scale, small_shift, need_sums);
}

at::Tensor prim_gate_backward_k3(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& small,
                                 const at::Tensor& k3, const at::Tensor& p, const at::Tensor& q, const at::Tensor& r,
                                 const OptTensor& small_scale = c10::nullopt,
                                 const OptTensor& small_shift = c10::nullopt) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scnet_fused::_gate_backward_k3", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                         const OptTensor&)>();
  return op.call(dy, x, small, k3, p, q, r, small_scale, small_shift);
}

std::tuple<at::Tensor, at::Tensor> prim_channel_stats(const at::Tensor& t) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scnet_fused::_channel_stats", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op.call(t);
}

at::Tensor prim_avgpool(const at::Tensor& x, int64_t r) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scnet_fused::_avgpool", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t)>();
  return op.call(x, r);
}

at::Tensor prim_avgpool_backward(const at::Tensor& dy, int64_t H, int64_t W, int64_t r, bool channels_last) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scnet_fused::_avgpool_backward", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t, bool)>();
  return op.call(dy, H, W, r, channels_last);
}

void prim_affine_relu_out(const at::Tensor& t, const at::Tensor& scale, const at::Tensor& shift,
                          const at::Tensor& out) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scnet_fused::_affine_relu_out", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  op.call(t, scale, shift, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prim_gate_bn_train_forward(const at::Tensor& x, const at::Tensor& small,
                                                                          const at::Tensor& k3, const at::Tensor& weight,
                                                                          const at::Tensor& bias, double eps,
                                                                          const OptTensor& small_scale = c10::nullopt,
                                                                          const OptTensor& small_shift = c10::nullopt) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scnet_fused::_gate_bn_train_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, double, const OptTensor&, const OptTensor&)>();
  return op.call(x, small, k3, weight, bias, eps, small_scale, small_shift);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prim_gate_bn_train_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& small, const at::Tensor& k3, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var, double eps,
    const OptTensor& small_scale = c10::nullopt, const OptTensor& small_shift = c10::nullopt) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scnet_fused::_gate_bn_train_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                           const OptTensor&, const OptTensor&)>();
  return op.call(dy, x, small, k3, weight, bias, mean, var, eps, small_scale, small_shift);
}

// The one-call CPU BatchNorm kernels: with the ReLU (`_bn_relu_train_backward` / `_out`) or without it
// (`_bn_train_backward` / `_out`, relu false).
using TrainBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                        const at::Tensor&, const at::Tensor&,
                                                                        const at::Tensor&, const at::Tensor&, double);
using TrainOutSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                                       const at::Tensor&);

std::tuple<at::Tensor, at::Tensor, at::Tensor> prim_bn_train_backward(const at::Tensor& dy, const at::Tensor& t,
                                                                      const at::Tensor& weight, const at::Tensor& bias,
                                                                      const at::Tensor& mean, const at::Tensor& var,
                                                                      double eps, bool relu) {
  static auto with_relu = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("scnet_fused::_bn_relu_train_backward", "")
                              .typed<TrainBackwardSig>();
  static auto without = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("scnet_fused::_bn_train_backward", "")
                            .typed<TrainBackwardSig>();
  return (relu ? with_relu : without).call(dy, t, weight, bias, mean, var, eps);
}

std::tuple<at::Tensor, at::Tensor> prim_bn_train_out(const at::Tensor& t, const at::Tensor& weight,
                                                     const at::Tensor& bias, double eps, const at::Tensor& out,
                                                     bool relu) {
  static auto with_relu =
      c10::Dispatcher::singleton().findSchemaOrThrow("scnet_fused::_bn_relu_train_out", "").typed<TrainOutSig>();
  static auto without =
      c10::Dispatcher::singleton().findSchemaOrThrow("scnet_fused::_bn_train_out", "").typed<TrainOutSig>();
  return (relu ? with_relu : without).call(t, weight, bias, eps, out);
}

at::Tensor prim_affine_add_relu(const at::Tensor& t, const at::Tensor& residual, const at::Tensor& scale,
                                const at::Tensor& shift) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scnet_fused::_affine_add_relu", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(t, residual, scale, shift);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prim_bn_add_relu_train_forward(const at::Tensor& t,
                                                                              const at::Tensor& residual,
                                                                              const at::Tensor& weight,
                                                                              const at::Tensor& bias, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scnet_fused::_bn_add_relu_train_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(t, residual, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prim_bn_add_relu_train_backward(
    const at::Tensor& dy, const at::Tensor& y, const at::Tensor& t, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& var, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scnet_fused::_bn_add_relu_train_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(dy, y, t, weight, bias, mean, var, eps);
}

at::Tensor prim_affine_relu(const at::Tensor& t, const at::Tensor& scale, const at::Tensor& shift) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scnet_fused::_affine_relu", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(t, scale, shift);
}

std::tuple<at::Tensor, at::Tensor> prim_affine_relu_backward_sums(const at::Tensor& dy, const at::Tensor& t,
                                                                  const at::Tensor& scale, const at::Tensor& shift,
                                                                  const at::Tensor& center) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scnet_fused::_affine_relu_backward_sums", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&)>();
  return op.call(dy, t, scale, shift, center);
}

at::Tensor prim_affine_relu_backward_apply(const at::Tensor& dy, const at::Tensor& t, const at::Tensor& scale,
                                           const at::Tensor& shift, const at::Tensor& p, const at::Tensor& q,
                                           const at::Tensor& r) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scnet_fused::_affine_relu_backward_apply", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(dy, t, scale, shift, p, q, r);
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------
bool is_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat format_like(const at::Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// A float32 contiguous copy of a per-channel vector (detached), or nullopt.
c10::optional<at::Tensor> f32(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  return t->detach().to(at::kFloat).contiguous();
}

// Gradients produced with create_graph: they are wired to the op's differentiable inputs through a
// node whose backward raises, naming the op (the gate's backward kernels have no derivative of their
// own). Without it they would be constants and a second backward would silently miss this op's part.
struct NoDoubleBackward : public torch::autograd::Function<NoDoubleBackward> {
  // TensorList (not variable_list) arguments: Function::apply takes the tensors of a TensorList as
  // inputs of the node; a std::vector would count as one non-tensor argument.
  static variable_list forward(AutogradContext* ctx, at::TensorList grads, at::TensorList inputs, std::string op) {
    (void)inputs;  // only wired into the graph
    ctx->saved_data["op"] = op;
    variable_list out;
    out.reserve(grads.size());
    for (const auto& g : grads) out.push_back(g.clone());
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, "Trying to backward through ", ctx->saved_data["op"].toStringRef(),
                " but no autograd formula was registered: this fused op has no double backward");
  }
};

// Gradients for a backward run with create_graph: scnet_fused::_double_vjp(op, dy, inputs, scalars)
// (registered by the Python package) recomputes the op's forward in standard operators from the saved
// inputs, which are attached to the graph, and differentiates it with create_graph. Its gradients follow
// `inputs` (see scnet_fused/ops/_double.py for the two ops that save their output instead); undefined
// tensors are inserted at the positions `scalar_at` (the op's non-tensor arguments) so that the list
// matches the forward's arguments. nullopt without the op, or when no second derivative is to come.
c10::optional<variable_list> double_vjp(const char* op, const at::Tensor& dy, const variable_list& inputs,
                                        const std::vector<double>& scalars, std::vector<size_t> scalar_at = {}) {
  if (!at::GradMode::is_enabled()) return c10::nullopt;
  const auto handle = c10::Dispatcher::singleton().findSchema({"scnet_fused::_double_vjp", ""});
  if (!handle.has_value() || !handle->hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd))
    return c10::nullopt;
  c10::List<c10::optional<at::Tensor>> ins;
  for (const auto& t : inputs) ins.push_back(t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt);
  torch::jit::Stack stack;
  stack.emplace_back(std::string(op));
  stack.emplace_back(dy.defined() ? c10::IValue(dy) : c10::IValue());
  stack.emplace_back(std::move(ins));
  stack.emplace_back(c10::List<double>(scalars));
  handle->callBoxed(&stack);
  TORCH_CHECK(stack.size() == 1, "scnet_fused::_double_vjp returned ", stack.size(), " values");
  variable_list grads;
  for (const c10::IValue& v : stack[0].toListRef()) grads.push_back(v.isNone() ? at::Tensor() : v.toTensor());
  for (size_t pos : scalar_at) grads.insert(grads.begin() + static_cast<std::ptrdiff_t>(pos), at::Tensor());
  return grads;
}

variable_list guard_double_backward(variable_list grads, const variable_list& inputs, const char* op) {
  if (!at::GradMode::is_enabled()) return grads;  // create_graph=False: plain gradients
  variable_list wired;
  for (const auto& t : inputs)
    if (t.defined() && t.requires_grad()) wired.push_back(t);
  if (wired.empty()) return grads;
  variable_list defined;
  for (const auto& g : grads)
    if (g.defined()) defined.push_back(g);
  variable_list wrapped = NoDoubleBackward::apply(at::TensorList(defined), at::TensorList(wired), std::string(op));
  variable_list out;
  size_t k = 0;
  for (const auto& g : grads) out.push_back(g.defined() ? wrapped[k++] : g);
  return out;
}

// ---------------------------------------------------------------------------------------------
// sc_gate
// ---------------------------------------------------------------------------------------------
at::Tensor gate_impl(const at::Tensor& x, const at::Tensor& small, const at::Tensor& k3, const OptTensor& scale,
                     const OptTensor& shift, const OptTensor& small_scale, const OptTensor& small_shift) {
  return prim_gate_forward(x, small, k3, f32(scale), f32(shift), f32(small_scale), f32(small_shift));
}

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

// The gradients through the pooled branch's affine from dn, the gradient of its output (the kernels'
// dsmall): dsmall = dn * small_scale and, over N, h and w, dsmall_scale = sum(dn * small),
// dsmall_shift = sum(dn); float32 math (the ATen calls of the Python op, so the same bits).
std::tuple<at::Tensor, at::Tensor, at::Tensor> small_affine_grads(const at::Tensor& dn, const at::Tensor& small,
                                                                  const at::Tensor& ss, const at::Tensor& st) {
  const at::Tensor d = dn.to(at::kFloat);
  at::Tensor dsmall = ss.defined() ? (d * ss.to(at::kFloat).view({1, -1, 1, 1})).to(small.scalar_type()) : dn;
  at::Tensor dss = ss.defined() ? (d * small.to(at::kFloat)).sum({0, 2, 3}).to(ss.scalar_type()) : at::Tensor();
  at::Tensor dst = st.defined() ? d.sum({0, 2, 3}).to(st.scalar_type()) : at::Tensor();
  return {dsmall, dss, dst};
}

struct GateFn : public torch::autograd::Function<GateFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& small, const at::Tensor& k3,
                            const OptTensor& scale, const OptTensor& shift, const OptTensor& small_scale,
                            const OptTensor& small_shift) {
    ctx->save_for_backward({x, small, k3, scale.value_or(at::Tensor()), shift.value_or(at::Tensor()),
                            small_scale.value_or(at::Tensor()), small_shift.value_or(at::Tensor())});
    return gate_impl(x, small, k3, scale, shift, small_scale, small_shift);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &small = saved[1], &k3 = saved[2], &scale = saved[3], &shift = saved[4];
    const at::Tensor &ss = saved[5], &st = saved[6];
    if (auto g = double_vjp("sc_gate", grads[0], {x, small, k3, scale, shift, ss, st}, {})) return *g;
    const at::Tensor dy = grads[0].to(x.dtype()).contiguous(format_like(x));
    // The per-channel sums are the affine's gradients: skipped when no trained affine asks for them
    // (a plain gate, a frozen BatchNorm's constants). The edges count only the tensors given: x, small,
    // k3, then scale and shift where present.
    const bool want_dscale = scale.defined() && ctx->needs_input_grad(3);
    const bool want_dshift = shift.defined() && ctx->needs_input_grad(scale.defined() ? 4 : 3);
    auto [dx, dsmall, dk3, sum_g, sum_gk] =
        prim_gate_backward(dy, x, small, k3, f32(opt(scale)), f32(opt(shift)), c10::nullopt, true, f32(opt(ss)),
                           f32(opt(st)), want_dscale || want_dshift);
    at::Tensor dscale = want_dscale ? sum_gk.to(scale.scalar_type()) : at::Tensor();
    at::Tensor dshift = want_dshift ? sum_g.to(shift.scalar_type()) : at::Tensor();
    at::Tensor dss, dst;
    if (ss.defined() || st.defined()) std::tie(dsmall, dss, dst) = small_affine_grads(dsmall, small, ss, st);
    return guard_double_backward({dx, dsmall, dk3, dscale, dshift, dss, dst},
                                 {grads[0], x, small, k3, scale, shift, ss, st}, "scnet_fused.sc_gate_backward");
  }
};

// ---------------------------------------------------------------------------------------------
// sc_gate_bn_train
// ---------------------------------------------------------------------------------------------
struct BnFold {
  at::Tensor invstd, scale, shift;
};

// BatchNorm as a per-channel affine in `dtype`: invstd = rsqrt(var + eps), scale = weight * invstd,
// shift = bias - mean * scale (the ATen calls of the Python folds, so the same bits).
BnFold affine_fold(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var,
                   double eps, at::ScalarType dtype) {
  BnFold f;
  f.invstd = at::rsqrt(var.to(dtype) + eps);
  f.scale = (weight.to(dtype) * f.invstd).contiguous();
  f.shift = (bias.to(dtype) - mean.to(dtype) * f.scale).contiguous();
  return f;
}

// The fold of a training-mode BatchNorm from its batch statistics (float32): no autograd.
BnFold bn_fold(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var,
               double eps) {
  return affine_fold(weight.detach(), bias.detach(), mean, var, eps, mean.scalar_type());
}

// ss / st: the pooled branch's affine (undefined: none).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_bn_train_impl(const at::Tensor& x, const at::Tensor& small,
                                                                  const at::Tensor& k3, const at::Tensor& weight,
                                                                  const at::Tensor& bias, double eps,
                                                                  const at::Tensor& ss = at::Tensor(),
                                                                  const at::Tensor& st = at::Tensor()) {
  if (x.is_cpu()) {  // one call: NCHW channel by channel, k3 read the second time from cache
    return prim_gate_bn_train_forward(x, small, k3, weight.detach(), bias.detach(), eps, opt(ss), opt(st));
  }
  auto [mean, var] = prim_channel_stats(k3);
  const BnFold f = bn_fold(weight, bias, mean, var, eps);
  at::Tensor y = prim_gate_forward(x, small, k3, f.scale, f.shift, opt(ss), opt(st));
  return {y, mean, var};
}

// The input gradients of the training-mode BatchNorm gate: (dx, dsmall, dk3, dweight, dbias) in the
// dtypes of x, small, k3 and float32; with ss / st, dsmall is the gradient of the pooled branch's
// affine output.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_bn_train_grads(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& small, const at::Tensor& k3, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& ss,
    const at::Tensor& st) {
  if (x.is_cpu()) {  // one call: NCHW channel by channel, k3 and g * scale read the second time from cache
    return prim_gate_bn_train_backward(dy, x, small, k3, weight.detach(), bias.detach(), mean, var, eps, opt(ss),
                                       opt(st));
  }
  const BnFold f = bn_fold(weight, bias, mean, var, eps);
  // Pass 1: dx, dsmall and the per-channel sums sum(g), sum(g * (k3 - mean)), g = dy * sigmoid(.).
  auto [dx, dsmall, unused_dk3, sum_g, sum_gc] =
      prim_gate_backward(dy, x, small, k3, f.scale, f.shift, mean.contiguous(), false, opt(ss), opt(st));
  const double m = static_cast<double>(x.size(0) * x.size(2) * x.size(3));
  at::Tensor dweight = sum_gc * f.invstd;  // sum(g * xhat)
  // Pass 2: BatchNorm's input gradient dk3 = scale * (g - sum_g / M - xhat * dweight / M) = p g + q k3 + r
  // (the sigmoid recomputed).
  at::Tensor q = (-f.scale * f.invstd * dweight / m).contiguous();
  at::Tensor r = (-q * mean - f.scale * sum_g / m).contiguous();
  at::Tensor dk3 = prim_gate_backward_k3(dy, x, small, k3, f.scale, q, r, opt(ss), opt(st));
  return {dx, dsmall, dk3, dweight, sum_g};
}

struct GateBnTrainFn : public torch::autograd::Function<GateBnTrainFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& small,
                               const at::Tensor& k3, const at::Tensor& weight, const at::Tensor& bias, double eps) {
    auto [y, mean, var] = gate_bn_train_impl(x, small, k3, weight, bias, eps);
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, var});
    ctx->save_for_backward({x, small, k3, weight, bias, mean, var});
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &small = saved[1], &k3 = saved[2], &weight = saved[3], &bias = saved[4];
    const at::Tensor &mean = saved[5], &var = saved[6];
    const double eps = ctx->saved_data["eps"].toDouble();
    if (auto g = double_vjp("sc_gate_bn_train", grads[0], {x, small, k3, weight, bias}, {eps}, {5})) return *g;
    at::Tensor dy = grads[0];
    if (!dy.defined()) dy = at::zeros_like(x);  // only mean / var were used (they carry no gradient)
    dy = dy.to(x.dtype()).contiguous(format_like(x));
    auto [dx, dsmall, dk3, dweight, dbias] =
        gate_bn_train_grads(dy, x, small, k3, weight, bias, mean, var, eps, at::Tensor(), at::Tensor());
    return guard_double_backward(
        {dx, dsmall, dk3, dweight.to(weight.scalar_type()), dbias.to(bias.scalar_type()), at::Tensor()},
        {grads[0], x, small, k3, weight, bias}, "scnet_fused.sc_gate_bn_train_backward");
  }
};

// ---------------------------------------------------------------------------------------------
// sc_gate_bn2_train: training-mode BatchNorms of k3 and of the pooled branch inside the gate
// ---------------------------------------------------------------------------------------------
// (y, mean, var, small_mean, small_var): the pooled map's batch statistics, its BatchNorm folded to the
// per-channel affine the kernels apply where they read it, and the training-mode BatchNorm gate.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_bn2_train_impl(
    const at::Tensor& x, const at::Tensor& small, const at::Tensor& k3, const at::Tensor& weight,
    const at::Tensor& bias, double eps, const at::Tensor& small_weight, const at::Tensor& small_bias,
    double small_eps) {
  for (const at::Tensor* t : {&small_weight, &small_bias}) {
    TORCH_CHECK(t->dim() == 1 && small.dim() == 4 && t->size(0) == small.size(1),
                "scnet_fused::_sc_gate_bn2_train_ag: the pooled branch's weight and bias must be 1-D with one "
                "value per channel of small, got ", t->sizes(), " for small ", small.sizes());
  }
  auto [small_mean, small_var] = prim_channel_stats(small);
  const BnFold f2 = bn_fold(small_weight, small_bias, small_mean, small_var, small_eps);
  auto [y, mean, var] = gate_bn_train_impl(x, small, k3, weight, bias, eps, f2.scale, f2.shift);
  return {y, mean, var, small_mean, small_var};
}

// A 4-d tensor itself where its strides are the ones its memory format gives a new tensor of its sizes,
// else a copy in that format. ATen's CPU BatchNorm backward (torch 2.14) misreads a channels_last input
// whose size-1 batch dimension has another stride than C*H*W (legal: a size-1 dimension's stride is
// never used) next to an NCHW gradient: the input and weight gradients came out wrong.
at::Tensor with_canonical_strides(const at::Tensor& t) {
  if (t.dim() != 4) return t.contiguous();
  const auto fmt = t.suggest_memory_format();
  const int64_t C = t.size(1), H = t.size(2), W = t.size(3);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const std::array<int64_t, 4> want = cl ? std::array<int64_t, 4>{H * W * C, 1, W * C, C}
                                         : std::array<int64_t, 4>{C * H * W, H * W, W, 1};
  for (int d = 0; d < 4; ++d)
    if (t.stride(d) != want[d]) return t.clone(fmt);
  return t;
}

struct GateBn2TrainFn : public torch::autograd::Function<GateBn2TrainFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& small,
                               const at::Tensor& k3, const at::Tensor& weight, const at::Tensor& bias, double eps,
                               const at::Tensor& small_weight, const at::Tensor& small_bias, double small_eps) {
    auto [y, mean, var, small_mean, small_var] =
        gate_bn2_train_impl(x, small, k3, weight, bias, eps, small_weight, small_bias, small_eps);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["small_eps"] = small_eps;
    ctx->mark_non_differentiable({mean, var, small_mean, small_var});
    ctx->save_for_backward({x, small, k3, weight, bias, mean, var, small_weight, small_bias, small_mean, small_var});
    return {y, mean, var, small_mean, small_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &small = saved[1], &k3 = saved[2], &weight = saved[3], &bias = saved[4];
    const at::Tensor &mean = saved[5], &var = saved[6], &small_weight = saved[7], &small_bias = saved[8];
    const at::Tensor &small_mean = saved[9], &small_var = saved[10];
    const double eps = ctx->saved_data["eps"].toDouble();
    const double small_eps = ctx->saved_data["small_eps"].toDouble();
    if (auto g = double_vjp("sc_gate_bn2_train", grads[0], {x, small, k3, weight, bias, small_weight, small_bias},
                            {eps, small_eps}, {5, 8}))
      return *g;
    at::Tensor dy = grads[0];
    if (!dy.defined()) dy = at::zeros_like(x);  // only the statistics were used (they carry no gradient)
    dy = dy.to(x.dtype()).contiguous(format_like(x));
    const BnFold f2 = bn_fold(small_weight, small_bias, small_mean, small_var, small_eps);
    auto [dx, dn, dk3, dweight, dbias] =
        gate_bn_train_grads(dy, x, small, k3, weight, bias, mean, var, eps, f2.scale, f2.shift);
    // The pooled branch's BatchNorm backward on the small map, from dn (the gradient of its output); the
    // weight in the statistics' dtype (half-precision parameters: ATen's mixed-type form).
    // (An empty pooled map, no channels or no images: nothing to reduce, and ATen's CPU BatchNorm
    // backward divides by the channel count, a floating-point exception at C = 0.)
    at::Tensor dsmall, dsw, dsb;
    if (small.numel() == 0) {
      dsmall = at::zeros_like(small);
      if (small_weight.requires_grad()) dsw = at::zeros_like(small_weight);
      if (small_bias.requires_grad()) dsb = at::zeros_like(small_bias);
    } else {
      std::tie(dsmall, dsw, dsb) = at::native_batch_norm_backward(
          dn, with_canonical_strides(small), small_weight.detach().to(small_mean.scalar_type()), c10::nullopt,
          c10::nullopt, small_mean,
          f2.invstd, true, small_eps, {true, small_weight.requires_grad(), small_bias.requires_grad()});
    }
    return guard_double_backward(
        {dx, dsmall, dk3, dweight.to(weight.scalar_type()), dbias.to(bias.scalar_type()), at::Tensor(),
         dsw.defined() ? dsw.to(small_weight.scalar_type()) : dsw,
         dsb.defined() ? dsb.to(small_bias.scalar_type()) : dsb, at::Tensor()},
        {grads[0], x, small, k3, weight, bias, small_weight, small_bias}, "scnet_fused.sc_gate_bn2_train_backward");
  }
};

// ---------------------------------------------------------------------------------------------
// bn_relu_train, and bn_train (relu false: the BatchNorm alone, a standalone SCConv's k4 norm; CPU
// only, where the modules take it). On the CPU one call each way (NCHW channel by channel); elsewhere
// (bn_relu_train) the statistics pass and the ReLU primitives.
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_impl(const at::Tensor& t_in, const at::Tensor& weight,
                                                             const at::Tensor& bias, double eps, bool relu) {
  const at::Tensor t = t_in.contiguous(format_like(t_in));
  if (t.is_cpu()) {  // one call: NCHW channel by channel, each channel read the second time from cache
    at::Tensor y = host::new_output(t.sizes(), t.options(), format_like(t));
    auto [mean, var] = prim_bn_train_out(t, weight.detach(), bias.detach(), eps, y, relu);
    return {y, mean, var};
  }
  TORCH_INTERNAL_ASSERT(relu, "bn_train: the BatchNorm alone has CPU kernels only");
  auto [mean, var] = prim_channel_stats(t);
  const BnFold f = bn_fold(weight, bias, mean, var, eps);
  return {prim_affine_relu(t, f.scale, f.shift), mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_impl(const at::Tensor& t, const at::Tensor& weight,
                                                                  const at::Tensor& bias, double eps) {
  return bn_train_impl(t, weight, bias, eps, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_only_train_impl(const at::Tensor& t, const at::Tensor& weight,
                                                                  const at::Tensor& bias, double eps) {
  TORCH_CHECK(t.is_cpu(), "bn_train: CPU tensors only (t is on ", t.device(), ")");
  TORCH_CHECK(t.dim() == 4 && t.size(0) * t.size(2) * t.size(3) > 0,
              "bn_train: expects a 4-D t with elements in every channel, got shape ", t.sizes());
  TORCH_CHECK(weight.dim() == 1 && bias.dim() == 1 && weight.size(0) == t.size(1) && bias.size(0) == t.size(1),
              "bn_train: weight and bias must be 1-D of t's ", t.size(1), " channels, got ", weight.sizes(), " and ",
              bias.sizes());
  return bn_train_impl(t, weight, bias, eps, false);
}

// (dt, dweight, dbias) of relu(batch_norm(t)) (or of batch_norm(t)) for the output gradient dy (dense
// like t, or a channel slice of a wider gradient in t's memory format, read in place by the kernels).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_grads(const at::Tensor& dy, const at::Tensor& t,
                                                              const at::Tensor& weight, const at::Tensor& bias,
                                                              const at::Tensor& mean, const at::Tensor& var, double eps,
                                                              bool relu) {
  if (t.is_cpu()) {  // one call: NCHW channel by channel, each channel's data read twice from cache
    auto [dt, dweight, dbias] = prim_bn_train_backward(dy, t, weight.detach(), bias.detach(), mean, var, eps, relu);
    return {dt, dweight.to(weight.scalar_type()), dbias.to(bias.scalar_type())};
  }
  TORCH_INTERNAL_ASSERT(relu, "bn_train: the BatchNorm alone has CPU kernels only");
  const BnFold f = bn_fold(weight, bias, mean, var, eps);
  // Pass 1: sum(g), sum(g * (t - mean)) with g the ReLU-masked dy; pass 2: dt = p g + q t + r.
  auto [sum_g, sum_gc] = prim_affine_relu_backward_sums(dy, t, f.scale, f.shift, mean.contiguous());
  const double m = static_cast<double>(t.size(0) * t.size(2) * t.size(3));
  at::Tensor dweight = sum_gc * f.invstd;
  at::Tensor q = (-f.scale * f.invstd * dweight / m).contiguous();
  at::Tensor r = (-q * mean - f.scale * sum_g / m).contiguous();
  at::Tensor dt = prim_affine_relu_backward_apply(dy, t, f.scale, f.shift, f.scale, q, r);
  return {dt, dweight.to(weight.scalar_type()), sum_g.to(bias.scalar_type())};
}

template <bool kRelu>
struct BnTrainFn : public torch::autograd::Function<BnTrainFn<kRelu>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& t, const at::Tensor& weight,
                               const at::Tensor& bias, double eps) {
    auto [y, mean, var] = kRelu ? bn_relu_train_impl(t, weight, bias, eps) : bn_only_train_impl(t, weight, bias, eps);
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, var});
    ctx->save_for_backward({t, weight, bias, mean, var});
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &weight = saved[1], &bias = saved[2], &mean = saved[3], &var = saved[4];
    const double eps = ctx->saved_data["eps"].toDouble();
    if (auto g = double_vjp(kRelu ? "bn_relu_train" : "bn_train", grads[0], {saved[0], weight, bias}, {eps}, {3}))
      return *g;
    const at::Tensor t = saved[0].contiguous(format_like(saved[0]));
    at::Tensor dy = grads[0];
    if (!dy.defined()) dy = at::zeros_like(t);
    dy = dy.to(t.dtype()).contiguous(format_like(t));
    auto [dt, dweight, dbias] = bn_train_grads(dy, t, weight, bias, mean, var, eps, kRelu);
    return guard_double_backward({dt, dweight, dbias, at::Tensor()}, {grads[0], saved[0], weight, bias},
                                 kRelu ? "scnet_fused.bn_relu_train_backward" : "scnet_fused.bn_train_backward");
  }
};

// ---------------------------------------------------------------------------------------------
// bn_add_relu_train: BatchNorm + residual addition + ReLU (a bottleneck's end)
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_add_relu_train_impl(const at::Tensor& t_in,
                                                                      const at::Tensor& weight,
                                                                      const at::Tensor& bias,
                                                                      const at::Tensor& residual, double eps) {
  TORCH_CHECK(residual.sizes() == t_in.sizes() && residual.scalar_type() == t_in.scalar_type() &&
                  residual.device() == t_in.device(),
              "bn_add_relu_train: residual must have t's shape, dtype and device");
  const at::Tensor t = t_in.contiguous(format_like(t_in));
  if (t.is_cpu()) {  // one call: NCHW channel by channel, each channel read the second time from cache
    return prim_bn_add_relu_train_forward(t, residual, weight.detach(), bias.detach(), eps);
  }
  auto [mean, var] = prim_channel_stats(t);
  const BnFold f = bn_fold(weight, bias, mean, var, eps);
  at::Tensor y = prim_affine_add_relu(t, residual, f.scale, f.shift);
  return {y, mean, var};
}

struct BnAddReluTrainFn : public torch::autograd::Function<BnAddReluTrainFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& t, const at::Tensor& weight,
                               const at::Tensor& bias, const at::Tensor& residual, double eps) {
    auto [y, mean, var] = bn_add_relu_train_impl(t, weight, bias, residual, eps);
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, var});
    ctx->save_for_backward({y, t, weight, bias, mean, var});
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &weight = saved[2], &bias = saved[3], &mean = saved[4], &var = saved[5];
    const double eps = ctx->saved_data["eps"].toDouble();
    // (t, weight, bias and the output y) -> gradients of t, weight, bias and the residual
    if (auto g = double_vjp("bn_add_relu_train", grads[0], {saved[1], weight, bias, saved[0]}, {eps}, {4})) return *g;
    const at::Tensor t = saved[1].contiguous(format_like(saved[1]));
    const at::Tensor y = saved[0].contiguous(format_like(t));
    at::Tensor dy = grads[0];
    if (!dy.defined()) dy = at::zeros_like(t);
    dy = dy.to(t.dtype()).contiguous(format_like(t));
    at::Tensor dt, dweight, dbias, dres;
    if (t.is_cpu()) {  // one call: NCHW channel by channel, g and t read the second time from cache
      std::tie(dt, dweight, dbias, dres) =
          prim_bn_add_relu_train_backward(dy, y, t, weight.detach(), bias.detach(), mean, var, eps);
      dweight = dweight.to(weight.scalar_type());
      dbias = dbias.to(bias.scalar_type());
    } else {
      // g = dy where the output is not <= 0 (the residual's gradient), then BatchNorm's backward from g
      // through the ReLU primitives with their mask off (scale 0, shift 1: 0 * t + 1 is never <= 0)
      dres = at::threshold_backward(dy, y, 0).contiguous(format_like(t));
      const BnFold f = bn_fold(weight, bias, mean, var, eps);
      const at::Tensor off = at::zeros_like(f.scale), on = at::ones_like(f.scale);
      auto [sum_g, sum_gc] = prim_affine_relu_backward_sums(dres, t, off, on, mean.contiguous());
      const double m = static_cast<double>(t.size(0) * t.size(2) * t.size(3));
      dweight = sum_gc * f.invstd;
      at::Tensor q = (-f.scale * f.invstd * dweight / m).contiguous();
      at::Tensor r = (-q * mean - f.scale * sum_g / m).contiguous();
      dt = prim_affine_relu_backward_apply(dres, t, off, on, f.scale, q, r);
      dweight = dweight.to(weight.scalar_type());
      dbias = sum_g.to(bias.scalar_type());
    }
    return guard_double_backward({dt, dweight, dbias, dres, at::Tensor()}, {grads[0], saved[1], weight, bias, saved[0]},
                                 "scnet_fused.bn_add_relu_train_backward");
  }
};

// ---------------------------------------------------------------------------------------------
// bn_relu_cat_train: both branches' BatchNorm + ReLU written into their concatenation
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_cat_train_impl(
    const at::Tensor& ta, const at::Tensor& wa, const at::Tensor& ba, double eps_a, const at::Tensor& tb,
    const at::Tensor& wb, const at::Tensor& bb, double eps_b) {
  const at::MemoryFormat fmt = format_like(ta);
  const int64_t ca = ta.size(1);
  at::Tensor out = host::new_output({ta.size(0), ca + tb.size(1), ta.size(2), ta.size(3)}, ta.options(), fmt);
  at::Tensor stats[4];
  const at::Tensor* ts[2] = {&ta, &tb};
  const at::Tensor* ws[2] = {&wa, &wb};
  const at::Tensor* bs[2] = {&ba, &bb};
  const double eps[2] = {eps_a, eps_b};
  for (int k = 0; k < 2; ++k) {
    const at::Tensor t = ts[k]->contiguous(fmt);
    at::Tensor half = k == 0 ? out.narrow(1, 0, ca) : out.narrow(1, ca, tb.size(1));
    at::Tensor mean, var;
    if (t.is_cpu()) {  // written in place, in one call
      std::tie(mean, var) = prim_bn_train_out(t, ws[k]->detach(), bs[k]->detach(), eps[k], half, true);
    } else {
      std::tie(mean, var) = prim_channel_stats(t);
      const BnFold f = bn_fold(*ws[k], *bs[k], mean, var, eps[k]);
      prim_affine_relu_out(t, f.scale, f.shift, half);  // written in place
    }
    stats[2 * k] = mean;
    stats[2 * k + 1] = var;
  }
  return {out, stats[0], stats[1], stats[2], stats[3]};
}

struct BnReluCatTrainFn : public torch::autograd::Function<BnReluCatTrainFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& ta, const at::Tensor& wa, const at::Tensor& ba,
                               double eps_a, const at::Tensor& tb, const at::Tensor& wb, const at::Tensor& bb,
                               double eps_b) {
    auto [out, mean_a, var_a, mean_b, var_b] = bn_relu_cat_train_impl(ta, wa, ba, eps_a, tb, wb, bb, eps_b);
    ctx->saved_data["eps_a"] = eps_a;
    ctx->saved_data["eps_b"] = eps_b;
    ctx->mark_non_differentiable({mean_a, var_a, mean_b, var_b});
    ctx->save_for_backward({ta, wa, ba, mean_a, var_a, tb, wb, bb, mean_b, var_b});
    return {out, mean_a, var_a, mean_b, var_b};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (auto g = double_vjp("bn_relu_cat_train", grads[0], {saved[0], saved[1], saved[2], saved[5], saved[6], saved[7]},
                            {ctx->saved_data["eps_a"].toDouble(), ctx->saved_data["eps_b"].toDouble()}, {3, 7}))
      return *g;
    const at::MemoryFormat fmt = format_like(saved[0]);
    const at::Tensor ta = saved[0].contiguous(fmt), tb = saved[5].contiguous(fmt);
    const int64_t ca = ta.size(1), cb = tb.size(1);
    at::Tensor dout = grads[0];
    if (!dout.defined()) dout = at::zeros({ta.size(0), ca + cb, ta.size(2), ta.size(3)}, ta.options());
    dout = dout.to(ta.dtype()).contiguous(fmt);
    // each half of dout is read in place by the kernels (a channel slice in ta's memory format)
    auto [dta, dwa, dba] = bn_train_grads(dout.narrow(1, 0, ca), ta, saved[1], saved[2], saved[3], saved[4],
                                          ctx->saved_data["eps_a"].toDouble(), true);
    auto [dtb, dwb, dbb] = bn_train_grads(dout.narrow(1, ca, cb), tb, saved[6], saved[7], saved[8], saved[9],
                                          ctx->saved_data["eps_b"].toDouble(), true);
    return guard_double_backward(
        {dta, dwa, dba, at::Tensor(), dtb, dwb, dbb, at::Tensor()},
        {grads[0], saved[0], saved[1], saved[2], saved[5], saved[6], saved[7]}, "scnet_fused.bn_relu_cat_train_backward");
  }
};

// ---------------------------------------------------------------------------------------------
// relu_cat: cat([relu(a), relu(b)], 1), each ReLU writing its half of the output (a's memory format)
// ---------------------------------------------------------------------------------------------
at::Tensor relu_cat_impl(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "scnet_fused::_relu_cat_ag";
  TORCH_CHECK(a.dim() == 4 && b.dim() == 4, op, ": expected 4-D tensors, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(2) && a.size(3) == b.size(3), op, ": shapes ",
              a.sizes(), " and ", b.sizes(), " differ outside dim 1");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.device() == b.device(), op, ": dtype/device differ (",
              a.scalar_type(), " on ", a.device(), ", ", b.scalar_type(), " on ", b.device(), ")");
  const int64_t ca = a.size(1);
  at::Tensor out = host::new_output({a.size(0), ca + b.size(1), a.size(2), a.size(3)}, a.options(), format_like(a));
  at::Tensor out_a = out.narrow(1, 0, ca), out_b = out.narrow(1, ca, b.size(1));
  at::clamp_min_out(out_a, a, 0);
  at::clamp_min_out(out_b, b, 0);
  return out;
}

struct ReluCatFn : public torch::autograd::Function<ReluCatFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    at::Tensor out = relu_cat_impl(a, b);
    ctx->saved_data["ca"] = a.size(1);
    ctx->save_for_backward({out});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor out = ctx->get_saved_variables()[0];
    const int64_t ca = ctx->saved_data["ca"].toInt(), cb = out.size(1) - ca;
    const at::Tensor& g = grads[0];
    // (out) -> gradients of a and b
    if (auto d = double_vjp("relu_cat", g, {out}, {static_cast<double>(ca)})) return *d;
    const at::MemoryFormat fmt = format_like(out);
    const at::Tensor zero = at::zeros({}, g.options());
    // Each half masked straight from the slices (one read of grad and out, one write per half); zero
    // where out <= 0, as ReLU's own backward (a NaN output passes the gradient).
    at::Tensor ga = at::where(out.narrow(1, 0, ca) <= 0, zero, g.narrow(1, 0, ca)).contiguous(fmt);
    at::Tensor gb = at::where(out.narrow(1, ca, cb) <= 0, zero, g.narrow(1, ca, cb)).contiguous(fmt);
    return guard_double_backward({ga, gb}, {g, out}, "scnet_fused.relu_cat_backward");
  }
};

// ---------------------------------------------------------------------------------------------
// BatchNorm helpers of the modules
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> bn_affine_fold(const c10::optional<at::Tensor>& weight,
                                                  const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                  const at::Tensor& var, double eps, at::ScalarType dtype) {
  const auto opts = mean.options().dtype(at::kFloat);
  const at::Tensor w = weight.has_value() && weight->defined() ? *weight : at::ones({mean.size(0)}, opts);
  const at::Tensor b = bias.has_value() && bias->defined() ? *bias : at::zeros({mean.size(0)}, opts);
  BnFold f = affine_fold(w, b, mean, var, eps, dtype);
  return {f.scale, f.shift};
}

std::tuple<at::Tensor, at::Tensor> conv_bn_fold(const at::Tensor& conv_weight, const c10::optional<at::Tensor>& weight,
                                                const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                const at::Tensor& var, double eps, at::ScalarType dtype) {
  TORCH_CHECK(conv_weight.dim() == 4 && mean.dim() == 1 && conv_weight.size(0) == mean.size(0),
              "scnet_fused::_conv_bn_fold: expected (K, C, kH, kW) convolution filters with K = ", mean.sizes(),
              "'s channel count, got ", conv_weight.sizes());
  auto [scale, shift] = bn_affine_fold(weight, bias, mean, var, eps, dtype);
  const at::ScalarType wt = conv_weight.scalar_type();
  return {(conv_weight.to(scale.scalar_type()) * scale.view({-1, 1, 1, 1})).to(wt), shift.to(wt)};
}

// running = (1 - factor) * running + factor * stat in place; 16-bit float buffers in float32, rounded
// once, as ATen's BatchNorm (a batch variance above 65504 still moves a float16 running variance by a
// finite step). The Python twin is _blend_ of scnet_fused/modules.py.
static void blend_(at::Tensor& running, const at::Tensor& stat, double factor) {
  const at::ScalarType rt = running.scalar_type();
  if (rt == at::kHalf || rt == at::kBFloat16) {
    running.copy_(running.to(at::kFloat).mul_(1.0 - factor).add_(stat.to(at::kFloat), factor));
  } else {
    running.mul_(1.0 - factor).add_(stat.to(rt), factor);
  }
}

void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                          const at::Tensor& var, double factor, double unbias) {
  at::NoGradGuard no_grad;
  blend_(running_mean, mean, factor);
  blend_(running_var, var * unbias, factor);
}

// ---------------------------------------------------------------------------------------------
// sc_avgpool (its backward is linear, with the pool as adjoint: differentiable to any order)
// ---------------------------------------------------------------------------------------------
struct AvgPoolFn;

struct AvgPoolBackwardFn : public torch::autograd::Function<AvgPoolBackwardFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& dy, int64_t H, int64_t W, int64_t r,
                            bool channels_last) {
    ctx->saved_data["r"] = r;
    return prim_avgpool_backward(dy, H, W, r, channels_last);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads);
};

struct AvgPoolFn : public torch::autograd::Function<AvgPoolFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t r) {
    ctx->saved_data["r"] = r;
    ctx->saved_data["H"] = x.size(2);
    ctx->saved_data["W"] = x.size(3);
    ctx->saved_data["cl"] = is_channels_last(x);
    return prim_avgpool(x.contiguous(format_like(x)), r);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t r = ctx->saved_data["r"].toInt();
    at::Tensor dx = AvgPoolBackwardFn::apply(grads[0], ctx->saved_data["H"].toInt(), ctx->saved_data["W"].toInt(), r,
                                             ctx->saved_data["cl"].toBool());
    return {dx, at::Tensor()};
  }
};

variable_list AvgPoolBackwardFn::backward(AutogradContext* ctx, variable_list grads) {
  const at::Tensor g = grads[0];
  return {AvgPoolFn::apply(g, ctx->saved_data["r"].toInt()), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
}

// ---------------------------------------------------------------------------------------------
// Kernels of the registered ops
// ---------------------------------------------------------------------------------------------
at::Tensor sc_gate_autograd(const at::Tensor& x, const at::Tensor& small, const at::Tensor& k3,
                            const OptTensor& scale, const OptTensor& shift, const OptTensor& small_scale,
                            const OptTensor& small_shift) {
  return GateFn::apply(x, small, k3, scale, shift, small_scale, small_shift);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sc_gate_bn_train_plain(const at::Tensor& x, const at::Tensor& small,
                                                                      const at::Tensor& k3, const at::Tensor& weight,
                                                                      const at::Tensor& bias, double eps) {
  return gate_bn_train_impl(x, small, k3, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sc_gate_bn2_train_autograd(
    const at::Tensor& x, const at::Tensor& small, const at::Tensor& k3, const at::Tensor& weight,
    const at::Tensor& bias, double eps, const at::Tensor& small_weight, const at::Tensor& small_bias,
    double small_eps) {
  auto out = GateBn2TrainFn::apply(x, small, k3, weight, bias, eps, small_weight, small_bias, small_eps);
  return {out[0], out[1], out[2], out[3], out[4]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sc_gate_bn_train_autograd(const at::Tensor& x, const at::Tensor& small,
                                                                         const at::Tensor& k3, const at::Tensor& weight,
                                                                         const at::Tensor& bias, double eps) {
  auto out = GateBnTrainFn::apply(x, small, k3, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

at::Tensor sc_avgpool_autograd(const at::Tensor& x, int64_t r) { return AvgPoolFn::apply(x, r); }

at::Tensor relu_cat_autograd(const at::Tensor& a, const at::Tensor& b) { return ReluCatFn::apply(a, b); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_train_autograd(const at::Tensor& t, const at::Tensor& weight,
                                                                      const at::Tensor& bias, double eps) {
  auto out = BnTrainFn<true>::apply(t, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_add_relu_train_autograd(const at::Tensor& t,
                                                                          const at::Tensor& weight,
                                                                          const at::Tensor& bias,
                                                                          const at::Tensor& residual, double eps) {
  auto out = BnAddReluTrainFn::apply(t, weight, bias, residual, eps);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_cat_train_autograd(
    const at::Tensor& ta, const at::Tensor& wa, const at::Tensor& ba, double eps_a, const at::Tensor& tb,
    const at::Tensor& wb, const at::Tensor& bb, double eps_b) {
  auto out = BnReluCatTrainFn::apply(ta, wa, ba, eps_a, tb, wb, bb, eps_b);
  return {out[0], out[1], out[2], out[3], out[4]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_autograd(const at::Tensor& t, const at::Tensor& weight,
                                                                 const at::Tensor& bias, double eps) {
  auto out = BnTrainFn<false>::apply(t, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

at::Tensor sc_avgpool_plain(const at::Tensor& x, int64_t r) { return prim_avgpool(x.contiguous(format_like(x)), r); }

}  // namespace
}  // namespace scnet_fused

TORCH_LIBRARY_FRAGMENT(scnet_fused, m) {
  m.def("_sc_gate_ag(Tensor x, Tensor small, Tensor k3, Tensor? scale, Tensor? shift, Tensor? small_scale=None, "
        "Tensor? small_shift=None) -> Tensor");
  m.def("_sc_gate_bn_train_ag(Tensor x, Tensor small, Tensor k3, Tensor weight, Tensor bias, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("_sc_gate_bn2_train_ag(Tensor x, Tensor small, Tensor k3, Tensor weight, Tensor bias, float eps, "
        "Tensor small_weight, Tensor small_bias, float small_eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("_sc_avgpool_ag(Tensor x, int r) -> Tensor");
  m.def("_relu_cat_ag(Tensor a, Tensor b) -> Tensor");
  m.def("_bn_affine_fold(Tensor? weight, Tensor? bias, Tensor mean, Tensor var, float eps, ScalarType dtype) "
        "-> (Tensor, Tensor)");
  m.def("_conv_bn_fold(Tensor conv_weight, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, float eps, "
        "ScalarType dtype) -> (Tensor, Tensor)");
  m.def("_update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
        "float factor, float unbias) -> ()");
  m.def("_bn_relu_train_ag(Tensor t, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("_bn_train_ag(Tensor t, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("_bn_add_relu_train_ag(Tensor t, Tensor weight, Tensor bias, Tensor residual, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("_bn_relu_cat_train_ag(Tensor ta, Tensor wa, Tensor ba, float eps_a, Tensor tb, Tensor wb, Tensor bb, "
        "float eps_b) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(scnet_fused, Autograd, m) {
  m.impl("_sc_gate_ag", &scnet_fused::sc_gate_autograd);
  m.impl("_sc_gate_bn_train_ag", &scnet_fused::sc_gate_bn_train_autograd);
  m.impl("_sc_gate_bn2_train_ag", &scnet_fused::sc_gate_bn2_train_autograd);
  m.impl("_sc_avgpool_ag", &scnet_fused::sc_avgpool_autograd);
  m.impl("_relu_cat_ag", &scnet_fused::relu_cat_autograd);
  m.impl("_bn_relu_train_ag", &scnet_fused::bn_relu_train_autograd);
  m.impl("_bn_train_ag", &scnet_fused::bn_train_autograd);
  m.impl("_bn_add_relu_train_ag", &scnet_fused::bn_add_relu_train_autograd);
  m.impl("_bn_relu_cat_train_ag", &scnet_fused::bn_relu_cat_train_autograd);
}

TORCH_LIBRARY_IMPL(scnet_fused, CompositeExplicitAutograd, m) {
  m.impl("_sc_gate_ag", &scnet_fused::gate_impl);
  m.impl("_sc_gate_bn_train_ag", &scnet_fused::sc_gate_bn_train_plain);
  m.impl("_sc_gate_bn2_train_ag", &scnet_fused::gate_bn2_train_impl);
  m.impl("_sc_avgpool_ag", &scnet_fused::sc_avgpool_plain);
  m.impl("_relu_cat_ag", &scnet_fused::relu_cat_impl);
  m.impl("_bn_relu_train_ag", &scnet_fused::bn_relu_train_impl);
  m.impl("_bn_train_ag", &scnet_fused::bn_only_train_impl);
  m.impl("_bn_add_relu_train_ag", &scnet_fused::bn_add_relu_train_impl);
  m.impl("_bn_relu_cat_train_ag", &scnet_fused::bn_relu_cat_train_impl);
}

TORCH_LIBRARY_IMPL(scnet_fused, CompositeImplicitAutograd, m) {
  m.impl("_bn_affine_fold", &scnet_fused::bn_affine_fold);
  m.impl("_conv_bn_fold", &scnet_fused::conv_bn_fold);
  m.impl("_update_running_stats_", &scnet_fused::update_running_stats);
}
