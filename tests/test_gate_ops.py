"""The public gate ops: semantics on every backend here, input checks, opcheck, gradcheck, compile."""

import os
import threading

import pytest
import torch
import torch.nn.functional as F

import scnet_fused
from scnet_fused.ops import BackendUnavailable, sc_gate, sc_gate_bn_train

from _util import assert_close_rule, backends_here, eager_gate, randn

BACKENDS = backends_here()

# (N, C, H, W, h, w): irregular maps, odd N, C not a multiple of 8, h = 1 maps.
SHAPES = [(3, 5, 14, 13, 3, 3), (1, 3, 25, 7, 6, 1), (2, 12, 5, 5, 1, 1), (3, 4, 13, 14, 3, 7)]


def _inputs(shape, dtype=torch.float32, channels_last=False, requires_grad=True):
    N, C, H, W, h, w = shape
    x = randn(N, C, H, W, channels_last=channels_last, dtype=dtype, requires_grad=requires_grad)
    small = randn(N, C, h, w, dtype=dtype, requires_grad=requires_grad)
    k3 = randn(N, C, H, W, channels_last=channels_last, dtype=dtype, requires_grad=requires_grad, shift=0.3)
    return x, small, k3


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gate_matches_eager(backend, shape, channels_last):
    x, small, k3 = _inputs(shape, channels_last=channels_last)
    ref = eager_gate(x, small, k3)
    with scnet_fused.backend(backend):
        out = sc_gate(x, small, k3)
        g = torch.randn_like(ref)
        got = _grads(out, (x, small, k3), g)
    torch.testing.assert_close(out, ref)
    if channels_last and shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(got, _grads(ref, (x, small, k3), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_affine_matches_eager(backend):
    x, small, k3 = _inputs(SHAPES[0])
    C = x.shape[1]
    scale = torch.rand(C, requires_grad=True) + 0.5
    shift = torch.randn(C, requires_grad=True)
    ref = eager_gate(x, small, k3 * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    with scnet_fused.backend(backend):
        out = sc_gate(x, small, k3, scale, shift)
        g = torch.randn_like(ref)
        got = _grads(out, (x, small, k3, scale, shift), g)
    torch.testing.assert_close(out, ref)
    for a, b in zip(got, _grads(ref, (x, small, k3, scale, shift), g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _bn_eager(x, small, k3, w, b, eps=1e-5):
    return eager_gate(x, small, F.batch_norm(k3, None, None, w, b, True, 0.0, eps))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gate_bn_train_matches_eager(backend, shape, channels_last):
    x, small, k3 = _inputs(shape, channels_last=channels_last)
    C = x.shape[1]
    w = (torch.rand(C) + 0.5).requires_grad_()
    b = torch.randn(C).requires_grad_()
    ref = _bn_eager(x, small, k3, w, b)
    with scnet_fused.backend(backend):
        out, mean, var = sc_gate_bn_train(x, small, k3, w, b, 1e-5)
        g = torch.randn_like(ref)
        got = _grads(out, (x, small, k3, w, b), g)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    var_ref, mean_ref = torch.var_mean(k3.detach(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(var, var_ref)
    for a, b_ in zip(got, _grads(ref, (x, small, k3, w, b), g)):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gate_low_precision_rule(backend, dtype):
    x, small, k3 = _inputs(SHAPES[0], dtype=dtype)
    x64, s64, k64 = (t.detach().double().requires_grad_() for t in (x, small, k3))
    ref64 = eager_gate(x64, s64, k64)
    eager = eager_gate(x, small, k3)
    g = torch.randn(ref64.shape, dtype=torch.float64)
    with scnet_fused.backend(backend):
        out = sc_gate(x, small, k3)
        got = _grads(out, (x, small, k3), g.to(dtype))
    assert out.dtype == dtype
    assert_close_rule(out, ref64.detach(), eager.detach(), what=f"{dtype} forward")
    for name, a, b, e in zip("x small k3".split(), got, _grads(ref64, (x64, s64, k64), g),
                             _grads(eager, (x, small, k3), g.to(dtype))):
        assert a.dtype == dtype
        assert_close_rule(a, b, e, what=f"{dtype} grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base = torch.randn(2, 6, 16, 30)
    x = base[:, :, 1:15, ::2].requires_grad_()           # sliced: neither layout
    k3 = torch.randn(2, 14, 15, 6).permute(0, 3, 1, 2).requires_grad_()  # odd strides
    small = torch.randn(2, 6, 7, 3).transpose(2, 3)[:, :, :, ::2].requires_grad_()  # (2, 6, 3, 4)
    ref = eager_gate(x, small, k3)
    with scnet_fused.backend(backend):
        out = sc_gate(x, small, k3)
        g = torch.randn_like(ref)
        got = _grads(out, (x, small, k3), g)
    torch.testing.assert_close(out, ref)
    for a, b in zip(got, _grads(ref, (x, small, k3), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_infinite_k3_gives_the_eager_gradients(backend, channels_last, affine):
    """An infinite k3 (an overflowed convolution) where the sigmoid is strictly inside (0, 1): dx is
    +-inf as in eager (dy * a * s * (1 - s)), not NaN from an inf - inf, and dsmall sums it; a NaN in x
    stays NaN. Every element's value, or its being NaN, as eager PyTorch's."""
    x, small, k3 = (t.detach() for t in _inputs((2, 3, 14, 13, 3, 3), channels_last=channels_last))
    k3[0, 0, 3, 4], k3[1, 2, 13, 12], k3[1, 1, 0, 0] = float("inf"), -float("inf"), float("inf")
    x[0, 1, 5, 5] = float("nan")
    scale, shift = (torch.rand(3) + 0.5, torch.randn(3)) if affine else (None, None)
    dy = randn(2, 3, 14, 13, channels_last=channels_last)
    results = []
    for run in ("eager", backend):
        ins = [t.clone().requires_grad_() for t in (x, small, k3)]
        if run == "eager":
            a = ins[2] * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1) if affine else ins[2]
            y = eager_gate(ins[0], ins[1], a)
        else:
            with scnet_fused.backend(backend):
                y = sc_gate(*ins, scale, shift)
        results.append((y,) + _grads(y, ins, dy))
    for name, got, want in zip(("y", "dx", "dsmall", "dk3"), results[1], results[0]):
        assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN where eager has none (or none where it has)"
        assert torch.equal(got.isinf(), want.isinf()), name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, equal_nan=True, msg=lambda m: f"{name}: {m}")
    assert results[0][1].isinf().sum() >= 3  # the case is one: eager has infinite dx


def test_expanded_grad_output():
    x, small, k3 = _inputs(SHAPES[0])
    sc_gate(x, small, k3).sum().backward()  # the incoming gradient is an expanded (stride-0) tensor
    ref = [t.grad.clone() for t in (x, small, k3)]
    for t in (x, small, k3):
        t.grad = None
    eager_gate(x, small, k3).sum().backward()
    for a, t in zip(ref, (x, small, k3)):
        torch.testing.assert_close(a, t.grad)


def test_empty_batch():
    x, small, k3 = _inputs((0, 4, 8, 8, 2, 2))
    out = sc_gate(x, small, k3)
    assert out.shape == (0, 4, 8, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape and small.grad.shape == small.shape
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sc_gate_bn_train(x, small, k3, torch.ones(4), torch.zeros(4))


BAD = [
    ("rank", lambda x, s, k: (x[0], s, k), ValueError, "x must be 4-D"),
    ("dtype", lambda x, s, k: (x, s.double(), k), TypeError, "share one dtype"),
    ("int dtype", lambda x, s, k: (x.long(), s.long(), k.long()), TypeError, "float16, bfloat16"),
    ("device", lambda x, s, k: (x, s.to("meta"), k), ValueError, "one device"),
    ("channels", lambda x, s, k: (x, s[:, :2], k), ValueError, "batch and channel sizes"),
    ("batch", lambda x, s, k: (x, s[:1], k), ValueError, "batch and channel sizes"),
    ("k3 shape", lambda x, s, k: (x, s, k[:, :, :-1]), ValueError, "k3 must have x's shape"),
    ("empty pooled map", lambda x, s, k: (x, s[:, :, :0], k), ValueError, "pooled map is empty"),
    ("small too big", lambda x, s, k: (x, torch.randn(3, 5, 20, 3), k), ValueError, "must not be larger"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_errors(case):
    _, make, exc, match = case
    x, small, k3 = _inputs(SHAPES[0], requires_grad=False)
    with pytest.raises(exc, match=match):
        sc_gate(*make(x, small, k3))


def test_bad_per_channel_arguments():
    x, small, k3 = _inputs(SHAPES[0], requires_grad=False)
    with pytest.raises(ValueError, match="scale must be a 1-D tensor of C=5"):
        sc_gate(x, small, k3, torch.ones(4), None)
    with pytest.raises(ValueError, match="weight must be a 1-D tensor of C=5"):
        sc_gate_bn_train(x, small, k3, torch.ones(5, 1), torch.zeros(5))


def test_backend_selection_errors(monkeypatch):
    x, small, k3 = _inputs(SHAPES[0], requires_grad=False)
    with pytest.raises(ValueError, match="unknown scnet_fused backend"):
        with scnet_fused.backend("tpu"):
            pass
    with pytest.raises(BackendUnavailable, match="cuda backend needs CUDA tensors"):
        with scnet_fused.backend("cuda"):
            sc_gate(x, small, k3)
    monkeypatch.setenv("SCNET_FUSED_BACKEND", "reference")
    assert scnet_fused.ops.requested() == "reference"
    torch.testing.assert_close(sc_gate(x, small, k3), eager_gate(x, small, k3))
    monkeypatch.setenv("SCNET_FUSED_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown scnet_fused backend"):
        sc_gate(x, small, k3)


def test_triton_interpreter_with_an_incompatible_numpy_is_a_clear_error(monkeypatch):
    """triton < 3.7's interpreter fails inside every kernel with a loop over tensor bounds under numpy
    >= 2.4; forcing the triton backend on CPU tensors there says so before any kernel runs."""
    import numpy

    from scnet_fused.ops import _dispatch

    triton = pytest.importorskip("triton")
    assert _dispatch._release("3.6.0") == (3, 6) and _dispatch._release("2.4.0rc1") == (2, 4)
    assert _dispatch._release("3.10") == (3, 10) and _dispatch._release("2.5.2") == (2, 5)
    x, small, k3 = _inputs(SHAPES[0], requires_grad=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    reason = _dispatch.interpreter_problem()
    assert "triton 3.6.0" in reason and "numpy 2.4.6" in reason and "numpy<2.4" in reason
    with pytest.raises(BackendUnavailable, match="cannot run these kernels with numpy 2.4.6"):
        with scnet_fused.backend("triton"):
            sc_gate(x, small, k3)
    for tv, nv in (("3.6.0", "2.3.5"), ("3.7.0", "2.4.6"), ("3.8.0", "2.4.6")):
        monkeypatch.setattr(triton, "__version__", tv)
        monkeypatch.setattr(numpy, "__version__", nv)
        assert _dispatch.interpreter_problem() is None, (tv, nv)



def test_cuda_arch_names():
    from scnet_fused.ops import _cpp

    assert _cpp.arch_names("800,900") == "8.0, 9.0"
    assert _cpp.arch_names("750, 860,1000,1210") == "7.5, 8.6, 10.0, 12.1"
    assert _cpp.arch_names("") == "unknown archs"


def test_the_kernel_load_probe_names_a_device_that_is_not_there():
    """The extension's probe itself (a CUDA build): an index past the visible devices (all of them on a
    machine without a GPU) is an answer naming it, not a CUDA error or an empty 'loads fine'."""
    from scnet_fused.ops import _cpp

    if _cpp.unavailable_reason("cuda") is not None:
        pytest.skip(_cpp.unavailable_reason("cuda"))
    from scnet_fused import _C

    visible = torch.cuda.device_count()
    for index in (visible, visible + 3, -1):
        assert _C.cuda_kernel_problem(index) == f"no CUDA device {index} ({visible} visible)"
    assert _cpp.arch_names(_C.cuda_arch_list) == "8.0, 9.0" or "TORCH_CUDA_ARCH_LIST" in os.environ


def test_a_gpu_without_a_kernel_image_is_named_and_asked_once(monkeypatch):
    """The CUDA runtime's answer for a GPU the build has no image for (one older than every architecture
    of the build) becomes a reason naming the GPU, its capability, the build's and the rebuild command;
    the runtime is asked once per device."""
    from scnet_fused.ops import _cpp

    asked = []

    class FakeC:
        cuda_arch_list = "800,900"

        @staticmethod
        def cuda_kernel_problem(index):
            asked.append(index)
            return ("the kernels of sc_gate_cuda.cu do not load: no kernel image is available for execution "
                    "on the device") if index == 1 else ""

    monkeypatch.setattr(_cpp, "_C", FakeC)
    monkeypatch.setattr(_cpp, "_import_error", None)
    monkeypatch.setattr(_cpp, "_cuda_problems", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla T4")
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    reason = _cpp.cuda_device_problem(gpu1)
    for part in ("GPU 1 (Tesla T4, compute capability 7.5)", "no kernel image is available",
                 "compiled for compute capability 8.0, 9.0", 'TORCH_CUDA_ARCH_LIST="7.5"'):
        assert part in reason, (part, reason)
    assert _cpp.cuda_device_problem(gpu1) == reason and _cpp.cuda_device_problem(gpu0) is None
    assert _cpp.cuda_device_problem(gpu0) is None and asked == [1, 0]
    monkeypatch.setattr(_cpp, "_import_error", "not built")  # no extension: the backend's own reason says so
    monkeypatch.setattr(_cpp, "_cuda_problems", {})
    assert _cpp.cuda_device_problem(gpu1) is None


def test_a_gpu_without_a_kernel_image_is_refused_before_any_kernel(monkeypatch):
    """backend("cuda") on such a GPU is a clear error before any kernel runs; auto goes on past the cuda
    backend (to the reference, with one warning giving each skipped backend's reason)."""
    import warnings

    from scnet_fused.ops import _cpp, _dispatch

    reason = "the CUDA kernels of this build cannot run on GPU 0 (Tesla T4, compute capability 7.5): ..."
    monkeypatch.setattr(_cpp, "cuda_device_problem", lambda device: reason)
    monkeypatch.setattr(_dispatch, "_warned", set())
    real_load = _dispatch._load
    monkeypatch.setattr(_dispatch, "_load", lambda name: "triton is not installed" if name == "triton"
                        else object() if name == "cuda" else real_load(name))
    dev = torch.device("cuda", 0)
    with scnet_fused.backend("cuda"), pytest.raises(BackendUnavailable, match="compute capability 7.5"):
        _dispatch.select(dev, torch.float32)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        name, _ = _dispatch.select(dev, torch.float32)
    assert name == "reference"
    assert len(seen) == 1 and "triton: triton is not installed" in str(seen[0].message)
    assert f"cuda: {reason}" in str(seen[0].message)
    monkeypatch.setattr(_cpp, "cuda_device_problem", lambda device: None)  # a GPU it runs on
    with pytest.warns(RuntimeWarning, match="using cuda"):
        assert _dispatch.select(dev, torch.float32)[0] == "cuda"


def test_backend_context_is_per_thread(monkeypatch):
    monkeypatch.delenv("SCNET_FUSED_BACKEND", raising=False)
    seen = {}
    with scnet_fused.backend("reference"):
        t = threading.Thread(target=lambda: seen.setdefault("other", scnet_fused.ops.requested()))
        t.start()
        t.join()
        assert scnet_fused.ops.requested() == "reference"
    assert seen["other"] == "auto"  # another thread does not see this thread's context
    assert scnet_fused.ops.requested() == "auto"


@pytest.mark.parametrize("cpp_autograd", ["1", "0"])
def test_backward_runs_on_the_forwards_backend(monkeypatch, cpp_autograd):
    """A forward inside ``with backend(...)`` has its backward on that backend wherever ``.backward()`` is
    called; a backward inside another backend's block keeps the forward's (both autograd paths)."""
    from scnet_fused import ops, reference

    monkeypatch.delenv("SCNET_FUSED_BACKEND", raising=False)
    monkeypatch.setenv("SCNET_FUSED_CPP_AUTOGRAD", cpp_autograd)
    calls = []
    for name in ("gate_backward", "avgpool_backward", "affine_relu_backward_sums", "bn_relu_train_backward"):
        if hasattr(reference, name):
            original = getattr(reference, name)
            monkeypatch.setattr(reference, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    x, small, k3 = (t.detach().requires_grad_() for t in _inputs(SHAPES[0]))
    C = x.shape[1]
    w, b = torch.rand(C, requires_grad=True), torch.randn(C, requires_grad=True)

    def run():
        return (sc_gate(x, small, k3).sum() + scnet_fused.sc_avgpool(x, 2).sum()
                + ops.bn_relu_train(k3, w, b)[0].sum())

    with scnet_fused.backend("reference"):
        loss = run()
    loss.backward()
    assert {"gate_backward", "avgpool_backward"} <= set(calls), calls
    assert calls.count("affine_relu_backward_sums") + calls.count("bn_relu_train_backward") >= 1, calls
    if "cpu" in backends_here():
        calls.clear()
        loss = run()  # auto: the C++ kernels on these CPU tensors
        with scnet_fused.backend("triton" if "triton" not in backends_here() else "reference"):
            loss.backward()  # neither an error (triton cannot run CPU tensors here) nor the reference
        assert calls == []


def test_gradcheck_float64():
    x, small, k3 = (t.double().detach().requires_grad_() for t in _inputs((2, 3, 7, 6, 1, 2)))
    scale = torch.rand(3, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: sc_gate(*a), (x, small, k3, scale, shift))
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: sc_gate_bn_train(*a, 1e-5)[0], (x, small, k3, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, small, k3 = _inputs(SHAPES[0])
    C = x.shape[1]
    scale, shift = torch.rand(C, requires_grad=True), torch.randn(C, requires_grad=True)
    w, b = torch.rand(C, requires_grad=True), torch.randn(C, requires_grad=True)
    with scnet_fused.backend(backend):
        for args in [(x, small, k3, None, None), (x, small, k3, scale, shift),
                     tuple(t.detach() if t is not None else None for t in (x, small, k3, scale, shift))]:
            torch.library.opcheck(torch.ops.scnet_fused.sc_gate.default, args)
        torch.library.opcheck(torch.ops.scnet_fused.sc_gate_bn_train.default, (x, small, k3, w, b, 1e-5))
        torch.library.opcheck(torch.ops.scnet_fused.sc_gate_bn_train.default,
                              (x.detach(), small.detach(), k3.detach(), w.detach(), b.detach(), 1e-5))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(x, small, k3, w, b):
        y, mean, var = sc_gate_bn_train(x, small, k3, w, b, 1e-5)
        return (sc_gate(y, small, k3) * 2).sum() + mean.sum() * 0

    x, small, k3 = _inputs(SHAPES[0])
    w, b = torch.rand(5, requires_grad=True), torch.randn(5, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out_c = compiled(x, small, k3, w, b)
    gc = torch.autograd.grad(out_c, (x, small, k3, w, b))
    out_e = f(x, small, k3, w, b)
    ge = torch.autograd.grad(out_e, (x, small, k3, w, b))
    torch.testing.assert_close(out_c, out_e)
    for a, b_ in zip(gc, ge):
        torch.testing.assert_close(a, b_)


def test_auto_drops_a_backend_whose_kernels_do_not_compile(monkeypatch):
    """Under auto, a Triton kernel that cannot be compiled on the device is dropped with a warning
    and the call is served by the next backend; forcing the backend still raises."""
    from triton.compiler.errors import CompilationError

    from scnet_fused.ops import _dispatch

    class Broken:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise CompilationError(None, None, "no such instruction on this device")
            return fail

    monkeypatch.setitem(_dispatch._module_cache, "triton", Broken())
    monkeypatch.setattr(_dispatch, "_auto_order", lambda device, dtype: ("triton", "reference"))
    monkeypatch.setattr(_dispatch, "triton_interpreted", lambda: False)
    monkeypatch.setattr(_dispatch, "_device_ok", lambda name, device: None)
    x, small, k3 = _inputs(SHAPES[0], requires_grad=False)
    with pytest.warns(RuntimeWarning, match="backend triton dropped, its kernels failed to compile"):
        out = sc_gate(x, small, k3)
    torch.testing.assert_close(out, eager_gate(x, small, k3))
    assert "failed to compile" in _dispatch.available("triton")
    monkeypatch.setitem(_dispatch._module_cache, "triton", Broken())
    with pytest.raises(CompilationError):
        with scnet_fused.backend("triton"):
            sc_gate(x, small, k3)


def _bad_gate_inputs():
    x, small = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 2, 2)
    c = torch.ones(4)
    return [
        ("rank", (x[0], small, x[0], ())),
        ("dtype", (x, small.double(), x, ())),
        ("integer", (x.long(), small.long(), x.long(), ())),
        ("k3 shape", (x, small, x[:, :3], ())),
        ("batch", (x, small[:1], x, ())),
        ("channels", (x, small[:, :3], x, ())),
        ("empty pooled map", (x, small[:, :, :0], x, ())),
        ("pooled map larger", (x, torch.randn(2, 4, 9, 8), x, ())),
        ("device", (x, torch.randn(2, 4, 2, 2, device="meta"), x, ())),
        ("per-channel length", (x, small, x, (torch.ones(3),))),
        ("per-channel rank", (x, small, x, (c.view(2, 2),))),
        ("per-channel integer", (x, small, x, (torch.ones(4, dtype=torch.long),))),
        ("per-channel device", (x, small, x, (torch.ones(4, device="meta"),))),
        ("per-channel not a tensor", (x, small, x, ([1.0] * 4,))),
        ("not a tensor", (x.tolist(), small, x, ())),
    ]


@pytest.mark.parametrize("case", _bad_gate_inputs(), ids=lambda c: c[0])
def test_the_quick_input_check_accepts_nothing_the_full_checks_refuse(case):
    """check_gate_inputs first asks a one-expression form of its checks; that form must say no wherever
    one of the checks one by one refuses (they then name the problem)."""
    from scnet_fused.ops.sc_gate import _inputs_ok, check_gate_inputs

    _, (x, small, k3, per_channel) = case
    assert not _inputs_ok(x, small, k3, per_channel)
    with pytest.raises((ValueError, TypeError)):
        check_gate_inputs(x, small, k3, *per_channel, names=("scale",))
    good = torch.randn(2, 4, 8, 8)
    assert _inputs_ok(good, torch.randn(2, 4, 2, 2), good, (torch.ones(4), None))
