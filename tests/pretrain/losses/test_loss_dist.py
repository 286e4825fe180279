"""Two gloo processes, each with half the batch, reproduce the one-process loss and gradients."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import act_as_launcher, free_port

from pretrain.dist import (
    all_gather_tensor,
    all_gather_with_grad,
    all_reduce_sum,
    cleanup,
    gather_batch_sizes,
    get_rank,
    get_world_size,
    init_distributed,
    known_batch_sizes,
)
from pretrain.losses.imsvd import IMSVDLoss

pytestmark = pytest.mark.dist

N, IN, D, B = 16, 12, 160, 16
CASES = [
    ("reference", True, {}),
    ("lean", False, {}),
    ("lean", True, {}),
    (
        "lean",
        True,
        {"ti_mode": "ce", "temperature": 0.5, "dia_coeff": 0.0, "off_coeff": 2.0},
    ),
]


def _problem():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(N, IN, generator=g)
    x2 = x1 + 0.3 * torch.randn(N, IN, generator=g)
    weight = 2.0 * torch.randn(IN, D, generator=g)
    return x1, x2, weight


def _loss_and_grad(impl, shard, kw, x1, x2, weight):
    w = weight.clone().requires_grad_()
    # Rows-per-block of one variable: several sweep blocks per rank.
    crit = IMSVDLoss(bin_size=B, impl=impl, shard=shard, block_elems=B * D, **kw)
    out = crit(x1 @ w, x2 @ w)
    out["loss"].backward()
    return {k: v.item() for k, v in out.items()}, w.grad


def _worker(rank, world, port, out_dir):
    act_as_launcher(rank, world, port)
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.backend) == (rank, world, "gloo")
    assert (get_rank(), get_world_size()) == (rank, world)
    results = {}
    x1, x2, weight = _problem()
    half = slice(rank * N // world, (rank + 1) * N // world)
    for i, (impl, shard, kw) in enumerate(CASES):
        values, grad = _loss_and_grad(impl, shard, kw, x1[half], x2[half], weight)
        grad = all_reduce_sum(grad) / world  # what DDP does with parameter gradients
        results[i] = (values, grad)

    # Helpers with unequal first dims: rank r holds r + 1 rows.
    local = torch.arange((rank + 1) * 3, dtype=torch.float32).reshape(rank + 1, 3) + 10 * rank
    results["gather"] = all_gather_tensor(local)
    leaf = local.clone().requires_grad_()
    gathered = all_gather_with_grad(leaf)
    weights = torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape)
    (weights * gathered).sum().backward()
    results["gather_grad"] = leaf.grad
    results["reduced"] = all_reduce_sum(torch.full((2,), float(rank + 1)))
    results["known"] = _known_sizes_step(rank, world, x1[half], x2[half], weight, local)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    cleanup()


def _known_sizes_step(rank, world, x1, x2, weight, local):
    """The training step's pattern: sizes exchanged once, then the loss inside
    known_batch_sizes. Counts the all_gather calls and the device-to-host reads (.item(),
    .tolist()) of the loss's forward and backward."""
    counts = {"all_gather": 0, "host_reads": 0}
    real_gather, real_item, real_tolist = dist.all_gather, torch.Tensor.item, torch.Tensor.tolist

    def counted(real, key):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return real(*args, **kwargs)

        return wrapper

    sizes = gather_batch_sizes(x1.shape[0], torch.device("cpu"))
    w = weight.clone().requires_grad_()
    dist.all_gather = counted(real_gather, "all_gather")
    torch.Tensor.item = counted(real_item, "host_reads")
    torch.Tensor.tolist = counted(real_tolist, "host_reads")
    try:
        with known_batch_sizes(sizes):
            out = IMSVDLoss(bin_size=B, impl="lean", shard=True, block_elems=B * D)(x1 @ w, x2 @ w)
        out["loss"].backward()
    finally:
        dist.all_gather, torch.Tensor.item, torch.Tensor.tolist = (
            real_gather,
            real_item,
            real_tolist,
        )
    grad = all_reduce_sum(w.grad) / world  # what DDP does with parameter gradients
    result = {"sizes": sizes, "counts": counts, "loss": out["loss"].item(), "grad": grad}
    with known_batch_sizes([1, 2]):  # unequal first dims, known: no exchange, same rows
        result["gather"] = all_gather_tensor(local)
    try:
        with known_batch_sizes([5, 5]):  # not this rank's rows: refused on every rank
            all_gather_tensor(local)
    except ValueError as exc:
        result["refused"] = str(exc)
    return result


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(2, free_port(), out_dir), nprocs=2, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-shard{c[1]}" for c in CASES])
def test_two_ranks_equal_one_process(two_rank_results, case):
    impl, shard, kw = CASES[case]
    x1, x2, weight = _problem()
    values, grad = _loss_and_grad("reference", True, kw, x1, x2, weight)
    for rank_results in two_rank_results:
        got_values, got_grad = rank_results[case]
        # The joint terms use the gathered batch: every rank holds the whole-batch value.
        for k in ("loss_dia", "loss_off"):
            assert got_values[k] == pytest.approx(values[k], rel=1e-5, abs=1e-7), k
        torch.testing.assert_close(got_grad, grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item())
    # TI is a per-rank mean over the local half: the mean over ranks (what DDP optimises) is the
    # whole-batch value, and so is the mean of the total loss.
    for k in ("loss_ti", "loss"):
        mean = sum(r[case][0][k] for r in two_rank_results) / len(two_rank_results)
        assert mean == pytest.approx(values[k], rel=1e-5, abs=1e-7), k
    if values["loss_ti"] != 0.0:
        assert two_rank_results[0][case][0]["loss_ti"] != two_rank_results[1][case][0]["loss_ti"]


def test_two_rank_helpers(two_rank_results):
    expected = torch.cat([torch.arange(3.0).reshape(1, 3), torch.arange(6.0).reshape(2, 3) + 10])
    for rank, res in enumerate(two_rank_results):
        torch.testing.assert_close(res["gather"], expected)
        torch.testing.assert_close(res["reduced"], torch.full((2,), 3.0))
        # d/d(local) of sum(weights * gathered) summed over both ranks' identical losses.
        rows = slice(0, 1) if rank == 0 else slice(1, 3)
        weights = torch.arange(9.0).reshape(3, 3)
        torch.testing.assert_close(res["gather_grad"], 2 * weights[rows])


def test_known_batch_sizes_leave_no_size_exchange_in_the_loss(two_rank_results):
    expected = torch.cat([torch.arange(3.0).reshape(1, 3), torch.arange(6.0).reshape(2, 3) + 10])
    for rank, res in enumerate(two_rank_results):
        known = res["known"]
        assert known["sizes"] == [N // 2, N // 2]
        # forward: one gather per view (q1, q2), no size gathers; backward: all-reduces only;
        # and nothing read back to the host
        assert known["counts"] == {"all_gather": 2, "host_reads": 0}
        # the same loss and gradient as the path that exchanges sizes (CASES[2])
        assert known["loss"] == pytest.approx(res[2][0]["loss"], rel=1e-6)
        torch.testing.assert_close(known["grad"], res[2][1])
        torch.testing.assert_close(known["gather"], expected)
        assert f"on rank {rank} inside known_batch_sizes([5, 5])" in known["refused"]
