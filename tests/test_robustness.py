"""What users throw at the fused SCConv and the library, as one table of cases: bad shapes, dtypes,
devices, tiny maps, empty batches, NaN/Inf, partial requires_grad, double backward, bad checkpoints,
pickles that would run code, and concurrent calls into the CPU kernels.

Each row: (name, callable, expected). ``expected`` is ``OK`` (the callable makes its own assertions)
or ``(ExceptionType, regex)``: the callable must raise that error with a message matching the regex.
"""

import copy
import pickle
import threading

import pytest
import torch
from torch import nn

import scnet_fused
from scnet_fused import CheckpointError, load_checkpoint
from scnet_fused import reference as R
from scnet_fused.ops import available, sc_gate
from scnet_fused.ops._dispatch import _release
from _util import backends_here, randomize_norms

OK = "ok"
BACKEND = "cpu" if available("cpu") is None else "reference"
GATE_BACKENDS = backends_here()


def _pair(C=4, stride=1, train=True, seed=0):
    torch.manual_seed(seed)
    ref = R.SCConv(C, C, stride, 1, 1, 1, 4, nn.BatchNorm2d)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)  # negative scales too: the sign of an Inf must survive
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    fused = scnet_fused.convert(ref)
    ref.train(train), fused.train(train)
    return ref, fused


def _run(model, x, backend=BACKEND, grad_seed=3):
    """Forward + backward with a fixed upstream gradient; returns (out, x.grad or None, {param: grad})."""
    model = copy.deepcopy(model)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    with scnet_fused.backend(backend):
        out = model(x)
        if out.requires_grad:
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
            out.backward(g)
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}, model


def _assert_same_run(a, b, equal_nan=False, rtol=1e-4, atol=1e-5):
    out_a, xg_a, pg_a, mod_a = a
    out_b, xg_b, pg_b, mod_b = b
    torch.testing.assert_close(out_a, out_b, rtol=rtol, atol=atol, equal_nan=equal_nan)
    assert (xg_a is None) == (xg_b is None)
    if xg_a is not None:
        torch.testing.assert_close(xg_a, xg_b, rtol=rtol, atol=atol, equal_nan=equal_nan)
    assert pg_a.keys() == pg_b.keys()
    for n in pg_a:
        assert (pg_a[n] is None) == (pg_b[n] is None), f"{n}: grad presence differs"
        if pg_a[n] is not None:
            torch.testing.assert_close(pg_a[n], pg_b[n], rtol=rtol, atol=atol, equal_nan=equal_nan,
                                       msg=lambda m: f"grad {n}: {m}")
    sb = mod_b.state_dict()
    for k, v in mod_a.state_dict().items():
        torch.testing.assert_close(v, sb[k], rtol=rtol, atol=atol, equal_nan=equal_nan,
                                   msg=lambda m: f"state {k}: {m}")


def _same_error_as_reference(make_input, train=True):
    """Both modules raise, and the same kind of error; returns the fused module's exception."""
    ref, fused = _pair(train=train)
    errors = []
    for m in (ref, fused):
        with pytest.raises(Exception) as info:
            _run(m, make_input())
        errors.append(info.value)
    assert type(errors[1]) is type(errors[0]), (repr(errors[0]), repr(errors[1]))
    raise errors[1]


def _cpu_gate_special_values_mismatch() -> str:
    """Where the C++ CPU gate's vectorized sigmoid disagrees with torch on non-finite or huge inputs
    (NaN / Inf positions), as a description; empty when it agrees."""
    if available("cpu") is not None:
        return ""
    from scnet_fused.ops import _dispatch

    inf, nan = float("inf"), float("nan")
    zs = torch.tensor([nan, -inf, inf, -100.0, 100.0, 0.0])
    ks = torch.tensor([1.0, inf, -inf, nan])
    z, k = (t.reshape(1, 1, 1, -1).repeat(1, 1, 1, 16) for t in torch.meshgrid(zs, ks, indexing="ij"))
    args = (z.contiguous(), torch.zeros_like(z), k.contiguous(), None, None)
    got = _dispatch._load("cpu").gate_forward(*args)
    want = _dispatch._load("reference").gate_forward(*args)
    close = (got - want).abs() <= 1e-6 * want.abs()  # finite values: a few ulps
    bad = ~((got == want) | (got.isnan() & want.isnan()) | close)
    if not bad.any():
        return ""
    i = bad.flatten().nonzero().flatten()[:4].tolist()
    return "; ".join(f"z={z.flatten()[j].item()}, k3={k.flatten()[j].item()}: {got.flatten()[j].item()} "
                     f"(torch: {want.flatten()[j].item()})" for j in i)


def _stats_case(backend):
    def case():
        """The statistics primitive on channels holding infinities of one sign, of both signs, a NaN, and
        huge finite values: the batch mean torch's CPU BatchNorm gives (+-inf, NaN, finite), NaN variance
        for the non-finite channels."""
        from scnet_fused.ops import _dispatch

        inf = float("inf")
        t = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(2))
        t[0, 0, 1, 2] = t[1, 0, 0, 0] = -inf
        t[1, 1, 2, 3] = inf
        t[0, 2, 0, 1], t[1, 2, 1, 1] = inf, -inf
        t[0, 3, 2, 2] = float("nan")
        t[:, 4] *= 1e18
        for layout in (torch.contiguous_format, torch.channels_last):
            with scnet_fused.backend(backend):
                _, prims = _dispatch.select(t.device, t.dtype)
                mean, var = prims.channel_stats(t.contiguous(memory_format=layout))
            rm, rv = torch.zeros(5), torch.ones(5)
            torch.nn.functional.batch_norm(t, rm, rv, training=True, momentum=1.0)
            torch.testing.assert_close(mean[:4], rm[:4], equal_nan=True, rtol=0, atol=0)
            torch.testing.assert_close(mean[4], rm[4], rtol=1e-5, atol=0)
            assert var[:4].isnan().all() and torch.isfinite(var[4]), var
    return case


def cpu_gate_special_values():
    """The C++ CPU gate's vectorized sigmoid gives torch's results for NaN, +-Inf and huge inputs."""
    if available("cpu") is not None:
        pytest.skip(f"cpu backend unavailable: {available('cpu')}")
    mismatch = _cpu_gate_special_values_mismatch()
    assert not mismatch, mismatch


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


def wrong_rank_module():
    _same_error_as_reference(lambda: torch.randn(4, 8, 8))


def wrong_rank_op():
    x = torch.randn(2, 4, 8, 8)
    sc_gate(x[0], torch.randn(2, 4, 2, 2), x)


def dtype_mismatch_op():
    x = torch.randn(2, 4, 8, 8)
    sc_gate(x, torch.randn(2, 4, 2, 2, dtype=torch.float64), x)


def dtype_mismatch_module():
    _same_error_as_reference(lambda: torch.randn(2, 4, 8, 8, dtype=torch.float64))


def dtype_int_op():
    x = torch.randint(0, 3, (2, 4, 8, 8))
    sc_gate(x, x[:, :, :2, :2].contiguous(), x)


def device_mismatch_op():
    x = torch.randn(2, 4, 8, 8)
    sc_gate(x, torch.randn(2, 4, 2, 2, device="meta"), x)


def device_mismatch_direct_op_call():
    """The registered op itself (no Python wrapper in front) checks devices too."""
    x = torch.randn(2, 4, 8, 8)
    torch.ops.scnet_fused.sc_gate(x, torch.randn(2, 4, 2, 2, device="meta"), x, None, None)


def device_mismatch_module():
    ref, fused = _pair()
    ref.to("meta"), fused.to("meta")
    errors = []
    for m in (ref, fused):
        with pytest.raises(Exception) as info:
            m(torch.randn(2, 4, 8, 8))
        errors.append(info.value)
    assert type(errors[1]) is type(errors[0]), (repr(errors[0]), repr(errors[1]))
    raise errors[1]


def meta_device_forward_backward():
    """A fused model on the meta device (shape inference, deferred init) runs like the reference."""
    for train in (True, False):
        ref, fused = _pair(train=train)
        ref.to("meta"), fused.to("meta")
        x = torch.randn(3, 4, 13, 9, device="meta", requires_grad=True)
        out_r = ref(x)
        out_f = fused(x)
        assert out_f.shape == out_r.shape and out_f.device.type == "meta"
        out_f.sum().backward()


def channel_mismatch_module():
    _same_error_as_reference(lambda: torch.randn(2, 6, 8, 8))


def channel_mismatch_construction():
    scnet_fused.SCConv(4, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)


def channel_mismatch_op():
    x = torch.randn(2, 4, 8, 8)
    sc_gate(x, torch.randn(2, 3, 2, 2), x)


def height_below_pooling_rate():
    _same_error_as_reference(lambda: torch.randn(2, 4, 3, 8))


def width_below_pooling_rate():
    _same_error_as_reference(lambda: torch.randn(2, 4, 8, 3), train=False)


def empty_pooled_map_op():
    x = torch.randn(2, 4, 3, 3)
    sc_gate(x, torch.randn(2, 4, 0, 1), x)


def pooling_rate_exact():
    """H = W = pooling_r: a 1x1 pooled map broadcast over the whole input."""
    for train in (True, False):
        ref, fused = _pair(train=train)
        x = torch.randn(3, 4, 4, 5, requires_grad=True)
        _assert_same_run(_run(fused, x), _run(ref, x))


def empty_batch_eval():
    ref, fused = _pair(train=False)
    x = torch.randn(0, 4, 8, 8, requires_grad=True)
    a, b = _run(fused, x), _run(ref, x)
    assert a[0].shape == b[0].shape == (0, 4, 8, 8)
    _assert_same_run(a, b)


def empty_batch_train():
    ref, fused = _pair(train=True)
    x = torch.randn(0, 4, 8, 8, requires_grad=True)
    b = _run(ref, x)  # nn.BatchNorm2d accepts an empty batch in training
    a = _run(fused, x)
    _assert_same_run(a, b)


def _nan_inf_case(backend, train):
    def case():
        for val in (float("nan"), float("inf"), -float("inf")):
            ref, fused = _pair(train=train)
            x = torch.randn(2, 4, 9, 10, generator=torch.Generator().manual_seed(1))
            x[0, 1, 3, 4] = val
            x[1, 2, 8, 0] = val
            x.requires_grad_()
            a, b = _run(fused, x, backend), _run(ref, x, backend)
            assert (a[0].isnan().any() or a[0].isinf().any()), "the non-finite input vanished"
            _assert_same_run(a, b, equal_nan=True)
    return case


def _large_preactivation_case(backend):
    def case():
        ref, fused = _pair(train=False)
        x = torch.randn(2, 4, 9, 16, generator=torch.Generator().manual_seed(2)) * 100.0
        x.requires_grad_()
        a, b = _run(fused, x, backend), _run(ref, x, backend)
        assert torch.isfinite(b[0]).all()
        _assert_same_run(a, b, rtol=1e-4, atol=1e-3)
    return case


def _freeze(model, which):
    for n, p in model.named_parameters():
        if which == "all" or n.startswith(which):
            p.requires_grad_(False)
    return model


def _partial_grad_case(which, x_requires_grad, train=True):
    def case():
        ref, fused = _pair(train=train)
        _freeze(ref, which), _freeze(fused, which)
        x = torch.randn(2, 4, 13, 10, requires_grad=x_requires_grad)
        a, b = _run(fused, x), _run(ref, x)
        _assert_same_run(a, b)
        for n, g in a[2].items():
            frozen = which == "all" or n.startswith(which)
            assert (g is None) == frozen, f"{n}: grad {'present' if g is not None else 'missing'}"
    return case


def _double_backward_case(train):
    def case():
        ref, fused = _pair(train=train)
        x = torch.randn(2, 4, 8, 8)
        # The reference supports it (a gradient penalty, say): the fused model gives the same.
        got = []
        for m in (ref, fused):
            xi = x.clone().requires_grad_()
            with scnet_fused.backend(BACKEND):
                out = m(xi)
                (g,) = torch.autograd.grad(out.square().sum(), xi, create_graph=True)
                assert g.requires_grad
                got.append((g,) + torch.autograd.grad(g.square().sum(), [xi] + list(m.parameters()),
                                                      allow_unused=True))
        for a, b in zip(*got):
            assert (a is None) == (b is None) or not (a if a is not None else b).any()
            if a is not None and b is not None:
                torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3 * max(1.0, b.abs().max().item()))
    return case


def _state(train=False):
    return _pair(train=train)[1].state_dict()


def checkpoint_missing_key(tmp_path):
    state = _state()
    del state["k3.0.weight"]
    torch.save(state, tmp_path / "ckpt.pth")
    load_checkpoint(_pair()[1], tmp_path / "ckpt.pth")


def checkpoint_unexpected_key(tmp_path):
    state = _state()
    state["k5.0.weight"] = torch.zeros(1)
    load_checkpoint(_pair()[1], state)


def checkpoint_wrong_shape(tmp_path):
    state = _state()
    state["k4.0.weight"] = torch.zeros(4, 4, 5, 5)
    torch.save({"state_dict": state}, tmp_path / "ckpt.pth")
    load_checkpoint(_pair()[1], tmp_path / "ckpt.pth")


def checkpoint_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "ckpt.pth")
    load_checkpoint(_pair()[1], tmp_path / "ckpt.pth")


def checkpoint_roundtrip_module_prefix(tmp_path):
    ref, fused = _pair(train=False)
    torch.save({"model": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "ckpt.pth")
    _, target = _pair(train=False, seed=5)
    load_checkpoint(target, tmp_path / "ckpt.pth")
    for k, v in ref.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def checkpoint_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "marker"
    state = _state()
    state["evil"] = _RunsCodeWhenUnpickled(marker)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump(state, f)  # plain pickle: what torch.load would meet in a legacy file
    torch.save({"state_dict": _state(), "extra": _RunsCodeWhenUnpickled(marker)}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(CheckpointError, match="weights_only"):
            load_checkpoint(_pair()[1], tmp_path / name)
        assert not marker.exists(), f"loading {name} ran code"


def two_threads_cpu_kernels():
    if available("cpu") is not None:
        pytest.skip(f"the compiled CPU backend is not built: {available('cpu')}")
    models_, inputs, expected = [], [], []
    for i, train in enumerate((True, False)):
        ref, fused = _pair(C=8, train=train, seed=i)
        x = torch.randn(3, 8, 25, 14 + i, generator=torch.Generator().manual_seed(10 + i), requires_grad=True)
        models_.append(fused), inputs.append(x)
        expected.append(_run(fused, x, "cpu"))
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def work(i):
        try:
            barrier.wait()
            results[i] = [_run(models_[i], inputs[i], "cpu") for _ in range(5)]
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        for got in results[i]:
            _assert_same_run(got, expected[i], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

CASES = [
    ("wrong_rank_module", wrong_rank_module, (ValueError, r"4-D")),
    ("wrong_rank_op", wrong_rank_op, (ValueError, r"x must be 4-D")),
    ("dtype_mismatch_op", dtype_mismatch_op, (TypeError, r"share one dtype")),
    ("dtype_mismatch_module", dtype_mismatch_module, (RuntimeError, r"")),
    ("dtype_integer_op", dtype_int_op, (TypeError, r"float16, bfloat16, float32 or float64")),
    ("device_mismatch_op_meta", device_mismatch_op, (ValueError, r"one device")),
    ("device_mismatch_direct_op_call", device_mismatch_direct_op_call, (ValueError, r"one device")),
    ("device_mismatch_module_meta", device_mismatch_module, (RuntimeError, r"")),
    ("meta_device_forward_backward", meta_device_forward_backward, OK),
    ("channel_mismatch_module", channel_mismatch_module, (ValueError, r"expects 4 input channels, got 6")),
    ("channel_mismatch_construction", channel_mismatch_construction, (ValueError, r"inplanes == planes")),
    ("channel_mismatch_op", channel_mismatch_op, (ValueError, r"batch and channel sizes")),
    ("height_below_pooling_rate", height_below_pooling_rate, (ValueError, r"3x8 .*pooling_r=4")),
    ("width_below_pooling_rate", width_below_pooling_rate, (ValueError, r"8x3 .*pooling_r=4")),
    ("empty_pooled_map_op", empty_pooled_map_op, (ValueError, r"pooled map is empty")),
    ("pooling_rate_exact", pooling_rate_exact, OK),
    ("empty_batch_eval", empty_batch_eval, OK),
    ("empty_batch_train", empty_batch_train, OK),
]
for _b in GATE_BACKENDS:
    CASES += [
        (f"channel_stats_non_finite[{_b}]", _stats_case(_b), OK),
        (f"nan_inf_eval[{_b}]", _nan_inf_case(_b, train=False), OK),
        (f"nan_inf_train[{_b}]", _nan_inf_case(_b, train=True), OK),
        (f"large_preactivation[{_b}]", _large_preactivation_case(_b), OK),
    ]
CASES += [
    ("grad_x_only_weights_frozen", _partial_grad_case("all", True), OK),
    ("grad_x_only_weights_frozen_eval", _partial_grad_case("all", True, train=False), OK),
    ("grad_weights_only", _partial_grad_case("none", False), OK),
    ("small_branch_frozen", _partial_grad_case("k2.", True), OK),
    ("small_branch_frozen_x_no_grad", _partial_grad_case("k2.", False), OK),
    ("k3_norm_frozen", _partial_grad_case("k3.1.", True), OK),
    ("double_backward_train", _double_backward_case(True), OK),
    ("double_backward_eval", _double_backward_case(False), OK),
    ("checkpoint_missing_key", checkpoint_missing_key, (CheckpointError, r"missing keys \(1\): k3\.0\.weight")),
    ("checkpoint_unexpected_key", checkpoint_unexpected_key, (CheckpointError, r"unexpected keys \(1\): k5\.0\.weight")),
    ("checkpoint_wrong_shape", checkpoint_wrong_shape, (CheckpointError, r"k4\.0\.weight: checkpoint \(4, 4, 5, 5\)")),
    ("checkpoint_not_a_state_dict", checkpoint_not_a_state_dict, (CheckpointError, r"no state_dict")),
    ("checkpoint_module_prefix_loads", checkpoint_roundtrip_module_prefix, OK),
    ("checkpoint_pickle_runs_no_code", checkpoint_pickle_runs_no_code, OK),
    ("two_threads_cpu_kernels", two_threads_cpu_kernels, OK),
    ("cpu_gate_special_values", cpu_gate_special_values, OK),
]


@pytest.mark.parametrize("name,fn,expected", CASES, ids=[c[0] for c in CASES])
def test_robustness(name, fn, expected, tmp_path):
    import inspect

    args = (tmp_path,) if inspect.signature(fn).parameters else ()
    if expected == OK:
        fn(*args)
    else:
        exc_type, pattern = expected
        with pytest.raises(exc_type, match=pattern or None):  # "": the reference's own message
            fn(*args)


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_training_batchnorm_ops_refuse_a_non_positive_eps(eps, backend):
    """A training BatchNorm divides by sqrt(var + eps) and a constant channel has var 0: every fused op
    with one refuses eps <= 0 (as ATen's batch_norm does) and NaN, naming the op and the argument."""
    from scnet_fused import ops

    t = torch.randn(2, 3, 8, 8)
    t[:, 1] = 5.0  # a constant channel
    w, b = torch.ones(3), torch.zeros(3)
    small = torch.randn(2, 3, 2, 2)
    calls = {
        "bn_relu_train": lambda e: ops.bn_relu_train(t, w, b, e),
        "bn_add_relu_train": lambda e: ops.bn_add_relu_train(t, w, b, t.clone(), e),
        "bn_relu_cat_train": lambda e: ops.bn_relu_cat_train(t, w, b, t, w, b, 1e-5, e),
        "sc_gate_bn_train": lambda e: scnet_fused.sc_gate_bn_train(t, small, t, w, b, e),
        "sc_gate_bn2_train": lambda e: scnet_fused.sc_gate_bn2_train(t, small, t, w, b, 1e-5, w, b, e),
    }
    with scnet_fused.backend(backend):
        for name, call in calls.items():
            call(1e-5)  # fine
            with pytest.raises(ValueError, match=f"{name}: (small_)?eps(_b)? must be positive"):
                call(eps)


@pytest.mark.parametrize("dtype,backend", [(torch.float64, "auto"), (torch.float32, "reference")]
                         + [(torch.float32, b) for b in backends_here() if b == "cpu"])
def test_gate_bn_ops_without_channels(dtype, backend):
    """C = 0: empty outputs and gradients on every CPU path (the reference path raised ATen's upsampling
    error, and the pooled branch's BatchNorm backward, ATen's, a floating-point exception)."""
    x = torch.randn(2, 0, 8, 8, dtype=dtype, requires_grad=True)
    small = torch.randn(2, 0, 2, 2, dtype=dtype, requires_grad=True)
    w, b = torch.ones(0, dtype=dtype, requires_grad=True), torch.zeros(0, dtype=dtype, requires_grad=True)
    with scnet_fused.backend(backend):
        y, mean, var = scnet_fused.sc_gate_bn_train(x, small, x, w, b)
        y2, *stats = scnet_fused.sc_gate_bn2_train(x, small, x, w, b, 1e-5, w, b, 1e-5)
        g = scnet_fused.sc_gate(x, small, x)
    assert y.shape == y2.shape == g.shape == (2, 0, 8, 8) and mean.shape == var.shape == (0,)
    assert all(s.shape == (0,) for s in stats)
    (y.sum() + y2.sum() + g.sum()).backward()
    assert x.grad.shape == x.shape and small.grad.shape == small.shape and w.grad.shape == (0,)


@pytest.mark.parametrize("glue", [True, False], ids=["cpp", "python"])
def test_half_running_variance_moves_by_a_finite_step(glue, monkeypatch):
    """A float16 BatchNorm whose batch variance is above 65504 (a float16 infinity): ATen updates the
    running variance in float32 and rounds once, so it stays finite; the fused update does the same
    (through the C++ helper and the Python fallback)."""
    from scnet_fused import modules

    if not glue:
        monkeypatch.setattr(modules, "cpp_glue", lambda *a: False)
    t = (torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 400).half()
    bn_ref = nn.BatchNorm2d(3).half()
    bn = copy.deepcopy(bn_ref)
    torch.relu(bn_ref(t))
    modules._bn_relu_of(bn, nn.ReLU(), t)
    assert bool(torch.isfinite(bn_ref.running_var).all()) and float(bn_ref.running_var.min()) > 1e4
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=2e-3, atol=0)
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=2e-3, atol=0.05)
    assert int(bn.num_batches_tracked) == int(bn_ref.num_batches_tracked) == 1


def _state_after_error(model, x, match):
    with pytest.raises(ValueError, match=match):
        model(x)
    return model.state_dict()


def _outcome_of_eps_zero(model, x):
    """A training forward with a BatchNorm's eps at 0: ATen refuses it from torch 2.10 on (ValueError,
    "... eps must be positive ..."; the words vary by version); torch 2.9 runs it. (None, state) for the
    error, else (output, state)."""
    try:
        y = model(x)
    except ValueError as exc:
        assert "eps must be positive" in str(exc), exc
        return None, copy.deepcopy(model.state_dict())
    return y.detach(), copy.deepcopy(model.state_dict())


def _assert_same_outcome(got, want):
    """The fused model did what the reference did: the same error, or the same output; the same state."""
    assert (got[0] is None) == (want[0] is None), ("fused", got[0] is None, "reference", want[0] is None)
    if want[0] is not None:
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5, equal_nan=True)
    _assert_same_state(got[1], want[1])


def _assert_same_state(got, want):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("block", ["scconv", "bottleneck"])
def test_k3_changing_the_size_errs_with_the_references_side_effects(block):
    """A padding other than the dilation makes k3's output larger than x: the fused SCConv refuses it
    with a clear error before the gate, and its norms have counted the batch as the reference's have
    (the reference runs k2 and k3 in full and fails at the product); in a bottleneck k1's too."""
    if block == "scconv":
        ref = R.SCConv(8, 8, stride=1, padding=2, dilation=1, groups=1, pooling_r=4, norm_layer=nn.BatchNorm2d)
    else:
        ref = R.SCBottleneck(16, 4, norm_layer=nn.BatchNorm2d)
        ref.scconv.k3[0].padding = (2, 2)
    randomize_norms(ref)
    fused = scnet_fused.convert(ref)
    x = torch.randn(2, ref.conv1_a.in_channels if block == "bottleneck" else 8, 12, 12)
    with pytest.raises(RuntimeError):  # the reference: the product's size mismatch
        ref.train()(x)
    with pytest.raises(ValueError, match="k3 changed the spatial size"):
        fused.train()(x)
    _assert_same_state(fused.state_dict(), ref.state_dict())
    assert fused.state_dict() != {} and any(
        k.endswith("num_batches_tracked") and v.item() == 1 for k, v in fused.state_dict().items())


@pytest.mark.parametrize("where", ["k2", "k3", "k4", "k1", "bn1_a", "bn3"])
def test_training_eps_of_zero_errs_with_the_references_side_effects(where):
    """eps = 0 in a training BatchNorm of a fused bottleneck: ATen's error, and afterwards the same state
    as the reference's (the BatchNorms before it have counted the batch, it has bumped its counter),
    also where the fused code updates that BatchNorm together with another one. (Before torch 2.10 ATen
    runs it: then the reference's output and state.)"""
    ref = R.SCBottleneck(16, 4, norm_layer=nn.BatchNorm2d).train()
    fused = scnet_fused.convert(ref)
    x = torch.randn(2, 16, 16, 16)
    outcomes = []
    for model in (ref, fused):
        norm = {"k2": model.scconv.k2[2], "k3": model.scconv.k3[1], "k4": model.scconv.k4[1],
                "k1": model.k1[1]}.get(where)
        (norm if norm is not None else getattr(model, where)).eps = 0.0
        # (torch 2.11 words it "batch_norm eps must be positive, but got 0.0", 2.14 "... during training")
        outcomes.append(_outcome_of_eps_zero(model, x))
    if _release(torch.__version__) >= (2, 10):
        assert outcomes[0][0] is None, "ATen ran a training BatchNorm with eps = 0"
    _assert_same_outcome(outcomes[1], outcomes[0])


@pytest.mark.parametrize("pair", [("k1", "k2"), ("k1", "k3"), ("k1", "k4"), ("k2", "k3"), ("bn1_a", "bn1_b"),
                                  ("bn1_b", "k4")])
@pytest.mark.parametrize("how", ["module", "buffers"])
def test_a_batchnorm_shared_by_two_places_counts_in_the_references_order(pair, how):
    """One BatchNorm module serving two places of a bottleneck, or two BatchNorms holding the same
    running-statistics tensors: the statistics take the batches in the order the reference runs the
    places (the fused paths run some in another order, k1's norm after the SCConv, say), so the fused
    modules take the reference computation there. The outputs, gradients and every buffer after three
    training steps and an eval step are the reference's."""
    torch.manual_seed(0)
    ref = R.SCBottleneck(32, 8, norm_layer=nn.BatchNorm2d)
    randomize_norms(ref)
    places = {"bn1_a": (ref, "bn1_a"), "bn1_b": (ref, "bn1_b"), "k1": (ref.k1, "1"), "k2": (ref.scconv.k2, "2"),
              "k3": (ref.scconv.k3, "1"), "k4": (ref.scconv.k4, "1")}
    (owner_a, key_a), (owner_b, key_b) = places[pair[0]], places[pair[1]]
    if how == "module":
        owner_b._modules[key_b] = owner_a._modules[key_a]
    else:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            owner_b._modules[key_b]._buffers[name] = owner_a._modules[key_a]._buffers[name]
    fused = scnet_fused.convert(ref)
    x = torch.randn(2, 32, 13, 14)
    for mode in (True, True, True, False):
        ref.train(mode), fused.train(mode)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yf = ref(xr), fused(xf)
        torch.testing.assert_close(yf, yr, rtol=1e-4, atol=1e-5)
        g = torch.randn_like(yr)
        torch.testing.assert_close(torch.autograd.grad(yf, xf, g)[0], torch.autograd.grad(yr, xr, g)[0],
                                   rtol=1e-4, atol=1e-5)
        _assert_same_state(fused.state_dict(), ref.state_dict())


@pytest.mark.parametrize("case", ["shared k1/k3", "eps 0 in k3"])
def test_eval_model_with_training_batchnorms_keeps_the_references_state(case, monkeypatch):
    """Test-time adaptation: the model in eval mode, its BatchNorms training. A shared BatchNorm, or a
    training eps of 0, still sends the fused bottleneck to the reference computation (the check looks at
    the BatchNorms, not the module's own mode), with and without autograd."""
    from scnet_fused import modules

    monkeypatch.setattr(modules, "BOTTLENECK_INFERENCE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(modules, "SCCONV_INFERENCE_MIN_ELEMENTS", 0)
    torch.manual_seed(0)
    ref = R.SCBottleneck(32, 8, norm_layer=nn.BatchNorm2d)
    randomize_norms(ref)
    if case == "shared k1/k3":
        ref.scconv.k3[1] = ref.k1[1]
    fused = scnet_fused.convert(ref)
    x = torch.randn(2, 32, 13, 14)
    for model in (ref, fused):
        model.eval()
        for b in model.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.train()
        if case == "eps 0 in k3":
            model.scconv.k3[1].eps = 0.0
    outcomes = []
    for model in (ref, fused):
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                if case == "eps 0 in k3":
                    outcomes.append(_outcome_of_eps_zero(model, x))
                else:
                    outcomes.append((model(x).detach(), copy.deepcopy(model.state_dict())))
    for got, want in zip(outcomes[2:], outcomes[:2]):
        _assert_same_outcome(got, want)


def test_an_error_inside_the_scconv_leaves_the_references_state():
    """A training batch whose pooled map has one value per channel (N = 1, 4x4 maps): BatchNorm2d's
    error from k2, and the fused bottleneck's state afterwards is the reference's, k1's BatchNorm
    (which the reference runs before its SCConv) having counted the batch."""
    ref = R.SCBottleneck(16, 4, norm_layer=nn.BatchNorm2d).train()
    fused = scnet_fused.convert(ref)
    x = torch.randn(1, 16, 4, 4)
    want = _state_after_error(ref, x, "Expected more than 1 value per channel")
    got = _state_after_error(fused, x, "Expected more than 1 value per channel")
    assert int(got["k1.1.num_batches_tracked"]) == 1
    _assert_same_state(got, want)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", backends_here())
def test_a_finite_value_whose_square_overflows_gives_atens_batchnorm(backend, channels_last):
    """One value of 3e19 in a channel: its float32 square overflows, and ATen's float32 variance is
    +inf, so its BatchNorm gives the bias across the channel (finite). The fused statistics once called
    that channel non-finite and made all of it NaN; now the variance is +inf as ATen's, the other
    channel is unaffected, and the outputs are ATen's."""
    from scnet_fused import ops

    g = torch.Generator().manual_seed(4)
    t = torch.randn(2, 2, 8, 8, generator=g)
    t[0, 0, 3, 5] = 3e19
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    w, b = torch.tensor([1.0, 0.7]), torch.tensor([0.5, -0.2])
    want = torch.relu(nn.functional.batch_norm(t, None, None, w, b, training=True))
    x, small = torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 2, 2, 2, generator=g)
    with scnet_fused.backend(backend):
        y, mean, var = ops.bn_relu_train(t, w, b, 1e-5)
        y2, _, var2 = scnet_fused.sc_gate_bn_train(x, small, t, w, b)
    assert float(var[0]) == float(var2[0]) == float("inf") and bool(torch.isfinite(mean).all())
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert not bool(y2.isnan().any())
    if backend != "cpu":
        return  # (values near the float32 maximum overflow their float32 sums: NaN, documented)
    # Two values of 2e38 in one vector lane (flat positions 1 and 17): the float32 partial sums overflow,
    # the channel is still finite. The CPU kernels give a finite mean and variance +inf, so the channel's
    # output is its bias, as ATen's NCHW kernel gives (its channels_last kernel's float32 mean overflows
    # to inf and its output is NaN); the other channel is ATen's.
    t2 = torch.randn(2, 2, 8, 8, generator=g)
    t2[0, 0, 0, 1] = t2[0, 0, 2, 1] = 2e38
    t2 = t2.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    want2 = torch.relu(nn.functional.batch_norm(t2, None, None, w, b, training=True))
    with scnet_fused.backend(backend):
        y3, mean3, var3 = ops.bn_relu_train(t2, w, b, 1e-5)
    assert float(var3[0]) == float("inf") and bool(torch.isfinite(mean3).all())
    assert torch.equal(y3[:, 0], torch.full_like(y3[:, 0], 0.5))
    torch.testing.assert_close(y3[:, 1], want2[:, 1], rtol=1e-5, atol=1e-5)
