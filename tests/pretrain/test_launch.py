"""pretrain.launch: the launcher's exit status and line for failed training processes."""

from __future__ import annotations

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from pretrain.launch import exit_status


def _failed(*codes: int) -> ChildFailedError:
    failures = {
        rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="<N/A>")
        for rank, code in enumerate(codes)
    }
    return ChildFailedError("pretrain.main", failures)


def test_exit_status_is_the_processes_status_or_128_plus_the_signal():
    assert exit_status(_failed(2)) == 2  # a toolkit error (the process printed its error line)
    assert exit_status(_failed(2, -15)) == 2  # the others were stopped by torchrun
    assert exit_status(_failed(1, 3)) == 3
    assert exit_status(_failed(-9)) == 137  # the OOM killer, as a shell reports it
    assert exit_status(_failed(-15, -9)) == 143
