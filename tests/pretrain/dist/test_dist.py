"""Single-process behaviour of pretrain.dist and its reading of the launcher environment."""

import pytest
import torch

from pretrain import dist as pdist
from pretrain.dist import DistributedSetupError
from pretrain.dist import group as dist_group
from pretrain.dist import init_distributed

LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_without_env(clean_env):
    info = init_distributed("auto")
    assert (info.rank, info.world_size, info.local_rank, info.backend) == (
        0,
        1,
        0,
        None,
    )
    assert info.is_main and not info.distributed
    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pdist.get_rank() == 0 and pdist.get_world_size() == 1 and pdist.is_main_process()
    pdist.barrier()
    x = torch.randn(3, 2, requires_grad=True)
    assert pdist.all_gather_with_grad(x) is x
    assert pdist.all_reduce_sum_with_grad(x) is x
    torch.testing.assert_close(pdist.all_gather_tensor(x), x.detach())
    reduced = pdist.all_reduce_sum(x)
    torch.testing.assert_close(reduced, x.detach())
    assert not reduced.requires_grad
    pdist.cleanup()


def test_torchrun_world_of_one(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "1")
    clean_env.setenv("LOCAL_RANK", "0")
    info = init_distributed("cpu")
    assert (info.world_size, info.backend, info.device) == (
        1,
        None,
        torch.device("cpu"),
    )


@pytest.mark.parametrize(
    "env,missing",
    [
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "MASTER_ADDR"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT"),
        (
            {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"},
            "MASTER_ADDR",
        ),
    ],
)
def test_multi_process_env_needs_master(clean_env, env, missing):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(DistributedSetupError, match=missing):
        init_distributed("cpu")


def test_bad_env_values(clean_env):
    clean_env.setenv("RANK", "x")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK='x'"):
        init_distributed("cpu")
    clean_env.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, 2\)"):
        init_distributed("cpu")


def test_slurm_env_is_read(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    clean_env.setenv("SLURM_LOCALID", "0")
    assert init_distributed("cpu").world_size == 1
    assert dist_group._read_launch_env(
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    )[:3] == (5, 8, 1)
    # torchrun variables win over SLURM's when both are present.
    both = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
    }
    assert dist_group._read_launch_env(both)[:3] == (1, 2, 0)


def test_bad_device(clean_env):
    with pytest.raises(DistributedSetupError, match="device"):
        init_distributed("tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(DistributedSetupError, match="CUDA is not available"):
            init_distributed("cuda")
