"""torchrun for ``tools/pretrain.sh``: PyTorch's launcher (``torch.distributed.run``, the same
arguments), with a failed training process reported as one line and its exit status (2 for the
toolkit's errors: the process printed its ``error:`` line; 128 + N for a process killed by
signal N) instead of torchrun's traceback and status 1. Other launcher failures (rendezvous,
a signal to torchrun itself) keep torchrun's own report.

    python -m pretrain.launch --nproc_per_node=2 -m pretrain.main --config imsvd_smoke
"""

from __future__ import annotations

import sys
from typing import Sequence

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

__all__ = ["main", "exit_status"]


def exit_status(error: ChildFailedError) -> int:
    """The launcher's exit status for failed processes: the largest positive status among them
    (2: a toolkit error), else 128 + the signal that killed one (as a shell reports it; -9 from
    the OOM killer gives 137)."""
    codes = [f.exitcode for f in error.failures.values()]
    positive = [c for c in codes if c > 0]
    if positive:
        return max(positive)
    return 128 + max((-c for c in codes if c < 0), default=0) if codes else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as e:
        status = exit_status(e)
        failed = sorted(e.failures.items())
        what = ", ".join(
            (
                f"rank {r}: status {f.exitcode}"
                if f.exitcode > 0
                else f"rank {r}: signal {-f.exitcode}"
            )
            for r, f in failed
        )
        hint = " (its error is above)" if status < 128 else ""
        print(f"pretrain.sh: training process(es) failed ({what}){hint}", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
