// C++ checks of the shared index math and of the CPU gate kernels (run by ctest).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "cpu/sc_isa.h"
#include "cpu/sc_scratch.h"
#include "sc_gate_math.h"
#include "sc_index.h"

#ifndef SCNET_TEST_ISA
#define SCNET_TEST_ISA "default"
#endif

namespace {

int g_failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

std::vector<int64_t> source_table(int64_t out, int64_t in) {
  std::vector<int64_t> r(out);
  const float s = scnet_fused::nearest_scale(in, out);
  for (int64_t i = 0; i < out; ++i) r[i] = scnet_fused::nearest_source(i, s, in, out);
  return r;
}

std::vector<int64_t> start_table(int64_t out, int64_t in) {
  std::vector<int64_t> r(in + 1);
  const float s = scnet_fused::nearest_scale(in, out);
  for (int64_t a = 0; a <= in; ++a) r[a] = scnet_fused::cell_start(a, s, in, out);
  return r;
}

std::string str(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "]";
}

void test_index_map() {
  const std::vector<int64_t> e14 = {0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2};
  expect(source_table(14, 3) == e14, "H=14 h=3 map " + str(source_table(14, 3)));
  const std::vector<int64_t> e25 = {0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5};
  expect(source_table(25, 6) == e25, "H=25 h=6 map " + str(source_table(25, 6)));
  expect(source_table(13, 3) == std::vector<int64_t>({0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2}), "H=13 h=3 map");
  expect(source_table(7, 1) == std::vector<int64_t>(7, 0), "H=7 h=1 map");
  expect(source_table(56, 14)[55] == 13 && source_table(56, 14)[4] == 1, "H=56 h=14 map");
  expect(source_table(28, 14)[27] == 13, "H=28 h=14 (2x) map");

  expect(start_table(14, 3) == std::vector<int64_t>({0, 5, 10, 14}), "H=14 h=3 starts " + str(start_table(14, 3)));
  expect(start_table(25, 6) == std::vector<int64_t>({0, 5, 9, 13, 17, 21, 25}),
         "H=25 h=6 starts " + str(start_table(25, 6)));
  // Starts against a linear scan of the map, for many pairs.
  for (int64_t out = 1; out <= 130; ++out) {
    for (int64_t in = 1; in <= out; ++in) {
      const auto src = source_table(out, in);
      const auto st = start_table(out, in);
      bool ok = st.front() == 0 && st.back() == out;
      for (int64_t a = 0; a < in && ok; ++a) {
        int64_t first = out;
        for (int64_t i = 0; i < out; ++i) {
          if (src[i] >= a) {
            first = i;
            break;
          }
        }
        ok = st[a] == first;
        for (int64_t i = st[a]; i < st[a + 1] && ok; ++i) ok = src[i] == a;
      }
      for (int64_t i = 1; i < out && ok; ++i) ok = src[i] >= src[i - 1] && src[i] < in;
      if (!ok) expect(false, "cell starts for out=" + std::to_string(out) + " in=" + std::to_string(in));
    }
  }
}

using Opt = std::optional<at::Tensor>;
using GateFwd = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const Opt&, const Opt&,
                           const Opt&);
using GateBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const Opt&, const Opt&, bool,
    const Opt&, const Opt&, bool);

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// small_affine: the pooled branch's per-channel affine (small * ss + st where the kernels read small).
void test_gate_kernels(int64_t N, int64_t C, int64_t H, int64_t W, int64_t h, int64_t w, bool channels_last,
                       bool small_affine = false) {
  const std::string tag = "N=" + std::to_string(N) + " C=" + std::to_string(C) + " H=" + std::to_string(H) +
                          " W=" + std::to_string(W) + (channels_last ? " NHWC" : " NCHW") +
                          (small_affine ? " small affine" : "");
  auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("scnet_fused::_gate_forward", "").typed<GateFwd>();
  auto bwd = c10::Dispatcher::singleton().findSchemaOrThrow("scnet_fused::_gate_backward", "").typed<GateBwd>();
  at::manual_seed(0);
  at::Tensor x = at::randn({N, C, H, W});
  at::Tensor k = at::randn({N, C, H, W});
  at::Tensor dy = at::randn({N, C, H, W});
  at::Tensor small = at::randn({N, C, h, w});
  at::Tensor scale = at::rand({C}) + 0.5;
  at::Tensor shift = at::randn({C});
  at::Tensor center = at::randn({C});
  at::Tensor ss = small_affine ? at::rand({C}) + 0.5 : at::ones({C});
  at::Tensor st = small_affine ? at::randn({C}) : at::zeros({C});
  const Opt ss_arg = small_affine ? Opt(ss) : std::nullopt, st_arg = small_affine ? Opt(st) : std::nullopt;
  if (channels_last) {
    x = x.contiguous(at::MemoryFormat::ChannelsLast);
    k = k.contiguous(at::MemoryFormat::ChannelsLast);
    dy = dy.contiguous(at::MemoryFormat::ChannelsLast);
  }
  at::Tensor y = fwd.call(x, small, k, scale, shift, ss_arg, st_arg);
  at::Tensor dx, dsmall, dk3, sum_g, sum_gk;
  std::tie(dx, dsmall, dk3, sum_g, sum_gk) =
      bwd.call(dy, x, small, k, scale, shift, center, true, ss_arg, st_arg, true);
  // Without the sums: the same gradients, bit for bit, and empty sums.
  const auto plain = bwd.call(dy, x, small, k, scale, shift, center, true, ss_arg, st_arg, false);
  expect(at::equal(std::get<0>(plain), dx) && at::equal(std::get<1>(plain), dsmall) &&
             at::equal(std::get<2>(plain), dk3),
         "gate backward without sums: the same dx, dsmall, dk3, " + tag);
  expect(std::get<3>(plain).numel() == 0 && std::get<4>(plain).numel() == 0,
         "gate backward without sums: empty sums, " + tag);
  expect(y.is_contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
         "forward keeps the memory format, " + tag);

  // Naive loops in double.
  const auto src_r = source_table(H, h);
  const auto src_c = source_table(W, w);
  at::Tensor ey = at::zeros({N, C, H, W}, at::kDouble), edx = at::zeros({N, C, H, W}, at::kDouble);
  at::Tensor edk = at::zeros({N, C, H, W}, at::kDouble), eds = at::zeros({N, C, h, w}, at::kDouble);
  at::Tensor esg = at::zeros({C}, at::kDouble), esgk = at::zeros({C}, at::kDouble);
  auto X = x.accessor<float, 4>(), K = k.accessor<float, 4>(), D = dy.accessor<float, 4>();
  auto S = small.accessor<float, 4>();
  auto sc = scale.accessor<float, 1>(), sh = shift.accessor<float, 1>(), ct = center.accessor<float, 1>();
  auto SS = ss.accessor<float, 1>(), ST = st.accessor<float, 1>();
  auto Y = ey.accessor<double, 4>(), DX = edx.accessor<double, 4>(), DK = edk.accessor<double, 4>();
  auto DS = eds.accessor<double, 4>();
  auto SG = esg.accessor<double, 1>(), SGK = esgk.accessor<double, 1>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < H; ++i)
        for (int64_t j = 0; j < W; ++j) {
          const double u = static_cast<double>(S[n][c][src_r[i]][src_c[j]]) * SS[c] + ST[c];
          const double z = static_cast<double>(X[n][c][i][j]) + u;
          const double s = 1.0 / (1.0 + std::exp(-z));
          const double a = static_cast<double>(K[n][c][i][j]) * sc[c] + sh[c];
          const double d = D[n][c][i][j];
          Y[n][c][i][j] = a * s;
          DX[n][c][i][j] = d * a * s * (1.0 - s);
          DK[n][c][i][j] = d * s * sc[c];
          DS[n][c][src_r[i]][src_c[j]] += d * a * s * (1.0 - s);
          SG[c] += d * s;
          SGK[c] += d * s * (K[n][c][i][j] - ct[c]);
        }
  expect(max_abs_diff(y, ey) < 1e-5, "gate forward " + tag);
  expect(max_abs_diff(dx, edx) < 1e-5, "gate backward dx " + tag);
  expect(max_abs_diff(dk3, edk) < 1e-5, "gate backward dk3 " + tag);
  expect(max_abs_diff(dsmall, eds) < 1e-4, "gate backward dsmall " + tag);
  expect(max_abs_diff(sum_g, esg) < 1e-3, "gate backward sum_g " + tag);
  expect(max_abs_diff(sum_gk, esgk) < 1e-3, "gate backward sum_gk " + tag);
}

// The per-thread scratch stack: aligned, nested buffers disjoint, a buffer that does not fit from the
// heap and the block grown to the deepest use once empty (the same memory on the next call), each
// thread its own block.
void test_scratch_stack() {
  using scnet_fused::cpu_scratch::Scratch;
  const auto aligned = [](const float* p) { return reinterpret_cast<uintptr_t>(p) % 64 == 0; };
  const float* first = nullptr;
  for (int call = 0; call < 3; ++call) {
    const Scratch a(1000), b(17), c(1);
    expect(aligned(a.data()) && aligned(b.data()) && aligned(c.data()), "scratch alignment");
    for (int i = 0; i < 1000; ++i) a.data()[i] = 1.0f;
    for (int i = 0; i < 17; ++i) b.data()[i] = 2.0f;
    c.data()[0] = 3.0f;
    bool intact = true;
    for (int i = 0; i < 1000; ++i) intact = intact && a.data()[i] == 1.0f;
    for (int i = 0; i < 17; ++i) intact = intact && b.data()[i] == 2.0f;
    expect(intact && c.data()[0] == 3.0f, "scratch buffers overlap (call " + std::to_string(call) + ")");
    if (call == 1) first = a.data();
    if (call == 2) expect(a.data() == first, "scratch: the same block on the next call");
    if (call > 0) expect(b.data() == a.data() + 1008 && c.data() == b.data() + 32, "scratch: stacked in the block");
  }
  {  // deeper than the block: from the heap, then the block grows
    const Scratch a(1000), big(1 << 20);
    big.data()[(1 << 20) - 1] = 4.0f;
    expect(big.data() != a.data() + 1008, "scratch: an oversized buffer comes from the heap");
  }
  {
    const Scratch a(1000), big(1 << 20);
    expect(big.data() == a.data() + 1008, "scratch: the block grew to the deepest use");
  }
  {  // past the 8 MiB kept a thread: the block grows to 8 MiB, the rest comes from the heap
    const Scratch a(1000), huge(3 << 20);
    huge.data()[(3 << 20) - 1] = 5.0f;
  }
  const float* base = nullptr;
  {
    const Scratch a(1000), b((1 << 21) - 1008);  // 8 MiB in all: in the block
    base = a.data();
    expect(b.data() == a.data() + 1008, "scratch: the block grew to 8 MiB");
  }
  {
    const Scratch huge(3 << 20);
    expect(huge.data() != base, "scratch: more than 8 MiB is not kept");
  }
  const float* main_block = nullptr;
  {
    const Scratch a(64);
    main_block = a.data();
  }
  const float* other = nullptr;
  std::thread t([&] {
    const Scratch a(64);
    other = a.data();
  });
  t.join();
  expect(other != nullptr && other != main_block, "scratch: each thread its own block");
}

}  // namespace

int main() {
  // The CPU kernels this program links were built for SCNET_TEST_ISA: a CPU without it cannot run them.
  if (!scnet_fused::cpu_supports_isa(SCNET_TEST_ISA)) {
    std::printf("skipped: this CPU does not run %s code\n", SCNET_TEST_ISA);
    return 77;
  }
  test_index_map();
  test_scratch_stack();
  test_gate_kernels(3, 13, 14, 25, 3, 6, false);
  test_gate_kernels(3, 13, 14, 25, 3, 6, true);
  test_gate_kernels(2, 8, 56, 56, 14, 14, false);
  test_gate_kernels(1, 5, 7, 5, 1, 1, true);
  test_gate_kernels(2, 3, 13, 7, 6, 3, false);
  test_gate_kernels(3, 13, 14, 25, 3, 6, false, true);
  test_gate_kernels(3, 13, 14, 25, 3, 6, true, true);
  test_gate_kernels(1, 5, 7, 5, 1, 1, false, true);
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all checks passed (%s CPU kernels)\n", SCNET_TEST_ISA);
  return 0;
}
