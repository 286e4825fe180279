"""Linear probe on a frozen backbone: Places205 and ImageNet (one implementation, two configs).

    python -m transfer.linear --config places205_linear --weights W --output-dir OUT \
        data.train_root=places205/train data.val_root=places205/val
    python -m transfer.linear --config imagenet_linear --weights W --output-dir OUT \
        data.train_root=imagenet/train data.val_root=imagenet/val
    torchrun --nproc_per_node 8 -m transfer.linear --config ... (same arguments)

The backbone is frozen in eval mode; its pooled features go through an optional
BatchNorm1d(affine=False) (Places205 protocol) and one Linear layer, the only trained module
(DistributedDataParallel across processes). The BatchNorm normalises over the GLOBAL batch
(features are all-gathered; they carry no gradient), so N processes train exactly like one.
Every epoch the head and optimizer are saved atomically to OUT/linear_checkpoint.pth and a
rerun resumes from it. Validation features (deterministic transform) are cached in
OUT/features. After training the backbone's content hash is compared with the one before
training; a change is an error. OUT/linear_results.json holds top-1/top-5.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ConfigError

logger = logging.getLogger("imsvd.linear")

CHECKPOINT_NAME = "linear_checkpoint.pth"
RESULTS_NAME = "linear_results.json"


class LinearEvalError(ValueError):
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


def _datasets(cfg: dict):
    from pretrain.data import build_image_dataset
    from pretrain.transforms import eval_transform, train_linear_transform

    d = cfg["data"]
    if d["train_aug"] == "random_resized_crop":
        train_tf = train_linear_transform(int(d["train_crop"]), tuple(d["train_scale"]))
    elif d["train_aug"] == "center_crop":
        train_tf = eval_transform(int(d["resize"]), int(d["crop"]))
    else:
        raise ConfigError(
            f"data.train_aug must be 'random_resized_crop' or 'center_crop', got {d['train_aug']!r}"
        )
    if not (d["train_root"] or d["train_list"]) or not (d["val_root"] or d["val_list"]):
        raise ConfigError("linear eval needs data.train_root (or train_list) and data.val_root")
    train = build_image_dataset(d["train_root"] or None, d["train_list"] or None, train_tf)
    val = build_image_dataset(
        d["val_root"] or None,
        d["val_list"] or None,
        eval_transform(int(d["resize"]), int(d["crop"])),
    )
    return train, val


def _load_head_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    from pretrain.checkpoint import CheckpointError, load_plain

    try:
        obj = load_plain(path)
    except CheckpointError as e:
        raise LinearEvalError(f"cannot read linear-head checkpoint: {e}") from None
    for key in ("epoch", "head", "optimizer", "weights_sha256"):
        if key not in obj:
            raise LinearEvalError(f"linear-head checkpoint {path} lacks field '{key}'")
    return obj


def train_linear(cfg: dict) -> dict:
    """Train and evaluate the linear head from a resolved config (linear_base.yaml schema).

    Args:
        cfg: config dict; weights and output_dir required.
    Returns:
        Results dict (top1, top5, epochs, history); identical on every rank.
    """
    from pretrain.checkpoint import atomic_torch_save, tensor_sha256
    from pretrain.config import save_config
    from pretrain.dist import all_gather_tensor, get_rank, init_distributed
    from pretrain.log import MetricWriter, print_table, progress, setup_logging, write_json_atomic
    from transfer.features import (
        backbone_from_weights,
        cached_features,
        feature_dim,
        forward_features,
    )

    for key in ("weights", "output_dir"):
        if not cfg[key]:
            raise ConfigError(f"config key '{key}' is required (use --{key.replace('_', '-')})")
    out = Path(cfg["output_dir"])
    info = init_distributed(cfg["device"])
    setup_logging(str(out), rank=info.rank)
    t = cfg["train"]
    world = info.world_size
    if int(t["batch_size"]) % world:
        raise ConfigError(
            f"train.batch_size={t['batch_size']} is not divisible by {world} processes"
        )
    local_bs = int(t["batch_size"]) // world
    torch.manual_seed(int(cfg["seed"]))
    if info.is_main:
        save_config(cfg, out / "config.yaml")

    backbone, meta = backbone_from_weights(cfg["weights"], info.device)
    hash_before = tensor_sha256(backbone.state_dict())
    train_ds, val_ds = _datasets(cfg)
    num_classes = int(cfg["head"]["num_classes"]) or max(
        getattr(train_ds, "num_classes", 0), max(train_ds.targets) + 1
    )
    layer = "pool5"
    head = LinearHead(feature_dim(backbone, layer), num_classes, bool(cfg["head"]["batchnorm"]))
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
    start_epoch, history = 0, []
    state = _load_head_checkpoint(ckpt_path) if t["resume"] else None
    if state is not None:
        if state["weights_sha256"] != meta["sha256"]:
            raise LinearEvalError(
                f"{ckpt_path} was trained on other backbone weights; use a new output_dir"
            )
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state.get("history", []))
        logger.info("resumed linear head from %s at epoch %d", ckpt_path, start_epoch)

    sampler = torch.utils.data.DistributedSampler(
        train_ds, num_replicas=world, rank=info.rank, shuffle=True, seed=int(cfg["seed"])
    )
    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=local_bs, sampler=sampler, num_workers=int(cfg["data"]["num_workers"]),
        pin_memory=info.device.type == "cuda", drop_last=False,
    )  # fmt: skip
    writer = MetricWriter(str(out), rank=info.rank, tensorboard=False)
    epochs = int(t["epochs"])
    val_feats = None

    def evaluate() -> dict:
        nonlocal val_feats
        if val_feats is None:
            val_feats = cached_features(
                out / "features", "val", backbone, val_ds, meta["sha256"], layer, local_bs,
                info.device, int(cfg["data"]["num_workers"]),
            )  # fmt: skip
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
        for images, labels in progress(loader, total=len(loader), desc=f"epoch {epoch}",
                                       rank=get_rank()):  # fmt: skip
            images, labels = images.to(info.device), labels.to(info.device)
            with torch.no_grad():
                feats = forward_features(backbone, images, layer)
                sizes = all_gather_tensor(torch.tensor([feats.shape[0]], device=info.device))
                all_feats = all_gather_tensor(feats)
            offset = int(sizes[: info.rank].sum())
            logits = model(all_feats, slice(offset, offset + feats.shape[0]))
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            step += 1
            if int(t["log_every"]) and step % int(t["log_every"]) == 0:
                writer.write(step, {"loss": loss.item(), "lr": lr, "epoch": epoch})
        record = {"epoch": epoch + 1, "lr": lr, "loss": (loss_sum / max(len(loader), 1)).item()}
        every = int(t["eval_every"])
        if (every and (epoch + 1) % every == 0) or epoch + 1 == epochs:
            record.update(evaluate())
        history.append(record)
        writer.write(step, record)
        logger.info("epoch %d: %s", epoch + 1, record)
        if info.is_main:
            atomic_torch_save(
                {"epoch": epoch + 1, "head": head.state_dict(), "optimizer": opt.state_dict(),
                 "weights_sha256": meta["sha256"], "history": history},
                ckpt_path,
            )  # fmt: skip
    writer.close()
    if tensor_sha256(backbone.state_dict()) != hash_before:
        raise LinearEvalError("the frozen backbone weights changed during linear training")
    final = evaluate()
    results = dict(final, epochs=epochs, num_classes=num_classes, frozen_weights_unchanged=True,
                   weights=str(cfg["weights"]), weights_sha256=meta["sha256"],
                   history=history)  # fmt: skip
    if info.is_main:
        write_json_atomic(results, out / RESULTS_NAME)
        print_table([{"metric": k, "value": final[k]} for k in ("top1", "top5")],
                    title=f"linear probe ({num_classes} classes, {epochs} epochs)")  # fmt: skip
    return results


def head_predictions(head: LinearHead, feats: np.ndarray) -> np.ndarray:
    """Class predictions of a trained head for raw features (eval mode)."""
    head.eval()
    with torch.no_grad():
        return head(torch.as_tensor(feats, dtype=torch.float32)).argmax(1).numpy()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for user errors)."""
    from transfer.evalcfg import load_eval_config

    p = argparse.ArgumentParser(
        description="Linear probe on a frozen backbone (Places205 / ImageNet recipes)",
        epilog="Overrides: dotted config keys, e.g. data.train_root=/data/train train.epochs=14",
    )
    p.add_argument("--config", default="imagenet_linear", help="path, or a name in configs/eval/")
    p.add_argument("--weights", help="backbone checkpoint (any kind load_backbone reads)")
    p.add_argument("--output-dir", help="checkpoint, features cache, results JSON, logs")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = p.parse_args(argv)
    try:
        train_linear(load_eval_config(args, {"weights": "weights", "output_dir": "output_dir"}))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
