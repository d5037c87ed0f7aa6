// CPU kernel of a 2-D max pool on NCHW float32 maps (`_max_pool2d_nchw`; SCNet's stem pool, 3x3 with
// stride 2 and padding 1), with ATen's exact results: the same values and the same indices.
//
// ATen's own NCHW kernel took 25 ms for the stem's 8x64x112x112 map on a 2-core AMD EPYC, against
// 1.5 ms for its channels_last kernel. Here the outputs of a row are vectorized: each input row is
// split into its column phases (column sW * m + ph at P[ph][m]; once per task, for the consecutive
// output rows that share it), so that one window column of kV consecutive outputs is one contiguous
// vector load. Each lane then
// runs ATen's scan exactly (window rows top to bottom, columns left to right; an element replaces the
// running maximum where it is greater, or NaN, so that ties keep the first maximum and the last NaN
// wins; the running maximum starts at -inf with the window's first element's index), which gives
// ATen's index where several elements tie (ReLU outputs of zero, common before the stem pool). The
// outputs whose windows reach into the padding run ATen's scan as scalar code. Indices are the element's
// offset in its plane (int64), as max_pool2d_with_indices returns them; its backward takes them as
// they are. No reduction crosses a task: the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "sc_host.h"

namespace scnet_fused {
namespace cpu_maxpool {
namespace {

using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
constexpr int64_t kV = Vec::size();
static_assert(IVec::size() == kV, "float and int32 vectors must have the same lane count");

struct Geometry {
  int64_t H, W, Ho, Wo, kH, kW, sH, sW, pH, pW;
};

// Output columns [j_lo, j_hi) whose windows lie inside the row (no padding column).
inline void interior_columns(const Geometry& g, int64_t* j_lo, int64_t* j_hi) {
  const int64_t lo = (g.pW + g.sW - 1) / g.sW;                       // j * sW - pW >= 0
  const int64_t hi = g.W - g.kW + g.pW >= 0 ? (g.W - g.kW + g.pW) / g.sW + 1 : 0;  // j * sW - pW + kW <= W
  *j_lo = std::min(lo, g.Wo);
  *j_hi = std::max(*j_lo, std::min(hi, g.Wo));
}

// ATen's scan for one output (plane xp, output (i, j)): value and plane offset of the maximum.
inline void scan_one(const float* xp, const Geometry& g, int64_t i, int64_t j, float* out_v, int64_t* out_i) {
  const int64_t ih0 = i * g.sH - g.pH, iw0 = j * g.sW - g.pW;
  const int64_t r0 = std::max<int64_t>(ih0, 0), r1 = std::min(ih0 + g.kH, g.H);
  const int64_t c0 = std::max<int64_t>(iw0, 0), c1 = std::min(iw0 + g.kW, g.W);
  float best = -std::numeric_limits<float>::infinity();
  int64_t at = r0 * g.W + c0;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = c0; c < c1; ++c) {
      const float v = xp[r * g.W + c];
      if (v > best || std::isnan(v)) {
        best = v;
        at = r * g.W + c;
      }
    }
  }
  *out_v = best;
  *out_i = at;
}

// The column phases of input row `row` (W floats) into q: q[ph * stride_ph + m] = row[sW * m + ph].
inline void split_phases(const float* row, const Geometry& g, int64_t stride_ph, float* q) {
  if (g.sW == 1) {
    std::copy(row, row + g.W, q);
    return;
  }
  int64_t m = 0;
  if (g.sW == 2) {  // two vectors of the row -> kV even and kV odd columns
    for (; 2 * (m + kV) <= g.W; m += kV) {
      const auto eo = at::vec::deinterleave2(Vec::loadu(row + 2 * m), Vec::loadu(row + 2 * m + kV));
      std::get<0>(eo).store(q + m);
      std::get<1>(eo).store(q + stride_ph + m);
    }
  }
  for (int64_t ph = 0; ph < g.sW; ++ph) {
    float* d = q + ph * stride_ph;
    const int64_t m1 = (g.W - ph + g.sW - 1) / g.sW;
    for (int64_t k = m; k < m1; ++k) d[k] = row[g.sW * k + ph];
  }
}

// Per task: the column phases of the last kH input rows split (slot r % kH holds row r of plane
// `plane`), so that an input row shared by consecutive output rows is split once.
struct PhaseRows {
  int64_t stride_ph, stride_row;
  std::vector<float> buf;
  std::vector<int64_t> plane_of, row_of;
  explicit PhaseRows(const Geometry& g)
      : stride_ph(g.W / g.sW + kV + 1),
        stride_row(g.sW * stride_ph),
        buf(static_cast<size_t>(g.kH * stride_row + kV)),
        plane_of(g.kH, -1),
        row_of(g.kH, -1) {}
  const float* get(const float* xp, int64_t plane, int64_t r, const Geometry& g) {
    const int64_t slot = r % g.kH;
    float* q = buf.data() + slot * stride_row;
    if (plane_of[slot] != plane || row_of[slot] != r) {
      split_phases(xp + r * g.W, g, stride_ph, q);
      plane_of[slot] = plane;
      row_of[slot] = r;
    }
    return q;
  }
};

// One output row (plane `plane` at xp, row i) into yp[0, Wo) (and ip, when set).
template <bool kIdx>
void pool_row(const float* xp, int64_t plane, const Geometry& g, int64_t i, float* yp, int64_t* ip, PhaseRows& rows) {
  const int64_t ih0 = i * g.sH - g.pH;
  const int64_t r0 = std::max<int64_t>(ih0, 0), r1 = std::min(ih0 + g.kH, g.H);
  int64_t j_lo, j_hi;
  interior_columns(g, &j_lo, &j_hi);
  const int64_t stride_ph = rows.stride_ph;
  if (j_hi - j_lo >= kV) {
    const float* P[16];
    for (int64_t r = r0; r < r1; ++r) P[r - r0] = rows.get(xp, plane, r, g);
    alignas(64) int32_t ibuf[kV];
    int32_t lane_off[kV];
    for (int64_t l = 0; l < kV; ++l) lane_off[l] = static_cast<int32_t>(l * g.sW);
    const IVec lanes = IVec::loadu(lane_off);
    // kV outputs from j (j + kV <= j_hi): each lane runs ATen's scan of its window.
    const auto block = [&](int64_t j) {
      Vec best(-std::numeric_limits<float>::infinity());
      IVec at(static_cast<int32_t>(r0 * g.W + j * g.sW - g.pW));
      at = at + lanes;
      for (int64_t r = r0; r < r1; ++r) {
        const float* pr = P[r - r0];
        for (int64_t c = 0; c < g.kW; ++c) {
          // column j * sW - pW + c = sW * (j + q) + ph, 0 <= ph < sW
          const int64_t off = c - g.pW;
          const int64_t q = off >= 0 ? off / g.sW : -((-off + g.sW - 1) / g.sW);
          const int64_t ph = off - q * g.sW;
          const Vec v = Vec::loadu(pr + ph * stride_ph + j + q);
          const Vec take = (v > best) | v.isnan();
          best = Vec::blendv(best, v, take);
          if constexpr (kIdx) {
            const IVec here = IVec(static_cast<int32_t>(r * g.W + j * g.sW - g.pW + c)) + lanes;
            at = IVec::blendv(at, here, at::vec::cast<int32_t>(take));
          }
        }
      }
      best.store(yp + j);
      if constexpr (kIdx) {
        at.store(ibuf);
        for (int64_t l = 0; l < kV; ++l) ip[j + l] = ibuf[l];
      }
    };
    int64_t j = j_lo;
    for (; j + kV <= j_hi; j += kV) block(j);
    if (j < j_hi) block(j_hi - kV);  // the rest as one block overlapping the one before (equal values rewritten)
  } else {
    j_lo = j_hi = 0;
  }
  // the columns left (those whose windows reach into the padding, or all of a short row): ATen's scan each
  const auto scalar = [&](int64_t j) {
    int64_t a;
    scan_one(xp, g, i, j, yp + j, &a);
    if constexpr (kIdx) ip[j] = a;
  };
  for (int64_t j = 0; j < j_lo; ++j) scalar(j);
  for (int64_t j = j_hi; j < g.Wo; ++j) scalar(j);
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_nchw(const at::Tensor& x, int64_t kH, int64_t kW, int64_t sH,
                                                    int64_t sW, int64_t pH, int64_t pW, bool need_indices) {
  const char* op = "scnet_fused::_max_pool2d_nchw (cpu)";
  TORCH_CHECK(x.device().is_cpu(), op, ": expected a CPU tensor");
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D (N, C, H, W) input, got ", x.dim(), " dimensions");
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": expected float32, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), op, ": expected a contiguous (NCHW) input");
  TORCH_CHECK(kH > 0 && kW > 0 && sH > 0 && sW > 0, op, ": kernel size and stride must be positive");
  TORCH_CHECK(kH <= 16, op, ": kernel heights above 16 are not supported");
  // (pH <= kH / 2, not 2 pH <= kH: no product that can overflow for a huge padding)
  TORCH_CHECK(pH >= 0 && pW >= 0 && pH <= kH / 2 && pW <= kW / 2, op,
              ": padding must be non-negative and at most half the kernel size");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(H + 2 * pH >= kH && W + 2 * pW >= kW, op, ": the padded input (", H + 2 * pH, "x", W + 2 * pW,
              ") is smaller than the kernel (", kH, "x", kW, ")");
  TORCH_CHECK(H * W < (int64_t(1) << 31) - kV * sW, op, ": planes above 2^31 elements are not supported");
  const Geometry g{H, W, (H + 2 * pH - kH) / sH + 1, (W + 2 * pW - kW) / sW + 1, kH, kW, sH, sW, pH, pW};
  at::Tensor y = host::new_output({N, C, g.Ho, g.Wo}, x.options());
  at::Tensor idx = at::empty({need_indices ? N : 0, C, g.Ho, g.Wo}, x.options().dtype(at::kLong));
  if (host::poison_enabled()) idx.fill_(-1);  // (the debug poison: an index the kernel forgets stays -1)
  const int64_t rows = N * C * g.Ho;
  if (rows == 0 || g.Wo == 0) return {y, idx};
  const float* xd = x.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  int64_t* id = need_indices ? idx.data_ptr<int64_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.Wo * kH * kW));
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    PhaseRows phase_rows(g);
    for (int64_t row = b; row < e; ++row) {
      const int64_t plane = row / g.Ho, i = row % g.Ho;
      const float* xp = xd + plane * H * W;
      if (id) {
        pool_row<true>(xp, plane, g, i, yd + row * g.Wo, id + row * g.Wo, phase_rows);
      } else {
        pool_row<false>(xp, plane, g, i, yd + row * g.Wo, nullptr, phase_rows);
      }
    }
  });
  return {y, idx};
}

}  // namespace
}  // namespace cpu_maxpool
}  // namespace scnet_fused

TORCH_LIBRARY_IMPL(scnet_fused, CPU, m) {
  m.impl("_max_pool2d_nchw", &scnet_fused::cpu_maxpool::max_pool2d_nchw);
}
