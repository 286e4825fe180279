"""Global-batch BatchNorm on CPU (gloo): the gradients and running statistics of N processes
equal those of one process holding the whole batch; the conversion keeps keys and shares
parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers import act_as_launcher, free_port
from torch import nn

from pretrain.models.syncbn import GlobalBatchNorm, convert_sync_batchnorm


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 5),
        nn.BatchNorm1d(5),
    )  # fmt: skip


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 3, 6, 6, generator=g) * 2 + 1, torch.randint(0, 5, (10,), generator=g)


def _worker(rank, world, port, shares, queue):
    act_as_launcher(rank, world, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = convert_sync_batchnorm(_net(), torch.device("cpu"))
        ddp = nn.parallel.DistributedDataParallel(net)
        x, y = _batch()
        lo, hi = sum(shares[:rank]), sum(shares[: rank + 1])  # shares may be uneven, or empty
        loss = nn.functional.cross_entropy(ddp(x[lo:hi]), y[lo:hi], reduction="sum")
        (loss * world / len(y)).backward()
        if rank == 0:
            grads = [p.grad.numpy().copy() for p in net.parameters()]
            stats = [b.numpy().copy() for n, b in net.named_buffers() if "running" in n]
            queue.put((grads, stats))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("shares", [[5, 5], [7, 3], [0, 10]])
def test_two_processes_equal_one_batch(shares):
    net = _net()
    x, y = _batch()
    nn.functional.cross_entropy(net(x), y).backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, shares, queue)) for r in range(2)]
    for p in procs:
        p.start()
    grads, stats = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    for g, p in zip(grads, net.parameters()):
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-5, atol=1e-6)
    ref = [b.numpy() for n, b in net.named_buffers() if "running" in n]
    for a, b in zip(stats, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_conversion_keeps_keys_and_shares_parameters():
    net = _net()
    keys, bn = list(net.state_dict()), net[1]
    conv = convert_sync_batchnorm(net, torch.device("cpu"))
    assert list(conv.state_dict()) == keys
    assert isinstance(conv[1], GlobalBatchNorm) and isinstance(conv[5], GlobalBatchNorm)
    assert conv[1].weight is bn.weight and conv[1].running_var is bn.running_var
    # without a process group (and in eval mode) it is plain BatchNorm
    x, _ = _batch()
    ref = _net()
    torch.testing.assert_close(conv(x), ref(x))
    conv.eval(), ref.eval()
    torch.testing.assert_close(conv(x), ref(x))
