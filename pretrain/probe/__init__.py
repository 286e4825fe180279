"""The weighted kNN classifier and the online kNN probe of pretraining.

* :mod:`pretrain.probe.knn`: the one weighted-kNN implementation (InstDisc's vote; bank sharded
  over processes), also used by ``transfer.eval.knn``;
* :mod:`pretrain.probe.online`: the probe sets and the probe the training hook runs every
  ``eval.every_steps`` steps.
"""
