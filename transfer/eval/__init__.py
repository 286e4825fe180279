"""Frozen-feature evaluations: kNN, linear probes, VOC07 SVM, and the runner they share
(:mod:`transfer.eval.runner`: one command-line grammar, set-up, weights, results)."""
