"""The parts of supervised training on a pretrained backbone (linear probe and fine-tuning):
the head, the model that joins it to the backbone, global batches, seeded augmentations, the
epoch schedule, top-k accuracy and the validation pass's features and scores.
:mod:`transfer.eval.supervised` runs them."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from pretrain.config import ConfigError
from pretrain.data.datasets import build_train_val_datasets, collate_readable
from pretrain.data.transforms import eval_transform, train_linear_transform
from pretrain.dist import all_reduce_sum
from pretrain.log import format_table
from pretrain.models.syncbn import convert_sync_batchnorm
from transfer.eval import features

__all__ = [
    "LinearHead",
    "SupervisedModel",
    "GlobalBatchSampler",
    "SeededItems",
    "lr_factor",
    "lr_at_epoch",
    "topk_accuracy",
    "topk_hits",
    "head_accuracy",
    "backbone_features",
    "format_epoch",
    "build_datasets",
    "head_classes",
    "build_model",
    "sgd_groups",
    "build_train_loader",
    "validate",
    "summary",
]


class LinearHead(nn.Module):
    """Optional BatchNorm1d(affine=False) + Linear (weights normal(0, 0.01), bias 0, as the
    reference IMSVD and VICReg evaluations initialise their heads).

    Input (N, dim) features, output (N, num_classes) logits. With several processes the trainer
    converts the BatchNorm to one over the global batch (:mod:`pretrain.models.syncbn`).
    """

    def __init__(self, dim: int, num_classes: int, batchnorm: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False) if batchnorm else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(feats))


class SupervisedModel(nn.Module):
    """Backbone features (``layer``, see :func:`transfer.eval.features.forward_features`) + head.

    Input (N, 3, H, W) images, output (N, num_classes) logits. State-dict keys ``backbone.*``
    (torchvision names) and ``head.*``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, layer: str) -> None:
        super().__init__()
        self.backbone, self.head, self.layer = backbone, head, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(features.forward_features(self.backbone, x, self.layer))


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Batches of one process: its share of each global batch, without padding.

    Each epoch draws one permutation of the N samples (``torch.randperm`` seeded with
    ``seed + epoch``, as DistributedSampler); step s's global batch is the permutation's block
    ``[s * B, (s + 1) * B)`` (the last one shorter) and process r takes every ``world``-th
    index of it from position r. The union over processes is the batch one process would see,
    every sample appears once per epoch (no padded duplicates), and every process has
    ceil(N / B) steps (a share may be empty). Items are ``(epoch, index)`` pairs (for
    :class:`SeededItems`); ``set_epoch(e, start)`` begins epoch e at its step ``start`` (a
    resumed epoch).

    Args:
        n: number of samples.
        global_batch: B, samples per step over all processes.
        world, rank: process count and this process's rank.
        seed: permutation seed.
    """

    def __init__(self, n: int, global_batch: int, world: int, rank: int, seed: int) -> None:
        self.n, self.batch, self.world, self.rank = int(n), int(global_batch), world, rank
        self.seed, self.epoch, self.start = int(seed), 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and the step to begin at."""
        self.epoch, self.start = int(epoch), int(start)

    @property
    def steps_per_epoch(self) -> int:
        """ceil(N / B)."""
        return -(-self.n // self.batch)

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start, 0)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for begin in range(self.start * self.batch, self.n, self.batch):
            yield [
                (self.epoch, i) for i in perm[begin : begin + self.batch][self.rank :: self.world]
            ]


class SeededItems(Dataset):
    """Item ``(epoch, index)`` of ``dataset`` with its random transform drawn from torch's
    generator seeded by (seed, epoch, index), the caller's generator state left as it was.

    So the augmentation of a sample is the same in any process, with any worker count, and
    after a resume in the middle of an epoch (torchvision's random transforms draw from torch's
    global generator).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**63))
            return self.dataset[index]


def lr_factor(epoch: int, train: dict) -> float:
    """The schedule's factor of an epoch (per-epoch, as torch's CosineAnnealingLR / MultiStepLR):
    0.5 (1 + cos(pi e / E)) under ``cosine``, gamma ** (milestones passed) under ``multistep``.

    Raises:
        ConfigError: another train.schedule.
    """
    if train["schedule"] == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / int(train["epochs"])))
    if train["schedule"] == "multistep":
        return float(train["gamma"]) ** sum(epoch >= int(m) for m in train["milestones"])
    raise ConfigError(f"train.schedule must be 'cosine' or 'multistep', got {train['schedule']!r}")


def lr_at_epoch(epoch: int, cfg: dict) -> float:
    """The head's learning rate of an epoch: train.lr times :func:`lr_factor`."""
    return float(cfg["train"]["lr"]) * lr_factor(epoch, cfg["train"])


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list:
    """Per k, how many rows have their label among the k largest logits (k capped at the
    class count); ints, to be summed over shards."""
    out = []
    for k in ks:
        kk = min(k, logits.shape[1])
        out.append(int((logits.topk(kk, dim=1).indices == labels[:, None]).any(dim=1).sum()))
    return out


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracies in percent ({"top1": ..., "top5": ...}); k capped at the class count."""
    hits = topk_hits(logits, labels, ks)
    return {f"top{k}": 100.0 * h / max(labels.shape[0], 1) for k, h in zip(ks, hits)}


_SCORE_ROWS = 8192  # validation rows scored by the head at a time


def head_accuracy(head: nn.Module, feats, labels, device, ks: Sequence[int] = (1, 5)):
    """Top-k accuracies (percent) of ``head`` on the validation features of every process.

    Each process scores its own rows (``feats`` (n, dim) and ``labels`` (n,), numpy) with the
    head in eval mode, a slice at a time, and puts it back in train mode; one all-reduce sums
    the hits and the rows, so every rank (each calls this) returns the same figures.

    Returns:
        ({"top1": ..., "top5": ...}, validation rows over every process).
    """
    hits = [0] * len(ks)
    head.eval()
    with torch.no_grad():
        for lo in range(0, feats.shape[0], _SCORE_ROWS):
            logits = head(torch.from_numpy(feats[lo : lo + _SCORE_ROWS]).to(device))
            part = torch.from_numpy(labels[lo : lo + _SCORE_ROWS]).to(device)
            hits = [a + b for a, b in zip(hits, topk_hits(logits, part, ks))]
    head.train()
    *hits, rows = (
        int(v) for v in all_reduce_sum(torch.tensor([*hits, feats.shape[0]], device=device))
    )
    return {f"top{k}": 100.0 * h / max(rows, 1) for k, h in zip(ks, hits)}, rows


def backbone_features(backbone: nn.Module, dataset, cfg: dict, device):
    """This process's rows (``gather="shard"``) of the features of ``dataset`` through the
    backbone as it is now (fine-tuning's validation: no cache), at the recipe's layer, batch
    size, workers, precision and memory format; the backbone is put back in train mode.

    Returns:
        (features (n, dim), labels (n,)), numpy.
    """
    d = cfg["data"]
    feats, labels = features.extract_features(
        backbone,
        dataset,
        desc="val features",
        gather="shard",
        layer=cfg["features"]["layer"],
        batch_size=int(d["batch_size"]),
        device=device,
        num_workers=int(d["num_workers"]),
        precision=cfg["train"]["precision"],
        channels_last=bool(cfg["train"]["channels_last"]),
    )
    backbone.train()
    return feats, labels


def format_epoch(record: dict, epochs: int, unreadable: int = 0) -> str:
    """One log line for an epoch record, e.g. ``epoch 3/100  lr 0.0200  loss 1.2346  top1 66.90%``.

    Args:
        record: {"epoch", "lr", "loss"} plus optional "top1" / "top5" (percent).
        epochs: total epochs of the run.
        unreadable: training images left out in this epoch (shown when non-zero).
    """
    parts = [
        f"epoch {record['epoch']}/{epochs}",
        f"lr {record['lr']:.4g}",
        f"loss {record['loss']:.4f}",
    ]
    parts += [f"{k} {record[k]:.2f}%" for k in ("top1", "top5") if k in record]
    if unreadable:
        parts.append(f"({unreadable} unreadable images left out)")
    return "  ".join(parts)


def build_datasets(cfg: dict):
    """(train, val) datasets of a recipe: the train augmentation, the evaluation view."""
    d = cfg["data"]
    if d["train_aug"] == "random_resized_crop":
        train_tf = train_linear_transform(int(d["train_crop"]), tuple(d["train_scale"]))
    else:
        train_tf = eval_transform(int(d["resize"]), int(d["crop"]))
    return build_train_val_datasets(
        d["train_root"],
        d["train_list"],
        d["val_root"],
        d["val_list"],
        train_tf,
        eval_transform(int(d["resize"]), int(d["crop"])),
        strict=bool(d["strict"]),
    )


def validate(cfg: dict) -> None:
    """Cross-field checks of a supervised-head recipe (raises ConfigError naming the keys)."""
    d, t = cfg["data"], cfg["train"]
    if d["train_aug"] not in ("random_resized_crop", "center_crop"):
        raise ConfigError(
            f"data.train_aug must be 'random_resized_crop' or 'center_crop', got {d['train_aug']!r}"
        )
    if not (d["train_root"] or d["train_list"]) or not (d["val_root"] or d["val_list"]):
        raise ConfigError(
            f"{cfg['evaluation']} needs data.train_root (or train_list) and data.val_root (or "
            "val_list)"
        )
    if t["schedule"] not in ("cosine", "multistep"):
        raise ConfigError(f"train.schedule must be 'cosine' or 'multistep', got {t['schedule']!r}")
    if t["precision"] not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be fp32, bf16 or fp16, got {t['precision']!r}")
    if t["nesterov"] and float(t["momentum"]) <= 0:
        raise ConfigError("train.nesterov=true needs train.momentum > 0")
    if d["train_subset"] and float(d["train_fraction"]):
        raise ConfigError(
            "data.train_subset and data.train_fraction are alternatives: set one of them"
        )


def summary(results: dict, what: str) -> str:
    """The printed table: top-1 / top-5 of the last epoch and the best evaluated epoch (or where
    a run stopped by a signal will resume)."""
    if results.get("status") == "preempted":
        return (
            f"{what}: stopped by a signal at epoch {results['epoch']}, step {results['step']} "
            "(checkpoint saved); run the same command again to resume"
        )
    best = results["best"]
    title = f"{what}, percent ({results['num_classes']} classes, {results['epochs']} epochs)"
    rows = [{"metric": k, "value": results[k]} for k in ("top1", "top5")]
    rows.append({"metric": f"best top1 (epoch {best['epoch']})", "value": best["top1"]})
    return format_table(rows, title)


def build_model(backbone: nn.Module, num_classes: int, cfg: dict, info, finetune: bool):
    """The backbone joined to a new head, on the process's device, and the module to call.

    With several processes the trained part (head, or head and backbone when fine-tuning) gets
    global-batch BatchNorm (:func:`pretrain.models.syncbn.convert_sync_batchnorm`) and is wrapped in
    DistributedDataParallel; frozen, the module to call takes features, fine-tuning images.

    Returns:
        (model, forward): the unwrapped :class:`SupervisedModel` and the trained module.
    """
    head = LinearHead(
        features.feature_dim(backbone, cfg["features"]["layer"]),
        num_classes,
        bool(cfg["head"]["batchnorm"]),
    )
    if finetune:
        backbone.requires_grad_(True)
    model = SupervisedModel(backbone, head, cfg["features"]["layer"]).to(info.device)
    if info.distributed:
        if finetune:
            model = convert_sync_batchnorm(model, info.device)
        else:
            model.head = convert_sync_batchnorm(model.head, info.device)
    trained = model if finetune else model.head
    if not info.distributed:
        return model, trained
    ids = [info.device.index] if info.device.type == "cuda" else None
    return model, nn.parallel.DistributedDataParallel(trained, device_ids=ids)


def sgd_groups(model: SupervisedModel, cfg: dict, finetune: bool) -> list[dict]:
    """SGD parameter groups: the head (train.lr, train.weight_decay) and, when fine-tuning, the
    backbone (backbone.lr, backbone.weight_decay)."""
    t = cfg["train"]
    groups = [
        {
            "params": list(model.head.parameters()),
            "lr": float(t["lr"]),
            "weight_decay": float(t["weight_decay"]),
            "name": "head",
        }
    ]
    if finetune:
        b = cfg["backbone"]
        groups.append(
            {
                "params": list(model.backbone.parameters()),
                "lr": float(b["lr"]),
                "weight_decay": float(b["weight_decay"]),
                "name": "backbone",
            }
        )
    return groups


def build_train_loader(dataset, cfg: dict, info):
    """(sampler, loader) of the training set: global batches of seeded items.

    The loader yields (images or None, labels, unreadable count) per step, as
    :func:`pretrain.data.datasets.collate_readable`.
    """
    sampler = GlobalBatchSampler(
        len(dataset), int(cfg["train"]["batch_size"]), info.world_size, info.rank, int(cfg["seed"])
    )
    loader = torch.utils.data.DataLoader(
        SeededItems(dataset, int(cfg["seed"])),
        batch_sampler=sampler,
        num_workers=int(cfg["data"]["num_workers"]),
        pin_memory=info.device.type == "cuda",
        collate_fn=collate_readable,
    )
    return sampler, loader


def head_classes(cfg: dict, dataset) -> int:
    """The head's class count: ``head.num_classes``, or the training data's when 0.

    Raises:
        ConfigError: head.num_classes below the data's class count.
    """
    found = dataset.num_classes
    n = int(cfg["head"]["num_classes"]) or found
    if n < found:
        raise ConfigError(
            f"head.num_classes={n} but the training data has {found} classes (0: take the "
            "number from the data)"
        )
    return n
