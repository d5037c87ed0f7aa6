// CPU kernels of the Winograd F(4x4, 3x3) convolution: its transforms and its products (contract:
// scnet_fused/ops/winograd.py). A 3x3 convolution with stride 1 and padding 1 of an (N, C, H, W) map
// is computed on 4x4 output tiles, TH = ceil(H / 4) by TW = ceil(W / 4) of them per image:
//
//   Y_tile = A^T [ sum_c (G g G^T) (.) (B^T d_tile B) ] A
//
// d_tile the 6x6 input window at rows 4 th - 1 .. 4 th + 4, columns 4 tw - 1 .. 4 tw + 4 (zero outside
// the map), g a 3x3 filter, (.) the element-wise product. The sum over input channels is 36 matrix
// products (one per position xi = 6 r + s of the 6x6 transformed tile), torch.bmm or _wino_bmm below;
// the transforms around them write the layout those products read: [36][channels][tiles], tiles
// numbered t = (n * TH + th) * TW + tw, contiguous.
//
//   _wino_input(x, TH, TW)         V[xi][c][t] = (B^T d_tile B)[xi]                 (x: N, C, H, W)
//   _wino_output(M, N, H, W, bias) y[n][k][4 th + i][4 tw + j] = (A^T M_tile A)[i][j] + bias[k]
//   _wino_output_adjoint(dy, TH, TW)  Z[xi][k][t] = (A dy_tile A^T)[xi]  (dy_tile: the 4x4 output tile,
//                                  zero outside the map): the adjoint of _wino_output, for the weight
//                                  gradient dU[xi] = Z[xi] V[xi]^T.
//
//   _wino_filter(g, flip, in_major)  U[xi][k][c] = (G g[k][c] G^T)[xi] (flip: of the input gradient's
//                                  filters flip(g)^T; in_major: the channel axes swapped)
//   _wino_filter_adjoint(dU)       dg[k][c] = G^T dU[.][k][c] G, the weight gradient from dU
//   _wino_bmm(a, b, a_transposed)  the 36 channel sums as batched matrix products, a register-blocked
//                                  kernel (taken where MKL's products are slow: see winograd.py)
//   _wino_conv(x, U, bias)         the whole convolution, input transform, products and output
//                                  transform a block of tiles at a time in cache (U from
//                                  _wino_filter(g, flip, in_major=true)); y in x's layout (dense NCHW
//                                  or channels_last; other strides through a channels_last copy)
//   _wino_conv_w(x, g, bias, flip)  the same from the filters, their transform made inside the task
//                                  items (small maps, many channels)
//   _wino_wgrad(Z, V)              the weight gradient's products and adjoint transform in one kernel
//   _wino_wgrad_x(dy, x)           the weight gradient from the two maps, both transforms inside, the
//                                  tiles in runs whose partial products are added in run order
//
// float32, NCHW (dense). Vectorized across the tiles of a tile row with at::vec::Vectorized<float>:
// each row of the map is first split into its four column phases (column = 4 k + p), so that the six
// (or four) columns of every tile are contiguous loads at k = tw and k = tw + 1. One task item = one
// (channel, image) plane, its tile rows staged in cache and written out as 36 contiguous runs; no
// reduction crosses a task. The `_nhwc` variants use the tile-domain layout [36][tiles][channels],
// vectorized across the channels, one tile per task item; they read channels_last maps, and dense NCHW
// ones a strip of rows at a time transposed to channels_last in the task's cache (stage_rows), and
// `_wino_output_nhwc` writes either layout.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "sc_cpu_vec.h"
#include "sc_host.h"
#include "sc_scratch.h"

namespace scnet_fused {
namespace cpu_winograd {
namespace {

using namespace ::scnet_fused::cpu_vec;
using ::scnet_fused::cpu_scratch::Scratch;

// B^T applied to six values (the input transform of one row or column of a 6x6 window).
template <typename V>
inline void bt6(const V& d0, const V& d1, const V& d2, const V& d3, const V& d4, const V& d5, V* o) {
  const V f4(4.0f), f5(5.0f), f2(2.0f);
  o[0] = f4 * d0 - f5 * d2 + d4;
  const V a = d3 + d4 - f4 * (d1 + d2);  // -4 d1 - 4 d2 + d3 + d4
  const V b = f4 * (d1 - d2) + d4 - d3;  //  4 d1 - 4 d2 - d3 + d4
  o[1] = a;
  o[2] = b;
  const V c = d4 - d2;
  const V e = f2 * (d3 - d1);
  o[3] = c + e;  // -2 d1 - d2 + 2 d3 + d4
  o[4] = c - e;  //  2 d1 - d2 - 2 d3 + d4
  o[5] = f4 * d1 - f5 * d3 + d5;
}

// A^T applied to six values (4 outputs).
template <typename V>
inline void at6(const V& m0, const V& m1, const V& m2, const V& m3, const V& m4, const V& m5, V* o) {
  const V f2(2.0f), f4(4.0f), f8(8.0f);
  const V p12 = m1 + m2, d12 = m1 - m2, p34 = m3 + m4, d34 = m3 - m4;
  o[0] = m0 + p12 + p34;
  o[1] = d12 + f2 * d34;
  o[2] = p12 + f4 * p34;
  o[3] = d12 + f8 * d34 + m5;
}

// A applied to four values (6 outputs): the adjoint of at6.
template <typename V>
inline void a4(const V& d0, const V& d1, const V& d2, const V& d3, V* o) {
  const V f2(2.0f), f4(4.0f), f8(8.0f);
  const V p02 = d0 + d2, p13 = d1 + d3;
  const V q = d0 + f4 * d2, w = f2 * d1 + f8 * d3;
  o[0] = d0;
  o[1] = p02 + p13;
  o[2] = p02 - p13;
  o[3] = q + w;
  o[4] = q - w;
  o[5] = d3;
}

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// The column phases are handled 16 tiles (64 columns) at a time.
constexpr int64_t kChunk = 16;

// dst[p][k] = src[4 k + p] for k in [0, 16) and p in [0, 4) (dst[p] = dst + p * stride): the four
// column phases of 64 consecutive floats.
inline void deinterleave4(const float* src, float* dst, int64_t stride) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__)
  alignas(64) static const int32_t kIdx[4][16] = {
      {0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28},
      {1, 5, 9, 13, 17, 21, 25, 29, 1, 5, 9, 13, 17, 21, 25, 29},
      {2, 6, 10, 14, 18, 22, 26, 30, 2, 6, 10, 14, 18, 22, 26, 30},
      {3, 7, 11, 15, 19, 23, 27, 31, 3, 7, 11, 15, 19, 23, 27, 31}};
  const __m512 a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16), c = _mm512_loadu_ps(src + 32),
               d = _mm512_loadu_ps(src + 48);
  for (int p = 0; p < 4; ++p) {
    const __m512i idx = _mm512_load_si512(kIdx[p]);
    const __m512 ab = _mm512_permutex2var_ps(a, idx, b);  // lanes 0-7: k = 0..7
    const __m512 cd = _mm512_permutex2var_ps(c, idx, d);  // lanes 0-7: k = 8..15
    _mm512_storeu_ps(dst + p * stride, _mm512_shuffle_f32x4(ab, cd, 0x44));
  }
#else
  for (int p = 0; p < 4; ++p)
    for (int k = 0; k < 16; ++k) dst[p * stride + k] = src[4 * k + p];
#endif
}

// dst[4 k + p] = src[p][k] for k in [0, 16) and p in [0, 4) (src[p] = src + p * stride): the inverse.
inline void interleave4(const float* src, int64_t stride, float* dst) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__)
  alignas(64) static const int32_t kPairLo[16] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  alignas(64) static const int32_t kPairHi[16] = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  alignas(64) static const int32_t kQuad[2][16] = {
      {0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23},
      {8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31}};
  const __m512 p0 = _mm512_loadu_ps(src), p1 = _mm512_loadu_ps(src + stride), p2 = _mm512_loadu_ps(src + 2 * stride),
               p3 = _mm512_loadu_ps(src + 3 * stride);
  const __m512i lo = _mm512_load_si512(kPairLo), hi = _mm512_load_si512(kPairHi);
  const __m512 lo01 = _mm512_permutex2var_ps(p0, lo, p1), hi01 = _mm512_permutex2var_ps(p0, hi, p1);  // k 0-7, 8-15
  const __m512 lo23 = _mm512_permutex2var_ps(p2, lo, p3), hi23 = _mm512_permutex2var_ps(p2, hi, p3);
  const __m512i q0 = _mm512_load_si512(kQuad[0]), q1 = _mm512_load_si512(kQuad[1]);
  _mm512_storeu_ps(dst, _mm512_permutex2var_ps(lo01, q0, lo23));
  _mm512_storeu_ps(dst + 16, _mm512_permutex2var_ps(lo01, q1, lo23));
  _mm512_storeu_ps(dst + 32, _mm512_permutex2var_ps(hi01, q0, hi23));
  _mm512_storeu_ps(dst + 48, _mm512_permutex2var_ps(hi01, q1, hi23));
#else
  for (int p = 0; p < 4; ++p)
    for (int k = 0; k < 16; ++k) dst[4 * k + p] = src[p * stride + k];
#endif
}

// 36 rows of `count` floats, stage[xi * pitch ...] -> dst[xi * xi_stride ...]: a plane's transformed
// tiles, staged in cache by the task, written out as 36 contiguous runs.
inline void flush_stage(const float* stage, int64_t pitch, int64_t count, float* dst, int64_t xi_stride) {
  for (int64_t xi = 0; xi < 36; ++xi) {
    const float* src = stage + xi * pitch;
    float* out = dst + xi * xi_stride;
    int64_t e = 0;
    for (; e + kV <= count; e += kV) Vec::loadu(src + e).store(out + e);
    if (e < count) Vec::loadu(src + e).store(out + e, count - e);
  }
}


// The four column phases of one zero-padded row: row[0, 4 S) -> dst[p][0, S) (S a multiple of 16).
inline void split_phases(const float* row, int64_t S, float* dst) {
  for (int64_t k = 0; k < S; k += kChunk) deinterleave4(row + 4 * k, dst + k, S);
}

void check_map(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": expected float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, op, ": expected an (N, C, H, W) tensor, got ", t.dim(), " dimensions");
}

// Dense NCHW and not also channels_last (the layouts both hold for 1x1 maps and single channels).
inline bool is_nchw(const at::Tensor& t) {
  return t.is_contiguous() && !t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_tiles(const char* op, int64_t H, int64_t W, int64_t TH, int64_t TW) {
  TORCH_CHECK(H > 0 && W > 0, op, ": empty map ", H, "x", W);
  TORCH_CHECK(TH == (H + 3) / 4 && TW == (W + 3) / 4, op, ": a ", H, "x", W, " map has ", (H + 3) / 4, "x",
              (W + 3) / 4, " tiles of 4x4, got ", TH, "x", TW);
}

// ---------------------------------------------------------------------------------------------
// The transforms into the tile domain: the input's (B^T d B, 6x6 windows at offset -1) and the
// output gradient's (A dy A^T, 4x4 tiles at offset 0).
// ---------------------------------------------------------------------------------------------
template <int ROWS>
struct TileTransform;

template <>
struct TileTransform<6> {  // B^T d B
  static constexpr int64_t kOffset = 1;  // the window starts one row / column before the tile
  static void rows(const float* b, int64_t len, Vec* o) {
    bt6(Vec::loadu(b), Vec::loadu(b + len), Vec::loadu(b + 2 * len), Vec::loadu(b + 3 * len),
        Vec::loadu(b + 4 * len), Vec::loadu(b + 5 * len), o);
  }
  static void cols(const float* t, int64_t S, int64_t tw, Vec* o) {  // columns 4 tw - 1 .. 4 tw + 4
    bt6(Vec::loadu(t + tw), Vec::loadu(t + S + tw), Vec::loadu(t + 2 * S + tw), Vec::loadu(t + 3 * S + tw),
        Vec::loadu(t + tw + 1), Vec::loadu(t + S + tw + 1), o);
  }
};

template <>
struct TileTransform<4> {  // A dy A^T
  static constexpr int64_t kOffset = 0;
  static void rows(const float* b, int64_t len, Vec* o) {
    a4(Vec::loadu(b), Vec::loadu(b + len), Vec::loadu(b + 2 * len), Vec::loadu(b + 3 * len), o);
  }
  static void cols(const float* t, int64_t S, int64_t tw, Vec* o) {  // columns 4 tw .. 4 tw + 3
    a4(Vec::loadu(t + tw), Vec::loadu(t + S + tw), Vec::loadu(t + 2 * S + tw), Vec::loadu(t + 3 * S + tw), o);
  }
};

// out[xi][c][t] for the (N, C, H, W) map `src`: one task item per (channel, image) plane, whose tile
// rows are transformed into a staging buffer and written out as 36 contiguous runs.
template <int ROWS>
at::Tensor to_tiles(const char* op, const at::Tensor& src_in, int64_t TH, int64_t TW) {
  using TT = TileTransform<ROWS>;
  check_map(op, src_in);
  const at::Tensor src = src_in.contiguous();
  const int64_t N = src.size(0), C = src.size(1), H = src.size(2), W = src.size(3);
  check_tiles(op, H, W, TH, TW);
  const int64_t T = N * TH * TW;
  at::Tensor out = host::new_output({36, C, T}, src.options());
  if (out.numel() == 0) return out;
  const float* sp = src.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  // phase row stride, a multiple of the 16-tile chunk with room for k = TW (the last window's last two
  // columns); the vector loads at k = tw + 1 run past a phase row into the next one, in the lanes of
  // tiles past TW
  const int64_t S = round_up(TW + 1, kChunk);
  const int64_t len = 4 * S, xi_stride = C * T;
  const int64_t tiles = TH * TW, pitch = round_up(tiles, kV) + kV;
  at::parallel_for(0, C * N, grain_for(36 * tiles), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(ROWS * len, 0.0f), tr(6 * len, 0.0f), padded(len, 0.0f), stage(36 * pitch);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item % N, c = item / N;
      const float* plane = sp + (n * C + c) * H * W;
      for (int64_t th = 0; th < TH; ++th) {
        // buf[i][p][k] = src[4 th - off + i][4 k + p - off] (zero outside the map), through a copy of
        // the row at offset `off` in a zero-padded row buffer
        for (int64_t i = 0; i < ROWS; ++i) {
          float* b = buf.data() + i * len;
          const int64_t row = 4 * th - TT::kOffset + i;
          if (row < 0 || row >= H) {
            std::fill(b, b + len, 0.0f);
            continue;
          }
          std::copy(plane + row * W, plane + row * W + W, padded.data() + TT::kOffset);
          split_phases(padded.data(), S, b);
        }
        // tr[r][p][k] = the row combination r of buf[.][p][k], over the flattened (p, k)
        for (int64_t e = 0; e < len; e += kV) {
          Vec o[6];
          TT::rows(buf.data() + e, len, o);
          for (int r = 0; r < 6; ++r) o[r].store(tr.data() + r * len + e);
        }
        // stage[6 r + s][th * TW + tw] = the column combination s of tr[r] over tile tw's columns (full
        // vectors: the lanes past TW are overwritten by the next tile row or never copied out)
        float* srow = stage.data() + th * TW;
        for (int64_t tw = 0; tw < TW; tw += kV) {
          for (int r = 0; r < 6; ++r) {
            Vec o[6];
            TT::cols(tr.data() + r * len, S, tw, o);
            for (int s = 0; s < 6; ++s) o[s].store(srow + (6 * r + s) * pitch + tw);
          }
        }
      }
      flush_stage(stage.data(), pitch, tiles, op_ + c * T + n * tiles, xi_stride);
    }
  });
  return out;
}

at::Tensor wino_input(const at::Tensor& x, int64_t TH, int64_t TW) {
  return to_tiles<6>("scnet_fused::_wino_input (cpu)", x, TH, TW);
}

// The adjoint of the output transform (for the weight gradient).
at::Tensor wino_output_adjoint(const at::Tensor& dy, int64_t TH, int64_t TW) {
  return to_tiles<4>("scnet_fused::_wino_output_adjoint (cpu)", dy, TH, TW);
}

// The optional bias of an output transform, checked: a float32 CPU vector of K elements (undefined if absent).
at::Tensor checked_bias(const char* op, const c10::optional<at::Tensor>& bias_in, int64_t K) {
  if (!(bias_in.has_value() && bias_in->defined())) return at::Tensor();
  at::Tensor bias = bias_in->contiguous();
  TORCH_CHECK(bias.device().is_cpu() && bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.size(0) == K, op,
              ": bias must be a float32 CPU vector of ", K, " elements, got ", bias.sizes());
  return bias;
}

// The checked arguments of an output transform: M is (36, K, tiles), or (36, tiles, K) for channels_last.
struct OutputArgs {
  at::Tensor m, bias;
  int64_t K, TH, TW, T;
};

OutputArgs output_args(const char* op, const at::Tensor& m_in, int64_t N, int64_t H, int64_t W,
                       const c10::optional<at::Tensor>& bias_in, bool nhwc) {
  TORCH_CHECK(m_in.device().is_cpu() && m_in.scalar_type() == at::kFloat && m_in.dim() == 3 && m_in.size(0) == 36,
              op, ": expected a float32 CPU tensor of shape ", nhwc ? "(36, tiles, K)" : "(36, K, tiles)", ", got ",
              m_in.sizes(), " ", m_in.scalar_type(), " on ", m_in.device());
  TORCH_CHECK(N >= 0, op, ": negative batch ", N);
  OutputArgs a;
  a.TH = (H + 3) / 4;
  a.TW = (W + 3) / 4;
  check_tiles(op, H, W, a.TH, a.TW);
  a.K = m_in.size(nhwc ? 2 : 1);
  a.T = N * a.TH * a.TW;
  const int64_t tiles = m_in.size(nhwc ? 1 : 2);
  TORCH_CHECK(tiles == a.T, op, ": ", N, " images of ", H, "x", W, " have ", a.T, " tiles, M has ", tiles);
  a.m = m_in.contiguous();
  a.bias = checked_bias(op, bias_in, a.K);
  return a;
}

// ---------------------------------------------------------------------------------------------
// Output transform.
// ---------------------------------------------------------------------------------------------
at::Tensor wino_output(const at::Tensor& m_in, int64_t N, int64_t H, int64_t W, const c10::optional<at::Tensor>& bias_in) {
  const char* op = "scnet_fused::_wino_output (cpu)";
  const OutputArgs a = output_args(op, m_in, N, H, W, bias_in, false);
  const at::Tensor& m = a.m;
  const at::Tensor& bias = a.bias;
  const int64_t K = a.K, TH = a.TH, TW = a.TW, T = a.T;
  at::Tensor y = host::new_output({N, K, H, W}, m.options());
  if (y.numel() == 0) return y;
  const float* mp = m.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t S = round_up(TW, kChunk);
  const int64_t xi_stride = K * T;
  at::parallel_for(0, K * N * TH, grain_for(36 * TW), [&](int64_t begin, int64_t end) {
    std::vector<float> ob(16 * S), row(4 * S);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t th = item % TH, n = (item / TH) % N, k = item / (TH * N);
      const float* mrow = mp + k * T + (n * TH + th) * TW;
      for (int64_t tw = 0; tw < TW; tw += kV) {
        const int64_t cnt = std::min<int64_t>(kV, TW - tw);
        Vec acc[4][4];
        for (int r = 0; r < 6; ++r) {
          Vec mv[6];
          for (int s = 0; s < 6; ++s) {
            const float* src = mrow + (6 * r + s) * xi_stride + tw;
            mv[s] = cnt == kV ? Vec::loadu(src) : Vec::loadu(src, cnt);
          }
          Vec q[4];
          at6(mv[0], mv[1], mv[2], mv[3], mv[4], mv[5], q);
          // acc[i][j] += A^T[i][r] q[j]; A^T columns: r0 (1,0,0,0), r1 (1,1,1,1), r2 (1,-1,1,-1),
          // r3 (1,2,4,8), r4 (1,-2,4,-8), r5 (0,0,0,1)
          for (int j = 0; j < 4; ++j) {
            switch (r) {
              case 0: acc[0][j] = q[j]; acc[1][j] = Vec(0.0f); acc[2][j] = Vec(0.0f); acc[3][j] = Vec(0.0f); break;
              case 1: acc[0][j] = acc[0][j] + q[j]; acc[1][j] = acc[1][j] + q[j]; acc[2][j] = acc[2][j] + q[j];
                      acc[3][j] = acc[3][j] + q[j]; break;
              case 2: acc[0][j] = acc[0][j] + q[j]; acc[1][j] = acc[1][j] - q[j]; acc[2][j] = acc[2][j] + q[j];
                      acc[3][j] = acc[3][j] - q[j]; break;
              case 3: acc[0][j] = acc[0][j] + q[j]; acc[1][j] = at::vec::fmadd(Vec(2.0f), q[j], acc[1][j]);
                      acc[2][j] = at::vec::fmadd(Vec(4.0f), q[j], acc[2][j]);
                      acc[3][j] = at::vec::fmadd(Vec(8.0f), q[j], acc[3][j]); break;
              case 4: acc[0][j] = acc[0][j] + q[j]; acc[1][j] = at::vec::fmadd(Vec(-2.0f), q[j], acc[1][j]);
                      acc[2][j] = at::vec::fmadd(Vec(4.0f), q[j], acc[2][j]);
                      acc[3][j] = at::vec::fmadd(Vec(-8.0f), q[j], acc[3][j]); break;
              default: acc[3][j] = acc[3][j] + q[j]; break;
            }
          }
        }
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j].store(ob.data() + (4 * i + j) * S + tw);
      }
      // y[4 th + i][4 tw + j] = ob[i][j][tw] (+ bias), the rows and columns inside the map
      const float b = bp ? bp[k] : 0.0f;
      float* plane = yp + (n * K + k) * H * W;
      const int64_t rows = std::min<int64_t>(4, H - 4 * th);
      const Vec bv(b);
      for (int64_t i = 0; i < rows; ++i) {
        const float* o = ob.data() + (4 * i) * S;  // ob[i][j][tw], phase stride S
        for (int64_t k = 0; k < S; k += kChunk) interleave4(o + k, S, row.data() + 4 * k);
        float* dst = plane + (4 * th + i) * W;
        int64_t col = 0;
        for (; col + kV <= W; col += kV) (Vec::loadu(row.data() + col) + bv).store(dst + col);
        if (col < W) (Vec::loadu(row.data() + col, W - col) + bv).store(dst + col, W - col);
      }
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// channels_last (NHWC): the same three transforms, vectorized across the channels (contiguous in
// this layout), in the tile-domain layout [36][tiles][channels]: the matrix products then read the
// filters' transform transposed, M[xi] = V[xi] U[xi]^T. One task item = one tile, all channels.
// ---------------------------------------------------------------------------------------------
template <int ROWS>
inline void combine(const Vec* in, Vec* out) {
  if constexpr (ROWS == 6) {
    bt6(in[0], in[1], in[2], in[3], in[4], in[5], out);
  } else {
    a4(in[0], in[1], in[2], in[3], out);
  }
}

inline Vec load_part(const float* p, int64_t cnt) { return cnt == kV ? Vec::loadu(p) : Vec::loadu(p, cnt); }

inline void store_part(const Vec& v, float* p, int64_t cnt) {
  if (cnt == kV) {
    v.store(p);
  } else {
    v.store(p, cnt);
  }
}

// Channel vectors of an NCHW map, whose channels lie a plane (`stride` floats) apart: gathered (with
// 32-bit indices `idx` = lane * stride where `gather`), or assembled lane by lane; `cnt` lanes, the rest 0.
inline Vec load_strided(const float* p, int64_t stride, int64_t cnt, bool gather,
                        const at::vec::Vectorized<int32_t>& idx) {
  if (gather && cnt == kV) return at::vec::gather<4>(p, idx);
  alignas(64) float tmp[kV];
  for (int64_t l = 0; l < kV; ++l) tmp[l] = l < cnt ? p[l * stride] : 0.0f;
  return Vec::loadu(tmp);
}

inline void store_strided(const Vec& v, float* p, int64_t stride, int64_t cnt) {
  alignas(64) float tmp[kV];
  v.store(tmp);
  for (int64_t l = 0; l < cnt; ++l) p[l * stride] = tmp[l];
}

// 32-bit lane offsets l * stride for gathers, and whether they fit.
struct LaneIndex {
  bool fits;
  at::vec::Vectorized<int32_t> idx;
  explicit LaneIndex(int64_t stride) : fits(stride * kV < (int64_t{1} << 31)) {
    alignas(64) int32_t a[kV];
    for (int64_t l = 0; l < kV; ++l) a[l] = fits ? static_cast<int32_t>(l * stride) : 0;
    idx = at::vec::Vectorized<int32_t>::loadu(a);
  }
};

// Tile t = (n TH + th) TW + tw of N images of TH x TW tiles.
struct Tile {
  int64_t n, th, tw;
  Tile(int64_t t, int64_t TH, int64_t TW) : n(t / (TW * TH)), th((t / TW) % TH), tw(t % TW) {}
};

// Where a map's elements lie: element (row, col) of channel c at img + (row W + col) pix + c chan, with
// (pix, chan) = (C, 1) channels_last or (1, H W) dense NCHW, whose channel vectors are gathered (or
// stored) a plane apart.
struct MapView {
  int64_t H, W, pix, chan;
  bool nchw;
  LaneIndex lanes;
  MapView(int64_t C, int64_t H_, int64_t W_, bool nchw_)
      : H(H_), W(W_), pix(nchw_ ? 1 : C), chan(nchw_ ? H_ * W_ : 1), nchw(nchw_), lanes(H_ * W_) {}
};

// B^T d B (ROWS 6) or A dy A^T (ROWS 4) of one window, channels [0, C), its channel vectors from
// load(i, j, c0, cnt) (row i, column j of the window; `cnt` channels from c0, the rest zero), into
// dst[xi * xi_stride + c].
template <int ROWS, typename Load>
inline void window_to_domain(Load&& load, int64_t C, float* dst, int64_t xi_stride) {
  for (int64_t c0 = 0; c0 < C; c0 += kV) {
    const int64_t cnt = std::min<int64_t>(kV, C - c0);
    Vec tr[6][ROWS];  // tr[r][j]: the row combination r of column j
    for (int64_t j = 0; j < ROWS; ++j) {
      Vec d[ROWS];
      for (int64_t i = 0; i < ROWS; ++i) d[i] = load(i, j, c0, cnt);
      Vec o[6];
      combine<ROWS>(d, o);
      for (int r = 0; r < 6; ++r) tr[r][j] = o[r];
    }
    for (int r = 0; r < 6; ++r) {
      Vec o[6];
      combine<ROWS>(tr[r], o);
      for (int s = 0; s < 6; ++s) store_part(o[s], dst + (6 * r + s) * xi_stride + c0, cnt);
    }
  }
}

// The tile (th, tw) of one image `img` (channels [0, C) from img): B^T d B of its 6x6 window at offset
// -1 (ROWS 6), or A dy A^T of its 4x4 tile (ROWS 4), into dst[xi * xi_stride + c].
template <int ROWS>
inline void tile_to_domain(const float* img, const MapView& v, int64_t C, int64_t th, int64_t tw, float* dst,
                           int64_t xi_stride) {
  constexpr int64_t off = ROWS == 6 ? 1 : 0;
  window_to_domain<ROWS>(
      [&](int64_t i, int64_t j, int64_t c0, int64_t cnt) {
        const int64_t row = 4 * th - off + i, col = 4 * tw - off + j;
        if (!(row >= 0 && row < v.H && col >= 0 && col < v.W)) return Vec(0.0f);
        const float* e = img + (row * v.W + col) * v.pix + c0 * v.chan;
        return v.nchw ? load_strided(e, v.chan, cnt, v.lanes.fits, v.lanes.idx) : load_part(e, cnt);
      },
      C, dst, xi_stride);
}

// Rows row0 .. row0 + R and columns col0 .. col0 + SW of the dense NCHW image `img` (C planes of H x W),
// all channels, into strip[(r * SW + j) * C + c] (channels_last), zero outside the map: register
// transposes of 16 channels x 16 columns. The NCHW transforms then read contiguous channel vectors
// from the strip instead of gathering each one a plane apart (the gathers were a fifth of the
// 8x32x56x56 SCConv training step).
inline void stage_rows(const float* img, int64_t C, int64_t H, int64_t W, int64_t row0, int64_t R, int64_t col0,
                       int64_t SW, float* strip) {
  const int64_t cs = std::max<int64_t>(col0, 0), ce = std::min<int64_t>(col0 + SW, W);
  for (int64_t r = 0; r < R; ++r) {
    float* dst = strip + r * SW * C;
    const int64_t row = row0 + r;
    if (row < 0 || row >= H || ce <= cs) {
      std::fill(dst, dst + SW * C, 0.0f);
      continue;
    }
    std::fill(dst, dst + (cs - col0) * C, 0.0f);
    std::fill(dst + (ce - col0) * C, dst + SW * C, 0.0f);
    at::vec::transpose_mxn<float>(img + row * W + cs, H * W, dst + (cs - col0) * C, C, static_cast<int>(C),
                                  static_cast<int>(ce - cs));
  }
}

// The window of tile `k` of a staged strip (row pitch SW positions of C channels): its channel vectors.
inline auto strip_window(const float* strip, int64_t SW, int64_t C, int64_t k) {
  return [=](int64_t i, int64_t j, int64_t c0, int64_t cnt) {
    return load_part(strip + (i * SW + 4 * k + j) * C + c0, cnt);
  };
}

// B^T d B of the 6x6 windows at offset -1 (ROWS 6), or A dy A^T of the 4x4 tiles (ROWS 4), of the tiles
// t0 .. t1 of the map at xp (C channels; dense NCHW, or channels_last as `v` says) into out[xi * xs + (t -
// t0) * C + c], by the calling thread. NCHW: a tile row's run of tiles at a time, its rows staged
// channels_last in `strip` (ROWS (4 min(t1 - t0, TW) + 2) C floats; unused for channels_last).
template <int ROWS>
inline void tiles_to_domain(const float* xp, const MapView& v, int64_t C, int64_t TH, int64_t TW, int64_t t0,
                            int64_t t1, float* out, int64_t xs, float* strip) {
  constexpr int64_t off = ROWS == 6 ? 1 : 0;
  for (int64_t t = t0; t < t1;) {
    const Tile p(t, TH, TW);
    const float* img = xp + p.n * v.H * v.W * C;
    if (!v.nchw) {
      tile_to_domain<ROWS>(img, v, C, p.th, p.tw, out + (t - t0) * C, xs);
      ++t;
      continue;
    }
    const int64_t seg = std::min<int64_t>(t1 - t, TW - p.tw), SW = 4 * seg + 2 * off;
    stage_rows(img, C, v.H, v.W, 4 * p.th - off, ROWS, 4 * p.tw - off, SW, strip);
    for (int64_t k = 0; k < seg; ++k)
      window_to_domain<ROWS>(strip_window(strip, SW, C, k), C, out + (t - t0 + k) * C, xs);
    t += seg;
  }
}

// The output tile (th, tw) of one image `img` (channels [0, K) from img): A^T M A of src[xi * xi_stride
// + k], plus bias[k] where bias is given; the tile's rows and columns past the map's edge are dropped.
inline void tile_from_domain(const float* src, int64_t xi_stride, int64_t K, const float* bias, const MapView& v,
                             int64_t th, int64_t tw, float* img) {
  const int64_t rows = std::min<int64_t>(4, v.H - 4 * th), cols = std::min<int64_t>(4, v.W - 4 * tw);
  for (int64_t k0 = 0; k0 < K; k0 += kV) {
    const int64_t cnt = std::min<int64_t>(kV, K - k0);
    Vec q[6][4];  // q[r][j]: A^T over s of M[6 r + s]
    for (int r = 0; r < 6; ++r) {
      Vec mv[6];
      for (int s = 0; s < 6; ++s) mv[s] = load_part(src + (6 * r + s) * xi_stride + k0, cnt);
      at6(mv[0], mv[1], mv[2], mv[3], mv[4], mv[5], q[r]);
    }
    const Vec b = bias ? load_part(bias + k0, cnt) : Vec(0.0f);
    for (int64_t j = 0; j < cols; ++j) {
      Vec o[4];
      at6(q[0][j], q[1][j], q[2][j], q[3][j], q[4][j], q[5][j], o);
      for (int64_t i = 0; i < rows; ++i) {
        float* e = img + ((4 * th + i) * v.W + 4 * tw + j) * v.pix + k0 * v.chan;
        if (v.nchw) {
          store_strided(o[i] + b, e, v.chan, cnt);
        } else {
          store_part(o[i] + b, e, cnt);
        }
      }
    }
  }
}

// out[xi][t][c] for the (N, C, H, W) map `src`: B^T d B of the 6x6 windows at offset -1 (ROWS 6), or
// A dy A^T of the 4x4 tiles (ROWS 4). A channels_last map is read with vector loads across the
// channels; a dense NCHW one a tile row per task item, its rows staged channels_last (stage_rows; no
// channels_last copy of the whole map).
template <int ROWS>
at::Tensor to_tiles_nhwc(const char* op, const at::Tensor& src_in, int64_t TH, int64_t TW) {
  check_map(op, src_in);
  const bool nchw = is_nchw(src_in);
  const at::Tensor src = nchw ? src_in : src_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = src.size(0), C = src.size(1), H = src.size(2), W = src.size(3);
  check_tiles(op, H, W, TH, TW);
  const int64_t T = N * TH * TW;
  at::Tensor out = host::new_output({36, T, C}, src.options());
  if (out.numel() == 0) return out;
  const float* sp = src.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  const MapView view(C, H, W, nchw);
  if (nchw) {  // a task item per tile row: its ROWS rows staged channels_last, then its TW tiles
    at::parallel_for(0, N * TH, grain_for(36 * C * TW), [&](int64_t begin, int64_t end) {
      const Scratch strip(ROWS * (4 * TW + 2) * C);
      tiles_to_domain<ROWS>(sp, view, C, TH, TW, begin * TW, end * TW, op_ + begin * TW * C, T * C, strip.data());
    });
    return out;
  }
  at::parallel_for(0, T, grain_for(36 * C), [&](int64_t begin, int64_t end) {
    tiles_to_domain<ROWS>(sp, view, C, TH, TW, begin, end, op_ + begin * C, T * C, nullptr);
  });
  return out;
}

at::Tensor wino_input_nhwc(const at::Tensor& x, int64_t TH, int64_t TW) {
  return to_tiles_nhwc<6>("scnet_fused::_wino_input_nhwc (cpu)", x, TH, TW);
}

at::Tensor wino_output_adjoint_nhwc(const at::Tensor& dy, int64_t TH, int64_t TW) {
  return to_tiles_nhwc<4>("scnet_fused::_wino_output_adjoint_nhwc (cpu)", dy, TH, TW);
}

// y (N, K, H, W) from M [36][tiles][K]: A^T M A per tile, plus bias; channels_last, or with `nchw` dense
// NCHW (each channel vector stored a plane apart: no NCHW copy of a channels_last result).
at::Tensor wino_output_nhwc(const at::Tensor& m_in, int64_t N, int64_t H, int64_t W,
                            const c10::optional<at::Tensor>& bias_in, bool nchw) {
  const char* op = "scnet_fused::_wino_output_nhwc (cpu)";
  const OutputArgs a = output_args(op, m_in, N, H, W, bias_in, true);
  const at::Tensor& m = a.m;
  const at::Tensor& bias = a.bias;
  const int64_t K = a.K, TH = a.TH, TW = a.TW, T = a.T;
  at::Tensor y = host::new_output({N, K, H, W}, m.options(),
                                  nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  const float* mp = m.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const MapView view(K, H, W, nchw);
  at::parallel_for(0, T, grain_for(36 * K), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Tile p(t, TH, TW);
      tile_from_domain(mp + t * K, T * K, K, bp, view, p.th, p.tw, yp + p.n * H * W * K);
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// The filters' transform U = G g G^T and its adjoint, 16 filters (one vector lane each) at a time.
// ---------------------------------------------------------------------------------------------

// G^T applied to six values (3 outputs): the adjoint of g3v.
inline void gt6(const Vec* m, Vec* o) {
  const Vec sixth(1.0f / 6.0f), quarter(0.25f), f24(1.0f / 24.0f), f2(2.0f), f4(4.0f);
  const Vec s12 = m[1] + m[2], d12 = m[2] - m[1], s34 = f24 * (m[3] + m[4]), d34 = f24 * (m[3] - m[4]);
  o[0] = quarter * m[0] - sixth * s12 + s34;
  o[1] = sixth * d12 + f2 * d34;
  o[2] = f4 * s34 - sixth * s12 + m[5];
}

// G applied to three values (6 outputs): G's rows are (1/4, 0, 0), -(1, 1, 1)/6, -(1, -1, 1)/6,
// (1, 2, 4)/24, (1, -2, 4)/24, (0, 0, 1). The results as values: arrays of vectors default-constructed
// on the stack were zero-filled (`rep stos`, a fifth of the filter transform's time).
struct Six {
  Vec v[6];
};
inline Six g3v(const Vec& g0, const Vec& g1, const Vec& g2) {
  const Vec sixth(1.0f / 6.0f), quarter(0.25f), f24(1.0f / 24.0f), f2(2.0f), f4(4.0f);
  const Vec p02 = g0 + g2, e = g0 + f4 * g2, t = f2 * g1;
  return Six{{quarter * g0, Vec(0.0f) - sixth * (p02 + g1), sixth * (g1 - p02), f24 * (e + t), f24 * (e - t), g2}};
}

// U[xi] of the 16 filters whose nine taps are in[0..8] (tap 3 i + j, one filter a lane), handed to
// store(xi, vector) position by position.
template <typename Store>
inline void filter_tile(const Vec* in, Store&& store) {
  const Six c0 = g3v(in[0], in[3], in[6]), c1 = g3v(in[1], in[4], in[7]), c2 = g3v(in[2], in[5], in[8]);
  for (int r = 0; r < 6; ++r) {  // row r of G g: (c0[r], c1[r], c2[r]); then G applied to it
    const Six o = g3v(c0.v[r], c1.v[r], c2.v[r]);
    for (int s = 0; s < 6; ++s) store(6 * r + s, o.v[s]);
  }
}

// (K, C, 3, 3) filters -> U (36, K, C), U[xi][k][c] = (G g[k][c] G^T)[xi]. `flip`: the filters of the
// input gradient's convolution, flip(g)^T (g[k][c] rotated by 180 degrees, input and output channels
// swapped): U (36, C, K). `in_major`: the two channel axes in the other order, input channel first, as
// the matrix products B[xi] = U[xi]^T read them: (36, C, K), or with flip (36, K, C). A task item is
// one row of U[xi] (all xi), 16 filters (one a vector lane) at a time.
at::Tensor wino_filter(const at::Tensor& w_in, bool flip, bool in_major) {
  const char* op = "scnet_fused::_wino_filter (cpu)";
  TORCH_CHECK(w_in.device().is_cpu(), op, ": expected a CPU tensor, got ", w_in.device());
  TORCH_CHECK(w_in.scalar_type() == at::kFloat, op, ": expected float32, got ", w_in.scalar_type());
  TORCH_CHECK(w_in.dim() == 4 && w_in.size(2) == 3 && w_in.size(3) == 3, op, ": expected (K, C, 3, 3) filters, got ",
              w_in.sizes());
  const at::Tensor w = w_in.contiguous();
  const int64_t K = w.size(0), C = w.size(1);
  const bool swap = flip != in_major;  // U's rows run over the input channels c, its columns over k
  const int64_t rows = swap ? C : K, cols = swap ? K : C;
  at::Tensor out = host::new_output({36, rows, cols}, w.options());
  if (out.numel() == 0) return out;
  const float* wp = w.data_ptr<float>();
  float* up = out.data_ptr<float>();
  const int64_t xi_stride = rows * cols;
  const int64_t lane = swap ? C * 9 : 9;  // floats from one lane's filter to the next's
  at::parallel_for(0, rows, grain_for(36 * cols), [&](int64_t begin, int64_t end) {
    alignas(64) float taps[9][kV];
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t c0 = 0; c0 < cols; c0 += kV) {
        const int64_t cnt = std::min<int64_t>(kV, cols - c0);
        // swap: row r = c, column = k; flip: the tap 3 i + j of the rotated filter is the original's 8 - (3 i + j)
        const float* g0 = swap ? wp + (c0 * C + r) * 9 : wp + (r * C + c0) * 9;
        // the vector's cnt filters (`lane` floats apart) transposed to taps[tap][lane], the rest zero
        if (cnt < kV) std::fill(&taps[0][0], &taps[0][0] + 9 * kV, 0.0f);
        at::vec::transpose_mxn<float>(g0, lane, &taps[0][0], kV, static_cast<int>(cnt), 9);
        const auto tap = [&](int e) { return Vec::loadu(taps[flip ? 8 - e : e]); };
        const Vec in[9] = {tap(0), tap(1), tap(2), tap(3), tap(4), tap(5), tap(6), tap(7), tap(8)};
        float* dst = up + r * cols + c0;
        filter_tile(in, [&](int xi, const Vec& u) { store_part(u, dst + xi * xi_stride, cnt); });
      }
    }
  });
  return out;
}

// dg of `cnt` consecutive filters (one a vector lane) from their dU at src[xi * xi_stride + lane]: G^T dU G,
// written as dst[9 l + e] (the filters' (K, C, 3, 3) layout) through the staging buffer `taps`.
inline void filter_adjoint_tile(const float* src, int64_t xi_stride, int64_t cnt, float* dst, float (*taps)[kV]) {
  Vec q[6][3];  // q[r][j]: G^T over s of dU[6 r + s]
  for (int r = 0; r < 6; ++r) {
    Vec m[6];
    for (int s = 0; s < 6; ++s) m[s] = load_part(src + (6 * r + s) * xi_stride, cnt);
    gt6(m, q[r]);
  }
  for (int j = 0; j < 3; ++j) {
    const Vec m[6] = {q[0][j], q[1][j], q[2][j], q[3][j], q[4][j], q[5][j]};
    Vec o[3];
    gt6(m, o);
    for (int i = 0; i < 3; ++i) o[i].store(taps[3 * i + j]);
  }
  for (int64_t l = 0; l < cnt; ++l)
    for (int e = 0; e < 9; ++e) dst[l * 9 + e] = taps[e][l];
}

// The adjoint of wino_filter (flip false): dU (36, K, C) -> dg (K, C, 3, 3), dg[k][c] = G^T dU[.][k][c] G.
at::Tensor wino_filter_adjoint(const at::Tensor& du_in) {
  const char* op = "scnet_fused::_wino_filter_adjoint (cpu)";
  TORCH_CHECK(du_in.device().is_cpu(), op, ": expected a CPU tensor, got ", du_in.device());
  TORCH_CHECK(du_in.scalar_type() == at::kFloat, op, ": expected float32, got ", du_in.scalar_type());
  TORCH_CHECK(du_in.dim() == 3 && du_in.size(0) == 36, op, ": expected a (36, K, C) tensor, got ", du_in.sizes());
  const at::Tensor du = du_in.contiguous();
  const int64_t K = du.size(1), C = du.size(2);
  at::Tensor out = host::new_output({K, C, 3, 3}, du.options());
  if (out.numel() == 0) return out;
  const float* dp = du.data_ptr<float>();
  float* gp = out.data_ptr<float>();
  const int64_t xi_stride = K * C;
  at::parallel_for(0, K, grain_for(36 * C), [&](int64_t begin, int64_t end) {
    alignas(64) float taps[9][kV];
    for (int64_t k = begin; k < end; ++k) {
      for (int64_t c0 = 0; c0 < C; c0 += kV) {
        const int64_t cnt = std::min<int64_t>(kV, C - c0);
        filter_adjoint_tile(dp + k * C + c0, xi_stride, cnt, gp + (k * C + c0) * 9, taps);
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// The 36 channel sums: out[p] = A[p] B[p] for p < P (batched single-precision matrix products).
// ---------------------------------------------------------------------------------------------
// A register-blocked product: a block of kMR rows of A times kNR = 2 vectors of B's columns is kept in
// kMR x 2 accumulator registers over the whole reduction (14 x 2 of the 32 AVX-512 registers; 6 x 2 of
// AVX2's 16), each step one broadcast of A's element per row and two fused multiply-adds. A's rows are
// packed per block into [reduction][kMR] (or read in place when A is given transposed, where a
// block's kMR elements of one reduction step are already contiguous); B's rows are read in place.
// One task item = one (p, row block), over all column blocks, so B[p] is read from cache after its
// first block. Sums run over the reduction index in order, one accumulator per output element.
constexpr int kMR = kV >= 16 ? 14 : (kV >= 8 ? 6 : 4);
constexpr int64_t kNR = 2 * kV;

// A's element (i, q) of the block at a[i * as + q] (kRows: A row-major, rows `as` apart) or at
// a[q * as + i] (a block's kMR elements of one step contiguous: packed, or A given transposed).
// With A given by reduction steps (packed, or transposed: the weight gradient's products, whose steps
// are the tiles), each step's rows of A and B are prefetched kPrefetchRows steps ahead: B's rows lie a
// whole matrix row apart, and the loads of B were where the samples of the kernel's stalls fell. The
// weight gradient's products and adjoint at (36, 32, 256) x (36, 32, 256), model 167 Xeon, 2 threads:
// 0.98-1.03 ms without, 0.85-0.89 four steps ahead, 0.77-0.88 eight; at 128 tiles of 128 channels
// 1.40-1.48 -> 1.09-1.11 ms. (The other form, A read in place by rows, did not gain from it; nor is it
// asked for where A and B were just made in the thread's cache, `_wino_wgrad_x`.)
constexpr int kPrefetchRows = 8;
template <int MR, bool kRows, bool kPrefetch = !kRows>
inline void gemm_block(const float* a, int64_t as, const float* b, int64_t ldb, int64_t kd, float* c,
                       int64_t ldc, int64_t nc) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__)
  // AVX-512 in intrinsics: with Vectorized<float> arrays GCC kept the accumulators in registers but
  // stored them back to the stack every step (half the speed)
  const int64_t n0 = std::min<int64_t>(16, nc), n1 = std::max<int64_t>(0, nc - 16);
  const __mmask16 m0 = static_cast<__mmask16>((1u << n0) - 1u), m1 = static_cast<__mmask16>((1u << n1) - 1u);
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  for (int64_t q = 0; q < kd; ++q) {
    if (kPrefetch) {
      // past a matrix's last row too (the next call's rows, measured faster than stopping at the last
      // row: 0.66-0.70 against 0.74-0.76 ms for the weight gradient at 32 tiles x 256 channels); the
      // addresses are made as integers, and a prefetch never faults
      const auto ahead = [](const float* p, int64_t stride, int64_t bytes) {
        return reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(p) +
                                             static_cast<std::uintptr_t>(kPrefetchRows * stride * 4 + bytes));
      };
      _mm_prefetch(ahead(b + q * ldb, ldb, 0), _MM_HINT_T0);
      _mm_prefetch(ahead(b + q * ldb, ldb, 64), _MM_HINT_T0);
      _mm_prefetch(ahead(a + q * as, as, 0), _MM_HINT_T0);
    }
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, b + q * ldb), b1 = _mm512_maskz_loadu_ps(m1, b + q * ldb + 16);
    const float* aq = kRows ? a + q : a + q * as;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(kRows ? aq[i * as] : aq[i]);
      acc0[i] = _mm512_fmadd_ps(ai, b0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(ai, b1, acc1[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm512_mask_storeu_ps(c + i * ldc, m0, acc0[i]);
    _mm512_mask_storeu_ps(c + i * ldc + 16, m1, acc1[i]);
  }
#else  // the other builds (whose "auto" keeps torch.bmm): one loop, partial loads where the columns end
  Vec acc0[MR], acc1[MR];
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = Vec(0.0f);
  const int64_t n0 = std::min<int64_t>(kV, nc), n1 = nc - n0;
  for (int64_t q = 0; q < kd; ++q) {
    const Vec b0 = load_part(b + q * ldb, n0);
    const Vec b1 = n1 > 0 ? load_part(b + q * ldb + kV, n1) : Vec(0.0f);
    const float* aq = kRows ? a + q : a + q * as;
    for (int i = 0; i < MR; ++i) {
      const Vec ai(kRows ? aq[i * as] : aq[i]);
      acc0[i] = at::vec::fmadd(ai, b0, acc0[i]);
      acc1[i] = at::vec::fmadd(ai, b1, acc1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    store_part(acc0[i], c + i * ldc, n0);
    if (n1 > 0) store_part(acc1[i], c + i * ldc + kV, n1);
  }
#endif
}

using GemmBlockFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, int64_t);

template <bool kRows, bool kPrefetch = !kRows, int... MRs>
constexpr std::array<GemmBlockFn, sizeof...(MRs)> gemm_table(std::integer_sequence<int, MRs...>) {
  return {&gemm_block<MRs + 1, kRows, kPrefetch>...};
}

// a (P, M, Kd), or with a_t (P, Kd, M) holding A transposed; b (P, Kd, N); -> (P, M, N).
at::Tensor wino_bmm(const at::Tensor& a_in, const at::Tensor& b_in, bool a_t) {
  const char* op = "scnet_fused::_wino_bmm (cpu)";
  for (const at::Tensor* t : {&a_in, &b_in}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": expected CPU tensors, got ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": expected float32, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 3, op, ": expected 3-D tensors, got ", t->dim(), " dimensions");
  }
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t P = a.size(0), M = a_t ? a.size(2) : a.size(1), Kd = a_t ? a.size(1) : a.size(2);
  const int64_t N = b.size(2);
  TORCH_CHECK(b.size(0) == P && b.size(1) == Kd, op, ": cannot multiply ", a.sizes(), a_t ? " (transposed)" : "",
              " by ", b.sizes());
  at::Tensor out = host::new_output({P, M, N}, a.options());
  if (out.numel() == 0) return out;
  if (Kd == 0) return out.zero_();
  static constexpr auto by_steps = gemm_table<false>(std::make_integer_sequence<int, kMR>{});
  static constexpr auto by_rows = gemm_table<true>(std::make_integer_sequence<int, kMR>{});
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  const int64_t mblocks = (M + kMR - 1) / kMR;
  // A row-major: packed per block when each block's rows are used for enough column blocks to repay the
  // copy, else broadcast from the rows in place
  const bool pack_a = !a_t && N > 4 * kNR;
  at::parallel_for(0, P * mblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> pack(pack_a ? Kd * kMR : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / mblocks, m0 = (item % mblocks) * kMR;
      const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
      const float* blk;
      int64_t as;
      GemmBlockFn fn = by_steps[mr - 1];
      if (a_t) {
        blk = ap + p * Kd * M + m0;
        as = M;
      } else if (pack_a) {  // rows m0 .. m0 + mr of A[p] into [Kd][kMR]
        const float* src = ap + (p * M + m0) * Kd;
        for (int i = 0; i < mr; ++i)
          for (int64_t q = 0; q < Kd; ++q) pack[q * kMR + i] = src[i * Kd + q];
        blk = pack.data();
        as = kMR;
      } else {
        blk = ap + (p * M + m0) * Kd;
        as = Kd;
        fn = by_rows[mr - 1];
      }
      const float* bq = bp + p * Kd * N;
      float* cq = op_ + (p * M + m0) * N;
      for (int64_t n0 = 0; n0 < N; n0 += kNR) fn(blk, as, bq + n0, N, Kd, cq + n0, N, std::min<int64_t>(kNR, N - n0));
    }
  });
  return out;
}

// The output transform of tiles t0 .. t0 + tb, tile i's products at src[xi * xi_stride + i * pitch + k]
// (k < kn), into output channels k0 .. k0 + kn of y (`v`: its layout), plus bias[k0 + k]. With `strip`
// (a dense NCHW y) each tile row's run of tiles is written channels_last into the strip first (4 rows of
// up to 4 tb columns by kn channels), whose rows are then transposed into the output planes: stored
// singly a plane apart, the elements had cost 1.15x the convolution at 32x56x56, 1.08x at 64x56x56,
// 1.09x at 64x28x28 (A/B in one process, AMD EPYC, 2 threads, N = 8), even at 14 px and 0.97x at
// 256x14x14, so the callers take the strip from 7 tiles a row.
inline void tiles_from_domain(const float* src, int64_t xi_stride, int64_t pitch, int64_t t0, int64_t tb,
                              int64_t kn, const float* bias, int64_t TH, int64_t TW, const MapView& v, int64_t K,
                              int64_t k0, float* yp, float* strip) {
  const int64_t H = v.H, W = v.W;
  for (int64_t i = 0; i < tb;) {
    const Tile p(t0 + i, TH, TW);
    if (strip == nullptr) {
      tile_from_domain(src + i * pitch, xi_stride, kn, bias, v, p.th, p.tw, yp + p.n * H * W * K + k0 * v.chan);
      ++i;
      continue;
    }
    const int64_t seg = std::min<int64_t>(tb - i, TW - p.tw);
    const int64_t rows = std::min<int64_t>(4, H - 4 * p.th), cols = std::min<int64_t>(4 * seg, W - 4 * p.tw);
    const MapView part(kn, rows, cols, false);
    for (int64_t k = 0; k < seg; ++k) tile_from_domain(src + (i + k) * pitch, xi_stride, kn, bias, part, 0, k, strip);
    float* out = yp + p.n * K * H * W + k0 * H * W + 4 * p.th * W + 4 * p.tw;
    for (int64_t r = 0; r < rows; ++r)
      at::vec::transpose_mxn<float>(strip + r * cols * kn, kn, out + r * W, H * W, static_cast<int>(cols),
                                    static_cast<int>(kn));
    i += seg;
  }
}

// ---------------------------------------------------------------------------------------------
// The whole convolution through the tile domain, a block of tiles at a time: the block's transformed
// input V (36 x tiles x C), its products M = V U (36 x tiles x K) and the output transform stay in the
// task's cache, and memory sees the map read once and the result written once (the three-pass form
// writes and reads V and M in between: 2 (36 / 16) (C + K) floats a pixel more).
// ---------------------------------------------------------------------------------------------
// A block is kMR tiles (one register block of the product: every product step reads the block's rows
// of V from L1; larger blocks measured slower, their buffers leaving L2). Where that leaves fewer than
// 4 blocks a thread, the blocks are made equal, up to 16 tiles, and the output channels are split into
// parts too (each part transforms its block's input again: x is read once per part, cheap next to the
// part's products). `block` > 0 fixes the block size (the tests pin every boundary with it).
at::Tensor wino_conv(const at::Tensor& x_in, const at::Tensor& u_in, const c10::optional<at::Tensor>& bias_in,
                     int64_t block, bool split_k) {
  const char* op = "scnet_fused::_wino_conv (cpu)";
  check_map(op, x_in);
  TORCH_CHECK(u_in.device().is_cpu() && u_in.scalar_type() == at::kFloat && u_in.dim() == 3 && u_in.size(0) == 36 &&
                  u_in.size(1) == x_in.size(1),
              op, ": expected the filters' transform as a float32 CPU tensor (36, C, K) with C = ", x_in.size(1),
              ", got ", u_in.sizes(), " ", u_in.scalar_type(), " on ", u_in.device());
  const bool nchw = is_nchw(x_in);
  const at::Tensor x = nchw ? x_in : x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor u = u_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = u.size(2);
  const at::Tensor bias = checked_bias(op, bias_in, K);
  TORCH_CHECK(block >= 0, op, ": block must be >= 0 (0: chosen here), got ", block);
  TORCH_CHECK(H > 0 && W > 0, op, ": empty spatial size ", H, "x", W);
  at::Tensor y = host::new_output({N, K, H, W}, x.options(),
                                  nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  if (C == 0) return bias.defined() ? y.copy_(bias.view({1, K, 1, 1}).expand_as(y)) : y.zero_();
  const int64_t TH = (H + 3) / 4, TW = (W + 3) / 4, T = N * TH * TW;
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  int64_t TB = std::min<int64_t>(block > 0 ? block : kMR, T);
  if (block == 0 && (T + kMR - 1) / kMR < want) {
    // few tiles: blocks of equal size up to 16 (kMR + 2 rows), the output channels split between them
    const int64_t nb = (T + 15) / 16;
    TB = (T + nb - 1) / nb;
  }
  const int64_t blocks = (T + TB - 1) / TB;
  const int64_t split = blocks < want && split_k ? (want + blocks - 1) / blocks : 1;
  const int64_t KC = std::max<int64_t>(kNR, round_up((K + split - 1) / split, kNR));
  const int64_t parts = (K + KC - 1) / KC;
  static constexpr auto by_rows = gemm_table<true>(std::make_integer_sequence<int, kMR>{});
  const float* xp = x.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const MapView in_view(C, H, W, nchw), out_view(K, H, W, nchw);
  const bool stage_out = nchw && TW >= 7;  // (tiles_from_domain)
  at::parallel_for(0, blocks * parts, 1, [&](int64_t begin, int64_t end) {
    // strip: an NCHW block's rows channels_last, 6 input rows or 4 output rows of up to min(TB, TW) tiles
    const Scratch vbuf(36 * TB * C), mbuf(36 * TB * KC),
        strip(nchw ? (4 * std::min(TB, TW) + 2) * std::max<int64_t>(6 * C, stage_out ? 4 * KC : 0) : 0);
    int64_t staged = -1;  // the block whose transformed input vbuf holds
    for (int64_t item = begin; item < end; ++item) {
      const int64_t blk = item / parts, k0 = (item % parts) * KC;
      const int64_t t0 = blk * TB, tb = std::min<int64_t>(TB, T - t0), kn = std::min<int64_t>(KC, K - k0);
      if (blk != staged) {
        tiles_to_domain<6>(xp, in_view, C, TH, TW, t0, t0 + tb, vbuf.data(), TB * C, strip.data());
        staged = blk;
      }
      for (int64_t xi = 0; xi < 36; ++xi) {
        const float* a = vbuf.data() + xi * TB * C;
        const float* b = up + xi * C * K + k0;
        float* c = mbuf.data() + xi * TB * KC;
        for (int64_t r0 = 0; r0 < tb; r0 += kMR) {
          const GemmBlockFn fn = by_rows[std::min<int64_t>(kMR, tb - r0) - 1];
          for (int64_t n0 = 0; n0 < kn; n0 += kNR)
            fn(a + r0 * C, C, b + n0, K, C, c + r0 * KC + n0, KC, std::min<int64_t>(kNR, kn - n0));
        }
      }
      tiles_from_domain(mbuf.data(), TB * KC, KC, t0, tb, kn, bp ? bp + k0 : nullptr, TH, TW, out_view, K, k0, yp,
                        stage_out ? strip.data() : nullptr);
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// Small maps: the filters' transform made inside the task items, never written to memory.
// ---------------------------------------------------------------------------------------------
// Where a map has few tiles next to its channels (the 7x7 and 14x14 maps of 128 and 256 channels), the
// filters' transform U (36 C K floats: 9.4 MB at 256 channels) and the weight gradient's dU are the
// largest tensors of the convolution, and a training step makes three of them per convolution (the
// forward's U, the input gradient's flipped one and dU), each written by one pass and read back by the
// next. wino_conv_w makes the input transform V (36 x tiles x C, small here) first; then a task item
// takes kNR output channels, transforms their filters into its own buffer [36][C][kNR] and runs the
// products and the output transform of its tiles against it. wino_wgrad makes dU a block of kMR x (up
// to 2 kNR) filters at a time, all 36 positions, and transforms it back to the filters' gradient in
// the task's cache.

// U[xi][i][o - o0] of the convolution's filters for the outputs o0 .. o0 + on (on <= kNR) and every input
// i < Cin into buf[xi * xs + i * kNR + o - o0] (columns from on on zero). The nine taps of filter (o, i)
// lie at w + o * os + i * is, or with `flip` rotated by 180 degrees (tap e at 8 - e). The filters are
// taken kFilterChunk inputs at a time: the part's vectors of 16 filters are transposed into `stage`
// [kNR / kV][kFilterChunk][9][kV] (16x16 register transposes: gathering each tap took 0.19 of 0.43 ms
// for the 256 x 256 filters; where the taps of consecutive inputs follow each other, is == 9, a chunk
// of a filter row at a time), then transformed input by input, the part's vectors together. Staging
// all Cin inputs at once (147 KB at 256 channels) let the stage leave L1 before its taps were read:
// the chunks took the flipped transform of 256 x 256 filters from 0.23 to 0.21 ms (model 167 Xeon).
constexpr int64_t kFilterChunk = 16;
inline void filter_part(const float* w, int64_t os, int64_t is, bool flip, int64_t Cin, int64_t o0, int64_t on,
                        float* stage, float* buf, int64_t xs) {
  constexpr int64_t kHalves = kNR / kV;
  for (int64_t i0 = 0; i0 < Cin; i0 += kFilterChunk) {
    const int64_t ic = std::min<int64_t>(kFilterChunk, Cin - i0);
    for (int64_t h = 0; h < kHalves; ++h) {
      float* st = stage + h * kFilterChunk * 9 * kV;
      const int64_t cnt = std::max<int64_t>(0, std::min<int64_t>(kV, on - h * kV));
      if (cnt < kV) std::fill(st, st + ic * 9 * kV, 0.0f);
      if (cnt == 0) continue;
      const float* g = w + (o0 + h * kV) * os;
      if (is == 9) {
        at::vec::transpose_mxn<float>(g + i0 * 9, os, st, kV, static_cast<int>(cnt), static_cast<int>(ic * 9));
      } else {
        for (int64_t i = 0; i < ic; ++i)
          at::vec::transpose_mxn<float>(g + (i0 + i) * is, os, st + i * 9 * kV, kV, static_cast<int>(cnt), 9);
      }
    }
    for (int64_t i = 0; i < ic; ++i) {
      for (int64_t h = 0; h < kHalves; ++h) {
        const float* t = stage + (h * kFilterChunk + i) * 9 * kV;
        const auto tap = [&](int e) { return Vec::loadu(t + (flip ? 8 - e : e) * kV); };
        const Vec in[9] = {tap(0), tap(1), tap(2), tap(3), tap(4), tap(5), tap(6), tap(7), tap(8)};
        float* dst = buf + (i0 + i) * kNR + h * kV;
        filter_tile(in, [&](int xi, const Vec& u) { u.store(dst + xi * xs); });
      }
    }
  }
}

// The convolution of x (N, Cin, H, W) with the filters `w` (K, C, 3, 3): Cin = C and K outputs, or with
// `flip` (the input gradient's convolution, flip(w)^T) Cin = K and C outputs; y in x's layout. A task
// item is kNR output channels of a group of the tiles, the items in group-major order; each thread first
// transforms the tiles of the groups its items cover into its own buffer (no tile is read by a thread
// that did not write it). The virtual machine this was measured on (AMD EPYC, 2 threads) runs in two
// states, apparently its two vCPUs on one core complex or on two (copying 32 MB took 1.3 or 0.65 ms). In
// the second, data one thread wrote and the other read is slow to write again: with the transformed
// input shared (written a tile row a thread, read whole by every thread), its transform took 0.08 ms
// of the convolution at 8x256x7x7 in the first state and 0.31 ms in the second (per thread, perf
// samples), the convolution 1.04 and 1.35-1.40 ms; each thread transforming all 32 tiles itself, 1.06
// and 1.06-1.07 ms (A/B in one process, 600 rounds, bit-identical results). `tile_groups` > 0 fixes
// the number of groups (each group's items transform the same filters again); 0 chooses one group a
// thread where the tiles number at least half the output channels (8x128x14x14: 1.05 ms in both
// states, 1.75 ms in the second with every tile read by every thread), else the fewest groups giving
// every thread two items: with fewer tiles the filters made again by every thread cost more than the
// tiles transformed again (8x256x7x7: 1.01 vs 1.16 ms, then 1.05-1.43 vs 1.16-1.31 ms). A group's
// tiles are cut into register blocks of at most kMR; the products run position-major over
// kBlocksPerPass blocks at a time, so each position's part of U (Cin x kNR, 32 KB at 256 channels) is
// read once for up to 42 tiles instead of once a block (with the chunked filter transform above,
// model 167 Xeon, 2 threads: 8x256x7x7 0.90 / 0.93 -> 0.87 / 0.88 ms, flipped second; 8x512x7x7
// 4.4 / 4.8 -> 3.6 / 3.9 ms; 8x256x14x14 unchanged at 2.95 ms).
constexpr int64_t kBlocksPerPass = 3;
at::Tensor wino_conv_w(const at::Tensor& x_in, const at::Tensor& w_in, const c10::optional<at::Tensor>& bias_in,
                       bool flip, int64_t tile_groups) {
  const char* op = "scnet_fused::_wino_conv_w (cpu)";
  check_map(op, x_in);
  TORCH_CHECK(w_in.device().is_cpu() && w_in.scalar_type() == at::kFloat && w_in.dim() == 4 && w_in.size(2) == 3 &&
                  w_in.size(3) == 3,
              op, ": expected float32 CPU (K, C, 3, 3) filters, got ", w_in.sizes(), " ", w_in.scalar_type(), " on ",
              w_in.device());
  const int64_t Cin = x_in.size(1), Kw = w_in.size(0), Cw = w_in.size(1);
  TORCH_CHECK((flip ? Kw : Cw) == Cin, op, ": the map has ", Cin, " channels, the filters ", w_in.sizes(),
              flip ? " (flipped: their output channels are the map's)" : "");
  TORCH_CHECK(tile_groups >= 0, op, ": tile_groups must be >= 0 (0: chosen here), got ", tile_groups);
  const int64_t Kout = flip ? Cw : Kw;
  const bool nchw = is_nchw(x_in);
  const at::Tensor x = nchw ? x_in : x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w = w_in.contiguous();
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const at::Tensor bias = checked_bias(op, bias_in, Kout);
  TORCH_CHECK(H > 0 && W > 0, op, ": empty spatial size ", H, "x", W);
  at::Tensor y = host::new_output({N, Kout, H, W}, x.options(),
                                  nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  if (Cin == 0) return bias.defined() ? y.copy_(bias.view({1, Kout, 1, 1}).expand_as(y)) : y.zero_();
  const int64_t TH = (H + 3) / 4, TW = (W + 3) / 4, T = N * TH * TW;
  const int64_t parts = (Kout + kNR - 1) / kNR;
  // two items a thread: one group each with two parts or more, else two groups each
  const int64_t threads = at::get_num_threads(), per_thread = (2 + parts - 1) / parts;
  const int64_t chosen = 2 * T >= Kout ? threads * per_thread : (2 * threads + parts - 1) / parts;
  const int64_t groups = std::min<int64_t>(T, tile_groups > 0 ? tile_groups : chosen);
  const int64_t TG = (T + groups - 1) / groups;
  // the filter (o, i) at w[o * os + i * is]
  const int64_t os = flip ? 9 : Cw * 9, is = flip ? Cw * 9 : 9;
  static constexpr auto by_rows = gemm_table<true>(std::make_integer_sequence<int, kMR>{});
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const MapView in_view(Cin, H, W, nchw), out_view(Kout, H, W, nchw);
  const bool stage_out = nchw && TW >= 7;  // (tiles_from_domain)
  at::parallel_for(0, parts * groups, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    // the 36 positions' rows a cache line more than Cin kNR apart: at a power of two (32 KiB at 256
    // channels) the 36 stores of every filter vector fell into the same few cache sets
    const int64_t xs = Cin * kNR + kV;
    const int64_t mxs = kBlocksPerPass * kMR * kNR;  // mbuf: [36][the pass's tiles][kNR]
    const Scratch ubuf(36 * xs), mbuf(36 * mxs), stage(kNR * kFilterChunk * 9),
        strip(stage_out ? 4 * std::min<int64_t>(kMR, TW) * 4 * kNR : 0);
    // the tiles of this thread's groups, transformed by this thread
    const int64_t ts = std::min(T, (begin / parts) * TG), te = std::min(T, ((end - 1) / parts + 1) * TG);
    const int64_t vs = (te - ts) * Cin + kV;  // (a cache line more: the 36 rows' stores in different sets)
    const Scratch own(36 * vs), instrip(nchw ? 6 * (4 * std::min(te - ts, TW) + 2) * Cin : 0);
    tiles_to_domain<6>(xp, in_view, Cin, TH, TW, ts, te, own.data(), vs, instrip.data());
    int64_t made = -1;  // the part whose filters ubuf holds
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / parts, part = item % parts;
      const int64_t o0 = part * kNR, on = std::min<int64_t>(kNR, Kout - o0);
      if (part != made) {
        filter_part(wp, os, is, flip, Cin, o0, on, stage.data(), ubuf.data(), xs);
        made = part;
      }
      const int64_t ta = g * TG, tn = std::max<int64_t>(0, std::min<int64_t>(TG, T - ta));
      // the group's tiles in equal blocks of at most kMR (a register block of the products each), taken
      // kBlocksPerPass at a time: each position's filters (kNR x Cin) are read once for the pass's blocks
      const int64_t nb = (tn + kMR - 1) / kMR;
      const auto block_start = [&](int64_t b) { return ta + b * tn / nb; };
      for (int64_t b0 = 0; b0 < nb; b0 += kBlocksPerPass) {
        const int64_t b1 = std::min<int64_t>(nb, b0 + kBlocksPerPass), s0 = block_start(b0);
        for (int64_t xi = 0; xi < 36; ++xi) {
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t t0 = block_start(b), tb = block_start(b + 1) - t0;
            by_rows[tb - 1](own.data() + xi * vs + (t0 - ts) * Cin, Cin, ubuf.data() + xi * xs, kNR, Cin,
                            mbuf.data() + xi * mxs + (t0 - s0) * kNR, kNR, on);
          }
        }
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t t0 = block_start(b), tb = block_start(b + 1) - t0;
          tiles_from_domain(mbuf.data() + (t0 - s0) * kNR, mxs, kNR, t0, tb, on, bp ? bp + o0 : nullptr, TH, TW,
                            out_view, Kout, o0, yp, stage_out ? strip.data() : nullptr);
        }
      }
    }
  });
  return y;
}

// The filters' gradient (K, C, 3, 3) from z (36, T, K) (the output gradient's adjoint transform) and v
// (36, T, C) (the input's transform): dU[xi] = z[xi]^T v[xi], then G^T dU G. A task item is kMR filter
// rows by `cpart` columns (a multiple of kNR; 0: 2 kNR, or kNR where that gives too few items).
at::Tensor wino_wgrad(const at::Tensor& z_in, const at::Tensor& v_in, int64_t cpart) {
  const char* op = "scnet_fused::_wino_wgrad (cpu)";
  for (const at::Tensor* t : {&z_in, &v_in}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == 36, op,
                ": expected float32 CPU (36, tiles, channels) tensors, got ", t->sizes(), " ", t->scalar_type(),
                " on ", t->device());
  }
  TORCH_CHECK(z_in.size(1) == v_in.size(1), op, ": the two transforms have ", z_in.size(1), " and ", v_in.size(1),
              " tiles");
  TORCH_CHECK(cpart >= 0 && cpart % kNR == 0, op, ": cpart must be a multiple of ", kNR, " (0: chosen here), got ",
              cpart);
  const at::Tensor z = z_in.contiguous(), v = v_in.contiguous();
  const int64_t T = z.size(1), K = z.size(2), C = v.size(2);
  // a part wider than the channels is one part of them all (no scratch sized beyond use, or overflowing)
  cpart = std::min<int64_t>(cpart, round_up(C, kNR));
  at::Tensor out = host::new_output({K, C, 3, 3}, z.options());
  if (out.numel() == 0) return out;
  const int64_t kblocks = (K + kMR - 1) / kMR;
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  int64_t CP = cpart > 0 ? cpart : std::min<int64_t>(2 * kNR, round_up(C, kNR));
  if (cpart == 0 && kblocks * ((C + CP - 1) / CP) < want) CP = kNR;
  const int64_t cparts = (C + CP - 1) / CP;
  static constexpr auto by_steps = gemm_table<false>(std::make_integer_sequence<int, kMR>{});
  const float* zp = z.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* gp = out.data_ptr<float>();
  at::parallel_for(0, kblocks * cparts, 1, [&](int64_t begin, int64_t end) {
    const Scratch du(36 * kMR * CP);
    alignas(64) float taps[9][kV];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k0 = (item / cparts) * kMR, c0 = (item % cparts) * CP;
      const int mr = static_cast<int>(std::min<int64_t>(kMR, K - k0));
      const int64_t cn = std::min<int64_t>(CP, C - c0);
      const GemmBlockFn fn = by_steps[mr - 1];
      for (int64_t xi = 0; xi < 36; ++xi)
        for (int64_t n0 = 0; n0 < cn; n0 += kNR)
          fn(zp + xi * T * K + k0, K, vp + xi * T * C + c0 + n0, C, T, du.data() + xi * kMR * CP + n0, CP,
             std::min<int64_t>(kNR, cn - n0));
      for (int i = 0; i < mr; ++i)
        for (int64_t c = 0; c < cn; c += kV)
          filter_adjoint_tile(du.data() + i * CP + c, kMR * CP, std::min<int64_t>(kV, cn - c),
                              gp + ((k0 + i) * C + c0 + c) * 9, taps);
    }
  });
  return out;
}

// The filters' gradient (K, C, 3, 3) of the convolution of x (N, C, H, W) whose output gradient is dy
// (N, K, H, W), the two maps in one layout (dense NCHW or channels_last), with both transforms made
// inside: the tiles are cut into `chunks` runs (0: chosen from the shape alone, below); a task item is
// one run, whose transforms z (36 x run x K, of dy) and v (36 x run x C, of x) its thread makes in its
// own cache and multiplies into the run's partial dU[xi] = z[xi]^T v[xi]; the partials are then added
// in run order (the result does not depend on the thread count) and transformed back, G^T dU G. The
// separate form writes z and v whole (36 / 16 of dy's and x's sizes) and reads them back for the
// products; here dy and x cross the memory bus once. For few channels (the partials, 36 K C floats
// each, are what it stores instead).
at::Tensor wino_wgrad_x(const at::Tensor& dy_in, const at::Tensor& x_in, int64_t chunks) {
  const char* op = "scnet_fused::_wino_wgrad_x (cpu)";
  check_map(op, dy_in);
  check_map(op, x_in);
  TORCH_CHECK(dy_in.size(0) == x_in.size(0) && dy_in.size(2) == x_in.size(2) && dy_in.size(3) == x_in.size(3), op,
              ": the output gradient ", dy_in.sizes(), " and the input ", x_in.sizes(),
              " differ in batch or spatial size");
  TORCH_CHECK(chunks >= 0, op, ": chunks must be >= 0 (0: chosen here), got ", chunks);
  const bool nchw = is_nchw(x_in);
  const auto fmt = nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt), dy = dy_in.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = dy.size(1);
  at::Tensor out = host::new_output({K, C, 3, 3}, x.options());
  if (out.numel() == 0) return out;
  const int64_t TH = (H + 3) / 4, TW = (W + 3) / 4, T = N * TH * TW;
  if (T == 0) return out.zero_();
  // runs of about 64 tiles, at most as many as 1M floats of partials hold (at least one)
  const int64_t most = std::max<int64_t>(1, (int64_t{1} << 20) / (36 * K * C));
  const int64_t P = std::min<int64_t>(T, chunks > 0 ? chunks : std::min<int64_t>(most, (T + 63) / 64));
  const int64_t KC = K * C;
  at::Tensor part = at::empty({P, 36, K, C}, x.options());
  // (without the prefetch: A and B were just made in the thread's cache)
  static constexpr auto by_steps = gemm_table<false, false>(std::make_integer_sequence<int, kMR>{});
  const float* xp = x.data_ptr<float>();
  const float* dp = dy.data_ptr<float>();
  float* pp = part.data_ptr<float>();
  const MapView xv(C, H, W, nchw), dv(K, H, W, nchw);
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    const int64_t most_tiles = (T + P - 1) / P;
    // rows a cache line more than a power of two apart (the 36 positions' stores in different sets)
    const int64_t zs = most_tiles * K + kV, vs = most_tiles * C + kV;
    const Scratch zbuf(36 * zs), vbuf(36 * vs),
        strip(nchw ? 6 * (4 * std::min(most_tiles, TW) + 2) * std::max(C, K) : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t0 = r * T / P, t1 = (r + 1) * T / P, n = t1 - t0;
      tiles_to_domain<4>(dp, dv, K, TH, TW, t0, t1, zbuf.data(), zs, strip.data());
      tiles_to_domain<6>(xp, xv, C, TH, TW, t0, t1, vbuf.data(), vs, strip.data());
      float* dst = pp + r * 36 * KC;
      for (int64_t xi = 0; xi < 36; ++xi) {
        for (int64_t k0 = 0; k0 < K; k0 += kMR) {
          const int mr = static_cast<int>(std::min<int64_t>(kMR, K - k0));
          const GemmBlockFn fn = by_steps[mr - 1];
          for (int64_t n0 = 0; n0 < C; n0 += kNR)
            fn(zbuf.data() + xi * zs + k0, K, vbuf.data() + xi * vs + n0, C, n, dst + xi * KC + k0 * C + n0, C,
               std::min<int64_t>(kNR, C - n0));
        }
      }
    }
  });
  // dU = the partials added in run order, into the first
  if (P > 1) {
    at::parallel_for(0, 36 * KC, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t r = 1; r < P; ++r) {
        const float* src = pp + r * 36 * KC;
        int64_t e = begin;
        for (; e + kV <= end; e += kV) (Vec::loadu(pp + e) + Vec::loadu(src + e)).store(pp + e);
        for (; e < end; ++e) pp[e] += src[e];
      }
    });
  }
  return wino_filter_adjoint(part[0]);
}

}  // namespace
}  // namespace cpu_winograd
}  // namespace scnet_fused

TORCH_LIBRARY_IMPL(scnet_fused, CPU, m) {
  m.impl("_wino_input", &scnet_fused::cpu_winograd::wino_input);
  m.impl("_wino_output", &scnet_fused::cpu_winograd::wino_output);
  m.impl("_wino_output_adjoint", &scnet_fused::cpu_winograd::wino_output_adjoint);
  m.impl("_wino_input_nhwc", &scnet_fused::cpu_winograd::wino_input_nhwc);
  m.impl("_wino_output_nhwc", &scnet_fused::cpu_winograd::wino_output_nhwc);
  m.impl("_wino_output_adjoint_nhwc", &scnet_fused::cpu_winograd::wino_output_adjoint_nhwc);
  m.impl("_wino_filter", &scnet_fused::cpu_winograd::wino_filter);
  m.impl("_wino_filter_adjoint", &scnet_fused::cpu_winograd::wino_filter_adjoint);
  m.impl("_wino_bmm", &scnet_fused::cpu_winograd::wino_bmm);
  m.impl("_wino_conv", &scnet_fused::cpu_winograd::wino_conv);
  m.impl("_wino_conv_w", &scnet_fused::cpu_winograd::wino_conv_w);
  m.impl("_wino_wgrad", &scnet_fused::cpu_winograd::wino_wgrad);
  m.impl("_wino_wgrad_x", &scnet_fused::cpu_winograd::wino_wgrad_x);
}
