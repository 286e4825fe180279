"""Two-view data pipeline throughput: reference PIL pipeline vs the fast pipeline.

Both run the same augmentation parameters on the same ImageNet-sized JPEGs, on one core
(torch.set_num_threads(1), num_workers=0), through the real pretraining loader. Figures:

* ref       -- reference pipeline: every op on PIL images in the loader, float tensors out;
* fast/cpu  -- fast pipeline end to end with its device stage on this CPU;
* fast/load -- fast pipeline loader side only (decode + crops, uint8): the per-core cost of data
               loading when the device stage runs on an accelerator;
* fast/cuda -- loader side + device stage on CUDA (only when a GPU is present).

Usage: python benchmarks/bench_pipeline.py [--images 64] [--size 500x375] [--rounds 3]
"""

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pretrain.data.loader import build_pretrain_loader  # noqa: E402


def make_jpegs(root: str, n: int, w: int, h: int) -> None:
    """Textured JPEGs (smooth colour waves + noise) in an ImageFolder tree with 4 classes."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, w)[None, :]
    y = np.linspace(0, 1, h)[:, None]
    for i in range(n):
        d = os.path.join(root, f"c{i % 4}")
        os.makedirs(d, exist_ok=True)
        f = rng.uniform(2, 20, 3)
        waves = [
            np.sin(2 * np.pi * (f[c] * x + f[(c + 1) % 3] * y * y) + rng.uniform(0, 6))
            for c in range(3)
        ]
        arr = (127 + 80 * np.stack(waves, -1) + rng.normal(0, 20, (h, w, 3))).clip(0, 255)
        buf = io.BytesIO()
        Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=90)
        with open(os.path.join(d, f"{i:04d}.jpg"), "wb") as fh:
            fh.write(buf.getvalue())


def images_per_s(root: str, pipeline: str, device: str, prepare: bool, epoch: int) -> float:
    cfg = {
        "kind": "imagefolder",
        "root": root,
        "pipeline": pipeline,
        "num_workers": 0,
        "pin_memory": False,
        "image_size": 224,
    }
    loader = build_pretrain_loader(
        cfg, rank=0, world_size=1, seed=0, batch_size_per_rank=32, device=device
    )
    loader.set_epoch(epoch)
    n = 0
    t0 = time.perf_counter()
    for batch in loader:
        if prepare:
            x1, x2 = loader.prepare(batch, device)
            if device == "cuda":
                torch.cuda.synchronize()
        n += batch["size"]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", default="500x375")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    w, h = (int(v) for v in args.size.split("x"))
    cases = [
        ("ref", "pil", "cpu", True),
        ("fast/cpu", "fast", "cpu", True),
        ("fast/load", "fast", "cpu", False),
    ]
    if torch.cuda.is_available():
        cases.append(("fast/cuda", "fast", "cuda", True))
    with tempfile.TemporaryDirectory() as root:
        make_jpegs(root, args.images, w, h)
        images_per_s(root, "fast", "cpu", True, 99)  # warm-up (page cache, allocator)
        if torch.cuda.is_available():
            images_per_s(root, "fast", "cuda", True, 99)
        res = {name: [] for name, *_ in cases}
        for r in range(args.rounds):  # interleaved rounds, median: fair under CPU contention
            for name, pipe, dev, prep in cases:
                res[name].append(images_per_s(root, pipe, dev, prep, r))
    med = {k: float(np.median(v)) for k, v in res.items()}
    print(f"{args.images} JPEGs {w}x{h}, two 224 views each, 1 thread, num_workers=0")
    print(f"{'pipeline':<10} {'images/s':>9} {'ratio vs ref':>13}")
    for name in med:
        print(f"{name:<10} {med[name]:9.1f} {med[name] / med['ref']:12.2f}x")


if __name__ == "__main__":
    main()
