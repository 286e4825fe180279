"""The objectives, one module per loss, and the statistics of the soft codes.

* :mod:`pretrain.losses.imsvd`: the IMSVD loss (lean / reference / row-sharded), with
  :mod:`pretrain.losses.offblock`, the lean off-block entropy sweep;
* :mod:`pretrain.losses.vicreg`, :mod:`pretrain.losses.barlowtwins`: the baselines, with their
  shared checks in :mod:`pretrain.losses.common`;
* :mod:`pretrain.losses.monitors`: code statistics (one-hot rate, marginal entropy, block MI),
  shared with ``transfer.analysis``.

Which loss a run uses, and with which monitors, is the method's (:mod:`pretrain.methods`).
"""
