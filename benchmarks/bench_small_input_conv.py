#!/usr/bin/env python3
"""``SmallInputConv2d`` (pretrain/models/backbone.py) against ``nn.Conv2d``: forward + backward
time.

Part 1 times each convolution shape whose output is 1x1 in a ResNet-18 with the ``small_s2`` stem
on 32 px views (layer4, and the stride-2 entry of layer4) at the demo's batch. Part 2 times the
demo's complete training step (two views, ResNet-18 small_s2, projector 1024-1040, IMSVD loss
with B = 10, backward, SGD step) with the backbone's convolutions as ``nn.Conv2d`` (reference)
and as ``SmallInputConv2d`` (the default). Both parts run in the same process, interleaved by
round; the median is reported, with the ratio reference / new.

    python benchmarks/bench_small_input_conv.py [--batch 256] [--size 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.losses.imsvd import IMSVDLoss  # noqa: E402
from pretrain.models.backbone import SmallInputConv2d  # noqa: E402
from pretrain.models.build import build_model  # noqa: E402

# (in, out, kernel, stride, padding, input side) of the 1x1-output convs of ResNet-18 small_s2
# at 32 px: layer4's 3x3 convs, its stride-2 entry and its 1x1 stride-2 shortcut
SHAPES = [(512, 512, 3, 1, 1, 1), (256, 512, 3, 2, 1, 2), (256, 512, 1, 2, 0, 2)]


def time_it(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def conv_case(cls, cin: int, cout: int, k: int, stride: int, pad: int, side: int, batch: int):
    torch.manual_seed(0)
    conv = cls(cin, cout, k, stride, pad, bias=False)
    x = torch.randn(batch, cin, side, side, requires_grad=True)
    g = torch.randn(batch, cout, 1, 1)

    def step():
        conv.zero_grad(set_to_none=True)
        conv(x).backward(g)

    return step


def train_case(small: bool, args):
    torch.manual_seed(0)
    model = build_model(
        {"arch": "resnet18", "stem": "small_s2", "projector": "1024-1040", "zero_init_residual": 1}
    )
    if not small:
        for m in model.modules():
            if type(m) is SmallInputConv2d:
                m.__class__ = nn.Conv2d
    crit = IMSVDLoss(bin_size=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x1 = torch.randn(args.batch, 3, args.size, args.size)
    x2 = torch.randn_like(x1)

    def step():
        loss = crit(model(x1), model(x2))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}")
    rows = []
    for shape in SHAPES:
        cin, cout, k, stride, _, side = shape
        name = f"conv {k}x{k} {cin}->{cout} s{stride} on {side}x{side}"
        ref = conv_case(nn.Conv2d, *shape, args.batch)
        new = conv_case(SmallInputConv2d, *shape, args.batch)
        rows.append((name, ref, new, 5))
    rows.append((f"demo step, {args.size} px", train_case(False, args), train_case(True, args), 1))
    print(f"{'fwd+bwd':44s} {'nn.Conv2d':>12s} {'SmallInput':>12s} {'ratio':>7s}")
    for name, ref, new, reps in rows:
        tr, tn = [], []
        for _ in range(args.rounds):
            tr.append(time_it(ref, reps))
            tn.append(time_it(new, reps))
        r, n = statistics.median(tr), statistics.median(tn)
        print(f"{name:44s} {r * 1e3:10.1f}ms {n * 1e3:10.1f}ms {r / n:6.2f}x")


if __name__ == "__main__":
    main()
