"""The training loop and what runs around it.

* :mod:`pretrain.engine.trainer`: :class:`~pretrain.engine.trainer.Trainer` (DDP, mixed
  precision, stepping, preemption) and :func:`~pretrain.engine.trainer.train`;
* :mod:`pretrain.engine.hooks`: the hook interface and the built-in hooks (metrics, online
  probe, checkpoints);
* :mod:`pretrain.engine.checkpointer`: the checkpoint policy (when to save, resume, prune, the
  run-folder lock); the files themselves are :mod:`pretrain.checkpoint`'s;
* :mod:`pretrain.engine.optim`: LARS, parameter groups, warm-up + cosine per step;
* :mod:`pretrain.engine.runtime`: what every training loop shares (precision, the stop request),
  also used by ``transfer.eval``'s supervised-head trainer.
"""
