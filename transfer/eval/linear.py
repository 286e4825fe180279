"""Linear probe on a frozen backbone: Places205 and ImageNet (one implementation, two configs).

    imsvd-linear --config places205_linear --weights W --output-dir OUT \
        data.train_root=places205/train data.val_root=places205/val
    imsvd-linear --config imagenet_linear --weights W --output-dir OUT \
        data.train_root=imagenet/train data.val_root=imagenet/val
    torchrun --nproc_per_node 8 -m transfer.eval.linear --config ... (same arguments)

The backbone is frozen in eval mode; its pooled features go through an optional
BatchNorm1d(affine=False) (Places205 protocol) and one Linear layer, the only trained module
(DistributedDataParallel across processes). The BatchNorm normalises over the GLOBAL batch
(features are all-gathered; they carry no gradient), each step's global batch is the same block
of one seeded permutation whatever the process count (:class:`GlobalBatchSampler`, no padded
duplicates) and the loss is the mean over that whole batch, so N processes train exactly like
one.
Every epoch the head and optimizer are saved atomically to OUT/linear_checkpoint.pth together
with the training class names, a signature of the training sample list and the training
settings; a rerun resumes from it only when all of these (and the backbone weights) match, and
otherwise stops with a message naming what differs. Validation features (deterministic
transform) are cached in OUT/features. Val labels follow the train split's class names.
Unreadable images are left out and counted (``data.strict=true``: fail instead). After
training the backbone's content hash is compared with the one before training; a change is an
error. OUT/linear_results.json holds top-1/top-5 (percent).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.checkpoint import CheckpointError, atomic_torch_save, load_plain, tensor_sha256
from pretrain.config import ConfigError
from pretrain.datasets import build_train_val_datasets, collate_readable
from pretrain.dist import all_gather_tensor
from pretrain.log import MetricWriter, format_table, progress
from pretrain.transforms import eval_transform, train_linear_transform
from transfer.eval import features, runner

logger = logging.getLogger("imsvd.linear")

CHECKPOINT_NAME = "linear_checkpoint.pth"
RESULTS_NAME = "linear_results.json"


class LinearEvalError(runner.IMSVDError, ValueError):  # pretrain.errors.IMSVDError
    """The linear evaluation cannot proceed (bad setup, or the frozen weights changed)."""


class LinearHead(nn.Module):
    """Optional BatchNorm1d(affine=False) + Linear.

    forward(feats, rows): the BatchNorm (training mode) uses the statistics of all of ``feats``
    (the gathered global batch); only ``feats[rows]`` (this process's samples) are classified.
    """

    def __init__(self, dim: int, num_classes: int, batchnorm: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False) if batchnorm else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        x = self.bn(feats)
        return self.fc(x if rows is None else x[rows])


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Batches of one process: its share of each global batch, without padding.

    Each epoch draws one permutation of the N samples (``torch.randperm`` seeded with
    ``seed + epoch``, as DistributedSampler); step s's global batch is the permutation's block
    ``[s * B, (s + 1) * B)`` (the last one shorter) and process r takes every ``world``-th
    index of it from position r. The union over processes is the batch one process would see,
    every sample appears once per epoch (no padded duplicates), and every process has
    ceil(N / B) steps (a share may be empty).

    Args:
        n: number of samples.
        global_batch: B, samples per step over all processes.
        world, rank: process count and this process's rank.
        seed: permutation seed.
    """

    def __init__(self, n: int, global_batch: int, world: int, rank: int, seed: int) -> None:
        self.n, self.batch, self.world, self.rank = int(n), int(global_batch), world, rank
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.n // self.batch)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for start in range(0, self.n, self.batch):
            yield perm[start : start + self.batch][self.rank :: self.world]


def lr_at_epoch(epoch: int, cfg: dict) -> float:
    """Learning rate of an epoch: cosine over train.epochs, or step decay at train.milestones."""
    t = cfg["train"]
    base = float(t["lr"])
    if t["schedule"] == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * epoch / int(t["epochs"])))
    if t["schedule"] == "multistep":
        return base * float(t["gamma"]) ** sum(epoch >= int(m) for m in t["milestones"])
    raise ConfigError(f"train.schedule must be 'cosine' or 'multistep', got {t['schedule']!r}")


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracies in percent ({"top1": ..., "top5": ...}); k capped at the class count."""
    out = {}
    for k in ks:
        kk = min(k, logits.shape[1])
        hit = (logits.topk(kk, dim=1).indices == labels[:, None]).any(dim=1)
        out[f"top{k}"] = 100.0 * hit.float().mean().item()
    return out


def validate(cfg: dict) -> None:
    """Cross-field checks of a linear-probe recipe (raises ConfigError naming the keys)."""
    d, t = cfg["data"], cfg["train"]
    if d["train_aug"] not in ("random_resized_crop", "center_crop"):
        raise ConfigError(
            f"data.train_aug must be 'random_resized_crop' or 'center_crop', got {d['train_aug']!r}"
        )
    if not (d["train_root"] or d["train_list"]) or not (d["val_root"] or d["val_list"]):
        raise ConfigError("linear eval needs data.train_root (or train_list) and data.val_root")
    if t["schedule"] not in ("cosine", "multistep"):
        raise ConfigError(f"train.schedule must be 'cosine' or 'multistep', got {t['schedule']!r}")
    if int(t["epochs"]) < 1 or int(t["batch_size"]) < 1:
        raise ConfigError(
            f"train.epochs and train.batch_size must be positive, got {t['epochs']}, "
            f"{t['batch_size']}"
        )


def _datasets(cfg: dict):
    d = cfg["data"]
    if d["train_aug"] == "random_resized_crop":
        train_tf = train_linear_transform(int(d["train_crop"]), tuple(d["train_scale"]))
    else:
        train_tf = eval_transform(int(d["resize"]), int(d["crop"]))
    return build_train_val_datasets(
        d["train_root"], d["train_list"], d["val_root"], d["val_list"], train_tf,
        eval_transform(int(d["resize"]), int(d["crop"])), strict=bool(d["strict"]),
    )  # fmt: skip


def train_signature(dataset, base: str | None) -> dict:
    """What identifies a training set for resuming: class names, size and a sample-list hash.

    Paths are hashed relative to ``base`` (the data root, or the list file's folder), so the
    same tree moved elsewhere keeps its signature.

    Returns:
        {"classes": list or None, "num_samples": int, "samples_sha256": hex str}.
    """
    h = hashlib.sha256(str(len(dataset.samples)).encode())
    for path, label in dataset.samples:
        rel = os.path.relpath(path, base) if base else path
        h.update(f"{rel}\0{label}\n".encode())
    classes = list(dataset.classes) if dataset.classes is not None else None
    return {
        "classes": classes,
        "num_samples": len(dataset.samples),
        "samples_sha256": h.hexdigest(),
    }


# Settings a resumed head must share with its checkpoint (dotted config keys). train.epochs may
# grow on resume with a step schedule; under cosine it changes every epoch's learning rate.
_RESUME_KEYS = ("seed", "head.batchnorm", "train.batch_size", "train.lr", "train.momentum",
                "train.nesterov", "train.weight_decay", "train.schedule", "train.milestones",
                "train.gamma", "data.train_aug", "data.train_crop", "data.train_scale",
                "data.resize", "data.crop", "features.layer")  # fmt: skip


def resume_settings(cfg: dict, num_classes: int) -> dict:
    """The training settings stored in the head checkpoint and compared on resume.

    Returns:
        Flat {dotted key: value}, plus ``head.num_classes`` (resolved) and, under a cosine
        schedule, ``train.epochs``.
    """
    out = {}
    for key in _RESUME_KEYS:
        node = cfg
        for part in key.split("."):
            node = node[part]
        out[key] = list(node) if isinstance(node, (list, tuple)) else node
    out["head.num_classes"] = int(num_classes)
    if cfg["train"]["schedule"] == "cosine":
        out["train.epochs"] = int(cfg["train"]["epochs"])
    return out


def resume_mismatch(state: dict, now: dict) -> list[str]:
    """What differs between a head checkpoint and this run, one readable item per difference.

    Args:
        state: the loaded checkpoint (``weights_sha256``, ``data``, ``settings``).
        now: the same three fields for this run.
    Returns:
        Descriptions of the differences (empty when the run may resume).
    """
    diffs = []
    if state["weights_sha256"] != now["weights_sha256"]:
        diffs.append(
            f"backbone weights: sha256 {state['weights_sha256'][:12]}... in the checkpoint, "
            f"{now['weights_sha256'][:12]}... now"
        )
    old, new = state["data"], now["data"]
    if old["classes"] != new["classes"]:
        a, b = old["classes"] or [], new["classes"] or []
        gone, added = [c for c in a if c not in b], [c for c in b if c not in a]
        detail = []
        if gone:
            detail.append(f"only in the checkpoint: {gone[:5]}")
        if added:
            detail.append(f"only now: {added[:5]}")
        if not detail:
            detail.append("same names in another order")
        diffs.append(f"training classes ({len(a)} vs {len(b)}; {'; '.join(detail)})")
    elif old["samples_sha256"] != new["samples_sha256"]:
        diffs.append(
            f"training samples ({old['num_samples']} in the checkpoint, {new['num_samples']} now,"
            " or other files / labels)"
        )
    for key in sorted(set(state["settings"]) | set(now["settings"])):
        a, b = state["settings"].get(key, "<unset>"), now["settings"].get(key, "<unset>")
        if a != b:
            diffs.append(f"{key}: {a!r} in the checkpoint, {b!r} now")
    return diffs


def _load_head_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = load_plain(path)
    except CheckpointError as e:
        raise LinearEvalError(f"cannot read linear-head checkpoint: {e}") from None
    for key in ("epoch", "head", "optimizer", "history", "weights_sha256", "data", "settings"):
        if key not in obj:
            raise LinearEvalError(
                f"linear-head checkpoint {path} lacks field '{key}' (written by an older version "
                "that did not record the training data and settings): use another --output-dir "
                "or train.resume=false"
            )
    return obj


def train_linear(cfg: dict) -> dict:
    """Train and evaluate the linear head from a resolved config (linear_base.yaml schema).

    Args:
        cfg: config dict; model.weights and output_dir required.

    Returns:
        Results dict (top1, top5, epochs, history); identical on every rank.
    """
    return runner.run_config(EVALUATION, cfg)


def run(ctx: runner.EvalContext) -> dict:
    """The linear probe in a set-up context (see the module docstring).

    Returns:
        Results dict (top1, top5, epochs, history); identical on every rank.

    Raises:
        LinearEvalError: a head checkpoint of another run, or changed frozen weights.
    """
    cfg, info, out = ctx.cfg, ctx.info, ctx.out
    t = cfg["train"]
    world = info.world_size
    if int(t["batch_size"]) % world:
        raise ConfigError(
            f"train.batch_size={t['batch_size']} is not divisible by {world} processes"
        )
    backbone, _, meta = ctx.load_model()
    hash_before = tensor_sha256(backbone.state_dict())
    train_ds, val_ds = _datasets(cfg)
    num_classes = int(cfg["head"]["num_classes"]) or train_ds.num_classes
    if num_classes < train_ds.num_classes:
        raise ConfigError(
            f"head.num_classes={num_classes} but the training data has {train_ds.num_classes} "
            "classes (0: take the number from the data)"
        )
    layer = cfg["features"]["layer"]
    head = LinearHead(
        features.feature_dim(backbone, layer), num_classes, bool(cfg["head"]["batchnorm"])
    )
    head = head.to(info.device)
    model = head
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            head, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    opt = torch.optim.SGD(
        head.parameters(), lr=float(t["lr"]), momentum=float(t["momentum"]),
        nesterov=bool(t["nesterov"]), weight_decay=float(t["weight_decay"]),
    )  # fmt: skip
    ckpt_path = out / CHECKPOINT_NAME
    d = cfg["data"]
    base = d["train_root"] or (os.path.dirname(os.path.abspath(d["train_list"])))
    identity = {
        "weights_sha256": meta["sha256"],
        "data": train_signature(train_ds, base),
        "settings": resume_settings(cfg, num_classes),
    }
    start_epoch, history = 0, []
    state = _load_head_checkpoint(ckpt_path) if t["resume"] else None
    if state is not None:
        diffs = resume_mismatch(state, identity)
        if diffs:
            raise LinearEvalError(
                f"{ckpt_path} does not belong to this run, so it cannot be resumed; it differs "
                f"in: {'; '.join(diffs)}. Use another --output-dir, or train.resume=false to "
                "train a new head there"
            )
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        logger.info("resumed linear head from %s at epoch %d", ckpt_path, start_epoch)

    sampler = GlobalBatchSampler(len(train_ds), int(t["batch_size"]), world, info.rank,
                                 int(cfg["seed"]))  # fmt: skip
    loader = torch.utils.data.DataLoader(
        train_ds, batch_sampler=sampler, num_workers=int(cfg["data"]["num_workers"]),
        pin_memory=info.device.type == "cuda", collate_fn=collate_readable,
    )  # fmt: skip
    writer = MetricWriter(str(out), rank=info.rank, tensorboard=False)
    epochs = int(t["epochs"])
    val_feats = None
    dim = features.feature_dim(backbone, layer)
    unreadable = {"train": 0, "val": 0}

    def evaluate() -> dict:
        nonlocal val_feats
        if val_feats is None:
            val_feats = ctx.features("val", backbone, val_ds, meta["sha256"])
        unreadable["val"] = len(val_ds) - len(val_feats[1])
        head.eval()
        with torch.no_grad():
            logits = head(torch.from_numpy(val_feats[0]).to(info.device))
        head.train()
        return topk_accuracy(logits.cpu(), torch.from_numpy(val_feats[1]))

    step = start_epoch * len(loader)
    for epoch in range(start_epoch, epochs):
        lr = lr_at_epoch(epoch, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        sampler.set_epoch(epoch)
        head.train()
        loss_sum = torch.zeros((), device=info.device)
        dropped = 0
        for images, labels, n_bad in progress(loader, total=len(loader), desc=f"epoch {epoch}",
                                              rank=info.rank):  # fmt: skip
            dropped += n_bad
            with torch.no_grad():
                if images is None:  # every image of this local batch was unreadable
                    feats = torch.zeros((0, dim), device=info.device)
                    labels = torch.zeros((0,), dtype=torch.long)
                else:
                    feats = features.forward_features(backbone, images.to(info.device), layer)
                sizes = all_gather_tensor(torch.tensor([feats.shape[0]], device=info.device))
                all_feats = all_gather_tensor(feats)
            if all_feats.shape[0] == 0:  # the same on every rank: skip the step everywhere
                continue
            if not bool(torch.isfinite(all_feats).all()):  # the same on every rank
                raise features.FeatureError(
                    f"epoch {epoch}: training features of weights {cfg['model']['weights']} hold "
                    "NaN/inf: these weights cannot be evaluated"
                )
            labels = labels.to(info.device)
            offset = int(sizes[: info.rank].sum())
            logits = model(all_feats, slice(offset, offset + feats.shape[0]))
            # the mean over the GLOBAL batch once DDP averages the gradients over the processes
            # (0, still a DDP step, for an empty local share)
            ce_sum = F.cross_entropy(logits, labels, reduction="sum")
            loss = ce_sum * world / all_feats.shape[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # the logged loss: the global batch's mean, the same for any process count
            step_loss = all_gather_tensor(ce_sum.detach().view(1)).sum() / all_feats.shape[0]
            loss_sum += step_loss
            step += 1
            if int(t["log_every"]) and step % int(t["log_every"]) == 0:
                writer.write(step, {"loss": step_loss.item(), "lr": lr, "epoch": epoch})
        dropped = int(all_gather_tensor(torch.tensor([dropped], device=info.device)).sum())
        unreadable["train"] = max(unreadable["train"], dropped)
        record = {"epoch": epoch + 1, "lr": lr, "loss": (loss_sum / max(len(loader), 1)).item()}
        every = int(t["eval_every"])
        if (every and (epoch + 1) % every == 0) or epoch + 1 == epochs:
            record.update(evaluate())
        history.append(record)
        writer.write(step, record)
        logger.info("%s", format_epoch(record, epochs, dropped))
        if info.is_main:
            atomic_torch_save(
                {"epoch": epoch + 1, "head": head.state_dict(), "optimizer": opt.state_dict(),
                 "history": history, "config": cfg, **identity},
                ckpt_path,
            )  # fmt: skip
    writer.close()
    if tensor_sha256(backbone.state_dict()) != hash_before:
        raise LinearEvalError("the frozen backbone weights changed during linear training")
    final = evaluate()
    results = dict(final, epochs=epochs, num_classes=num_classes, frozen_weights_unchanged=True,
                   num_train=len(train_ds) - unreadable["train"],
                   num_val=len(val_ds) - unreadable["val"], unreadable_images=unreadable,
                   weights=str(cfg["model"]["weights"]), weights_sha256=meta["sha256"],
                   history=history)  # fmt: skip
    return results


def summary(results: dict) -> str:
    """The printed table: top-1 / top-5."""
    title = f"linear probe, percent ({results['num_classes']} classes, {results['epochs']} epochs)"
    return format_table([{"metric": k, "value": results[k]} for k in ("top1", "top5")], title)


def format_epoch(record: dict, epochs: int, unreadable: int = 0) -> str:
    """One log line for an epoch record, e.g. ``epoch 3/100  lr 0.0200  loss 1.2346  top1 66.90%``.

    Args:
        record: {"epoch", "lr", "loss"} plus optional "top1" / "top5" (percent).
        epochs: total epochs of the run.
        unreadable: training images left out in this epoch (shown when non-zero).
    """
    parts = [f"epoch {record['epoch']}/{epochs}", f"lr {record['lr']:.4g}",
             f"loss {record['loss']:.4f}"]  # fmt: skip
    parts += [f"{k} {record[k]:.2f}%" for k in ("top1", "top5") if k in record]
    if unreadable:
        parts.append(f"({unreadable} unreadable images left out)")
    return "  ".join(parts)


EVALUATION = runner.Evaluation(
    name="linear",
    prog="imsvd-linear",
    description="Linear probe on a frozen backbone (Places205 / ImageNet recipes)",
    default_config="imagenet_linear",
    results_name=RESULTS_NAME,
    validate=validate,
    run=run,
    summary=summary,
)


def main(argv: list[str] | None = None) -> int:
    """Entry point (``imsvd-linear``); returns the exit code (2 for user errors)."""
    return runner.main(EVALUATION, argv)


if __name__ == "__main__":
    sys.exit(main())
