#!/usr/bin/env python3
"""Semi-supervised transfer on Fashion-MNIST: 1% and 10% of the train labels, fine-tuned and
frozen (linear probe), from the demo's IMSVD backbone and from the same network at torchvision's
random initialisation. Test top-1 on the 10,000 test images.

    python benchmarks/semi_fashion_mnist.py --weights outputs/demo/backbone_final.pth

Needs the demo's image tree (``make demo`` writes it to .cache/fashion_mnist) and its backbone.
Runs go one after another (two cores: parallel torch jobs thrash), each through the console
entry points (``python -m transfer.eval.finetune`` / ``transfer.eval.linear``) with the shipped
recipes: fine-tuning ``finetune_fashion_mnist_{1,10}pct``; the probe ``linear_fashion_mnist``
with the same subset (``data.train_fraction``, seed 0), epochs and batch size as the fine-tuning
recipe. A run whose results file exists is not run again. The table (top-1, minutes per run) is
printed and written to ``--out``/semi_fashion_mnist.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pretrain.checkpoint import export_backbone, load_backbone  # noqa: E402
from pretrain.models.backbone import build_backbone  # noqa: E402

# fraction -> (fine-tuning recipe, the probe's overrides: the recipe's subset, epochs, batch)
SETTINGS = {
    "1%": ("finetune_fashion_mnist_1pct",
           ["data.train_fraction=0.01", "train.epochs=30", "train.batch_size=64"]),
    "10%": ("finetune_fashion_mnist_10pct",
            ["data.train_fraction=0.1", "train.epochs=15", "train.batch_size=128"]),
}  # fmt: skip


def random_init_weights(path: Path, demo_weights: str) -> Path:
    """The demo network at torchvision's default initialisation (seed 0), in the backbone format."""
    if path.is_file():
        return path
    _, meta = load_backbone(demo_weights)
    torch.manual_seed(0)
    net = build_backbone(meta["arch"], False, meta["stem"])
    path.parent.mkdir(parents=True, exist_ok=True)
    export_backbone(path, net.state_dict(), arch=meta["arch"], stem=meta["stem"], epoch=0,
                    config=None)  # fmt: skip
    return path


def run(tool: str, config: str, weights: Path, out: Path, tree: Path, extra: list[str]) -> dict:
    """One evaluation run (skipped when its results exist); returns its results + minutes."""
    results = out / f"{tool}_results.json"
    timing = out / "minutes.json"
    if not results.is_file():
        cmd = [sys.executable, "-m", f"transfer.eval.{tool}", "--config", config,
               "--weights", str(weights), "--output-dir", str(out),
               f"data.train_root={tree / 'train'}", f"data.val_root={tree / 'test'}",
               *extra]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        timing.write_text(json.dumps({"minutes": (time.perf_counter() - t0) / 60}))
    res = json.loads(results.read_text())
    return {"top1": res["top1"], "best_top1": res["best"]["top1"],
            "num_train": res["num_train"], **json.loads(timing.read_text())}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(ROOT / "outputs/demo/backbone_final.pth"))
    p.add_argument("--tree", default=str(ROOT / ".cache/fashion_mnist"))
    p.add_argument("--out", default=str(ROOT / "outputs/semi_fashion_mnist"))
    args = p.parse_args(argv)
    out, tree = Path(args.out), Path(args.tree)
    inits = {"IMSVD (demo)": Path(args.weights),
             "random init": random_init_weights(out / "random_init.pth", args.weights)}  # fmt: skip
    rows = []
    for fraction, (recipe, probe) in SETTINGS.items():
        for name, weights in inits.items():
            tag = f"{fraction.rstrip('%')}pct_{'imsvd' if 'IMSVD' in name else 'random'}"
            ft = run("finetune", recipe, weights, out / f"finetune_{tag}", tree, [])
            lin = run("linear", "linear_fashion_mnist", weights, out / f"linear_{tag}", tree, probe)
            rows.append({"labels": fraction, "init": name, "finetune": ft, "linear": lin})
    print("| labels | start | fine-tuned top-1 | min | frozen probe top-1 | min |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ft, lin = r["finetune"], r["linear"]
        print(f"| {r['labels']} ({ft['num_train']} images) | {r['init']} | {ft['top1']:.2f} | "
              f"{ft['minutes']:.1f} | {lin['top1']:.2f} | {lin['minutes']:.1f} |")  # fmt: skip
    (out / "semi_fashion_mnist.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
