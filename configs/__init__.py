"""The shipped recipes (YAML package data): ``pretrain/`` for pretraining, ``eval/`` for the
evaluations. Installed as the package ``imsvd_configs`` (setup.cfg ``package_dir``);
``pretrain.config.find_config`` resolves a bare recipe name in them."""
