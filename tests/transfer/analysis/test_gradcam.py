"""Grad-CAM highlights the region that drives a unit."""

import numpy as np
import pytest
import torch
from torch import nn

from transfer.analysis.gradcam import GradCAM, choose_layer, overlay, unit_score

B = 2  # variable 0: units (red, green); variable 1: a constant pair


class ColourNet(nn.Module):
    """conv (red / green detectors) -> ReLU -> 2x2 max-pool -> mean pool -> unit logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, :, 1, 1] = torch.tensor([1.0, -1.0, -1.0])  # red
            self.conv.weight[1, :, 1, 1] = torch.tensor([-1.0, 1.0, -1.0])  # green
        self.feat = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(2, 2 * B, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0], [0.5, 0.5], [0.0, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feat(self.conv(x)).mean(dim=(2, 3)))


def scene() -> torch.Tensor:
    x = torch.zeros(1, 3, 32, 32)
    x[0, 0, 4:12, 18:26] = 1.0  # red square, top right
    x[0, 1, 20:28, 2:10] = 1.0  # green square, bottom left
    return x


def peak(cam: torch.Tensor) -> tuple[int, int]:
    flat = int(cam.flatten().argmax())
    return flat // cam.shape[-1], flat % cam.shape[-1]


def test_cam_peaks_inside_the_square_that_drives_the_unit():
    net = ColourNet().eval()
    x = scene().repeat(2, 1, 1, 1)
    with GradCAM(net, "feat") as cam_fn:
        cams = cam_fn(x, unit_score(0, [0, 1], B))  # image 0: "red" unit, image 1: "green"
    assert cams.shape == (2, 32, 32)
    assert float(cams.min()) >= 0.0 and float(cams.max()) == pytest.approx(1.0)
    r, c = peak(cams[0])
    assert 4 <= r < 12 and 18 <= c < 26
    r, c = peak(cams[1])
    assert 20 <= r < 28 and 2 <= c < 10
    red = torch.zeros(32, 32, dtype=torch.bool)
    red[4:12, 18:26] = True
    assert cams[0][red].mean() > 5 * cams[0][~red].mean()


def test_hooks_removed_and_errors():
    net = ColourNet().eval()
    with GradCAM(net, net.feat) as cam_fn:
        cam_fn(scene(), unit_score(0, 0, B))
    assert not net.feat._forward_hooks
    with pytest.raises(ValueError, match="not a submodule"):
        GradCAM(net, "nope")
    with pytest.raises(ValueError, match="eval mode"):
        GradCAM(net.train(), "feat")(scene(), unit_score(0, 0, B))
    with pytest.raises(ValueError, match="out of range"):
        GradCAM(net.eval(), "feat")(scene(), unit_score(5, 0, B))


def test_choose_layer_and_overlay():
    from pretrain.models.backbone import build_backbone

    net = build_backbone("resnet18", stem="small_s2").eval()
    assert choose_layer(net, 32) == "layer2"  # small_s2 at 32 px: layer3 is 2x2, layer4 1x1
    assert choose_layer(net, 224) == "layer4"
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    out = overlay(img, np.ones((8, 8)))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8 and out.max() > 0
