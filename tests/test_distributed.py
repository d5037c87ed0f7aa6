"""Data-parallel training of the fused model: two `gloo` processes on the CPU (127.0.0.1 only),
DistributedDataParallel over the fused and the reference model from one init and the same per-rank
data, and SyncBatchNorm conversion of the fused model."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import scnet_fused
from scnet_fused import models
from scnet_fused.ops import available

BACKEND = "cpu" if available("cpu") is None else "reference"
WORLD = 2
STEPS = 2

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny(fused: bool):
    torch.manual_seed(0)  # every rank and both models: one init
    return models.build("scnet50", fused=fused, layers=(1, 1, 1, 1), num_classes=5)


def _rank_data(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(3, 3, 64, 64, generator=g), torch.randint(0, 5, (3,), generator=g)


def _train(model, rank):
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.002, momentum=0.5)
    losses = []
    for step in range(STEPS):
        x, y = _rank_data(rank, step)
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _worker(rank, world, port, out_dir, backend_name):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result = {}
    try:
        with scnet_fused.backend(backend_name):
            ref, fused = _tiny(False), _tiny(True)
            result["init_equal"] = all(torch.equal(a, b) for a, b in
                                       zip(ref.state_dict().values(), fused.state_dict().values()))
            result["ref_losses"] = _train(ref, rank)
            result["fused_losses"] = _train(fused, rank)
            result["ref_state"] = {k: v.clone() for k, v in ref.state_dict().items()}
            result["fused_state"] = {k: v.clone() for k, v in fused.state_dict().items()}

            # SyncBatchNorm: conversion keeps the fused SCConv, its norms become SyncBatchNorm.
            sync_f = nn.SyncBatchNorm.convert_sync_batchnorm(_tiny(True))
            sync_r = nn.SyncBatchNorm.convert_sync_batchnorm(_tiny(False))
            sc = sync_f.layer1[0].scconv
            result["sync_types"] = (type(sc).__module__ + "." + type(sc).__qualname__,
                                    [type(m).__name__ for m in (sc.k2[2], sc.k3[1], sc.k4[1])])
            # DistributedDataParallel refuses to wrap SyncBatchNorm modules on the CPU ("only work
            # with GPU modules"): record torch's answer, then run the converted modules themselves.
            for name, model in (("fused", sync_f), ("ref", sync_r)):
                try:
                    nn.parallel.DistributedDataParallel(model)
                    result[f"sync_ddp_{name}"] = None
                except Exception as exc:
                    result[f"sync_ddp_{name}"] = (type(exc).__name__, str(exc))
            x, _ = _rank_data(rank, 99)
            sync_f.eval(), sync_r.eval()
            with torch.no_grad():
                result["sync_eval"] = (sync_f(x), sync_r(x))
            # Training with a live process group: torch syncs the statistics only for GPU tensors.
            sync_f.train(), sync_r.train()
            for name, model in (("fused", sync_f), ("ref", sync_r)):
                try:
                    model(x)
                    result[f"sync_train_{name}"] = None
                except Exception as exc:  # torch's own refusal on CPU tensors
                    result[f"sync_train_{name}"] = (type(exc).__name__, str(exc))
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out), BACKEND), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ddp_fused_matches_reference(ddp_results):
    for rank, res in enumerate(ddp_results):
        assert res["init_equal"], f"rank {rank}: fused and reference start from different weights"
        torch.testing.assert_close(torch.tensor(res["fused_losses"]), torch.tensor(res["ref_losses"]),
                                   rtol=1e-4, atol=1e-5)
        # Two SGD steps on batches of 3 amplify float32 rounding differences somewhat: compare the
        # trained weights at 1e-4 of their scale.
        for k, v in res["ref_state"].items():
            torch.testing.assert_close(res["fused_state"][k], v, rtol=1e-3, atol=1e-4,
                                       msg=lambda m: f"rank {rank} {k}: {m}")


def test_ddp_parameters_identical_across_ranks(ddp_results):
    r0, r1 = ddp_results
    assert r0["fused_losses"] != r1["fused_losses"], "the ranks saw the same data"
    for which in ("fused_state", "ref_state"):
        model = _tiny(which == "fused_state")
        params = {n for n, _ in model.named_parameters()}
        for k in params:
            assert torch.equal(r0[which][k], r1[which][k]), f"{which} {k} differs across ranks"


def test_ddp_syncbatchnorm_conversion_and_eval(ddp_results):
    for res in ddp_results:
        cls, norms = res["sync_types"]
        assert cls == "scnet_fused.modules.SCConv"
        assert norms == ["SyncBatchNorm"] * 3
        out_f, out_r = res["sync_eval"]
        torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-4)


def test_ddp_syncbatchnorm_training_on_cpu(ddp_results):
    refusals = []
    for res in ddp_results:
        # The fused model fails (or not) exactly where torch's SyncBatchNorm does.
        for what in ("sync_ddp", "sync_train"):
            fused, ref = res[f"{what}_fused"], res[f"{what}_ref"]
            assert (fused is None) == (ref is None), (what, fused, ref)
            if fused is not None:
                assert fused[0] == ref[0] and "SyncBatchNorm" in fused[1], (what, fused, ref)
                refusals.append(ref[1])
    if refusals:
        pytest.skip("torch refuses SyncBatchNorm training on CPU tensors (DDP: "
                    + "; ".join(sorted(set(refusals))) + ")")


def test_syncbatchnorm_training_without_process_group_takes_generic_path():
    """Outside a process group SyncBatchNorm normalizes locally: the fused SCConv must run it as a
    module (the generic gate, not the fused BN-training gate) and match the reference."""
    assert not dist.is_initialized()
    ref = nn.SyncBatchNorm.convert_sync_batchnorm(_tiny(False)).train()
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(_tiny(True)).train()
    assert isinstance(fused.layer2[0].scconv, scnet_fused.SCConv)
    x, y = _rank_data(0, 0)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    with scnet_fused.backend(BACKEND):
        out_r = ref(xr)
        nn.functional.cross_entropy(out_r, y).backward()
        with torch.profiler.profile() as prof:
            out_f = fused(xf)
            nn.functional.cross_entropy(out_f, y).backward()
    ops = {e.name for e in prof.events() if e.name.startswith("scnet_fused::")}
    # the generic gate ran (on either eager path), never the BN-training one or its statistics
    assert ops & {"scnet_fused::sc_gate", "scnet_fused::_sc_gate_ag"}, ops
    assert not ops & {"scnet_fused::sc_gate_bn_train", "scnet_fused::_sc_gate_bn_train_ag",
                      "scnet_fused::sc_gate_bn2_train", "scnet_fused::_sc_gate_bn2_train_ag",
                      "scnet_fused::_channel_stats"}, ops
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)
    pr = dict(ref.named_parameters())
    for n, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, pr[n].grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    sr = ref.state_dict()
    for k, v in fused.state_dict().items():
        torch.testing.assert_close(v, sr[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
