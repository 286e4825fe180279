"""Backbone, projector and arch inference."""

import pytest
import torch
import torchvision

from pretrain.model import (
    Projector,
    build_backbone,
    build_model,
    infer_arch,
    infer_stem,
    parse_projector_spec,
)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_backbone_keys_match_torchvision_without_fc(arch):
    ref = getattr(torchvision.models, arch)(weights=None).state_dict()
    ours = build_backbone(arch).state_dict()
    assert set(ours) == {k for k in ref if not k.startswith("fc.")}
    assert infer_arch(ours) == arch


def test_zero_init_residual_and_output():
    bb = build_backbone("resnet50")
    assert bb.num_features == 2048
    assert torch.all(bb.layer1[0].bn3.weight == 0)
    bb.eval()
    assert bb(torch.randn(1, 3, 64, 64)).shape == (1, 2048)


def test_small_stems():
    small = build_backbone("resnet18", stem="small")
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert infer_stem(small.state_dict()) == "small"
    s2 = build_backbone("resnet18", stem="small_s2")
    assert s2.conv1.stride == (2, 2) and isinstance(s2.maxpool, torch.nn.MaxPool2d)
    assert infer_stem(build_backbone("resnet18").state_dict()) == "standard"
    with pytest.raises(ValueError, match="stem"):
        build_backbone("resnet18", stem="tiny")
    with pytest.raises(ValueError, match="arch"):
        build_backbone("vit_b")


def test_projector_layout():
    proj = Projector(2048, "8192-8160")
    assert [type(m).__name__ for m in proj] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert proj[3].bias is None and proj.out_dim == 8160
    assert parse_projector_spec("8192-8192-8160") == [8192, 8192, 8160]
    with pytest.raises(ValueError, match="8192-8160"):
        parse_projector_spec("8192x8160")


def test_build_model_forward():
    m = build_model(
        {"arch": "resnet18", "stem": "small", "projector": "64-160", "zero_init_residual": True}
    )
    out = m(torch.randn(4, 3, 16, 16))
    assert out.shape == (4, 160)


def test_infer_arch_rejects_non_resnet():
    with pytest.raises(ValueError, match="not a torchvision ResNet"):
        infer_arch({"encoder.weight": torch.zeros(1)})
