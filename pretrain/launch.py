"""torchrun for ``tools/pretrain.sh``: PyTorch's launcher (``torch.distributed.run``, the same
arguments), with a failed training process reported as one line and its exit status (2 for the
toolkit's errors: the process printed its ``error:`` line) instead of torchrun's traceback and
status 1.

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
    (2: a toolkit error), else 1 (every failed process was killed by a signal)."""
    codes = [f.exitcode for f in error.failures.values()]
    return max([c for c in codes if c > 0], default=1)


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as e:
        status = exit_status(e)
        ranks = ", ".join(str(r) for r in sorted(e.failures))
        codes = sorted({f.exitcode for f in e.failures.values()})
        print(
            f"pretrain.sh: training process(es) of global rank {ranks} ended with status "
            f"{', '.join(map(str, codes))} (their error is above); exit status {status}",
            file=sys.stderr,
        )
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
