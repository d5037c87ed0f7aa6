// Per-element math of the self-calibration gate, shared by the CPU and CUDA kernels.
//
//   z  = x + small[n, c, ri(i), ci(j)]          (nearest upsampling, see sc_index.h; with the pooled
//                                                branch's affine, small * small_scale[c] + small_shift[c])
//   s  = sigmoid(z)
//   a  = k3 * scale[c] + shift[c]               (affine of k3: an eval BatchNorm folded in)
//   y  = a * s
// Backward, for an incoming gradient dy:
//   g  = dy * s                                 (gradient reaching a; dk3 = g * scale)
//   dz = dy * a * s * (1 - s)                   (gradient of x, and of small after the cell sums)
// Training BatchNorm of k3 (second pass):  dk3 = p[c] * g + q[c] * k3 + r[c].
//
// The upsampling adjoint walks "cells": the output indices that read source index a form the
// contiguous run [cell_start(a), cell_start(a + 1)) because the index map is monotone.
#pragma once
#include <cmath>
#include <cstdint>

#include "sc_index.h"

namespace scnet_fused {

SCNET_HD float gate_sigmoid(float z) {
#if defined(__CUDA_ARCH__)
  return 1.0f / (1.0f + __expf(-z));
#else
  return 1.0f / (1.0f + std::exp(-z));
#endif
}

// The pooled branch's per-channel affine (its BatchNorm), one fused multiply-add in every backend.
SCNET_HD float small_affine_apply(float v, float scale, float shift) { return fmaf(v, scale, shift); }

// k3 * scale + shift (scale 1 and shift 0 when absent).
SCNET_HD float affine_apply(float k, float scale, float shift) { return k * scale + shift; }

// Forward value of the gate: affine(k3) * sigmoid(x + up).
SCNET_HD float gate_value(float a, float s) { return a * s; }

// g = dy * s.
SCNET_HD float gate_grad_a(float dy, float s) { return dy * s; }

// dz = dy * a * s * (1 - s): the gradient of the sigmoid's argument.
SCNET_HD float gate_grad_z(float dy, float a, float s) { return dy * a * s * (1.0f - s); }

// Input gradient of a training-mode BatchNorm of k3 written as p * g + q * k3 + r.
SCNET_HD float bn_train_input_grad(float p, float g, float q, float k, float r) { return p * g + q * k + r; }

// Per-channel BatchNorm fold: normalized-and-affine k3 == k3 * scale + shift.
SCNET_HD float bn_fold_scale(float weight, float invstd) { return weight * invstd; }
SCNET_HD float bn_fold_shift(float bias, float mean, float scale) { return bias - mean * scale; }

// First output index whose source index is >= a, for a in [0, in_size]; cell_start(in_size) is
// out_size. Source index a is read by the outputs [cell_start(a), cell_start(a + 1)), an empty range
// when no output reads it. Binary search over the monotone map: exact at any size.
SCNET_HD int64_t cell_start(int64_t a, float scale, int64_t in_size, int64_t out_size) {
  if (a <= 0) return 0;
  if (a >= in_size) return out_size;
  int64_t lo = 0;
  int64_t hi = out_size;  // invariant: the answer lies in [lo, hi]
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (nearest_source(mid, scale, in_size, out_size) >= a) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// Whether every source index's run of outputs is `run` long and starts at a multiple of it (56 -> 14
// and 28 -> 7 at run 4; the Python twin is scnet_fused._index.uniform_run).
SCNET_HD bool uniform_cell_runs(int64_t run, float scale, int64_t in_size, int64_t out_size) {
  if (out_size != run * in_size) return false;
  for (int64_t a = 0; a <= in_size; ++a) {
    if (cell_start(a, scale, in_size, out_size) != a * run) return false;
  }
  return true;
}

}  // namespace scnet_fused
