"""Fine-tuning and the semi-supervised protocol (1% / 10% of the labels) on a pretrained backbone.

    imsvd-finetune --config imagenet_semi_vicreg_1pct --weights W --output-dir OUT \
        data.train_root=imagenet/train data.val_root=imagenet/val \
        data.train_subset=/path/to/1percent.txt
    imsvd-finetune --config finetune_fashion_mnist_10pct --weights W --output-dir OUT \
        data.train_root=.cache/fashion_mnist/train data.val_root=.cache/fashion_mnist/test
    torchrun --nproc_per_node 8 -m transfer.eval.finetune --config ... (same arguments)

The supervised-head trainer (:mod:`transfer.eval.supervised`) with the backbone trained: the
backbone in train mode with its own learning rate and weight decay (``backbone.lr``,
``backbone.weight_decay``; the head's are ``train.lr``, ``train.weight_decay``), BatchNorm over
the global batch with several processes, mixed precision (``train.precision``), atomic
checkpoints at epoch ends and every ``train.checkpoint_every_steps`` steps with exact resume.
Label subsets: ``data.train_subset`` (SimCLR's 1percent.txt / 10percent.txt format) or
``data.train_fraction`` + ``data.subset_seed`` (:mod:`transfer.eval.subsets`). Output folder:
finetune_checkpoint.pth, metrics.jsonl, log.txt, config.yaml, finetune_results.json (top-1 /
top-5 in percent of the last epoch, the best evaluated epoch, the history) and
backbone_finetuned.pth (the fine-tuned backbone, readable by every evaluation of the toolkit).
"""

from __future__ import annotations

import logging
import sys
from functools import partial

from pretrain.config import ConfigError
from transfer.eval import classifier, runner
from transfer.eval.inputs import check_weights
from transfer.eval.supervised import SupervisedTrainer

logger = logging.getLogger("imsvd.finetune")

CHECKPOINT_NAME = "finetune_checkpoint.pth"
RESULTS_NAME = "finetune_results.json"


def validate(cfg: dict) -> None:
    """Cross-field checks of a fine-tuning recipe (raises ConfigError naming the keys)."""
    classifier.validate(cfg)
    if "backbone" not in cfg:
        raise ConfigError("a fine-tuning recipe needs the 'backbone' section (finetune_base.yaml)")
    if cfg["features"]["layer"] not in ("pool5", "res5"):
        raise ConfigError(
            f"features.layer={cfg['features']['layer']!r}: fine-tuning trains the whole backbone, "
            "so its head must sit on res5 (pool5 or res5); res4 would leave layer4 untrained"
        )
    if float(cfg["backbone"]["lr"]) == 0.0:
        logger.warning(
            "backbone.lr=0: only the backbone's BatchNorm statistics change (the reference's "
            "--lr-backbone default); set backbone.lr to fine-tune its weights"
        )
    check_weights(cfg)


EVALUATION = runner.Evaluation(
    name="finetune",
    prog="imsvd-finetune",
    description="Fine-tuning / semi-supervised (1% / 10% labels) evaluation of a backbone",
    default_config="imagenet_finetune",
    results_name=RESULTS_NAME,
    validate=validate,
    run=lambda ctx: SupervisedTrainer(ctx, "finetune", CHECKPOINT_NAME).fit(),
    config_at_setup=False,  # written by the trainer after its resume check
    summary=partial(classifier.summary, what="fine-tuning"),
)


main = EVALUATION.main  # the entry point (imsvd-finetune)


if __name__ == "__main__":
    sys.exit(main())
