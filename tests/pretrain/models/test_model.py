"""Backbone, projector and arch inference."""

import pytest
import torch
import torchvision

from pretrain.models.backbone import SmallInputConv2d, build_backbone
from pretrain.models.build import build_model
from pretrain.models.projector import Projector, parse_projector_spec
from pretrain.models.resnet import infer_arch, infer_stem


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


@pytest.mark.parametrize(
    "cin,cout,k,stride,pad,side,short",
    [
        (16, 24, 3, 1, 1, 1, True),  # layer4's 3x3 convs on a 1x1 map
        (8, 24, 3, 2, 1, 2, True),  # layer4's stride-2 entry on a 2x2 map
        (8, 24, 1, 2, 0, 2, True),  # its 1x1 stride-2 shortcut
        (8, 24, 3, 2, 1, 1, True),
        (8, 8, 3, 2, 0, 4, True),  # no padding: the first 3x3 window only
        (8, 8, 7, 2, 3, 3, False),  # 2x2 output: nn.Conv2d
        (8, 8, 3, 1, 1, 2, False),
        (3, 8, 3, 2, 1, 32, False),
    ],
)
def test_small_input_conv_equals_conv2d(cin, cout, k, stride, pad, side, short):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(cin, cout, k, stride, pad, bias=True).double()
    new = SmallInputConv2d(cin, cout, k, stride, pad, bias=True).double()
    new.load_state_dict(ref.state_dict())
    x = torch.randn(5, cin, side, side, dtype=torch.double, requires_grad=True)
    assert (new._one_output_taps(x) is not None) == short
    y_ref, y_new = ref(x), new(x)
    assert y_new.shape == y_ref.shape
    g = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, [x, ref.weight, ref.bias], g)
    grads_new = torch.autograd.grad(y_new, [x, new.weight, new.bias], g)
    torch.testing.assert_close(y_new, y_ref, rtol=0, atol=1e-12)
    for a, b in zip(grads_new, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_backbone_uses_small_input_convs_with_conv2d_state():
    torch.manual_seed(0)
    net = build_backbone("resnet18", stem="small_s2").eval()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(type(m) is SmallInputConv2d for m in convs)
    ref = torchvision.models.resnet18()
    ref.conv1 = torch.nn.Conv2d(3, 64, 3, 2, 1, bias=False)
    ref.fc = torch.nn.Identity()
    ref.load_state_dict(net.state_dict())  # same keys and shapes
    ref.eval()
    x = torch.randn(4, 3, 32, 32)  # layer4 sees a 1x1 map
    torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)
