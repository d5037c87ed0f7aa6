// CPU kernels of the gate primitives (contract: scnet_fused/ops/_dispatch.py).
//
// Layouts: NCHW (contiguous) and NHWC (channels_last), read in place. Math in float32 for float32,
// float16 and bfloat16 storage. Vectorized with at::vec::Vectorized<float>, threaded with
// at::parallel_for. Every reduction (the upsampling adjoint and the per-channel sums) is split into
// tasks fixed by the shape alone and summed in a fixed order, so results do not depend on the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include "sc_cpu_stats.h"
#include "sc_cpu_vec.h"
#include "sc_gate_math.h"
#include "sc_host.h"

// SCNET_FUSED_ALWAYS_INLINE (sc_cpu_vec.h): the per-plane bodies of the NCHW kernels are inlined into
// every loop that walks planes (the plane-by-plane and the channel-by-channel ones).

namespace scnet_fused {
namespace cpu {
namespace {

using namespace ::scnet_fused::host;
using ::scnet_fused::cpu_vec::grain_for;

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();
// Float accumulators are flushed to double at least this often (elements per lane ~ kFlush / kV).
constexpr int64_t kFlush = 1024;

// ------------------------------------------------------------------------------------------------
// Loads and stores of kV elements of a storage type as float vectors.
// ------------------------------------------------------------------------------------------------
template <typename T>
struct IO {  // c10::Half, c10::BFloat16
  static Vec load(const T* p) {
    Vec v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
  static Vec load(const T* p, int64_t n) {
    T tmp[kV];
    for (int64_t e = 0; e < kV; ++e) tmp[e] = e < n ? p[e] : T(0.0f);
    return load(tmp);
  }
  static void store(T* p, const Vec& v) { at::vec::convert_from_float<T>(v, v).store(p, kV); }
  static void store(T* p, const Vec& v, int64_t n) { at::vec::convert_from_float<T>(v, v).store(p, n); }
};

template <>
struct IO<float> {
  static Vec load(const float* p) { return Vec::loadu(p); }
  static Vec load(const float* p, int64_t n) { return Vec::loadu(p, n); }
  static void store(float* p, const Vec& v) { v.store(p); }
  static void store(float* p, const Vec& v, int64_t n) { v.store(p, n); }
};

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__)
// 1 / d for d >= 1 in the lanes of keep, 0 in the others (the Newton step's last multiply zeroes them).
inline __m512 reciprocal_or_zero(__m512 d, __mmask16 keep) {
  const __m512 r = _mm512_rcp14_ps(d);  // 14 bits; one Newton step gives about 23 (rcp14(1) is 1)
  return _mm512_maskz_mul_ps(keep, r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}
#endif

// 1 / d for d >= 1: the hardware reciprocal estimate refined by one Newton step (about 23 bits), and
// exactly 1 for d = 1 (a saturated sigmoid: 1 / (1 + 2^-30) is 1 in float32, and s * (1 - s), the
// gate's derivative, must then be 0 as torch's is).
inline Vec vreciprocal(const Vec& d) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__)
  return reciprocal_or_zero(d, static_cast<__mmask16>(0xFFFF));
#elif defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__) && defined(__FMA__)
  // rcp(1) is 1 - 2^-12, refined to 1 - 2^-24: d = 1 is given 1 by a blend
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 r = _mm256_rcp_ps(d);
  const __m256 refined = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
  return _mm256_blendv_ps(refined, one, _mm256_cmp_ps(d, one, _CMP_EQ_OQ));
#else
  return Vec(1.0f) / d;
#endif
}


// 2^f on [-1/2, 1/2] for the vectorized sigmoids below: a degree-5 polynomial fitted by iteratively
// reweighted least squares (maximum relative error 1.9e-7 evaluated in float32; the degree-6 Taylor
// polynomial has 2.2e-7), highest degree first, evaluated by Horner's rule.
constexpr float kExp2Poly[6] = {1.3280890409721954e-3f, 9.6770689263959850e-3f, 5.5507120134055300e-2f,
                                2.4022086607356520e-1f, 6.9314695648539530e-1f, 1.0000000798170599f};

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__) && defined(__AVX512DQ__)
// sigmoid(z) = 1 / (1 + 2^t), t = -z * log2(e). 2^t = 2^n * 2^f with n = round(t) and f = t - n in
// [-1/2, 1/2] (reduce computes t - round(t) exactly, and 0 for an infinite t), 2^f by kExp2Poly, 2^n
// applied by scalef (exact for integral n; it saturates to 0 or infinity instead of wrapping, so z needs
// no clamp: for z = +inf the denominator is 1 + 0). 1 / d by reciprocal_or_zero, 0 where z < -87 (there
// d may be infinite, and the Newton step would give NaN): below -87 the result is 0, as in the AVX2
// build. Each operation here counts: the gate kernels' arithmetic is mostly this function (14 vector
// operations).
inline Vec vsigmoid(const Vec& z) {
  const __m512 t = _mm512_mul_ps(z, _mm512_set1_ps(-1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_scalef_ps(p, n));
  // NaN z: not below -87 (an unordered compare), so the NaN passes through.
  return reciprocal_or_zero(d, _mm512_cmp_ps_mask(z, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ));
}
#elif defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__) && defined(__FMA__)
// sigmoid(z) = 1 / (1 + 2^t), t = -z * log2(e), with z clamped to [-87, 87] (the result is then 1 or
// below 2e-38). 2^t = 2^n * 2^f: n = round(t) by adding and subtracting 1.5 * 2^23 (the sum's low
// mantissa bits are then n, shifted into the exponent below), f = t - n in [-1/2, 1/2] from one fused
// multiply-subtract, 2^f by kExp2Poly.
inline Vec vsigmoid(const Vec& z) {
  // min/max return their second operand when one is NaN: z goes second so a NaN passes through.
  const __m256 zc = _mm256_max_ps(_mm256_set1_ps(-87.0f), _mm256_min_ps(_mm256_set1_ps(87.0f), z));
  const __m256 nlog2e = _mm256_set1_ps(-1.44269504088896341f);
  const __m256 magic = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23
  const __m256 tm = _mm256_fmadd_ps(zc, nlog2e, magic);
  const __m256 n = _mm256_sub_ps(tm, magic);
  const __m256 f = _mm256_fmsub_ps(zc, nlog2e, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i bits = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_castps_si256(tm), 23));
  const __m256 r = vreciprocal(Vec(_mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_castsi256_ps(bits))));
  // Below -87 the sigmoid is 0 (as torch's: 1 / (1 + inf)), so -inf * 0 gives NaN there too.
  return _mm256_blendv_ps(r, _mm256_setzero_ps(), _mm256_cmp_ps(z, _mm256_set1_ps(-87.0f), _CMP_LT_OQ));
}
#else
inline Vec vsigmoid(const Vec& z) { return vreciprocal(Vec(1.0f) + z.neg().exp_u20()); }
#endif

using ::scnet_fused::cpu_vec::hsum;
using ::scnet_fused::cpu_stats::bn_fold_one;
using ::scnet_fused::cpu_stats::bn_input_affine;
using ::scnet_fused::cpu_stats::stats_nchw;
using ::scnet_fused::cpu_stats::stats_nhwc;

// ------------------------------------------------------------------------------------------------
// Shapes, index tables, argument checks.
// ------------------------------------------------------------------------------------------------
struct Geometry {
  int64_t N, C, H, W, h, w;
  std::vector<int64_t> rsrc, csrc;  // source row / column of every output row / column
  std::vector<int64_t> rs, cs;      // cell starts: h + 1 and w + 1 entries
};

Geometry make_geometry(const at::Tensor& x, const at::Tensor& small) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.h = small.size(2);
  g.w = small.size(3);
  const float sh = nearest_scale(g.h, g.H);
  const float sw = nearest_scale(g.w, g.W);
  g.rsrc.resize(g.H);
  g.csrc.resize(g.W);
  for (int64_t i = 0; i < g.H; ++i) g.rsrc[i] = nearest_source(i, sh, g.h, g.H);
  for (int64_t j = 0; j < g.W; ++j) g.csrc[j] = nearest_source(j, sw, g.w, g.W);
  g.rs.resize(g.h + 1);
  g.cs.resize(g.w + 1);
  for (int64_t a = 0; a <= g.h; ++a) g.rs[a] = cell_start(a, sh, g.h, g.H);
  for (int64_t b = 0; b <= g.w; ++b) g.cs[b] = cell_start(b, sw, g.w, g.W);
  return g;
}



// A per-channel float vector of length C (or `fill` everywhere when absent).
std::vector<float> per_channel(const char* op, const char* name, const c10::optional<at::Tensor>& t,
                               int64_t C, float fill) {
  if (!t.has_value() || !t->defined()) return std::vector<float>(C, fill);
  TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": ", name, " must be 1-D with C=", C, " values, got ",
              t->sizes());
  at::Tensor f = t->to(at::kFloat).contiguous();
  const float* p = f.data_ptr<float>();
  return std::vector<float>(p, p + C);
}

// The pooled branch's per-channel affine (a BatchNorm of the k2 convolution, applied where the gate
// reads the pooled map): the gate sees small * scale[c] + shift[c] (one fused multiply-add, the same
// rounding in every path); none when scale is nullptr.
struct SmallAffine {
  const float* scale = nullptr;
  const float* shift = nullptr;
};

// The small affine's values (empty when neither is given; a missing one is 1 or 0) and its view.
struct SmallAffineArgs {
  std::vector<float> scale, shift;
  SmallAffineArgs(const char* op, const c10::optional<at::Tensor>& sc, const c10::optional<at::Tensor>& sh,
                  int64_t C) {
    if ((sc.has_value() && sc->defined()) || (sh.has_value() && sh->defined())) {
      scale = per_channel(op, "small_scale", sc, C, 1.0f);
      shift = per_channel(op, "small_shift", sh, C, 0.0f);
    }
  }
  SmallAffine view() const {
    return scale.empty() ? SmallAffine{} : SmallAffine{scale.data(), shift.data()};
  }
};

template <typename T>
inline float small_value(T v, const SmallAffine& a, int64_t c) {
  return a.scale ? small_affine_apply(static_cast<float>(v), a.scale[c], a.shift[c]) : static_cast<float>(v);
}

// ------------------------------------------------------------------------------------------------
// Pointwise ops: the gate forward (y = affine(k3) * s) and the BN-training dk3 (p * dy * s + q * k3 + r).
// A, B, R: per-channel (scale, shift, unused) for the forward, (p, q, r) for dk3.
// ------------------------------------------------------------------------------------------------
template <typename T>
struct Pointwise {
  const T* x;
  const T* dy;  // dk3 only
  const T* k;
  const T* small;
  T* out;
  const float* A;
  const float* B;
  const float* R;
  SmallAffine sa;
};

// What a pointwise kernel computes (its template argument kM): the gate forward with k3's per-channel
// affine, the gate forward without one (no scale and no shift given: k3 * s, one operation less, and
// k3 = -0 gives -0 as k3 * s does), or the BN-training dk3.
enum PointwiseMode : int { kGate = 0, kGatePlain = 1, kDk3 = 2 };

template <int kM>
inline Vec pointwise_vec(const Vec& xv, const Vec& uv, const Vec& kv, const Vec& dyv, const Vec& A, const Vec& B,
                         const Vec& R) {
  const Vec s = vsigmoid(xv + uv);
  if constexpr (kM == kDk3) {
    return at::vec::fmadd(A, dyv * s, at::vec::fmadd(B, kv, R));
  } else if constexpr (kM == kGatePlain) {
    return kv * s;
  } else {
    return at::vec::fmadd(kv, A, B) * s;
  }
}

// NCHW blocking (the build without AVX2, and small maps too wide for the permute table below):
// planes of at most kBlock floats are processed kBlock / HW at a time (a group);
// larger planes one at a time in blocks of whole rows. For every block the upsampled values U are
// built first for all its planes (source rows expanded along W into E, then every output row a
// vector copy of its source row), and only then consumed. Building everything ahead keeps the
// vector loads of U and E away from stores still in flight (a load that spans several recent
// stores cannot be forwarded and stalls).
constexpr int64_t kBlock = 4096;

struct NchwBlocking {
  int64_t RB;    // rows per block
  int64_t G;     // planes per group
  int64_t L;     // floats of U per plane in a block (RB * W)
  int64_t Erows; // expanded source rows per plane in a block
};

NchwBlocking nchw_blocking(const Geometry& g) {
  NchwBlocking b;
  const int64_t HW = g.H * g.W;
  if (HW <= kBlock) {
    b.RB = g.H;
    b.G = std::max<int64_t>(1, kBlock / std::max<int64_t>(HW, 1));
  } else {
    b.RB = std::min<int64_t>(g.H, std::max<int64_t>(1, kBlock / std::max<int64_t>(g.W, 1)));
    b.G = 1;
  }
  b.L = b.RB * g.W;
  // The source index steps by at most one per output row (h <= H); twice that is a safe bound.
  b.Erows = std::min<int64_t>(g.h, 2 * b.RB + 2);
  return b;
}

// U[(q - q0) * bl.L + (i - i0) * W + j] = small[q, rsrc[i], csrc[j]] for planes [q0, q1), rows
// [i0, i1). U needs kV floats of slack (row copies may run up to kV - 1 floats past a row: into the
// next row, written afterwards, or into the slack).
template <typename T>
void build_up(const T* small, const SmallAffine& sa, const Geometry& g, const NchwBlocking& bl, int64_t q0,
              int64_t q1, int64_t i0, int64_t i1, float* U, float* E) {
  const int64_t W = g.W;
  const int64_t a0 = g.rsrc[i0], a1 = g.rsrc[i1 - 1];
  for (int64_t q = q0; q < q1; ++q) {
    const T* sp = small + q * g.h * g.w;
    float* Eq = E + (q - q0) * bl.Erows * W;
    const int64_t c = q % g.C;
    for (int64_t a = a0; a <= a1; ++a) {
      const T* srow = sp + a * g.w;
      float* er = Eq + (a - a0) * W;
      for (int64_t j = 0; j < W; ++j) er[j] = small_value(srow[g.csrc[j]], sa, c);
    }
  }
  for (int64_t q = q0; q < q1; ++q) {
    const float* Eq = E + (q - q0) * bl.Erows * W;
    float* Uq = U + (q - q0) * bl.L;
    for (int64_t i = i0; i < i1; ++i) {
      const float* er = Eq + (g.rsrc[i] - a0) * W;
      float* row = Uq + (i - i0) * W;
      for (int64_t j = 0; j < W; j += kV) Vec::loadu(er + j).store(row + j);
    }
  }
}

template <typename T, int kM>
void pointwise_nchw(const Pointwise<T>& p, const Geometry& g) {
  constexpr bool kK3 = kM == kDk3;
  const int64_t HW = g.H * g.W;
  const NchwBlocking bl = nchw_blocking(g);
  const int64_t grain = grain_for(HW);
  at::parallel_for(0, g.N * g.C, grain, [&](int64_t p0, int64_t p1) {
    std::vector<float> ubuf(bl.G * bl.L + kV), ebuf(bl.G * bl.Erows * g.W + kV);
    for (int64_t q0 = p0; q0 < p1; q0 += bl.G) {
      const int64_t q1 = std::min(p1, q0 + bl.G);
      for (int64_t i0 = 0; i0 < g.H; i0 += bl.RB) {
        const int64_t i1 = std::min(g.H, i0 + bl.RB);
        build_up(p.small, p.sa, g, bl, q0, q1, i0, i1, ubuf.data(), ebuf.data());
        const int64_t L = (i1 - i0) * g.W;
        for (int64_t plane = q0; plane < q1; ++plane) {
          const int64_t c = plane % g.C;
          const Vec A(p.A[c]), B(p.B[c]), R(p.R[c]);
          const float* U = ubuf.data() + (plane - q0) * bl.L;
          const int64_t base = plane * HW + i0 * g.W;
          const T* xp = p.x + base;
          const T* kp = p.k + base;
          const T* dp = kK3 ? p.dy + base : nullptr;
          T* op = p.out + base;
          int64_t e = 0;
          for (; e + kV <= L; e += kV) {
            const Vec dyv = kK3 ? IO<T>::load(dp + e) : Vec(0.0f);
            IO<T>::store(op + e,
                         pointwise_vec<kM>(IO<T>::load(xp + e), Vec::loadu(U + e), IO<T>::load(kp + e), dyv, A, B, R));
          }
          if (e < L && L >= kV) {
            // Recompute the last full vector (overlapping): the op is elementwise, rewriting is harmless.
            e = L - kV;
            const Vec dyv = kK3 ? IO<T>::load(dp + e) : Vec(0.0f);
            IO<T>::store(op + e,
                         pointwise_vec<kM>(IO<T>::load(xp + e), Vec::loadu(U + e), IO<T>::load(kp + e), dyv, A, B, R));
          } else if (e < L) {
            const int64_t n = L - e;
            const Vec dyv = kK3 ? IO<T>::load(dp + e, n) : Vec(0.0f);
            IO<T>::store(op + e,
                         pointwise_vec<kM>(IO<T>::load(xp + e, n), Vec::loadu(U + e, n), IO<T>::load(kp + e, n), dyv,
                                            A, B, R),
                         n);
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// NCHW upsampling by lane permutes (the AVX-512 and AVX2 builds). A plane is one flat run of
// vectors: vector v covers elements [e_v, e_v + kV), e_v = min(v * kV, HW - kV), so the last one
// overlaps its predecessor when kV does not divide HW (planes below kV elements: one partial vector).
// The upsampled value of element e is small[src(e)], src(e) = rsrc[e / W] * w + csrc[e % W]. With
// h <= H and w <= W, src steps by at most +1 from one element to the next and drops only back to the
// start of the same source row, so kV consecutive elements span at most max(kV, w) values. Where
// every vector's values span fewer than 2 * kV (so whenever w <= 2 * kV; the table checks each
// vector), they are one two-source permute of two vector loads from a padded float copy of the
// small plane. The table (a base offset and kV lane indices per vector) depends on the shape alone
// and is built once per call; no per-plane upsampled buffer is built. Otherwise (and for planes
// above kMaxTablePlane elements) the blocked path above runs.
// ------------------------------------------------------------------------------------------------
// SCNET_FUSED_CPU_STREAM (see "Streaming stores" below): read at every call, and checked in every
// build (the build without AVX2 does not stream).
enum class StreamMode { Auto, Off, On };

StreamMode stream_mode() {
  const char* env = std::getenv("SCNET_FUSED_CPU_STREAM");
  const std::string m = env ? env : "";
  if (m.empty() || m == "0") return StreamMode::Off;
  if (m == "auto") return StreamMode::Auto;
  TORCH_CHECK(m == "1", "SCNET_FUSED_CPU_STREAM must be 0, 1 or auto, got '", m, "'");
  return StreamMode::On;
}

#if (defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__)) || \
    (defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__))
#define SCNET_FUSED_PERMUTE_UP 1

constexpr int64_t kMaxTablePlane = int64_t(1) << 20;

struct UpTable {
  bool ok = false;
  bool one = false;  // every vector's values span fewer than kV: one load and a one-source permute
  std::vector<int32_t> base;  // per vector (ceil(HW / kV) of them): offset of its first source value
  std::vector<int32_t> idx;   // per vector, kV lane indices in [0, 2 * kV)
};

UpTable make_up_table(const Geometry& g) {
  UpTable t;
  const int64_t HW = g.H * g.W;
  // The table takes 4 bytes per element of a plane: planes above kMaxTablePlane elements take the
  // blocked path (which needs no table). The column gathers' offsets (kV rows of W) are int32.
  if (HW == 0 || HW > kMaxTablePlane || g.h * g.w > std::numeric_limits<int32_t>::max() - 2 * kV ||
      kV * g.W > std::numeric_limits<int32_t>::max()) {
    return t;
  }
  const int64_t nvec = (HW + kV - 1) / kV;
  const int64_t lanes = std::min(kV, HW);
  t.base.resize(nvec);
  t.idx.assign(nvec * kV, 0);
  int64_t span = 0;
  for (int64_t v = 0; v < nvec; ++v) {
    const int64_t e0 = HW >= kV ? std::min(v * kV, HW - kV) : 0;
    int64_t src[64];
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = -1;
    // element e0 + l at row i, column j: one division per vector, not two per lane
    int64_t i = e0 / g.W, j = e0 - i * g.W;
    for (int64_t l = 0; l < lanes; ++l) {
      src[l] = g.rsrc[i] * g.w + g.csrc[j];
      lo = std::min(lo, src[l]);
      hi = std::max(hi, src[l]);
      if (++j == g.W) {
        j = 0;
        ++i;
      }
    }
    if (hi - lo >= 2 * kV) return UpTable{};
    span = std::max(span, hi - lo + 1);
    t.base[v] = static_cast<int32_t>(lo);
    for (int64_t l = 0; l < lanes; ++l) t.idx[v * kV + l] = static_cast<int32_t>(src[l] - lo);
  }
  t.one = span <= kV;
  t.ok = true;
  return t;
}

// ------------------------------------------------------------------------------------------------
// Streaming (non-temporal) stores of the full-size outputs, opt-in. A normal store to a line that
// is not in cache reads the line first (read for ownership). When a call's tensors together are
// larger than the last-level cache, its outputs leave the cache before anything reads them again;
// streaming stores write them past the cache and skip that read: the gate backward with dk3 then
// moves 5 plane-sized streams instead of 7, the forward 3 instead of 4. That can pay only where the
// kernels are bound by memory bandwidth, not where they are bound by arithmetic (measure it with
// benchmarks/bench_stream_stores.py). SCNET_FUSED_CPU_STREAM: 0 (default) never, auto when the
// call's tensors exceed the last-level cache, 1 always; both need aligned vectors (planes a
// multiple of kV elements) and the AVX2 or AVX-512 build.
// ------------------------------------------------------------------------------------------------

// The largest data cache of the highest level cpu0 reports (sysfs, else sysconf), else 32 MiB.
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t best = 0;
    int best_level = 0;
    for (int i = 0; i < 16; ++i) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
      std::ifstream lf(dir + "level"), sf(dir + "size"), tf(dir + "type");
      int level = 0;
      std::string size, type;
      if (!(lf >> level) || !(sf >> size) || !(tf >> type) || type == "Instruction") continue;
      char* end = nullptr;
      int64_t v = std::strtoll(size.c_str(), &end, 10);
      if (end && *end == 'K') v <<= 10;
      if (end && *end == 'M') v <<= 20;
      if (v > 0 && (level > best_level || (level == best_level && v > best))) {
        best = v;
        best_level = level;
      }
    }
#ifdef _SC_LEVEL3_CACHE_SIZE
    if (best <= 0) best = std::max<int64_t>(0, sysconf(_SC_LEVEL3_CACHE_SIZE));
#endif
    return best > 0 ? best : int64_t(32) << 20;
  }();
  return bytes;
}

// Whether a call stores its outputs with streaming stores: `streams` plane-sized tensors of T read
// or written in all, N * C planes of HW elements, outputs `outs` (null entries ignored).
template <typename T>
bool use_streaming(StreamMode mode, int64_t planes, int64_t HW, int64_t streams, std::initializer_list<const T*> outs) {
  if (mode == StreamMode::Off || HW % kV != 0) return false;
  for (const T* o : outs) {
    if (o && reinterpret_cast<std::uintptr_t>(o) % (kV * sizeof(T)) != 0) return false;
  }
  return mode == StreamMode::On || planes * HW * static_cast<int64_t>(sizeof(T)) * streams > last_level_cache_bytes();
}

// kV values stored to p (aligned to kV * sizeof(T) bytes) as T, past the cache. The caller issues
// _mm_sfence() before its task ends.
template <typename T>
inline void stream_store(T* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, v);
  } else {
    const __m512i h = at::vec::convert_from_float<T>(v, v);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(h));
  }
#else
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, v);
  } else {
    const __m256i h = at::vec::convert_from_float<T>(v, v);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(h));
  }
#endif
}

template <typename T>
inline void put(T* p, const Vec& v, bool nt) {
  if (nt) {
    stream_store(p, v);
  } else {
    IO<T>::store(p, v);
  }
}

// The upsampled values of one vector: S[ix[l]] for lanes l, S padded to at least 2 * kV floats.
// kOne: every index is below kV.
template <bool kOne>
inline Vec up_vec(const float* S, const int32_t* ix) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__)
  const __m512i i = _mm512_loadu_si512(ix);
  if constexpr (kOne) return _mm512_permutexvar_ps(i, _mm512_loadu_ps(S));
  return _mm512_permutex2var_ps(_mm512_loadu_ps(S), i, _mm512_loadu_ps(S + 16));
#else
  const __m256i i = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ix));
  const __m256 a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(S), i);  // low 3 bits of each index
  if constexpr (kOne) return a;
  const __m256 b = _mm256_permutevar8x32_ps(_mm256_loadu_ps(S + 8), i);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(7))));
#endif
}

// Lanes l < n of a column of a row-major array with row pitch `pitch`: p[l * pitch], 0 in the others.
struct ColumnGather {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__)
  __m512i off;
  __mmask16 mask;
  ColumnGather(int64_t pitch, int64_t n)
      : off(_mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                               _mm512_set1_epi32(static_cast<int32_t>(pitch)))),
        mask(static_cast<__mmask16>((1u << n) - 1u)) {}
  Vec load(const float* p) const { return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, off, p, 4); }
#else
  __m256i off;
  __m256 mask;
  ColumnGather(int64_t pitch, int64_t n)
      : off(_mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int32_t>(pitch)))),
        mask(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(n)),
                                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)))) {}
  Vec load(const float* p) const { return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), p, off, mask, 4); }
#endif
};

// The small planes are converted to float for groups of planes at a time, ahead of their use: the
// vector loads of a plane's values then do not span stores still in flight (such a load cannot be
// forwarded from them and stalls), which for small planes would happen at every plane.
inline int64_t small_group(int64_t HW) { return std::max<int64_t>(1, std::min<int64_t>(64, kBlock / HW)); }

// The n * hw values of n consecutive small planes as float in S (through the affine sa, if any; the
// first plane is of channel c of C). S has 2 * kV floats more than the largest group: the permutes'
// vector loads may read past a plane's values (zeros, or values of an earlier group), and never
// select those lanes.
template <typename T>
inline void load_small_planes(const T* sp, int64_t hw, int64_t n, float* S, const SmallAffine& sa, int64_t c,
                              int64_t C) {
  if (sa.scale) {  // per plane: its channel's affine, vector fused multiply-adds (the scalar one's bits)
    for (int64_t q = 0; q < n; ++q, c = c + 1 == C ? 0 : c + 1) {
      const Vec A(sa.scale[c]), B(sa.shift[c]);
      const int64_t e1 = (q + 1) * hw;
      int64_t e = q * hw;
      for (; e + kV <= e1; e += kV) at::vec::fmadd(IO<T>::load(sp + e), A, B).store(S + e);
      for (; e < e1; ++e) S[e] = small_value(sp[e], sa, c);
    }
    return;
  }
  const int64_t m = n * hw;
  int64_t e = 0;
  for (; e + kV <= m; e += kV) IO<T>::load(sp + e).store(S + e);
  for (; e < m; ++e) S[e] = static_cast<float>(sp[e]);
}

// Walks the planes [p0, p1) of a task in order: the channel of the current plane and its small
// plane's values as float (converted for up to G planes at a time, see small_group).
template <typename T>
struct PlaneWalk {
  const T* small;
  SmallAffine sa;
  int64_t hw, G, C, p0, p1, c;
  std::vector<float> buf;
  PlaneWalk(const T* small_, const SmallAffine& sa_, int64_t hw_, int64_t G_, int64_t C_, int64_t p0_, int64_t p1_)
      : small(small_), sa(sa_), hw(hw_), G(G_), C(C_), p0(p0_), p1(p1_), c(p0_ % C_), buf(G_ * hw_ + 2 * kV, 0.0f) {}
  // The small values of `plane` (the planes are visited in order, each once).
  const float* values(int64_t plane) {
    const int64_t q = (plane - p0) % G;
    if (q == 0) load_small_planes(small + plane * hw, hw, std::min(G, p1 - plane), buf.data(), sa, c, C);
    return buf.data() + q * hw;
  }
  void next() { c = c + 1 == C ? 0 : c + 1; }
};

// One plane of the pointwise ops on the permute table (channel c, small values S as float).
template <typename T, int kM, bool kOne>
SCNET_FUSED_ALWAYS_INLINE void pointwise_plane_permute(const Pointwise<T>& p, const Geometry& g, const UpTable& t, int64_t plane,
                                    int64_t c, const float* S, bool nt) {
  constexpr bool kK3 = kM == kDk3;
  const int64_t HW = g.H * g.W, nvec = static_cast<int64_t>(t.base.size());
  const int32_t* TB = t.base.data();
  const int32_t* TI = t.idx.data();
  const Vec A(p.A[c]), B(p.B[c]), R(p.R[c]);
  const int64_t off = plane * HW;
  const T* xp = p.x + off;
  const T* kp = p.k + off;
  const T* dp = kK3 ? p.dy + off : nullptr;
  T* op = p.out + off;
  const auto one = [&](int64_t v, int64_t e) {
    const Vec uv = up_vec<kOne>(S + TB[v], TI + v * kV);
    const Vec dyv = kK3 ? IO<T>::load(dp + e) : Vec(0.0f);
    put(op + e, pointwise_vec<kM>(IO<T>::load(xp + e), uv, IO<T>::load(kp + e), dyv, A, B, R), nt);
  };
  if (HW >= kV) {
    const int64_t nfull = HW / kV;
    for (int64_t v = 0; v < nfull; ++v) one(v, v * kV);
    if (nfull < nvec) one(nfull, HW - kV);  // overlaps the one before: rewrites equal values
  } else {
    const Vec uv = up_vec<kOne>(S + TB[0], TI);
    const Vec dyv = kK3 ? IO<T>::load(dp, HW) : Vec(0.0f);
    IO<T>::store(op, pointwise_vec<kM>(IO<T>::load(xp, HW), uv, IO<T>::load(kp, HW), dyv, A, B, R), HW);
  }
}

template <typename T, int kM, bool kOne>
void pointwise_nchw_permute(const Pointwise<T>& p, const Geometry& g, const UpTable& t, bool nt) {
  const int64_t HW = g.H * g.W, hw = g.h * g.w, C = g.C;
  const int64_t grain = grain_for(HW);
  const int64_t G = small_group(HW);
  at::parallel_for(0, g.N * C, grain, [&](int64_t p0, int64_t p1) {
    PlaneWalk<T> walk(p.small, p.sa, hw, G, C, p0, p1);
    for (int64_t plane = p0; plane < p1; ++plane, walk.next()) {
      pointwise_plane_permute<T, kM, kOne>(p, g, t, plane, walk.c, walk.values(plane), nt);
    }
    if (nt) _mm_sfence();
  });
}

// The pointwise ops on NCHW maps whose pooled map is 1x1 (4 to 7 px at rate 4: SCNet-50's 7x7 stage),
// whose plane size is not a multiple of kV. Every element of a plane then adds the same upsampled
// value, so the planes are walked as one flat array: a chunk of kV consecutive planes is exactly HW
// vectors, and each lane takes its plane's upsampled value and channel constants by one permute of the
// chunk's kV values (lane table: element e of a chunk lies in plane e / HW). Plane by plane, a 49-element
// plane took 4 vectors of 16 lanes (the last one overlapping 15 of its lanes); here 16 such planes take
// 49 vectors instead of 64. The same arithmetic per element as pointwise_plane_permute, so the same bits.
constexpr int64_t kMaxFlatPlane = 1024;

template <typename T, int kM, bool kSameAB>
void pointwise_nchw_flat1(const Pointwise<T>& p, const Geometry& g) {
  constexpr bool kK3 = kM == kDk3;
  const int64_t HW = g.H * g.W, C = g.C, P = g.N * C;
  const Vec A0(p.A[0]), B0(p.B[0]);
  std::vector<int32_t> lane(HW * kV);
  for (int64_t q = 0; q < kV; ++q) std::fill(lane.begin() + q * HW, lane.begin() + (q + 1) * HW, static_cast<int32_t>(q));
  const int64_t chunks = (P + kV - 1) / kV;
  at::parallel_for(0, chunks, grain_for(kV * HW), [&](int64_t c0, int64_t c1) {
    alignas(64) float S[kV], A[kV], B[kV], R[kV];
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t q0 = ch * kV, nq = std::min<int64_t>(kV, P - q0);
      for (int64_t q = 0; q < kV; ++q) {
        const int64_t c = (q0 + q) % C;
        const bool in = q < nq;
        S[q] = in ? small_value(p.small[q0 + q], p.sa, c) : 0.0f;
        A[q] = in ? p.A[c] : 0.0f;
        B[q] = in ? p.B[c] : 0.0f;
        R[q] = in ? p.R[c] : 0.0f;
      }
      const int64_t n = nq * HW, off = q0 * HW;
      const T* xp = p.x + off;
      const T* kp = p.k + off;
      const T* dp = kK3 ? p.dy + off : nullptr;
      T* op = p.out + off;
      const int32_t* L = lane.data();
      // lanes [e, e + m) of the chunk: m = kV but at the last chunk's end (its lanes past n would be of
      // planes not there: masked loads and stores)
      const auto one = [&](int64_t e, int64_t m) {
        const int32_t* ix = L + e;
        const bool full = m == kV;
        const Vec xv = full ? IO<T>::load(xp + e) : IO<T>::load(xp + e, m);
        const Vec kv = full ? IO<T>::load(kp + e) : IO<T>::load(kp + e, m);
        const Vec dyv = !kK3 ? Vec(0.0f) : full ? IO<T>::load(dp + e) : IO<T>::load(dp + e, m);
        const Vec Rv = kK3 ? up_vec<true>(R, ix) : Vec(0.0f);
        const Vec Av = kSameAB ? A0 : up_vec<true>(A, ix), Bv = kSameAB ? B0 : up_vec<true>(B, ix);
        const Vec y = pointwise_vec<kM>(xv, up_vec<true>(S, ix), kv, dyv, Av, Bv, Rv);
        full ? IO<T>::store(op + e, y) : IO<T>::store(op + e, y, m);
      };
      int64_t e = 0;
      for (; e + kV <= n; e += kV) one(e, kV);
      if (e < n) one(e, n - e);
    }
  });
}

// The training-mode BatchNorm gate forward (`_gate_bn_train_forward`), NCHW, channel by channel: the
// channel's batch statistics (`cpu_stats::channel_moments`, the bits of `_channel_stats`), the fold
// (bn_fold_one, written to A and B at c), then y for its N planes while k3 is still in cache: k3 crosses
// the memory bus once, 3 full-size streams instead of 4. W, Bi: weight, bias; mean, var: per channel.
template <typename T, bool kOne>
void gate_bn_forward_by_channel(const Pointwise<T>& p, float* A, float* B, const Geometry& g, const UpTable& t,
                                bool nt, const float* W, const float* Bi, float eps, float* mean, float* var) {
  const int64_t HW = g.H * g.W, hw = g.h * g.w, N = g.N, C = g.C;
  at::parallel_for(0, C, grain_for(N * HW), [&](int64_t c0, int64_t c1) {
    std::vector<float> sbuf(N * hw + 2 * kV, 0.0f);  // the channel's small planes as float, padded
    for (int64_t c = c0; c < c1; ++c) {
      cpu_stats::channel_moments(p.k + c * HW, N, C * HW, HW, mean + c, var + c);
      bn_fold_one(W[c], Bi[c], mean[c], var[c], eps, A + c, B + c);
      for (int64_t n = 0; n < N; ++n) {
        load_small_planes(p.small + (n * C + c) * hw, hw, 1, sbuf.data() + n * hw, p.sa, c, C);
      }
      for (int64_t n = 0; n < N; ++n) pointwise_plane_permute<T, kGate, kOne>(p, g, t, n * C + c, c, sbuf.data() + n * hw, nt);
    }
    if (nt) _mm_sfence();
  });
}

#endif  // SCNET_FUSED_PERMUTE_UP

// NHWC work unit: (image n, source row a, channel block). Channel blocks of at most kCB channels.
constexpr int64_t kCB = 128;

struct NhwcTasks {
  int64_t ncb, cb, ntasks;
};

NhwcTasks nhwc_tasks(const Geometry& g) {
  NhwcTasks t;
  t.cb = std::min<int64_t>(g.C, kCB);
  t.ncb = (g.C + t.cb - 1) / t.cb;
  t.ntasks = g.N * g.h * t.ncb;
  return t;
}

// upT[b * cn + cc] = small[n, c0 + cc, a, b] (through the affine sa, if any)
template <typename T>
void gather_small_row(const T* small, const SmallAffine& sa, const Geometry& g, int64_t n, int64_t a, int64_t c0,
                      int64_t cn, float* upT) {
  for (int64_t cc = 0; cc < cn; ++cc) {
    const T* srow = small + ((n * g.C + c0 + cc) * g.h + a) * g.w;
    for (int64_t b = 0; b < g.w; ++b) upT[b * cn + cc] = small_value(srow[b], sa, c0 + cc);
  }
}

using ::scnet_fused::cpu_vec::for_chunks;
using ::scnet_fused::cpu_vec::kChunkVecs;

// Walks one output row of an NHWC task (a block of cn channels) as f(b0, b1, e, m, nv, tail): the
// source cells [b0, b1) for the channels of one chunk (for_chunks). A block of at most one chunk walks
// the whole row per chunk; a wider block goes cell by cell through its chunks, which keeps the streams'
// accesses close to sequential (a whole row per chunk measured up to 1.15x slower in the backward at
// 8x128x28x28).
template <typename F>
SCNET_FUSED_ALWAYS_INLINE void for_row_chunks(const Geometry& g, int64_t cn, F&& f) {
  const int64_t bstep = cn <= kChunkVecs * kV ? g.w : 1;
  for (int64_t b0 = 0; b0 < g.w; b0 += bstep) {
    const int64_t b1 = std::min(g.w, b0 + bstep);
    for_chunks(cn, [&](int64_t e, int64_t m, auto nv, auto tail) { f(b0, b1, e, m, nv, tail); });
  }
}

// The source cells [b0, b1) of one output row of the NHWC pointwise kernels, for the channels
// [e, e + NV * kV) of the block (the last vector m lanes wide when kTail): the per-channel constants
// and each cell's upsampled values held in registers, so the pixels' vectors load only the streams.
template <typename T, int kM, int NV, bool kTail>
SCNET_FUSED_ALWAYS_INLINE void pointwise_nhwc_cells(const Pointwise<T>& p, const Geometry& g, int64_t rowoff,
                                                    int64_t c0, int64_t cn, int64_t b0, int64_t b1, int64_t e,
                                                    int64_t m, const float* upT) {
  constexpr bool kK3 = kM == kDk3;
  auto ld = [&](const float* q) { return kTail ? Vec::loadu(q, m) : Vec::loadu(q); };
  auto lt = [&](const T* q) { return kTail ? IO<T>::load(q, m) : IO<T>::load(q); };
  Vec A[NV], B[NV], R[NV];
  for (int v = 0; v < NV; ++v) {
    A[v] = ld(p.A + c0 + e + v * kV);
    B[v] = ld(p.B + c0 + e + v * kV);
    R[v] = ld(p.R + c0 + e + v * kV);
  }
  for (int64_t b = b0; b < b1; ++b) {
    Vec uv[NV];
    for (int v = 0; v < NV; ++v) uv[v] = ld(upT + b * cn + e + v * kV);
    for (int64_t j = g.cs[b]; j < g.cs[b + 1]; ++j) {
      const int64_t off = rowoff + j * g.C + c0 + e;
      for (int v = 0; v < NV; ++v) {
        const int64_t o = off + v * kV;
        const Vec dyv = kK3 ? lt(p.dy + o) : Vec(0.0f);
        const Vec y = pointwise_vec<kM>(lt(p.x + o), uv[v], lt(p.k + o), dyv, A[v], B[v], R[v]);
        if (kTail) IO<T>::store(p.out + o, y, m);
        else IO<T>::store(p.out + o, y);
      }
    }
  }
}

template <typename T, int kM>
void pointwise_nhwc(const Pointwise<T>& p, const Geometry& g) {
  const NhwcTasks tk = nhwc_tasks(g);
  const int64_t per_task = std::max<int64_t>(1, (g.H / g.h + 1) * g.W * tk.cb);
  const int64_t grain = grain_for(per_task);
  at::parallel_for(0, tk.ntasks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> ubuf(g.w * tk.cb);
    float* upT = ubuf.data();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t cbi = t % tk.ncb;
      const int64_t a = (t / tk.ncb) % g.h;
      const int64_t n = t / (tk.ncb * g.h);
      const int64_t c0 = cbi * tk.cb;
      const int64_t cn = std::min(tk.cb, g.C - c0);
      gather_small_row(p.small, p.sa, g, n, a, c0, cn, upT);
      for (int64_t i = g.rs[a]; i < g.rs[a + 1]; ++i) {
        const int64_t rowoff = (n * g.H + i) * g.W * g.C;
        for_row_chunks(g, cn, [&](int64_t b0, int64_t b1, int64_t e, int64_t m, auto nv, auto tail) {
          pointwise_nhwc_cells<T, kM, decltype(nv)::value, decltype(tail)::value>(p, g, rowoff, c0, cn, b0, b1, e, m,
                                                                                  upT);
        });
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Gate backward: dx, dsmall (cell sums of dz), optional dk3 = g * scale, per-channel sums of g and
// g * (k3 - center).
// ------------------------------------------------------------------------------------------------
template <typename T>
struct Backward {
  const T* dy;
  const T* x;
  const T* small;
  const T* k;
  T* dx;
  T* dsmall;
  T* dk3;  // nullptr when not needed
  const float* scale;
  const float* shift;
  const float* center;
  SmallAffine sa;
};

// One vector of the backward. Returns dz; accumulates g and g * (k - center) over the lanes that
// `keep` selects (all lanes when nullptr).
template <bool kSums = true>
SCNET_FUSED_ALWAYS_INLINE Vec backward_vec(const Vec& xv, const Vec& uv, const Vec& kv, const Vec& dyv, const Vec& sc,
                                           const Vec& sh, const Vec& ctr, Vec& dk3v, Vec& gsum, Vec& gksum,
                                           const Vec* keep = nullptr) {
  const Vec s = vsigmoid(xv + uv);
  Vec g = dyv * s;
  const Vec ga = g * at::vec::fmadd(kv, sc, sh);
  // dy * a * s * (1 - s), as ga * (1 - s): ga - ga * s would turn an infinite a into NaN (inf - inf)
  // where the reference gives +-inf.
  const Vec dz = ga * (Vec(1.0f) - s);
  dk3v = g * sc;
  if constexpr (kSums) {  // without: the caller needs no per-channel sums (a gate without a trained affine)
    if (keep != nullptr) g = Vec::blendv(Vec(0.0f), g, *keep);
    gsum = gsum + g;
    gksum = at::vec::fmadd(g, kv - ctr, gksum);
  }
  return dz;
}

template <typename T>
void backward_nchw(const Backward<T>& p, const Geometry& g, double* part_g, double* part_gk) {
  const int64_t HW = g.H * g.W;
  const NchwBlocking bl = nchw_blocking(g);
  const int64_t grain = grain_for(HW);
  at::parallel_for(0, g.N * g.C, grain, [&](int64_t p0, int64_t p1) {
    std::vector<float> ubuf(bl.G * bl.L + kV), dbuf(bl.G * bl.L + kV), ebuf(bl.G * bl.Erows * g.W + kV);
    std::vector<float> abuf(bl.G * g.h * g.W);       // Acc[q][a * W + j]: dz summed over the rows of cell a
    std::vector<double> sums(2 * bl.G);
    for (int64_t q0 = p0; q0 < p1; q0 += bl.G) {
      const int64_t q1 = std::min(p1, q0 + bl.G);
      std::fill(abuf.begin(), abuf.end(), 0.0f);
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int64_t i0 = 0; i0 < g.H; i0 += bl.RB) {
        const int64_t i1 = std::min(g.H, i0 + bl.RB);
        build_up(p.small, p.sa, g, bl, q0, q1, i0, i1, ubuf.data(), ebuf.data());
        const int64_t L = (i1 - i0) * g.W;
        for (int64_t plane = q0; plane < q1; ++plane) {
          const int64_t c = plane % g.C;
          const Vec sc(p.scale[c]), sh(p.shift[c]), ctr(p.center[c]);
          const float* U = ubuf.data() + (plane - q0) * bl.L;
          float* D = dbuf.data() + (plane - q0) * bl.L;
          const int64_t base = plane * HW + i0 * g.W;
          const T* xp = p.x + base;
          const T* kp = p.k + base;
          const T* dp = p.dy + base;
          T* dxp = p.dx + base;
          T* dkp = p.dk3 ? p.dk3 + base : nullptr;
          double sum_g = 0.0, sum_gk = 0.0;
          for (int64_t f0 = 0; f0 < L; f0 += kFlush) {
            const int64_t f1 = std::min(L, f0 + kFlush);
            Vec gs(0.0f), gks(0.0f), dk3v;
            int64_t e = f0;
            for (; e + kV <= f1; e += kV) {
              const Vec dz = backward_vec(IO<T>::load(xp + e), Vec::loadu(U + e), IO<T>::load(kp + e),
                                          IO<T>::load(dp + e), sc, sh, ctr, dk3v, gs, gks);
              IO<T>::store(dxp + e, dz);
              if (dkp) IO<T>::store(dkp + e, dk3v);
              dz.store(D + e);
            }
            if (e < f1 && L >= kV) {
              // The last full vector again (overlapping): the stores rewrite equal values; the sums
              // take only the lanes not yet counted.
              const int64_t n = f1 - e;
              e = L - kV;
              const Vec keep = Vec::arange(0.0f, 1.0f) >= Vec(static_cast<float>(kV - n));
              const Vec dz = backward_vec(IO<T>::load(xp + e), Vec::loadu(U + e), IO<T>::load(kp + e),
                                          IO<T>::load(dp + e), sc, sh, ctr, dk3v, gs, gks, &keep);
              IO<T>::store(dxp + e, dz);
              if (dkp) IO<T>::store(dkp + e, dk3v);
              dz.store(D + e);
            } else if (e < f1) {
              const int64_t n = f1 - e;
              const Vec keep = Vec::arange(0.0f, 1.0f) < Vec(static_cast<float>(n));
              const Vec dz = backward_vec(IO<T>::load(xp + e, n), Vec::loadu(U + e, n), IO<T>::load(kp + e, n),
                                          IO<T>::load(dp + e, n), sc, sh, ctr, dk3v, gs, gks, &keep);
              IO<T>::store(dxp + e, dz, n);
              if (dkp) IO<T>::store(dkp + e, dk3v, n);
              dz.store(D + e, n);
            }
            sum_g += hsum(gs);
            sum_gk += hsum(gks);
          }
          sums[2 * (plane - q0)] += sum_g;
          sums[2 * (plane - q0) + 1] += sum_gk;
        }
        // Fold the rows' dz into their source rows (after the whole block: D is no longer in flight).
        for (int64_t plane = q0; plane < q1; ++plane) {
          float* Acc = abuf.data() + (plane - q0) * g.h * g.W;
          const float* D = dbuf.data() + (plane - q0) * bl.L;
          for (int64_t i = i0; i < i1; ++i) {
            float* arow = Acc + g.rsrc[i] * g.W;
            const float* drow = D + (i - i0) * g.W;
            int64_t j = 0;
            for (; j + kV <= g.W; j += kV) (Vec::loadu(arow + j) + Vec::loadu(drow + j)).store(arow + j);
            for (; j < g.W; ++j) arow[j] += drow[j];
          }
        }
      }
      // Column cells.
      for (int64_t plane = q0; plane < q1; ++plane) {
        const float* Acc = abuf.data() + (plane - q0) * g.h * g.W;
        T* dsp = p.dsmall + plane * g.h * g.w;
        for (int64_t a = 0; a < g.h; ++a) {
          const float* arow = Acc + a * g.W;
          for (int64_t b = 0; b < g.w; ++b) {
            float s = 0.0f;
            for (int64_t j = g.cs[b]; j < g.cs[b + 1]; ++j) s += arow[j];
            dsp[a * g.w + b] = static_cast<T>(s);
          }
        }
        part_g[plane] = sums[2 * (plane - q0)];
        part_gk[plane] = sums[2 * (plane - q0) + 1];
      }
    }
  });
}

#ifdef SCNET_FUSED_PERMUTE_UP
// The gate backward on the permute table, one plane (channel c, small values S as float): per plane
// one flat run of vectors (as the forward), dz kept in D; then the upsampling adjoint: D's rows summed
// per row cell (Acc, one row per source row) and Acc's columns per column cell, vectorized over the
// source rows. A plane that is a single cell (h = w = 1, the 7x7 stage) sums dz in the first pass
// instead. dk3 = g * scale goes to dkp when set: the dk3 output (TK = T) or a float scratch (TK =
// float). nt / ntk: streaming stores of dx / dk. D (HW + kV floats) and Acc (h * W + kV): the
// caller's scratch. The plane's sums of g and g * (k - center) go to *sum_g_out, *sum_gk_out (with
// kSums; without, they are not computed and the pointers not written).
template <typename T, typename TK, bool kOne, bool kSums = true>
SCNET_FUSED_ALWAYS_INLINE void backward_plane_permute(const Backward<T>& p, const Geometry& g, const UpTable& t, int64_t plane,
                                   int64_t c, const float* S, TK* dkp, bool nt, bool ntk, float* D, float* Acc,
                                   double* sum_g_out, double* sum_gk_out) {
  const int64_t HW = g.H * g.W, nvec = static_cast<int64_t>(t.base.size()), hw = g.h * g.w, W = g.W;
  constexpr int64_t kFlushVec = kFlush / kV;
  const int32_t* TB = t.base.data();
  const int32_t* TI = t.idx.data();
  const Vec lane = Vec::arange(0.0f, 1.0f);
  const bool one_cell = hw == 1;
  const Vec sc(p.scale[c]), sh(p.shift[c]), ctr(p.center[c]);
  const int64_t off = plane * HW;
  const T* xp = p.x + off;
  const T* kp = p.k + off;
  const T* dp = p.dy + off;
  T* dxp = p.dx + off;
  [[maybe_unused]] double sum_g = 0.0, sum_gk = 0.0;
  double sum_dz = 0.0;
  Vec gs(0.0f), gks(0.0f), dzs(0.0f), dk3v;
  if (HW >= kV) {
    const int64_t nfull = HW / kV;
    for (int64_t v = 0; v < nfull; ++v) {
      const int64_t e = v * kV;
      const Vec dz = backward_vec<kSums>(IO<T>::load(xp + e), up_vec<kOne>(S + TB[v], TI + v * kV),
                                  IO<T>::load(kp + e), IO<T>::load(dp + e), sc, sh, ctr, dk3v, gs, gks);
      put(dxp + e, dz, nt);
      if (dkp) put(dkp + e, dk3v, ntk);
      if (one_cell) {
        dzs = dzs + dz;
      } else {
        dz.store(D + e);
      }
      if ((v + 1) % kFlushVec == 0) {
        if constexpr (kSums) {
          sum_g += hsum(gs);
          sum_gk += hsum(gks);
          gs = Vec(0.0f);
          gks = Vec(0.0f);
        }
        if (one_cell) {
          sum_dz += hsum(dzs);
          dzs = Vec(0.0f);
        }
      }
    }
    if (nfull < nvec) {
      // The last vector overlaps the one before: the stores rewrite equal values; the sums take
      // only the lanes not yet counted.
      const int64_t e = HW - kV;
      const Vec keep = lane >= Vec(static_cast<float>(kV - (HW - nfull * kV)));
      const Vec dz = backward_vec<kSums>(IO<T>::load(xp + e), up_vec<kOne>(S + TB[nfull], TI + nfull * kV),
                                  IO<T>::load(kp + e), IO<T>::load(dp + e), sc, sh, ctr, dk3v, gs, gks, &keep);
      IO<T>::store(dxp + e, dz);
      if (dkp) IO<TK>::store(dkp + e, dk3v);
      if (one_cell) {
        dzs = dzs + Vec::blendv(Vec(0.0f), dz, keep);
      } else {
        dz.store(D + e);
      }
    }
  } else {
    const Vec keep = lane < Vec(static_cast<float>(HW));
    const Vec dz = backward_vec<kSums>(IO<T>::load(xp, HW), up_vec<kOne>(S + TB[0], TI), IO<T>::load(kp, HW),
                                IO<T>::load(dp, HW), sc, sh, ctr, dk3v, gs, gks, &keep);
    IO<T>::store(dxp, dz, HW);
    if (dkp) IO<TK>::store(dkp, dk3v, HW);
    if (one_cell) {
      dzs = dzs + Vec::blendv(Vec(0.0f), dz, keep);
    } else {
      dz.store(D);
    }
  }
  if constexpr (kSums) {
    sum_g += hsum(gs);
    sum_gk += hsum(gks);
    *sum_g_out = sum_g;
    *sum_gk_out = sum_gk;
  }
  T* dsp = p.dsmall + plane * hw;
  if (one_cell) {  // the whole plane is one cell: dsmall is the sum of dz
    dsp[0] = static_cast<T>(sum_dz + hsum(dzs));
    return;
  }

  // Rows: Acc[a] = the sum of D's rows in cell a (kept in registers; the row tails masked).
  const Vec tail_keep = lane < Vec(static_cast<float>(W % kV));
  for (int64_t a = 0; a < g.h; ++a) {
    for (int64_t j = 0; j < W; j += kV) {
      Vec v(0.0f);
      for (int64_t i = g.rs[a]; i < g.rs[a + 1]; ++i) v = v + Vec::loadu(D + i * W + j);
      if (j + kV > W) v = Vec::blendv(Vec(0.0f), v, tail_keep);
      v.store(Acc + a * W + j);  // a tail store runs into row a + 1, written next (or the padding)
    }
  }
  // Columns: dsmall[a, b] = the sum of Acc[a, cs[b] .. cs[b + 1]), for kV rows a at a time
  // (one column of them is one gather).
  for (int64_t a0 = 0; a0 < g.h; a0 += kV) {
    const int64_t na = std::min(kV, g.h - a0);
    const ColumnGather col(W, na);
    const float* A0 = Acc + a0 * W;
    for (int64_t b = 0; b < g.w; ++b) {
      Vec s(0.0f);
      for (int64_t j = g.cs[b]; j < g.cs[b + 1]; ++j) s = s + col.load(A0 + j);
      float out[kV];
      s.store(out);
      for (int64_t a = 0; a < na; ++a) dsp[(a0 + a) * g.w + b] = static_cast<T>(out[a]);
    }
  }
}

// The gate backward on the permute table, plane by plane; partial sums per plane (with kSums; without,
// part_g and part_gk are not written).
template <typename T, bool kOne, bool kSums>
void backward_nchw_permute(const Backward<T>& p, const Geometry& g, const UpTable& t, bool nt, double* part_g,
                           double* part_gk) {
  const int64_t HW = g.H * g.W, hw = g.h * g.w;
  const int64_t grain = grain_for(HW);
  const int64_t G = small_group(HW);
  at::parallel_for(0, g.N * g.C, grain, [&](int64_t p0, int64_t p1) {
    // D and Acc are padded by a vector: the row tails are read and written as whole vectors.
    std::vector<float> dbuf(HW + kV, 0.0f), abuf(g.h * g.W + kV);
    PlaneWalk<T> walk(p.small, p.sa, hw, G, g.C, p0, p1);
    for (int64_t plane = p0; plane < p1; ++plane, walk.next()) {
      const float* S = walk.values(plane);
      T* dkp = p.dk3 ? p.dk3 + plane * HW : nullptr;
      backward_plane_permute<T, T, kOne, kSums>(p, g, t, plane, walk.c, S, dkp, nt, nt, dbuf.data(),
                                                abuf.data(), part_g + plane, part_gk + plane);
    }
    if (nt) _mm_sfence();
  });
}

// The training-mode BatchNorm gate backward (`_gate_bn_train_backward`), NCHW, channel by channel:
// the channel's N planes through the gate backward (dx, dsmall, the sums; g * scale into a float
// scratch), then BatchNorm's input gradient dk3 = g * scale + q * k3 + r from the scratch and k3
// while both are still in cache. dy, x and k3 cross the memory bus once and dk3 is written once:
// 5 full-size streams instead of the 8 of the two passes. The sums are the two passes' partials
// added in the same order (the same bits); IS: invstd; sum_g, sum_gk: per channel, float32.
template <typename T, bool kOne>
void gate_bn_backward_by_channel(const Backward<T>& p, const Geometry& g, const UpTable& t, bool nt,
                                 const float* IS, float* sum_g, float* sum_gk) {
  const int64_t HW = g.H * g.W, hw = g.h * g.w, N = g.N, C = g.C;
  const float m = static_cast<float>(static_cast<double>(N * HW));
  at::parallel_for(0, C, grain_for(N * HW), [&](int64_t c0, int64_t c1) {
    std::vector<float> dbuf(HW + kV, 0.0f), abuf(g.h * g.W + kV);
    std::vector<float> sbuf(N * hw + 2 * kV, 0.0f);  // the channel's small planes as float, padded
    std::vector<float> gbuf(N * HW);                 // g * scale of the channel's planes
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t n = 0; n < N; ++n) {
        load_small_planes(p.small + (n * C + c) * hw, hw, 1, sbuf.data() + n * hw, p.sa, c, C);
      }
      double a1 = 0.0, a2 = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        double s1, s2;
        backward_plane_permute<T, float, kOne>(p, g, t, n * C + c, c, sbuf.data() + n * hw, gbuf.data() + n * HW,
                                               nt, false, dbuf.data(), abuf.data(), &s1, &s2);
        a1 += s1;
        a2 += s2;
      }
      sum_g[c] = static_cast<float>(a1);
      sum_gk[c] = static_cast<float>(a2);
      float qs, rs;
      bn_input_affine(sum_g[c], sum_gk[c], p.scale[c], IS[c], p.center[c], m, &qs, &rs);
      const Vec q(qs), r(rs);
      for (int64_t n = 0; n < N; ++n) {
        const T* kp = p.k + (n * C + c) * HW;
        const float* gp = gbuf.data() + n * HW;
        T* op = p.dk3 + (n * C + c) * HW;
        int64_t e = 0;
        for (; e + kV <= HW; e += kV) put(op + e, Vec::loadu(gp + e) + at::vec::fmadd(q, IO<T>::load(kp + e), r), nt);
        if (e < HW) {
          const int64_t k = HW - e;
          IO<T>::store(op + e, Vec::loadu(gp + e, k) + at::vec::fmadd(q, IO<T>::load(kp + e, k), r), k);
        }
      }
    }
    if (nt) _mm_sfence();
  });
}

#endif  // SCNET_FUSED_PERMUTE_UP

// The source cells [b0, b1) of one output row of the NHWC backward, for the channels [e, e + NV * kV)
// of the block (the last vector m lanes wide when kTail; NV is then 1): the cells' pixels in order,
// each cell's dz and the row's sums accumulating in registers. dsT is read and written once a cell
// and rowg / rowgk once a call, instead of once a pixel. (Read and written once a pixel, those small
// buffers aliased the streams' addresses modulo 4 KiB on some runs, which made the kernel bimodal.)
// The additions happen in the same order as pixel by pixel, so the results are the same bits.
template <typename T, bool kSums, int NV, bool kTail>
SCNET_FUSED_ALWAYS_INLINE void backward_nhwc_cells(const Backward<T>& p, const Geometry& g, int64_t rowoff,
                                                   int64_t c0, int64_t cn, int64_t b0, int64_t b1, int64_t e,
                                                   int64_t m, const float* upT, float* dsT, float* rowg,
                                                   float* rowgk) {
  auto ld = [&](const float* q) { return kTail ? Vec::loadu(q, m) : Vec::loadu(q); };
  auto lt = [&](const T* q) { return kTail ? IO<T>::load(q, m) : IO<T>::load(q); };
  auto st = [&](const Vec& v, float* q) { kTail ? v.store(q, m) : v.store(q); };
  Vec gs[NV], gks[NV];
  if constexpr (kSums) {
    for (int v = 0; v < NV; ++v) {
      gs[v] = ld(rowg + e + v * kV);
      gks[v] = ld(rowgk + e + v * kV);
    }
  }
  for (int64_t b = b0; b < b1; ++b) {
    Vec uv[NV], dacc[NV];
    for (int v = 0; v < NV; ++v) {
      uv[v] = ld(upT + b * cn + e + v * kV);
      dacc[v] = ld(dsT + b * cn + e + v * kV);
    }
    for (int64_t j = g.cs[b]; j < g.cs[b + 1]; ++j) {
      const int64_t off = rowoff + j * g.C + c0 + e;
      for (int v = 0; v < NV; ++v) {
        const int64_t o = off + v * kV;
        const int64_t c = c0 + e + v * kV;
        Vec dk3v;
        // scale, shift and center are read from L1 here: in registers too, with gs, gks, uv and dacc,
        // the four-vector chunk would spill
        const Vec dz = backward_vec<kSums>(lt(p.x + o), uv[v], lt(p.k + o), lt(p.dy + o), ld(p.scale + c),
                                           ld(p.shift + c), ld(p.center + c), dk3v, gs[v], gks[v]);
        if (kTail) {
          IO<T>::store(p.dx + o, dz, m);
          if (p.dk3) IO<T>::store(p.dk3 + o, dk3v, m);
        } else {
          IO<T>::store(p.dx + o, dz);
          if (p.dk3) IO<T>::store(p.dk3 + o, dk3v);
        }
        dacc[v] = dacc[v] + dz;
      }
    }
    for (int v = 0; v < NV; ++v) st(dacc[v], dsT + b * cn + e + v * kV);
  }
  if constexpr (kSums) {
    for (int v = 0; v < NV; ++v) {
      st(gs[v], rowg + e + v * kV);
      st(gks[v], rowgk + e + v * kV);
    }
  }
}

// Tasks (n, a, channel block); partial sums at [(n * h + a) * C + c] (with kSums; without, not
// computed and part_g, part_gk not written).
template <typename T, bool kSums>
void backward_nhwc(const Backward<T>& p, const Geometry& g, double* part_g, double* part_gk) {
  const NhwcTasks tk = nhwc_tasks(g);
  const int64_t per_task = std::max<int64_t>(1, (g.H / g.h + 1) * g.W * tk.cb);
  const int64_t grain = grain_for(per_task);
  at::parallel_for(0, tk.ntasks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> ubuf(g.w * tk.cb), dbuf(g.w * tk.cb), rowg(tk.cb), rowgk(tk.cb);
    std::vector<double> accg(tk.cb), accgk(tk.cb);
    float* upT = ubuf.data();
    float* dsT = dbuf.data();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t cbi = t % tk.ncb;
      const int64_t a = (t / tk.ncb) % g.h;
      const int64_t n = t / (tk.ncb * g.h);
      const int64_t c0 = cbi * tk.cb;
      const int64_t cn = std::min(tk.cb, g.C - c0);
      gather_small_row(p.small, p.sa, g, n, a, c0, cn, upT);
      std::fill(dbuf.begin(), dbuf.end(), 0.0f);
      std::fill(accg.begin(), accg.end(), 0.0);
      std::fill(accgk.begin(), accgk.end(), 0.0);
      for (int64_t i = g.rs[a]; i < g.rs[a + 1]; ++i) {
        const int64_t rowoff = (n * g.H + i) * g.W * g.C;
        if constexpr (kSums) {
          std::fill(rowg.begin(), rowg.end(), 0.0f);
          std::fill(rowgk.begin(), rowgk.end(), 0.0f);
        }
        for_row_chunks(g, cn, [&](int64_t b0, int64_t b1, int64_t e, int64_t m, auto nv, auto tail) {
          backward_nhwc_cells<T, kSums, decltype(nv)::value, decltype(tail)::value>(
              p, g, rowoff, c0, cn, b0, b1, e, m, upT, dsT, rowg.data(), rowgk.data());
        });
        if constexpr (kSums) {
          for (int64_t cc = 0; cc < cn; ++cc) {
            accg[cc] += rowg[cc];
            accgk[cc] += rowgk[cc];
          }
        }
      }
      for (int64_t cc = 0; cc < cn; ++cc) {
        T* drow = p.dsmall + ((n * g.C + c0 + cc) * g.h + a) * g.w;
        for (int64_t b = 0; b < g.w; ++b) drow[b] = static_cast<T>(dsT[b * cn + cc]);
        if constexpr (kSums) {
          part_g[(n * g.h + a) * g.C + c0 + cc] = accg[cc];
          part_gk[(n * g.h + a) * g.C + c0 + cc] = accgk[cc];
        }
      }
    }
  });
}

// out[c] = sum over k of part[k * C + c], in k order.
void reduce_partials(const double* part, int64_t K, int64_t C, float* out) {
  for (int64_t c = 0; c < C; ++c) {
    double s = 0.0;
    for (int64_t k = 0; k < K; ++k) s += part[k * C + c];
    out[c] = static_cast<float>(s);
  }
}

// ------------------------------------------------------------------------------------------------
// Op entry points.
// ------------------------------------------------------------------------------------------------
// Runs pointwise kernel F<kM> (a generic lambda taking the mode as a std::integral_constant) for mode.
template <typename F>
void with_mode(int mode, F&& f) {
  switch (mode) {
    case kDk3: f(std::integral_constant<int, kDk3>{}); break;
    case kGatePlain: f(std::integral_constant<int, kGatePlain>{}); break;
    case kGate: f(std::integral_constant<int, kGate>{}); break;
    default: TORCH_INTERNAL_ASSERT(false, "pointwise mode ", mode);
  }
}

at::Tensor pointwise_op(const char* op, int mode, const at::Tensor& x_in, const at::Tensor& small_in,
                        const at::Tensor& k_in, const at::Tensor* dy_in, std::vector<float> A, std::vector<float> B,
                        std::vector<float> R, const SmallAffine& sa) {
  [[maybe_unused]] const StreamMode smode = stream_mode();
  [[maybe_unused]] const bool k3_mode = mode == kDk3;
  const Layout L = layout_of(x_in);
  const at::Tensor x = in_layout(x_in, L);
  const at::Tensor k = in_layout(k_in, L);
  const at::Tensor dy = dy_in ? in_layout(*dy_in, L) : at::Tensor();
  const at::Tensor small = small_in.contiguous();
  at::Tensor out = new_output(x.sizes(), x.options(), format_of(L));
  if (x.numel() == 0) return out;
  const Geometry g = make_geometry(x, small);
  dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    Pointwise<T> p{x.data_ptr<T>(), dy.defined() ? dy.data_ptr<T>() : nullptr, k.data_ptr<T>(), small.data_ptr<T>(),
                   out.data_ptr<T>(), A.data(), B.data(), R.data(), sa};
    if (L == Layout::NCHW) {
#ifdef SCNET_FUSED_PERMUTE_UP
      const UpTable t = make_up_table(g);
      if (t.ok) {
        // Read x, k (and dy), written out.
        const bool nt = use_streaming<T>(smode, g.N * g.C, g.H * g.W, k3_mode ? 4 : 3, {p.out});
        // (planes up to kMaxFlatPlane elements: the lane table is 4 kV bytes per element, and for larger
        // planes the plane-by-plane walk's one overlapping vector is a small share)
        if (g.h == 1 && g.w == 1 && (g.H * g.W) % kV != 0 && g.H * g.W <= kMaxFlatPlane && !nt) {
          // one A and one B for every channel (or none, the plain gate): no permute for them
          const auto all_bits_of_first = [](const std::vector<float>& v) {
            return std::all_of(v.begin(), v.end(), [&](const float& f) { return std::memcmp(&f, v.data(), 4) == 0; });
          };
          const bool same = mode == kGatePlain || (all_bits_of_first(A) && all_bits_of_first(B));
          with_mode(mode, [&](auto m) {
            constexpr int kM = decltype(m)::value;
            if constexpr (kM == kGatePlain) {  // no A, B to permute
              pointwise_nchw_flat1<T, kM, true>(p, g);
            } else {
              same ? pointwise_nchw_flat1<T, kM, true>(p, g) : pointwise_nchw_flat1<T, kM, false>(p, g);
            }
          });
          return;
        }
        with_mode(mode, [&](auto m) {
          t.one ? pointwise_nchw_permute<T, decltype(m)::value, true>(p, g, t, nt)
                : pointwise_nchw_permute<T, decltype(m)::value, false>(p, g, t, nt);
        });
        return;
      }
#endif
      with_mode(mode, [&](auto m) { pointwise_nchw<T, decltype(m)::value>(p, g); });
    } else {
      with_mode(mode, [&](auto m) { pointwise_nhwc<T, decltype(m)::value>(p, g); });
    }
  });
  return out;
}

at::Tensor gate_forward(const at::Tensor& x, const at::Tensor& small, const at::Tensor& k3,
                        const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                        const c10::optional<at::Tensor>& small_scale, const c10::optional<at::Tensor>& small_shift) {
  const char* op = "scnet_fused::_gate_forward (cpu)";
  check_gate(op, x, small, k3, c10::DeviceType::CPU);
  const int64_t C = x.size(1);
  const SmallAffineArgs sa(op, small_scale, small_shift, C);
  const bool plain = !(scale.has_value() && scale->defined()) && !(shift.has_value() && shift->defined());
  return pointwise_op(op, plain ? kGatePlain : kGate, x, small, k3, nullptr, per_channel(op, "scale", scale, C, 1.0f),
                      per_channel(op, "shift", shift, C, 0.0f), std::vector<float>(C, 0.0f), sa.view());
}

at::Tensor gate_backward_k3(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& small, const at::Tensor& k3,
                            const at::Tensor& p, const at::Tensor& q, const at::Tensor& r,
                            const c10::optional<at::Tensor>& small_scale,
                            const c10::optional<at::Tensor>& small_shift) {
  const char* op = "scnet_fused::_gate_backward_k3 (cpu)";
  check_gate(op, x, small, k3, c10::DeviceType::CPU);
  check_full(op, "dy", dy, x);
  const int64_t C = x.size(1);
  const SmallAffineArgs sa(op, small_scale, small_shift, C);
  return pointwise_op(op, kDk3, x, small, k3, &dy, per_channel(op, "p", p, C, 0.0f), per_channel(op, "q", q, C, 0.0f),
                      per_channel(op, "r", r, C, 0.0f), sa.view());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_backward(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& small_in, const at::Tensor& k3_in,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
    const c10::optional<at::Tensor>& center, bool need_dk3, const c10::optional<at::Tensor>& small_scale,
    const c10::optional<at::Tensor>& small_shift, bool need_sums) {
  const char* op = "scnet_fused::_gate_backward (cpu)";
  check_gate(op, x_in, small_in, k3_in, c10::DeviceType::CPU);
  check_full(op, "dy", dy_in, x_in);
  const int64_t C = x_in.size(1);
  const SmallAffineArgs sa(op, small_scale, small_shift, C);
  std::vector<float> sc = per_channel(op, "scale", scale, C, 1.0f);
  std::vector<float> sh = per_channel(op, "shift", shift, C, 0.0f);
  std::vector<float> ct = per_channel(op, "center", center, C, 0.0f);
  [[maybe_unused]] const StreamMode mode = stream_mode();

  const Layout L = layout_of(x_in);
  const at::Tensor x = in_layout(x_in, L);
  const at::Tensor k = in_layout(k3_in, L);
  const at::Tensor dy = in_layout(dy_in, L);
  const at::Tensor small = small_in.contiguous();
  at::Tensor dx = new_output(x.sizes(), x.options(), format_of(L));
  at::Tensor dsmall = new_output(small.sizes(), small.options());
  at::Tensor dk3 = need_dk3 ? new_output(x.sizes(), x.options(), format_of(L)) : at::empty({0}, x.options());
  // Without need_sums the sums are empty: the permute and channels_last paths skip them, the blocked
  // NCHW one (the default build) drops them.
  const int64_t nsum = need_sums ? C : 0;
  at::Tensor sum_g = new_output({nsum}, x.options().dtype(at::kFloat));
  at::Tensor sum_gk = new_output({nsum}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    dsmall.zero_();
    sum_g.zero_();
    sum_gk.zero_();
    return {dx, dsmall, dk3, sum_g, sum_gk};
  }
  const Geometry g = make_geometry(x, small);
  const int64_t K = L == Layout::NCHW ? g.N : g.N * g.h;  // partial rows per channel
  std::vector<double> part_g(K * C), part_gk(K * C);
  dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    Backward<T> p{dy.data_ptr<T>(),     x.data_ptr<T>(),
                  small.data_ptr<T>(),  k.data_ptr<T>(),
                  dx.data_ptr<T>(),     dsmall.data_ptr<T>(),
                  need_dk3 ? dk3.data_ptr<T>() : nullptr,
                  sc.data(),            sh.data(),
                  ct.data(),            sa.view()};
    if (L == Layout::NCHW) {
#ifdef SCNET_FUSED_PERMUTE_UP
      const UpTable t = make_up_table(g);
      if (t.ok) {
        // Read dy, x, k, written dx (and dk3).
        const bool nt = use_streaming<T>(mode, g.N * g.C, g.H * g.W, need_dk3 ? 5 : 4, {p.dx, p.dk3});
        double* pg = part_g.data();
        double* pk = part_gk.data();
        if (need_sums) {
          t.one ? backward_nchw_permute<T, true, true>(p, g, t, nt, pg, pk)
                : backward_nchw_permute<T, false, true>(p, g, t, nt, pg, pk);
        } else {
          t.one ? backward_nchw_permute<T, true, false>(p, g, t, nt, pg, pk)
                : backward_nchw_permute<T, false, false>(p, g, t, nt, pg, pk);
        }
        return;
      }
#endif
      backward_nchw<T>(p, g, part_g.data(), part_gk.data());
    } else {
      need_sums ? backward_nhwc<T, true>(p, g, part_g.data(), part_gk.data())
                : backward_nhwc<T, false>(p, g, part_g.data(), part_gk.data());
    }
  });
  if (need_sums) {
    reduce_partials(part_g.data(), K, C, sum_g.data_ptr<float>());
    reduce_partials(part_gk.data(), K, C, sum_gk.data_ptr<float>());
  }
  return {dx, dsmall, dk3, sum_g, sum_gk};
}

// Per-channel mean and biased variance of t (dense in layout L, N * H * W > 0) into mean[C], var[C].
void stats_into(const char* op, const at::Tensor& t, Layout L, float* mean, float* var) {
  const int64_t N = t.size(0), C = t.size(1), HW = t.size(2) * t.size(3);
  dispatch_dtype(t.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    if (L == Layout::NCHW) {
      stats_nchw<T>(t.data_ptr<T>(), N, C, HW, mean, var);
    } else {
      stats_nhwc<T>(t.data_ptr<T>(), N, C, HW, mean, var);
    }
  });
}

#ifdef SCNET_FUSED_PERMUTE_UP
// Whether `_gate_bn_train_backward` and `_gate_bn_train_forward` run channel by channel: NCHW on the
// permute table (the AVX2 and AVX-512 builds), every thread gets a channel, and the channel's data the
// backward's first pass touches (dy, x, k3 and dx of T, the float scratch: the scratch and k3 are read
// again) is at most kChannelBytes, so that the second read comes from a core's L2 (2 MiB on the Xeons
// measured; from L3 on a 512 KiB one). The forward touches less (k3 twice, x, y).
bool gate_bn_by_channel(const Geometry& g, int64_t elem_bytes) {
  constexpr int64_t kChannelBytes = int64_t(1) << 20;
  return g.C >= at::get_num_threads() && g.N * g.H * g.W * (4 * elem_bytes + 4) <= kChannelBytes;
}

// The permute table where the one-call BatchNorm gate kernels go channel by channel, else none (ok false).
UpTable gate_bn_channel_table(const Geometry& g, Layout L, int64_t elem_bytes) {
  if (L != Layout::NCHW || !gate_bn_by_channel(g, elem_bytes)) return UpTable{};
  return make_up_table(g);
}
#endif

// d += q * t + r in place (the `_add_channel_affine_` primitive of sc_bn_relu_cpu.cpp).
void add_channel_affine(const at::Tensor& d, const at::Tensor& t, const at::Tensor& q, const at::Tensor& r) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("scnet_fused::_add_channel_affine_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  op.call(d, t, q, r);
}

// The input gradients of y = bn(k3) * sigmoid(x + up(small)) with bn a training-mode BatchNorm of k3
// (batch statistics mean, biased var): (dx, dsmall, dk3, dweight, dbias), float32 dweight and dbias.
// The fold (bn_fold), the gate backward with its per-channel sums, the algebra (dweight = sum_gk *
// invstd, dbias = sum_g, q, r: bn_input_affine) and dk3 = scale * g + q * k3 + r in one call: NCHW
// channel by channel where gate_bn_by_channel allows it, else the two passes of
// scnet_fused/ops/sc_gate.py (float32: dk3 from g * scale; float16 / bfloat16: the sigmoid again, so
// that g * scale is not rounded to the storage type before the cancelling sum).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_bn_train_backward(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& small_in, const at::Tensor& k3_in,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var, double eps,
    const c10::optional<at::Tensor>& small_scale, const c10::optional<at::Tensor>& small_shift) {
  const char* op = "scnet_fused::_gate_bn_train_backward (cpu)";
  check_gate(op, x_in, small_in, k3_in, c10::DeviceType::CPU);
  check_full(op, "dy", dy_in, x_in);
  const int64_t C = x_in.size(1);
  const SmallAffineArgs sa(op, small_scale, small_shift, C);
  const std::vector<float> W = per_channel(op, "weight", weight, C, 1.0f);
  const std::vector<float> Bi = per_channel(op, "bias", bias, C, 0.0f);
  const std::vector<float> K = per_channel(op, "mean", mean, C, 0.0f);
  const std::vector<float> V = per_channel(op, "var", var, C, 1.0f);
  std::vector<float> sc(C), sh(C), is(C);
  for (int64_t c = 0; c < C; ++c) bn_fold_one(W[c], Bi[c], K[c], V[c], static_cast<float>(eps), &sc[c], &sh[c], &is[c]);

  const Layout L = layout_of(x_in);
  const at::Tensor x = in_layout(x_in, L);
  const at::Tensor k = in_layout(k3_in, L);
  const at::Tensor dy = in_layout(dy_in, L);
  const at::Tensor small = small_in.contiguous();
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  at::Tensor dweight = at::zeros({C}, f32);
  at::Tensor dbias = at::zeros({C}, f32);
  if (x.numel() == 0) {
    return {new_output(x.sizes(), x.options(), format_of(L)), at::zeros_like(small),
            new_output(x.sizes(), x.options(), format_of(L)), dweight, dbias};
  }
  const Geometry g = make_geometry(x, small);
#ifdef SCNET_FUSED_PERMUTE_UP
  {
    const UpTable t = gate_bn_channel_table(g, L, x.element_size());
    if (t.ok) {
      at::Tensor dx = new_output(x.sizes(), x.options());
      at::Tensor dk3 = new_output(x.sizes(), x.options());
      at::Tensor dsmall = new_output(small.sizes(), small.options());
      float* sg = dbias.data_ptr<float>();  // dbias = sum g
      std::vector<float> sgk(C);
      const StreamMode mode = stream_mode();
      dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
        using T = decltype(tag);
        Backward<T> p{dy.data_ptr<T>(), x.data_ptr<T>(),     small.data_ptr<T>(), k.data_ptr<T>(),
                      dx.data_ptr<T>(), dsmall.data_ptr<T>(), dk3.data_ptr<T>(),   sc.data(),
                      sh.data(),        K.data(),             sa.view()};
        // Read dy, x, k, written dx and dk3.
        const bool nt = use_streaming<T>(mode, g.N * g.C, g.H * g.W, 5, {p.dx, p.dk3});
        t.one ? gate_bn_backward_by_channel<T, true>(p, g, t, nt, is.data(), sg, sgk.data())
              : gate_bn_backward_by_channel<T, false>(p, g, t, nt, is.data(), sg, sgk.data());
      });
      float* dw = dweight.data_ptr<float>();
      for (int64_t c = 0; c < C; ++c) dw[c] = sgk[c] * is[c];
      return {dx, dsmall, dk3, dweight, dbias};
    }
  }
#endif
  const at::Tensor sct = at::tensor(sc, f32), sht = at::tensor(sh, f32), kt = at::tensor(K, f32);
  const bool from_g = x.scalar_type() == at::kFloat;
  auto [dx, dsmall, dk3, sum_g, sum_gk] =
      gate_backward(dy, x, small, k, sct, sht, kt, from_g, small_scale, small_shift, true);
  const float m = static_cast<float>(static_cast<double>(g.N * g.H * g.W));
  std::vector<float> Q(C), R(C);
  const float* sg = sum_g.data_ptr<float>();
  const float* sgk = sum_gk.data_ptr<float>();
  float* dw = dweight.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    bn_input_affine(sg[c], sgk[c], sc[c], is[c], K[c], m, &Q[c], &R[c]);
    dw[c] = sgk[c] * is[c];
  }
  const at::Tensor qt = at::tensor(Q, f32), rt = at::tensor(R, f32);
  if (from_g) {
    add_channel_affine(dk3, k, qt, rt);
  } else {
    dk3 = gate_backward_k3(dy, x, small, k, sct, qt, rt, small_scale, small_shift);
  }
  return {dx, dsmall, dk3, dweight, sum_g};
}

// y = bn(k3) * sigmoid(x + up(small)) with bn a training-mode BatchNorm of k3, and k3's batch
// statistics (mean, biased var; float32): `_channel_stats`, the fold (bn_fold) and `_gate_forward` in
// one call, NCHW channel by channel where gate_bn_by_channel allows it (each channel's k3 read the
// second time from cache), else those passes one after the other. The same bits either way.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_bn_train_forward(
    const at::Tensor& x_in, const at::Tensor& small_in, const at::Tensor& k3_in, const at::Tensor& weight,
    const at::Tensor& bias, double eps, const c10::optional<at::Tensor>& small_scale,
    const c10::optional<at::Tensor>& small_shift) {
  const char* op = "scnet_fused::_gate_bn_train_forward (cpu)";
  check_gate(op, x_in, small_in, k3_in, c10::DeviceType::CPU);
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  const SmallAffineArgs sa(op, small_scale, small_shift, C);
  TORCH_CHECK(N * HW > 0, op, ": k3 has no elements per channel, shape ", k3_in.sizes());
  const std::vector<float> W = per_channel(op, "weight", weight, C, 1.0f);
  const std::vector<float> Bi = per_channel(op, "bias", bias, C, 0.0f);
  const float epsf = static_cast<float>(eps);
  const Layout L = layout_of(x_in);
  const at::Tensor x = in_layout(x_in, L);
  const at::Tensor k = in_layout(k3_in, L);
  const at::Tensor small = small_in.contiguous();
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = new_output({C}, f32), var = new_output({C}, f32);
  if (C == 0) return {new_output(x.sizes(), x.options(), format_of(L)), mean, var};
  const Geometry g = make_geometry(x, small);
#ifdef SCNET_FUSED_PERMUTE_UP
  {
    const UpTable t = gate_bn_channel_table(g, L, x.element_size());
    if (t.ok) {
      at::Tensor y = new_output(x.sizes(), x.options());
      std::vector<float> A(C), B(C), R(C, 0.0f);
      const StreamMode mode = stream_mode();
      dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
        using T = decltype(tag);
        Pointwise<T> p{x.data_ptr<T>(), nullptr, k.data_ptr<T>(), small.data_ptr<T>(), y.data_ptr<T>(),
                       A.data(),        B.data(), R.data(),         sa.view()};
        // Read x, k, written y.
        const bool nt = use_streaming<T>(mode, g.N * g.C, g.H * g.W, 3, {p.out});
        t.one ? gate_bn_forward_by_channel<T, true>(p, A.data(), B.data(), g, t, nt, W.data(), Bi.data(), epsf,
                                                   mean.data_ptr<float>(), var.data_ptr<float>())
              : gate_bn_forward_by_channel<T, false>(p, A.data(), B.data(), g, t, nt, W.data(), Bi.data(), epsf,
                                                    mean.data_ptr<float>(), var.data_ptr<float>());
      });
      return {y, mean, var};
    }
  }
#endif
  stats_into(op, k, L, mean.data_ptr<float>(), var.data_ptr<float>());
  std::vector<float> A(C), B(C);
  const float* mp = mean.data_ptr<float>();
  const float* vp = var.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) bn_fold_one(W[c], Bi[c], mp[c], vp[c], epsf, &A[c], &B[c]);
  at::Tensor y = pointwise_op(op, kGate, x, small, k, nullptr, A, B, std::vector<float>(C, 0.0f), sa.view());
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& t_in) {
  const char* op = "scnet_fused::_channel_stats (cpu)";
  TORCH_CHECK(t_in.device().is_cpu(), op, ": t must be a CPU tensor, got ", t_in.device());
  TORCH_CHECK(t_in.dim() == 4, op, ": t must be 4-D (N, C, H, W), got ", t_in.sizes());
  TORCH_CHECK(supported_dtype(t_in.scalar_type()), op, ": t must be float32, float16 or bfloat16, got ",
              t_in.scalar_type());
  const int64_t N = t_in.size(0), C = t_in.size(1), HW = t_in.size(2) * t_in.size(3);
  TORCH_CHECK(N * HW > 0, op, ": t has no elements per channel, shape ", t_in.sizes());
  at::Tensor mean = new_output({C}, t_in.options().dtype(at::kFloat));
  at::Tensor var = new_output({C}, t_in.options().dtype(at::kFloat));
  if (C == 0) return {mean, var};
  const Layout L = layout_of(t_in);
  const at::Tensor t = in_layout(t_in, L);
  stats_into(op, t, L, mean.data_ptr<float>(), var.data_ptr<float>());
  return {mean, var};
}

}  // namespace
}  // namespace cpu
}  // namespace scnet_fused

TORCH_LIBRARY_IMPL(scnet_fused, CPU, m) {
  m.impl("_gate_forward", &scnet_fused::cpu::gate_forward);
  m.impl("_gate_backward", &scnet_fused::cpu::gate_backward);
  m.impl("_gate_backward_k3", &scnet_fused::cpu::gate_backward_k3);
  m.impl("_channel_stats", &scnet_fused::cpu::channel_stats);
  m.impl("_gate_bn_train_backward", &scnet_fused::cpu::gate_bn_train_backward);
  m.impl("_gate_bn_train_forward", &scnet_fused::cpu::gate_bn_train_forward);
}
