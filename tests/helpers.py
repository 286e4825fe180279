"""Builders shared by the tests: tiny image trees, VOC folders and COCO datasets, tiny models and
weights in every checkpoint layout the readers accept, state-dict comparisons, and tools/ scripts
as modules.

Fixtures over these live in ``conftest.py``; tests that need a fresh, mutable copy call the
builders directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
VOC_TINY_CLASSES = ("aeroplane", "bicycle", "bird")
# a tiny IMSVD recipe (ResNet-18, CIFAR stem, 64-32 projector) as a training state records it
TINY_CONFIG = {"model": {"arch": "resnet18", "stem": "small", "projector": "64-32"}, "seed": 0}
# the layouts write_checkpoint_kind writes (every one is read by pretrain.checkpoint)
CHECKPOINT_KINDS = ("exported", "train_state", "reference_model", "model_final", "torchvision",
                    "moco")  # fmt: skip


def save_state(path: Path, model, **kwargs) -> Path:
    """``pretrain.checkpoint.save_training_state`` with the tests' defaults (no optimizer or
    scaler, position 0, :data:`TINY_CONFIG`); keywords override them or pass through."""
    from pretrain.checkpoint import save_training_state

    defaults = dict(optimizer=None, scaler=None, epoch=0, step=0, step_in_epoch=0)
    return save_training_state(path, model=model, **{**defaults, "config": TINY_CONFIG, **kwargs})


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago, for a test's own rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def act_as_launcher(rank: int, world: int, port: int) -> None:
    """The launcher's job (torchrun, SLURM), done by a test that spawns its ranks: RANK,
    WORLD_SIZE, LOCAL_RANK and MASTER_ADDR / MASTER_PORT. Library code never writes these."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (tools/ is not a package) by path."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_imsvd_model(spec: str = "64-32", stem: str = "small"):
    """An IMSVD model: ResNet-18 (``stem``) and a projector ``spec`` (random init)."""
    from pretrain.models.backbone import build_backbone
    from pretrain.models.build import PretrainModel
    from pretrain.models.projector import Projector

    return PretrainModel(build_backbone("resnet18", stem=stem), Projector(512, spec))


def randomised(sd: dict, seed: int = 0, integers: bool = False) -> dict:
    """Random values everywhere (BN statistics included) so that equality checks mean something.

    Args:
        sd: a state dict.
        seed: generator seed.
        integers: also draw integer tensors (num_batches_tracked) instead of copying them.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.is_floating_point():
            out[k] = torch.rand(v.shape, generator=g) + 0.1
        elif integers:
            out[k] = torch.randint(0, 1000, v.shape, generator=g, dtype=v.dtype)
        else:
            out[k] = v.clone()
    return out


def resnet18_backbone_sd(seed: int = 1, integers: bool = False) -> dict:
    """A randomised ResNet-18 backbone state dict (standard stem, no fc)."""
    from pretrain.models.backbone import build_backbone

    return randomised(build_backbone("resnet18", stem="standard").state_dict(), seed, integers)


def torchvision_resnet18_sd() -> "OrderedDict[str, torch.Tensor]":
    """A seeded torchvision ResNet-18 state dict with fc, random BN means, num_batches 7."""
    import torchvision

    torch.manual_seed(0)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    for k, v in sd.items():
        if k.endswith("running_mean"):
            v.normal_()
        elif k.endswith("num_batches_tracked"):
            v.fill_(7)
    return sd


def torchvision_sd(arch: str = "resnet50") -> "OrderedDict[str, torch.Tensor]":
    """A torchvision ResNet state dict (seed 0, default init, fc kept) with BN running statistics
    drawn from [0.5, 1.5) and num_batches_tracked 7, so that a converter that drops or mixes them
    up is seen."""
    import torchvision

    torch.manual_seed(0)
    sd = getattr(torchvision.models, arch)(weights=None).state_dict()
    for k, v in sd.items():
        if k.endswith(("running_mean", "running_var")):
            v.copy_(torch.rand_like(v) + 0.5)
        elif k.endswith("num_batches_tracked"):
            v.fill_(7)
    return sd


def export_and_convert(folder: Path, tool: str, out_name: str, arch: str = "resnet50") -> tuple:
    """:func:`torchvision_sd` exported as this project's backbone (folder/{arch}.pth) and converted
    by tools/{tool}.py to folder/out_name: (the source state dict, the converted file's path, the
    tool's summary)."""
    from pretrain.checkpoint import export_backbone

    sd = torchvision_sd(arch)
    exported, path = str(folder / f"{arch}.pth"), str(folder / out_name)
    backbone = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    export_backbone(exported, backbone, arch=arch, stem="standard", epoch=1, config=None)
    return sd, path, load_tool(tool).convert(exported, path)


def no_fc(sd: dict) -> "OrderedDict[str, torch.Tensor]":
    """``sd`` without the classifier (``fc.*``)."""
    return OrderedDict((k, v) for k, v in sd.items() if not k.startswith("fc."))


def assert_same_tensors(a: dict, b: dict) -> None:
    """Same keys, and per key the same dtype and values (compared on the CPU)."""
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


def write_checkpoint_kind(kind: str, path: str, sd: dict) -> None:
    """Write a ResNet-18 backbone ``sd`` (standard stem) in one of :data:`CHECKPOINT_KINDS`."""
    from pretrain.checkpoint import export_backbone, save_training_state
    from pretrain.models.backbone import build_backbone
    from pretrain.models.build import PretrainModel
    from pretrain.models.projector import Projector

    if kind == "exported":
        export_backbone(path, sd, arch="resnet18", stem="standard", epoch=3, config=None)
    elif kind == "train_state":
        model = PretrainModel(build_backbone("resnet18"), Projector(512, "64-32"))
        model.backbone.load_state_dict(sd)
        cfg = {"model": {"arch": "resnet18", "stem": "standard", "projector": "64-32"}}
        save_training_state(
            path, model=model, optimizer=None, scaler=None, epoch=1, step=10, step_in_epoch=0,
            config=cfg,
        )  # fmt: skip
    elif kind == "reference_model":  # IMSVD reference model.pth
        model = {f"module.backbone.{k}": v for k, v in sd.items()}
        model["module.projector.0.weight"] = torch.zeros(8, 512)
        torch.save({"epoch": 5, "model": model, "optimizer": {"state": {}}}, path)
    elif kind == "model_final":  # reference model_final.pth: bare backbone, no fc
        torch.save(sd, path)
    elif kind == "torchvision":  # e.g. VICReg / Barlow Twins resnet50.pth, or with fc
        torch.save({**sd, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}, path)
    elif kind == "moco":
        state = {f"module.encoder_q.{k}": v for k, v in sd.items()}
        state.update({f"module.encoder_k.{k}": v for k, v in sd.items()})
        state["module.encoder_q.fc.0.weight"] = torch.zeros(512, 512)
        state["module.encoder_q.fc.2.weight"] = torch.zeros(128, 512)
        state["module.queue"] = torch.zeros(128, 16)
        torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, path)
    else:
        raise ValueError(f"unknown checkpoint kind {kind!r}: expected one of {CHECKPOINT_KINDS}")


def make_weights(path: Path, seed: int = 0, arch: str = "resnet18", stem: str = "small_s2") -> Path:
    """Export a random-init backbone in this project's backbone format."""
    from pretrain.checkpoint import export_backbone
    from pretrain.models.backbone import build_backbone

    torch.manual_seed(seed)
    net = build_backbone(arch, zero_init_residual=False, stem=stem)
    export_backbone(path, net.state_dict(), arch=arch, stem=stem, epoch=0, config=None)
    return path


def class_image(label: int, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """An RGB image whose colour and stripe direction depend on the label (learnable)."""
    base = np.zeros((size, size, 3), dtype=np.float64)
    base[..., label % 3] = 180.0
    stripes = (np.arange(size) // (2 + label)) % 2 * 60.0
    base += stripes[None, :, None] if label % 2 else stripes[:, None, None]
    base += rng.normal(0, 25, size=base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def make_image_tree(root: Path, n_per_class: int, n_classes: int = 3, seed: int = 0) -> Path:
    """ImageFolder tree root/c{k}/img{i}.png."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            class_image(c, rng).save(root / f"c{c}" / f"img{i:03d}.png")
    return root


def noise_image(path: Path, size: tuple = (40, 30), seed: int = 0) -> None:
    """Save a random RGB image of ``size`` (w, h) at ``path`` (its suffix picks the format)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def dog_cat_tree(root: Path) -> Path:
    """ImageFolder tree root/{dog,cat}/{0..4}.jpg of noise images (classes sorted: cat, dog)."""
    for c, cls in enumerate(["dog", "cat"]):
        os.makedirs(root / cls)
        for i in range(5):
            noise_image(root / cls / f"{i}.jpg", seed=10 * c + i)
    return root


def add_unreadable_images(tree: Path) -> None:
    """Add two unreadable files to :func:`dog_cat_tree`: cat/bad.jpg (not an image) and
    dog/trunc.jpg (a JPEG cut at a third)."""
    (tree / "cat" / "bad.jpg").write_bytes(b"not an image")
    good = (tree / "dog" / "0.jpg").read_bytes()
    (tree / "dog" / "trunc.jpg").write_bytes(good[: len(good) // 3])


def make_voc_tree(root: Path, n_trainval: int = 30, n_test: int = 24, seed: int = 0) -> Path:
    """VOCdevkit/VOC2007 with JPEGImages and ImageSets/Main/<class>_{trainval,test}.txt.

    Image i shows class i % 3 (its label 1); a few images are marked difficult (0) for their
    class; every other (image, class) pair is -1.
    """
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    splits = {"trainval": range(n_trainval), "test": range(n_trainval, n_trainval + n_test)}
    for split, ids in splits.items():
        lines = {c: [] for c in VOC_TINY_CLASSES}
        for i in ids:
            img_id = f"{i:06d}"
            label = i % 3
            class_image(label, rng).save(voc / "JPEGImages" / f"{img_id}.jpg", quality=95)
            for c, name in enumerate(VOC_TINY_CLASSES):
                lab = 1 if c == label else -1
                if c == label and i % 7 == 0:
                    lab = 0
                lines[name].append(f"{img_id} {lab:2d}")
        for name, rows in lines.items():
            (voc / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text("\n".join(rows) + "\n")
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text(
            "\n".join(f"{i:06d}" for i in ids) + "\n"
        )
    return voc


def write_tiny_coco(
    image_dir: str,
    ann_path: str,
    names: list[str],
    categories: list[dict],
    uncompressed_rle: bool = False,
) -> str:
    """A tiny COCO-format instance dataset: ``len(names)`` 64 x 80 images, each with a rectangle
    (category 1, polygon mask) and an ellipse (category 3, RLE mask; with ``uncompressed_rle``
    every other one in the uncompressed form, run lengths in column-major order).

    Args:
        image_dir: where the PNG images go (created).
        ann_path: the annotation JSON written (its folder is created).
        names: the images' file names, in image-id order (ids from 1).
        categories: the JSON's ``categories`` (it must hold ids 1 and 3).

    Returns:
        ``ann_path``.
    """
    from pycocotools import mask as mask_util  # only the detection tests need it

    rng = np.random.default_rng(0)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.dirname(ann_path) or ".", exist_ok=True)
    images, anns = [], []
    h, w = 64, 80
    yy, xx = np.mgrid[0:h, 0:w]
    for i, name in enumerate(names):
        img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        x0, y0 = int(rng.integers(2, 30)), int(rng.integers(2, 25))
        rw, rh = int(rng.integers(15, 35)), int(rng.integers(12, 30))
        img[y0 : y0 + rh, x0 : x0 + rw] = (220, 40, 40)
        poly = [float(v) for v in (x0, y0, x0 + rw, y0, x0 + rw, y0 + rh, x0, y0 + rh)]
        box = dict(segmentation=[poly], bbox=[x0, y0, rw, rh], area=float(rw * rh))
        cx, cy = int(rng.integers(20, 60)), int(rng.integers(15, 50))
        ax, ay = int(rng.integers(6, 14)), int(rng.integers(5, 12))
        m = (((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2) <= 1.0
        img[m] = (40, 200, 60)
        rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        if uncompressed_rle and i % 2:
            segm = {"size": [h, w], "counts": _column_major_runs(m)}
        else:
            segm = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
        blob = dict(segmentation=segm, bbox=mask_util.toBbox(rle).tolist(), area=float(m.sum()))
        for category, ann in ((1, box), (3, blob)):
            anns.append(dict(image_id=i + 1, category_id=category, iscrowd=0, **ann))
        Image.fromarray(img).save(os.path.join(image_dir, name))
        images.append(dict(id=i + 1, file_name=name, height=h, width=w))
    for k, a in enumerate(anns):
        a["id"] = k + 1
    with open(ann_path, "w") as f:
        json.dump(dict(images=images, annotations=anns, categories=categories), f)
    return ann_path


def _column_major_runs(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts: alternating 0 / 1 run lengths, column-major, from 0."""
    counts, prev, run = [], 0, 0
    for v in mask.astype(np.uint8).flatten(order="F"):
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    return counts + [run]


def run_module(module: str, args: list[str], nproc: int = 1, timeout: int = 120) -> str:
    """Run ``python -m module args`` (or torchrun with nproc gloo processes); return stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", module, *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout
