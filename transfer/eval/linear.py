"""Linear probe on a frozen backbone: Places205 and ImageNet (one implementation, two configs).

    imsvd-linear --config places205_linear --weights W --output-dir OUT \
        data.train_root=places205/train data.val_root=places205/val
    imsvd-linear --config imagenet_linear --weights W --output-dir OUT \
        data.train_root=imagenet/train data.val_root=imagenet/val
    torchrun --nproc_per_node 8 -m transfer.eval.linear --config ... (same arguments)

The backbone is frozen in eval mode; its pooled features go through an optional
BatchNorm1d(affine=False) (Places205 protocol) and one Linear layer, the only trained module.
It is the supervised-head trainer (:mod:`transfer.eval.supervised`) in its frozen mode: N
processes train exactly like one (global batches, global BatchNorm statistics), the head is
saved atomically to OUT/linear_checkpoint.pth at every epoch end (and every
``train.checkpoint_every_steps`` steps), a rerun resumes from it only when the weights, the
training set and the recipe agree, and the backbone's content hash must be the same after
training. Validation features (deterministic transform) are cached in OUT/features; val labels
follow the train split's class names; unreadable images are left out and counted
(``data.strict=true``: fail instead). ``data.train_subset`` / ``data.train_fraction`` train on a
labelled subset (:mod:`transfer.eval.subsets`). OUT/linear_results.json holds top-1/top-5
(percent) of the last epoch, the best evaluated epoch and the history.
"""

from __future__ import annotations

import sys
from functools import partial

from pretrain.config import ConfigError
from transfer.eval import classifier, runner
from transfer.eval.inputs import check_weights
from transfer.eval.supervised import SupervisedTrainer

CHECKPOINT_NAME = "linear_checkpoint.pth"
RESULTS_NAME = "linear_results.json"


def validate(cfg: dict) -> None:
    """Cross-field checks of a linear-probe recipe (raises ConfigError naming the keys)."""
    classifier.validate(cfg)
    if "backbone" in cfg:
        raise ConfigError(
            "this recipe has a 'backbone' section (fine-tuning): run it with imsvd-finetune"
        )
    check_weights(cfg)


def train_linear(cfg: dict) -> dict:
    """Train and evaluate the linear head from a resolved config (linear_base.yaml schema).

    Args:
        cfg: config dict; model.weights and output_dir required.

    Returns:
        Results dict (top1, top5, best, epochs, history); identical on every rank.
    """
    return runner.run_config(EVALUATION, cfg)


EVALUATION = runner.Evaluation(
    name="linear",
    prog="imsvd-linear",
    description="Linear probe on a frozen backbone (Places205 / ImageNet recipes)",
    default_config="imagenet_linear",
    results_name=RESULTS_NAME,
    validate=validate,
    run=lambda ctx: SupervisedTrainer(ctx, "frozen", CHECKPOINT_NAME).fit(),
    config_at_setup=False,  # written by the trainer after its resume check
    summary=partial(classifier.summary, what="linear probe"),
)


main = EVALUATION.main  # the entry point (imsvd-linear)


if __name__ == "__main__":
    sys.exit(main())
