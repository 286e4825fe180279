"""How the frozen checkpoint files of this folder were written (run once per new format version;
the test never runs it: it reads the committed files, so a change of a writer cannot change them).

Each file holds a ResNet-18 (``standard`` stem) and, for training states, a 512-64-32 projector with
every floating tensor set to :func:`pattern` (which gzip shrinks from 45 MB to a few hundred KB;
a BatchNorm's running_var stays positive). ``python tests/data/checkpoints/make_frozen.py``
writes, gzipped:

* ``train_state_v1.pth.gz``: ``imsvd-train-state`` version 1 (as version 2 without
  ``hash_scheme`` / ``sha256``, docs/CHECKPOINT_FORMAT.md section 2);
* ``train_state_v2.pth.gz``: version 2, SGD momentum state after one step;
* ``train_state_v2_out_norm.pth.gz``: version 2 of the earlier layout of ``model.out_norm: bn``,
  the norm stored as top-level ``out_norm.*`` keys;
* ``backbone_v1.pth.gz``: ``imsvd-backbone`` version 1;
* ``mmdet_v1.pth.gz``: ``imsvd-convert-mmdet`` output (``imsvd-mmdet-weights`` version 1) of
  that backbone; ``d2.pkl.gz``: ``imsvd-convert-d2`` output (a Detectron2 weight pickle).
"""

from __future__ import annotations

import gzip
import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CONFIG = {
    "model": {
        "arch": "resnet18",
        "stem": "standard",
        "zero_init_residual": False,
        "projector": "64-32",
        "out_norm": "none",
    },
    "train": {"seed": 0, "batch_size": 16, "epochs": 2},
}


def pattern(t: torch.Tensor) -> torch.Tensor:
    """The frozen files' value of a floating tensor: 0.125 x (1 + index mod 7), exact in fp32."""
    n = torch.arange(t.numel(), dtype=torch.float64)
    return ((n % 7 + 1) * 0.125).to(t.dtype).view_as(t)


def patterned(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(pattern(t))
    return model


def tiny_model(out_norm: str = "none"):
    from pretrain.models.build import build_model

    return patterned(build_model({**CONFIG["model"], "out_norm": out_norm}))


def _gzip(src: Path, name: str) -> None:
    with open(src, "rb") as f, open(HERE / name, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as g:
            shutil.copyfileobj(f, g)


def main() -> None:
    sys.path.insert(0, str(HERE.parents[2]))
    from pretrain.checkpoint import export_backbone
    from pretrain.checkpoint.common import strip_prefix
    from pretrain.checkpoint.train_state import save_training_state, train_state_sha256
    from transfer.detection.d2.convert import convert as convert_d2
    from transfer.detection.mmdet.convert import convert as convert_mmdet

    tmp = Path(tempfile.mkdtemp())
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = pattern(p)
    opt.step()
    patterned(model)  # the weights again the pattern; the momentum buffers hold it too
    kw = dict(scaler=None, epoch=1, step=3, step_in_epoch=1, config=CONFIG, rng=None)
    v2 = save_training_state(tmp / "v2.pth", model=model, optimizer=opt, **kw)
    _gzip(v2, "train_state_v2.pth.gz")

    state = torch.load(v2, weights_only=False)
    v1 = dict(state, format_version=1)
    del v1["hash_scheme"], v1["sha256"]
    torch.save(v1, tmp / "v1.pth")
    _gzip(tmp / "v1.pth", "train_state_v1.pth.gz")

    normed = tiny_model("bn")
    sd = normed.state_dict()
    last = max(int(k.split(".")[1]) for k in sd if k.startswith("projector."))
    old = {
        (f"out_norm.{k.split('.', 2)[2]}" if k.startswith(f"projector.{last}.") else k): v
        for k, v in sd.items()
    }
    legacy = dict(state, model=old, optimizer=None)
    legacy["config"] = {**CONFIG, "model": {**CONFIG["model"], "out_norm": "bn"}}
    legacy["sha256"] = train_state_sha256(legacy)
    torch.save(legacy, tmp / "legacy.pth")
    _gzip(tmp / "legacy.pth", "train_state_v2_out_norm.pth.gz")

    backbone = strip_prefix(model.state_dict(), "backbone.")
    export_backbone(
        tmp / "bb.pth", backbone, arch="resnet18", stem="standard", epoch=2, config=CONFIG
    )
    _gzip(tmp / "bb.pth", "backbone_v1.pth.gz")
    print(convert_d2(str(tmp / "bb.pth"), str(tmp / "d2.pkl")))
    _gzip(tmp / "d2.pkl", "d2.pkl.gz")
    print(convert_mmdet(str(tmp / "bb.pth"), str(tmp / "mmdet.pth")))
    _gzip(tmp / "mmdet.pth", "mmdet_v1.pth.gz")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
