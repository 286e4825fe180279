"""The shipped recipes (YAML package data): ``pretrain/`` for pretraining, ``eval/`` for the
evaluations. ``pretrain.config.find_config`` resolves a bare recipe name in them."""
