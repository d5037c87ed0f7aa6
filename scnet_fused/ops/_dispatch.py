"""Backend selection for the fused ops.

Every backend provides the same kernel-level primitives (no autograd, no torch.library):

``gate_forward(x, small, k3, scale, shift, small_scale=None, small_shift=None) -> y``
    ``y = (k3 * scale[c] + shift[c]) * sigmoid(x + small[n, c, ri(i), ci(j)])`` with the nearest
    index maps ``ri``/``ci`` of :mod:`scnet_fused._index`; ``scale``/``shift`` are float32 ``[C]`` or
    None (identity). ``y`` has x's dtype and memory format. ``small_scale``/``small_shift`` (float32
    ``[C]``, a missing one 1 or 0; every gate primitive below takes them last): the pooled branch's
    affine, each value read from small becomes ``small * small_scale[c] + small_shift[c]`` (one fused
    multiply-add in float32), and ``dsmall`` is the gradient of that affine's output.
``gate_backward(dy, x, small, k3, scale, shift, center, need_dk3) -> (dx, dsmall, dk3|None, sum_g, sum_gk)``
    one pass: ``s = sigmoid(x + up(small))``, ``g = dy * s``, ``dx = dy * affine(k3) * s * (1 - s)``,
    ``dsmall`` = the upsampling adjoint of dx (cell sums, accumulated in float32), ``dk3 = g * scale``
    when ``need_dk3``, and float32 per-channel sums ``sum_g = sum g``,
    ``sum_gk = sum g * (k3 - center)`` (center float32 ``[C]`` or None for 0); with ``need_sums=False``
    (keyword, after the pooled branch's affine) both are empty and may go uncomputed.
``gate_backward_k3(dy, x, small, k3, p, q, r) -> dk3``
    ``dk3 = p[c] * g + q[c] * k3 + r[c]`` (the input gradient of a training-mode BatchNorm on k3).
``channel_stats(t) -> (mean, var)``
    per-channel mean and biased variance over N, H, W, float32.
``avgpool(x, r) -> y``
    the ``r x r``, stride-``r`` average pool: ``y`` is ``(N, C, H // r, W // r)`` (trailing rows and
    columns dropped) in x's dtype and memory format.
``avgpool_backward(dy, H, W, r, channels_last) -> dx``
    ``dx`` ``(N, C, H, W)``: ``dy / r**2`` spread over each window, 0 in the dropped rows and columns;
    channels_last or contiguous as asked.
``affine_relu(t, scale, shift) -> y``
    ``y = relu(t * scale[c] + shift[c])`` (NaN propagates), float32 ``[C]`` scale / shift; t's dtype and
    memory format.
``affine_add_relu(t, residual, scale, shift) -> y``
    ``y = relu(t * scale[c] + shift[c] + residual)``: a BatchNorm, a residual addition and a ReLU (the end
    of a bottleneck); residual of t's shape and dtype (read in t's memory format), y like t.
``affine_relu_out(t, scale, shift, out) -> out``
    the same written into ``out``: t's shape and dtype, dense in t's memory format or a channel slice
    ``buf[:, c0:c0 + C]`` of such a tensor (one half of a concatenation), written in place.
``affine_relu_backward_sums(dy, t, scale, shift, center) -> (sum_g, sum_gc)``
    ``g = dy`` where ``not (t * scale + shift <= 0)`` else 0; float32 per-channel ``sum g`` and
    ``sum g * (t - center)``. Here and in ``affine_relu_backward_apply`` dy may be such a channel slice
    (the compiled and Triton backends read it in place; any other strides are copied first).
``affine_relu_backward_apply(dy, t, scale, shift, p, q, r) -> dt``
    ``dt = p[c] * g + q[c] * t + r[c]`` (the input gradient of a training-mode BatchNorm before a ReLU).

The ``cpu`` backend has seven more primitives:

``add_channel_affine_(d, t, q, r) -> d``
    ``d += q[c] * t + r[c]`` in place (d dense in t's memory format). With ``d = g * scale`` from
    ``gate_backward(..., need_dk3=True)`` this is ``gate_backward_k3`` without its second sigmoid pass
    (what ``gate_bn_train_backward`` does for float32 where it does not go channel by channel).
``bn_relu_train_out(t, weight, bias, eps, out) -> (mean, var)``
    ``channel_stats``, BatchNorm folded to ``scale``, ``shift`` (``bn_fold``) and ``affine_relu_out``
    in one call; the same statistics bit for bit.
``bn_relu_train_backward(dy, t, weight, bias, mean, var, eps) -> (dt, dweight, dbias)``
    the fold, ``affine_relu_backward_sums``, the per-channel algebra (``dweight = sum_gc * invstd``,
    ``dbias = sum_g``, BatchNorm's ``p = scale``, ``q = -scale * invstd * dweight / M``,
    ``r = -q * mean - scale * sum_g / M``, ``M = N * H * W``) and ``affine_relu_backward_apply`` in one
    call; float32 dweight and dbias.

``bn_add_relu_train_forward(t, residual, weight, bias, eps) -> (y, mean, var)``
    ``channel_stats``, the fold and ``affine_add_relu`` in one call; the same statistics bit for bit.
``bn_add_relu_train_backward(dy, y, t, weight, bias, mean, var, eps) -> (dt, dweight, dbias, dresidual)``
    ``g = dy`` where not ``y <= 0`` (the output's mask; ``dresidual = g``), BatchNorm's sums of g and
    its input gradient from them, in one call; float32 dweight and dbias.
``gate_bn_train_forward(x, small, k3, weight, bias, eps) -> (y, mean, var)``
    ``channel_stats(k3)``, the fold and ``gate_forward`` in one call; the same bits.
``gate_bn_train_backward(dy, x, small, k3, weight, bias, mean, var, eps) -> (dx, dsmall, dk3, dweight, dbias)``
    the input gradients of ``sc_gate_bn_train`` in one call: the fold, ``gate_backward`` (its sums
    with ``center = mean``), the same per-channel algebra and ``dk3 = scale * g + q * k3 + r``; float32
    dweight and dbias.

On NCHW tensors the last four work channel by channel, so the second read of each channel's data
comes from cache.

Inputs reach a backend already checked (see ``scnet_fused.ops.sc_gate``): 4-D x, k3 (same shape,
dtype, device and memory format: contiguous or channels_last), small ``(N, C, h, w)`` contiguous in
the same dtype, float64 only on the reference backend.

Backends: ``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``cuda`` and ``cpu``
(the compiled extension ``scnet_fused._C``), ``reference`` (ATen). ``auto`` picks, per device, the
preferred one available (CUDA tensors: triton, then cuda; CPU tensors: cpu); an unavailable backend falls back with one warning; forcing one that cannot
run the given tensors is an error.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import threading
import warnings
from typing import Optional

import torch
import torch.fx

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
_ENV = "SCNET_FUSED_BACKEND"


class _State(threading.local):
    """Per thread: the stack of backends forced by :func:`backend` blocks."""

    def __init__(self):
        self.stack = []


_state = _State()
_warned: set = set()
_module_cache: dict = {}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not built, not installed, or wrong device)."""


def _validate(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown scnet_fused backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def requested() -> str:
    """The backend asked for: the innermost ``backend(...)`` context, else $SCNET_FUSED_BACKEND, else auto."""
    stack = _state.stack
    if stack:
        return stack[-1]
    env = os.environ.get(_ENV, "").strip()
    return _validate(env) if env else "auto"


@contextlib.contextmanager
def backend(name: str):
    """Force a backend inside a ``with`` block: ``with scnet_fused.backend("triton"): ...``."""
    name = _validate(name)
    stack = _state.stack
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _release(version: str) -> tuple:
    """(major, minor) of a version string such as '3.6.0' or '2.4.0rc1'."""
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def interpreter_problem() -> Optional[str]:
    """Why Triton's interpreter cannot run these kernels here, or None.

    Before triton 3.7 the interpreter turns a tensor used as a loop bound into an int with ``int()`` of a
    one-element array, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"): every kernel with a loop over loaded or computed bounds fails.
    """
    try:
        import numpy
        import triton
    except ImportError:
        return None
    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        return (f"the Triton interpreter of triton {triton.__version__} cannot run these kernels with numpy "
                f"{numpy.__version__} (it converts tensors to int in a way numpy 2.4 refuses; fixed in "
                f"triton 3.7): install 'numpy<2.4' or triton >= 3.7")
    return None


def _load(name: str):
    """Import a backend's primitives module, or return the reason it is unavailable (a str)."""
    if name in _module_cache:
        return _module_cache[name]
    result: object
    try:
        if name == "reference":
            result = importlib.import_module("scnet_fused.reference")
        elif name == "triton":
            result = importlib.import_module("scnet_fused.triton.sc_gate")
        else:
            from . import _cpp

            reason = _cpp.unavailable_reason(name)
            result = reason if reason else _cpp.Primitives(name)
    except Exception as exc:  # ImportError of triton, a broken extension, ...
        result = f"{type(exc).__name__}: {exc}"
    _module_cache[name] = result
    return result


def available(name: str) -> Optional[str]:
    """None when ``name`` is usable on this machine, else the reason it is not."""
    mod = _load(_validate(name))
    return mod if isinstance(mod, str) else None


def _device_ok(name: str, device: torch.device) -> Optional[str]:
    if name == "reference":
        return None
    if name == "cpu":
        return None if device.type == "cpu" else f"the cpu backend needs CPU tensors, got {device}"
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device}"
        from . import _cpp

        return _cpp.cuda_device_problem(device)
    if name == "triton":
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return interpreter_problem()
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device}"
    return f"no backend {name}"


def _usable(name: str, device: torch.device):
    """Backend ``name``'s primitives for ``auto`` on ``device``, or why it cannot run there (a str): the
    cuda backend also needs a GPU that loads its kernels (one older than every architecture of the build
    does not: ``auto`` goes on to the next backend)."""
    mod = _load(name)
    if name == "cuda" and not isinstance(mod, str):
        return _device_ok(name, device) or mod
    return mod


def _auto_order(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float64:
        return ("reference",)
    kind = device.type
    if kind == "cuda":
        # Triton first: its kernels are the ones whose exact semantics the CPU test suite runs (under
        # the interpreter); the CUDA extension is selected explicitly (backend("cuda")) until it is
        # measured faster on the device.
        return ("triton", "cuda", "reference")
    if kind == "cpu":
        return ("cpu", "reference")
    return ("reference",)


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _compile_errors() -> tuple:
    """Triton's errors for a kernel that cannot be built on this device (not for wrong results)."""
    errs = []
    try:
        from triton.compiler.errors import CompilationError

        errs.append(CompilationError)
        from triton.runtime import errors as runtime_errors

        errs += [getattr(runtime_errors, n) for n in ("OutOfResources", "PTXASError") if hasattr(runtime_errors, n)]
    except ImportError:
        pass
    return tuple(errs)


class _DropOnCompileError:
    """A JIT-compiled backend chosen by ``auto``: if one of its kernels cannot be compiled on this
    device, the backend is marked unavailable (one warning naming the error) and the call is
    retried on the next backend in ``auto``'s order. Forced backends are never wrapped."""

    def __init__(self, name, mod, device, dtype):
        from ..triton._common import GridLimitError

        self._name, self._mod, self._device, self._dtype = name, mod, device, dtype
        self._grid_error = GridLimitError

    def __getattr__(self, attr):
        fn = getattr(self._mod, attr)
        errors = _compile_errors()

        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except self._grid_error as exc:
                # Too large for one Triton launch grid (decided before any launch): this call alone runs
                # on the next backend, the backend stays.
                nxt_name, nxt = _after(self._name, self._device, self._dtype)
                _warn_once(f"grid:{self._name}:{attr}",
                           f"scnet_fused: {exc}; this call runs on the {nxt_name} backend")
                return getattr(nxt, attr)(*args, **kwargs)
            except errors as exc:
                reason = f"its kernels failed to compile here ({type(exc).__name__}: {str(exc).strip()[:300]})"
                _module_cache[self._name] = reason
                warnings.warn(f"scnet_fused: backend {self._name} dropped, {reason}; falling back",
                              RuntimeWarning, stacklevel=2)
                _, nxt = _after(self._name, self._device, self._dtype)
                return getattr(nxt, attr)(*args, **kwargs)

        return call


def _after(name: str, device: torch.device, dtype: torch.dtype):
    """``(name, primitives_module)`` of the first available backend after ``name`` in ``auto``'s order."""
    order = _auto_order(device, dtype)
    for cand in order[order.index(name) + 1:]:
        mod = _usable(cand, device)
        if not isinstance(mod, str):
            return cand, mod
    raise BackendUnavailable(f"no scnet_fused backend after {name} can run {device} tensors")  # pragma: no cover


def register_autograd(op, backward, setup_context) -> None:
    """``op.register_autograd(backward, setup_context=setup_context)``, the backward run under the backend
    the forward was asked for (the innermost :func:`backend` block or $SCNET_FUSED_BACKEND, recorded by
    the forward): a forward inside ``with backend("reference")`` has its backward on that backend too,
    wherever ``.backward()`` is called, as the compiled ops' C++ autograd nodes do."""

    def setup(ctx, inputs, output):
        ctx.scnet_backend = requested()
        setup_context(ctx, inputs, output)

    def run(ctx, *grads):
        with backend(ctx.scnet_backend):
            return backward(ctx, *grads)

    op.register_autograd(run, setup_context=setup)


def select(device: torch.device, dtype: torch.dtype):
    """Return ``(name, primitives_module)`` for tensors on ``device`` of ``dtype``."""
    name = requested()
    if name != "auto":
        bad = _device_ok(name, device)
        if bad is None and dtype == torch.float64 and name != "reference":
            bad = f"the {name} backend has no float64 kernels (use the reference backend)"
        if bad is None:
            mod = _load(name)
            if isinstance(mod, str):
                bad = f"the {name} backend is unavailable: {mod}"
            else:
                return name, mod
        raise BackendUnavailable(f"scnet_fused backend {name!r} was requested but cannot run: {bad}")
    order = _auto_order(device, dtype)
    skipped = []
    for i, cand in enumerate(order):
        mod = _usable(cand, device)
        if isinstance(mod, str):
            skipped.append(f"{cand}: {mod}")
        else:
            if i > 0 and cand == "reference" and dtype != torch.float64:
                _warn_once(f"{device.type}", f"scnet_fused: no fused backend for {device.type} tensors "
                           f"({'; '.join(skipped)}); using the reference backend")
            elif i > 0:
                _warn_once(f"{device.type}:{cand}", f"scnet_fused: backend {order[0]} unavailable "
                           f"({_load(order[0])}); using {cand}")
            if cand == "triton" and not triton_interpreted():
                return cand, _DropOnCompileError(cand, mod, device, dtype)
            return cand, mod
    raise BackendUnavailable(f"no scnet_fused backend can run {device} tensors")  # pragma: no cover


def one_call(prims, t: torch.Tensor) -> bool:
    """Whether the training-mode BatchNorm ops run as one call per direction: the ``cpu`` backend's
    ``bn_relu_train_out`` / ``bn_relu_train_backward`` and ``gate_bn_train_forward`` /
    ``gate_bn_train_backward``, instead of the passes with the per-channel algebra between them in
    ATen. The compiled twins are in ``csrc/autograd.cpp``."""
    return getattr(prims, "name", None) == "cpu" and t.device.type == "cpu"


_CPP_AUTOGRAD_BACKENDS = ("cpu", "cuda")
_CPP_AUTOGRAD_ENV = "SCNET_FUSED_CPP_AUTOGRAD"  # "0": always the torch.library ops (debugging)


# The predicates below run on every public call and every fused convolution, between kernels that
# evict the caches: bound once, they touch few objects.
_is_tracing = torch._C._is_tracing  # torch.jit.is_tracing() in eager Python
_functorch_fn = getattr(torch._C, "_are_functorch_transforms_active", None)
_forward_ad = torch.autograd.forward_ad
# CPython keeps os.environ in a dict of encoded keys: testing a key there is one hash probe, where
# os.environ.get encodes the key and decodes the value. None on another Python: os.environ.get.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEYS = {name: os.environ.encodekey(name) for name in (_ENV, _CPP_AUTOGRAD_ENV)}  # type: ignore
except AttributeError:
    _ENV_DATA = None


def _env_set(name: str) -> bool:
    """Whether environment variable ``name`` ($SCNET_FUSED_BACKEND or $SCNET_FUSED_CPP_AUTOGRAD) is set."""
    if _ENV_DATA is None:
        return name in os.environ
    return _ENV_KEYS[name] in _ENV_DATA


def _functorch_active() -> bool:
    return _functorch_fn is not None and bool(_functorch_fn())


def _forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``): the custom ops,
    the C++ autograd nodes and the Winograd convolution have no forward derivative."""
    return getattr(_forward_ad, "_current_level", -1) >= 0


@torch.compiler.assume_constant_result
def exporting() -> bool:
    """Whether torch.export (strict or not, and the ONNX exporter built on it) is recording this call;
    False in eager and under torch.compile. ``torch.compiler.is_exporting()`` alone says True under
    torch.compile too before torch 2.14: dynamo replaced the call with a constant True while tracing
    (pytorch/pytorch#176347, fixed in #176499), so a compiled graph took the export paths (no
    ``scnet_fused::conv3x3`` graph op, no channels_last maps). Here dynamo runs the function for real
    while tracing and keeps its result as a constant of the graph (``assume_constant_result``), so it
    reads the flag that export sets. (torch 2.6 has no ``is_exporting``: False there.)"""
    flag = getattr(torch.compiler, "is_exporting", None)
    return bool(flag()) if flag is not None else False


def fx_symbolic(x) -> bool:
    """Whether ``x`` is a ``torch.fx`` symbolic-tracing Proxy. The fused modules then record the reference
    computation: a graph of standard modules and functions, the published model's, which FX tools
    (feature extraction, quantization, graph rewrites) read. A tracer that keeps a fused module as a
    leaf never gets here: its graph calls the module, which runs fused."""
    return isinstance(x, torch.fx.Proxy)


def fx_record(fn, outputs: int, *args):
    """``fn(*args)`` recorded as one node of the torch.fx graph being traced (the first Proxy among
    ``args`` names the tracer): a public op called on a Proxy, whose input checks cannot run on one. The
    graph calls the op when it runs, fused, with its checks. ``outputs``: 1 for an op returning a
    tensor, else the length of the tuple it returns, given back as a tuple of Proxies (so that
    ``y, *_ = op(...)`` and ``op(...)[0]`` trace as they run)."""
    tracer = next(a.tracer for a in args if isinstance(a, torch.fx.Proxy))
    out = tracer.create_proxy("call_function", fn, args, {})
    return out if outputs == 1 else tuple(out[i] for i in range(outputs))


def standard_ops_only() -> bool:
    """Whether this call should run in standard PyTorch operators instead of the custom ops
    (:mod:`scnet_fused.ops._plain` for the ops; the fused modules run the reference computation):
    while ``torch.jit.trace`` or an ONNX export (either exporter) records it, so that the result runs
    without this package, inside a ``torch.func`` transform (grad, vjp, jacrev, vmap, ...), which
    the custom ops' autograd does not support, and while a forward-mode AD level is open
    (``torch.autograd.forward_ad``: dual tensors get their tangents through the standard operators).
    torch.compile and torch.export keep the custom ops. Cheap to rule out in eager."""
    if torch.compiler.is_compiling():
        return torch.onnx.is_in_onnx_export()
    return _is_tracing() or _functorch_active() or _forward_ad_active()


def _plain_eager(*tensors: torch.Tensor) -> bool:
    """Plain eager PyTorch on real tensors: not under torch.compile / torch.export, no tensor subclass
    (nn.Parameter aside), no functorch transform, no forward-mode AD level open, and
    ``SCNET_FUSED_CPP_AUTOGRAD`` is not "0"."""
    if torch.compiler.is_compiling():  # first: under tracing nothing below is evaluated
        return False
    return _cpp_allowed(tensors) and not _functorch_active() and not _forward_ad_active()


def _cpp_allowed(tensors) -> bool:
    """Real tensors (no subclass, nn.Parameter aside) and ``SCNET_FUSED_CPP_AUTOGRAD`` not "0"."""
    for t in tensors:
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return False
    return not _env_set(_CPP_AUTOGRAD_ENV) or os.environ.get(_CPP_AUTOGRAD_ENV, "1").strip() != "0"


def cpp_glue(*tensors: torch.Tensor) -> bool:
    """Whether an eager call can take a C++ op that runs no backend kernel (``_relu_cat_ag`` and the
    modules' BatchNorm helpers: ATen ops on any device), under the conditions of :func:`cpp_autograd`
    other than the backend."""
    if not _plain_eager(*tensors):
        return False
    from . import _cpp

    return _cpp.has_glue_ops()


def cpp_autograd(x: torch.Tensor) -> bool:
    """Whether an eager call on ``x`` can take the C++ autograd ops (``csrc/autograd.cpp``).

    Yes when the backend chosen for x is a compiled one (cpu or cuda) and the call is plain eager
    PyTorch on a real tensor: not under torch.compile / torch.export (they keep the torch.library
    custom ops as graph nodes), not a tensor subclass (fake, functional, ...), no functorch transform,
    not an empty tensor, and ``SCNET_FUSED_CPP_AUTOGRAD`` is not "0". Same kernels and results either
    way; the C++ path just skips the Python autograd and dispatch layers.
    """
    return _plain_eager(x) and _cpp_backend(x)


def _cpp_backend(x: torch.Tensor) -> bool:
    """The part of :func:`cpp_autograd` after :func:`_plain_eager`: a non-empty tensor, not float64,
    whose backend is a compiled one with the autograd ops built."""
    if _plain_cpu_call(x):
        return True
    if x.numel() == 0 or x.dtype == torch.float64:
        return False
    try:
        name, _ = select(x.device, x.dtype)
    except BackendUnavailable:
        return False
    if name not in _CPP_AUTOGRAD_BACKENDS:
        return False
    return _has_autograd_ops()


PLAIN, CPP, OP = "plain", "cpp", "op"

_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_CPU = torch.device("cpu")


def _plain_cpu_call(x) -> bool:
    """What :func:`select` would answer without its warnings and loads, for the common eager call: a
    non-empty CPU tensor of a kernel dtype, no :func:`backend` block, $SCNET_FUSED_BACKEND not set (set
    to anything, ``select`` reads it), ``auto``'s first choice there (:func:`_auto_order`) the cpu
    backend, already loaded, with the C++ autograd ops, which :func:`_cpp_backend` then takes."""
    if not x.is_cpu or x.dtype not in _FAST_DTYPES or _state.stack or _env_set(_ENV) or x.numel() == 0:
        return False
    if _auto_order(_CPU, x.dtype)[0] != "cpu":
        return False
    prims = _module_cache.get("cpu")
    if prims is None or isinstance(prims, str):
        return False
    return _has_autograd_ops()


_autograd_ops: Optional[bool] = None


def _has_autograd_ops() -> bool:
    """``_cpp.has_autograd_ops()``, kept after the first answer (the extension's ops do not change)."""
    global _autograd_ops
    if _autograd_ops is None:
        from . import _cpp

        _autograd_ops = _cpp.has_autograd_ops()
    return _autograd_ops


def route(x) -> str:
    """Which path a public op's call on ``x`` takes, :func:`standard_ops_only` and :func:`cpp_autograd`
    in one call (the public ops ask both on every call): ``PLAIN`` (the standard operators),
    ``CPP`` (the C++ autograd op) or ``OP`` (the torch.library custom op)."""
    if standard_ops_only():
        return PLAIN
    if torch.compiler.is_compiling():
        return OP
    return CPP if _cpp_allowed((x,)) and _cpp_backend(x) else OP
