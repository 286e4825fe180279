"""Torchvision -> MMDetection weight conversion and the safe reader (no MMDetection needed)."""

from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
import torchvision
from helpers import (
    CHECKPOINT_KINDS,
    load_tool,
    randomised,
    resnet18_backbone_sd,
    write_checkpoint_kind,
)

from pretrain.checkpoint import export_backbone
from pretrain.models.backbone import build_backbone
from transfer.detection.mmdet.weights import (
    MMDetWeightsError,
    check_depth,
    convert_torchvision_to_mmdet,
    depth_of_arch,
    read_mmdet_weights,
    write_mmdet_checkpoint,
)
from transfer.detection.resnet_keys import drop_category, infer_depth, is_backbone_key

MARKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".mmdet_payload_ran")


convert_tool = load_tool("convert_to_mmdet")
install_tool = load_tool("install_mmdet")


@pytest.mark.parametrize(
    "tv_key, mm_key",
    [
        ("conv1.weight", "backbone.conv1.weight"),
        ("bn1.running_var", "backbone.bn1.running_var"),
        ("layer1.0.conv2.weight", "backbone.layer1.0.conv2.weight"),
        ("layer3.5.bn3.num_batches_tracked", "backbone.layer3.5.bn3.num_batches_tracked"),
        ("layer3.0.downsample.1.bias", "backbone.layer3.0.downsample.1.bias"),
        ("layer4.0.downsample.0.weight", "roi_head.shared_head.layer4.0.downsample.0.weight"),
        ("layer4.2.bn1.weight", "roi_head.shared_head.layer4.2.bn1.weight"),
    ],
)
def test_c4_placement_table(tv_key, mm_key):
    sd = randomised(torchvision.models.resnet50().state_dict(), integers=True)
    out, _ = convert_torchvision_to_mmdet(sd)
    assert mm_key in out
    assert torch.equal(out[mm_key], sd[tv_key])


def test_round_trip_resnet50_c4_and_backbone_layouts():
    sd = randomised(torchvision.models.resnet50().state_dict(), integers=True)
    out, report = convert_torchvision_to_mmdet(sd)
    assert report.converted == len(out) == 318  # 265 tensors + 53 num_batches_tracked
    assert report.prefix_counts == {"backbone.": 258, "roi_head.shared_head.": 60}
    assert report.dropped == {"fc": ["fc.weight", "fc.bias"]}
    assert "converted 318 tensors" in report.summary() and "fc (2)" in report.summary()
    for key, value in sd.items():
        if key.startswith("fc."):
            continue
        prefix = "roi_head.shared_head." if key.startswith("layer4") else "backbone."
        assert out[prefix + key].dtype == value.dtype
        torch.testing.assert_close(out[prefix + key], value, rtol=0, atol=0)

    flat, report = convert_torchvision_to_mmdet(sd, layout="backbone")
    assert set(flat) == {"backbone." + k for k in sd if not k.startswith("fc.")}
    with pytest.raises(MMDetWeightsError, match="layout 'fpn'"):
        convert_torchvision_to_mmdet(sd, layout="fpn")


def test_projector_dropped_and_half_precision_widened():
    sd = {k: v.half() if v.is_floating_point() else v for k, v in randomised(
        torchvision.models.resnet18().state_dict(), integers=True).items()}  # fmt: skip
    sd["projector.0.weight"] = torch.zeros(3, 3)
    out, report = convert_torchvision_to_mmdet(sd)
    assert report.dropped["projector"] == ["projector.0.weight"]
    assert all(v.dtype == torch.float32 for k, v in out.items() if "num_batches" not in k)
    assert out["backbone.layer1.0.bn1.num_batches_tracked"].dtype == torch.int64


def test_unknown_keys_and_incomplete_backbones_are_named():
    sd = torchvision.models.resnet18().state_dict()
    with pytest.raises(MMDetWeightsError, match=r"module\.conv1\.weight"):
        convert_torchvision_to_mmdet({"module." + k: v for k, v in sd.items()})
    with pytest.raises(MMDetWeightsError, match="layer4"):
        convert_torchvision_to_mmdet({k: v for k, v in sd.items() if "layer4" not in k})
    with pytest.raises(MMDetWeightsError, match="'conv1.weight'"):
        convert_torchvision_to_mmdet({**sd, "conv1.weight": [1, 2]})


def test_resnet_keys_helpers():
    assert drop_category("fc.weight") == "fc"
    assert drop_category("layer1.0.bn1.num_batches_tracked") == "num_batches_tracked"
    assert drop_category("layer1.0.bn1.num_batches_tracked", keep=("num_batches_tracked",)) is None
    assert is_backbone_key("layer2.1.downsample.1.running_mean")
    assert not is_backbone_key("layer2.1.bn1.num_batches_tracked")
    assert is_backbone_key("layer2.1.bn1.num_batches_tracked", with_num_batches=True)
    assert not is_backbone_key("layer5.0.conv1.weight")
    for arch, depth in (("resnet18", 18), ("resnet34", 34), ("resnet50", 50), ("resnet101", 101)):
        keys = list(getattr(torchvision.models, arch)().state_dict())
        assert infer_depth(keys) == depth == depth_of_arch(arch)
    assert infer_depth(["conv1.weight"]) is None
    with pytest.raises(MMDetWeightsError, match="vit_b"):
        depth_of_arch("vit_b")


def test_writer_atomic_no_overwrite_and_plain(tmp_path):
    out, _ = convert_torchvision_to_mmdet(torchvision.models.resnet18().state_dict())
    path = tmp_path / "w.pth"
    write_mmdet_checkpoint(out, {"arch": "resnet18", "depth": 18}, str(path))
    assert os.listdir(tmp_path) == ["w.pth"]  # no temporary file left behind
    data = torch.load(path, weights_only=True)
    assert set(data) == {"state_dict", "meta"} and list(data["state_dict"]) == list(out)
    with pytest.raises(MMDetWeightsError, match="already exists"):
        write_mmdet_checkpoint(out, {}, str(path))
    write_mmdet_checkpoint({"backbone.conv1.weight": torch.zeros(1)}, {}, str(path), force=True)
    assert list(torch.load(path, weights_only=True)["state_dict"]) == ["backbone.conv1.weight"]
    with pytest.raises(MMDetWeightsError, match="does not exist"):
        write_mmdet_checkpoint(out, {}, str(tmp_path / "missing" / "w.pth"))
    with pytest.raises(MMDetWeightsError, match=r"meta\.when: object"):
        write_mmdet_checkpoint(out, {"when": object()}, str(tmp_path / "x.pth"))
    assert sorted(os.listdir(tmp_path)) == ["w.pth"]


# ------------------------------------------------------------------------------------------
# The CLI on every checkpoint kind load_backbone accepts (ResNet-18 keeps the files small).
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_convert_cli_each_kind(kind, tmp_path, capsys):
    sd = resnet18_backbone_sd(integers=True)
    src, out = str(tmp_path / "in.pth"), str(tmp_path / "out.pth")
    write_checkpoint_kind(kind, src, sd)
    assert convert_tool.main([src, out]) == 0
    printed = capsys.readouterr().out
    # ResNet-18: 20 convs + 20 norms x 4 tensors + 20 num_batches_tracked counters.
    assert "converted 120 tensors" in printed and "arch resnet18" in printed

    state, meta = read_mmdet_weights(out)
    assert meta["arch"] == "resnet18" and meta["depth"] == 18 and meta["stem"] == "standard"
    assert meta["layout"] == "c4" and meta["format"] == "imsvd-mmdet-resnet"
    assert len(state) == 120
    for key, value in sd.items():
        prefix = "roi_head.shared_head." if key.startswith("layer4") else "backbone."
        if key.endswith("num_batches_tracked") and kind == "train_state":
            continue  # the training checkpoint's own counters
        torch.testing.assert_close(state[prefix + key], value, rtol=0, atol=0)
    assert check_depth(state, meta, 18, out) == 100

    # A second run refuses to overwrite, --force replaces the file.
    assert convert_tool.main([src, out]) == 2
    assert "already exists" in capsys.readouterr().err
    assert convert_tool.main([src, out, "--force", "--layout", "backbone"]) == 0
    assert "backbone.layer4.0.conv1.weight" in read_mmdet_weights(out)[0]


def test_convert_cli_checkpoint_key_and_prefix(tmp_path, capsys):
    sd = resnet18_backbone_sd(seed=4, integers=True)
    src, out = str(tmp_path / "in.pth"), str(tmp_path / "out.pth")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()}, "epoch": 9}, src)
    argv = [src, out, "--checkpoint-key", "teacher", "--prefix", "backbone."]
    assert convert_tool.main(argv) == 0, capsys.readouterr().err
    state, _ = read_mmdet_weights(out)
    assert torch.equal(state["roi_head.shared_head.layer4.1.bn2.weight"], sd["layer4.1.bn2.weight"])


def test_convert_cli_bad_inputs(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    assert convert_tool.main([str(bad), str(tmp_path / "o.pth")]) == 2
    assert "bad.pth" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()

    # A CIFAR-style 3x3 stem has no MMDetection ResNet counterpart.
    small = tmp_path / "small.pth"
    sd = build_backbone("resnet18", stem="small").state_dict()
    export_backbone(str(small), sd, arch="resnet18", stem="small", epoch=1, config=None)
    assert convert_tool.main([str(small), str(tmp_path / "o.pth")]) == 2
    assert "stem" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()


# ------------------------------------------------------------------------------------------
# The safe reader: pickles and files that would run code are refused; depth is checked.
# ------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs a command (what a malicious checkpoint does)."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def test_malicious_files_are_refused_without_running_code(tmp_path):
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}, "x": _Payload()}, evil)
    with pytest.raises(MMDetWeightsError, match="evil.pth: refused by the safe loader"):
        read_mmdet_weights(str(evil))
    pkl = tmp_path / "evil.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    with pytest.raises(MMDetWeightsError, match="pickle files are not read"):
        read_mmdet_weights(str(pkl))
    assert not os.path.exists(MARKER)
    with pytest.raises(MMDetWeightsError, match="does not exist"):
        read_mmdet_weights(str(tmp_path / "none.pth"))
    for folder in (tmp_path, tmp_path / "dir.pth"):
        folder.mkdir(exist_ok=True)
        with pytest.raises(MMDetWeightsError, match="is a directory"):
            read_mmdet_weights(str(folder))
    junk = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], junk)
    with pytest.raises(MMDetWeightsError, match="expected a dict"):
        read_mmdet_weights(str(junk))


def test_check_depth_refuses_mismatches(tmp_path):
    out, _ = convert_torchvision_to_mmdet(torchvision.models.resnet18().state_dict())
    with pytest.raises(MMDetWeightsError, match="arch resnet18 .depth 18. but the config builds"):
        check_depth(out, {"arch": "resnet18"}, 50, "r18.pth")
    # Without metadata the block counts tell.
    with pytest.raises(MMDetWeightsError, match="ResNet-18 .block counts."):
        check_depth(out, {}, 50, "r18.pth")
    with pytest.raises(MMDetWeightsError, match="no ResNet tensors"):
        check_depth({"rpn_head.x": torch.zeros(1)}, {}, 50, "heads.pth")
    assert check_depth(out, {"arch": "resnet18"}, 18, "r18.pth") == 100


# ------------------------------------------------------------------------------------------
# tools/install_mmdet.py: the parts that need no download or build.
# ------------------------------------------------------------------------------------------


def test_install_patches_are_strict():
    setup_py = (
        "from pkg_resources import DistributionNotFound, get_distribution, parse_version\n"
        "                extra_compile_args['cxx'] = ['-std=c++17']\n"
        "                extra_compile_args['nvcc'] += ['-std=c++17']\n"
        "    version=get_version(),\n"
    )
    (rel, patch), (rel2, patch2) = install_tool.mmcv_patches("+imsvd.1.torch2.14.1")
    out = patch(setup_py, rel)
    assert "pkg_resources" not in out and "c++17" not in out and "-std=c++20" in out
    assert "version=get_version() + '+imsvd.1.torch2.14.1'," in out
    with pytest.raises(install_tool.InstallError, match="setup.py"):
        patch(out, rel)  # already patched: nothing to replace, and it says so
    assert patch2("dtype=np.float))", rel2) == "dtype=np.float64))"


def _shipped_patches() -> dict:
    """The three edits of --ops shipped (after the two of every build), by the file they edit."""
    return dict(install_tool.mmcv_patches("+imsvd.1.shipped.torch2.14.1", "shipped")[2:])


def test_install_shipped_ops_patches_of_sources_and_bindings():
    # the edits of --ops shipped, on excerpts of the mmcv 2.1.0 files they change
    patches = _shipped_patches()
    assert set(patches) == {
        "setup.py",
        "mmcv/ops/csrc/pytorch/pybind.cpp",
        "mmcv/utils/ext_loader.py",
    }
    setup_py = (
        "        else:\n"
        "            print(f'Compiling {ext_name} only with CPU')\n"
        "            op_files = glob.glob('./mmcv/ops/csrc/pytorch/*.cpp') + \\\n"
        "                glob.glob('./mmcv/ops/csrc/pytorch/cpu/*.cpp')\n"
        "            extension = CppExtension\n"
    )
    out = patches["setup.py"](setup_py, "setup.py")
    assert "glob.glob" not in out and "'./mmcv/ops/csrc/pytorch/cpu/roi_align.cpp'" in out
    assert "'./mmcv/ops/csrc/pytorch/pybind.cpp'" in out and out.count(".cpp'") == 6
    pybind = (
        "Tensor nms(Tensor boxes, Tensor scores, float iou_threshold, int offset);\n"
        "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n"
        '  m.def("upfirdn2d", &upfirdn2d, "upfirdn2d (CUDA)", py::arg("input"));\n'
        '  m.def("get_compiler_version", &get_compiler_version, "get_compiler_version");\n'
        '  m.def("get_compiling_cuda_version", &get_compiling_cuda_version,\n'
        '        "get_compiling_cuda_version");\n'
        '  m.def("nms", &nms, "nms (CPU/CUDA) ", py::arg("boxes"));\n'
        '  m.def("softnms", &softnms, "softnms (CPU) ", py::arg("boxes"));\n'
        '  m.def("nms_match", &nms_match, "nms_match (CPU) ", py::arg("dets"));\n'
        '  m.def("nms_rotated", &nms_rotated, "NMS for rotated boxes", py::arg("dets"));\n'
        '  m.def("roi_align_forward", &roi_align_forward, "roi_align forward");\n'
        '  m.def("roi_align_backward", &roi_align_backward, "roi_align backward");\n'
        "}\n"
    )
    rel = "mmcv/ops/csrc/pytorch/pybind.cpp"
    out = patches[rel](pybind, rel)
    assert "upfirdn2d" not in out and "nms_rotated" not in out and out.count("m.def(") == 7
    assert out.startswith("Tensor nms(") and out.rstrip().endswith("}")
    with pytest.raises(install_tool.InstallError, match="bindings"):  # a binding gone: refuse
        patches[rel](pybind.replace('  m.def("nms_match"', '  m.def("nms_matcher"'), rel)


def test_install_shipped_ops_patch_of_the_op_loader():
    loader = (
        "import importlib\nimport torch\n\n"
        "if torch.__version__ != 'parrots':\n\n"
        "    def load_ext(name, funcs):\n"
        "        ext = importlib.import_module('mmcv.' + name)\n"
        "        for fun in funcs:\n"
        "            assert hasattr(ext, fun), f'{fun} miss in module {name}'\n"
        "        return ext\n"
    )
    rel = "mmcv/utils/ext_loader.py"
    patches = _shipped_patches()
    patched = patches[rel](loader, rel)
    with pytest.raises(install_tool.InstallError, match="ext_loader"):
        patches[rel](patched, rel)  # already patched: nothing to replace
    # the patched loader keeps a compiled op and turns an absent one into a clear error
    fake = types.ModuleType("mmcv._ext")
    fake.nms = lambda: "compiled nms"
    namespace: dict = {}
    with mock.patch.dict(sys.modules, {"mmcv": types.ModuleType("mmcv"), "mmcv._ext": fake}):
        exec(compile(patched, rel, "exec"), namespace)
        ext = namespace["load_ext"]("_ext", ["nms", "deform_conv_forward"])
    assert ext.nms() == "compiled nms"
    with pytest.raises(
        RuntimeError, match="mmcv op deform_conv_forward is not compiled.*setup-mmdet"
    ):
        ext.deform_conv_forward(1, 2)


def test_install_all_ops_leaves_sources_bindings_and_loader_alone():
    assert len(install_tool.mmcv_patches("+imsvd.1.torch2.14.1", "all")) == 2
    assert install_tool.local_label("shipped", "2.14.1") == "+imsvd.1.shipped.torch2.14.1"
    assert install_tool.local_label("all", "2.14.1") == "+imsvd.1.torch2.14.1"


def test_install_prefers_a_cached_all_ops_wheel(tmp_path):
    tag, release = install_tool.wheel_cache.python_tag(
        sys.executable
    ), install_tool.wheel_cache.torch_tag(sys.executable)

    def wheel(label: str) -> Path:
        path = tmp_path / f"mmcv-2.1.0{label}-{tag}-{tag}-linux_x86_64.whl"
        path.write_bytes(b"")
        return path

    assert install_tool.cached_wheel(tmp_path, sys.executable, "shipped") is None
    shipped = wheel(install_tool.local_label("shipped", release))
    wheel("+imsvd.1.shipped.torch1.0.0")  # another torch: never reused
    assert install_tool.cached_wheel(tmp_path, sys.executable, "shipped") == shipped
    assert install_tool.cached_wheel(tmp_path, sys.executable, "all") is None
    full = wheel(install_tool.local_label("all", release))
    for ops in ("shipped", "all"):
        assert install_tool.cached_wheel(tmp_path, sys.executable, ops) == full


def test_install_refuses_bad_hash(tmp_path):
    fake = tmp_path / "mmcv-2.1.0.tar.gz"
    fake.write_bytes(b"not the sdist")
    with pytest.raises(install_tool.InstallError, match="SHA-256"):
        install_tool.verify(fake)
    other = tmp_path / "mmcv-9.9.9.tar.gz"
    other.write_bytes(b"x")
    with pytest.raises(install_tool.InstallError, match="no recorded hash"):
        install_tool.verify(other)
