"""Torchvision ResNet state_dict keys: what is a backbone tensor, what is dropped on purpose.

Shared by the exporters to detection frameworks (``transfer.detection.d2.weights`` renames these
keys for Detectron2, ``transfer.detection.mmdet.weights`` for MMDetection). Neither framework is
imported here.

A key is one of:

- a backbone tensor: the stem (``conv1.weight``, ``bn1.*``) or a block of ``layer1``..``layer4``
  (``convK.weight``, ``bnK.*``, ``downsample.0.weight``, ``downsample.1.*``);
- dropped deliberately, by category: ``fc.*`` (classifier), ``projector.*`` (pretraining head),
  BatchNorm ``num_batches_tracked`` counters (only where the target format has no such buffer);
- anything else: an error, reported by :func:`unknown_keys_message`.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "DROP_PATTERNS",
    "STEM_CONV",
    "STEM_BN",
    "BLOCK_CONV",
    "BLOCK_BN",
    "SHORTCUT_CONV",
    "SHORTCUT_BN",
    "STAGES",
    "drop_category",
    "is_backbone_key",
    "stage_of",
    "missing_stages",
    "unknown_keys_message",
    "infer_depth",
    "split_prefixed",
]

# Keys dropped on purpose, by category. Anything not dropped must be a backbone tensor.
DROP_PATTERNS: Tuple[Tuple[str, "re.Pattern[str]"], ...] = (
    ("num_batches_tracked", re.compile(r"(^|\.)num_batches_tracked$")),
    ("fc", re.compile(r"^fc\.")),
    ("projector", re.compile(r"^projector\.")),
)

_BN_PARAM = r"(weight|bias|running_mean|running_var)"
STEM_CONV = re.compile(r"^conv1\.weight$")
STEM_BN = re.compile(rf"^bn1\.{_BN_PARAM}$")
BLOCK_CONV = re.compile(r"^layer([1-4])\.(\d+)\.conv(\d)\.weight$")
BLOCK_BN = re.compile(rf"^layer([1-4])\.(\d+)\.bn(\d)\.{_BN_PARAM}$")
SHORTCUT_CONV = re.compile(r"^layer([1-4])\.(\d+)\.downsample\.0\.weight$")
SHORTCUT_BN = re.compile(rf"^layer([1-4])\.(\d+)\.downsample\.1\.{_BN_PARAM}$")
_BACKBONE = (STEM_CONV, STEM_BN, BLOCK_CONV, BLOCK_BN, SHORTCUT_CONV, SHORTCUT_BN)
_NUM_BATCHES = re.compile(r"^(bn1|layer[1-4]\.\d+\.(bn\d|downsample\.1))\.num_batches_tracked$")

# Torchvision stage names: the stem, then the four residual stages.
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")

# Blocks per stage and block type -> depth, for the torchvision ResNets.
_DEPTHS: Dict[Tuple[Tuple[int, ...], bool], int] = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}


def drop_category(key: str, keep: Sequence[str] = ()) -> Optional[str]:
    """Return the category under which a key is dropped deliberately, or None.

    Args:
        key: a torchvision-named key ("fc.weight", "layer1.0.bn1.num_batches_tracked").
        keep: categories the caller keeps instead of dropping (e.g. "num_batches_tracked").

    Returns:
        "num_batches_tracked", "fc", "projector" or None.
    """
    for category, pattern in DROP_PATTERNS:
        if category not in keep and pattern.search(key):
            return category
    return None


def is_backbone_key(key: str, with_num_batches: bool = False) -> bool:
    """Whether a key is a ResNet backbone tensor in torchvision names.

    Args:
        key: the key, without any model prefix.
        with_num_batches: also accept the BatchNorm ``num_batches_tracked`` buffers.

    Returns:
        True for the stem and the blocks of layer1..layer4.
    """
    if any(p.match(key) for p in _BACKBONE):
        return True
    return with_num_batches and bool(_NUM_BATCHES.match(key))


def stage_of(key: str) -> str:
    """Return the torchvision stage of a backbone key: "stem" or "layer1".."layer4"."""
    head = key.split(".", 1)[0]
    return head if head.startswith("layer") else "stem"


def missing_stages(keys: Sequence[str]) -> List[str]:
    """Return the stages (of :data:`STAGES`) without any key among ``keys``.

    Args:
        keys: backbone keys in torchvision names.

    Returns:
        The absent stage names, in order.
    """
    present = {stage_of(k) for k in keys}
    return [s for s in STAGES if s not in present]


def unknown_keys_message(unknown: Sequence[str]) -> str:
    """Return the error text for keys that are neither backbone tensors nor dropped.

    Args:
        unknown: the offending keys (at least one).

    Returns:
        A message naming up to 8 keys and the expected naming.
    """
    shown = ", ".join(repr(k) for k in unknown[:8])
    more = f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""
    return (
        f"{len(unknown)} key(s) are not torchvision ResNet backbone tensors: {shown}{more}. "
        "Expected names like 'conv1.weight', 'layer1.0.bn1.weight' (no 'module.' prefix)."
    )


def infer_depth(keys: Sequence[str]) -> Optional[int]:
    """Infer the ResNet depth (18/34/50/101/152) from torchvision-named backbone keys.

    Args:
        keys: backbone keys (stage prefixes as in torchvision: "layer3.5.conv3.weight").

    Returns:
        The depth, or None when the block counts match no standard ResNet.
    """
    blocks: Dict[int, set] = {}
    bottleneck = False
    for key in keys:
        m = BLOCK_CONV.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
            bottleneck = bottleneck or m.group(3) == "3"
    counts = tuple(len(blocks.get(i, ())) for i in range(1, 5))
    return _DEPTHS.get((counts, bottleneck))


def split_prefixed(
    state_dict: Mapping[str, object], prefixes: Mapping[str, str]
) -> Dict[str, object]:
    """Strip framework prefixes from keys, keeping only those under one of them.

    Args:
        state_dict: keys with model prefixes ("backbone.conv1.weight").
        prefixes: prefix -> replacement ({"backbone.": "", "roi_head.shared_head.": ""}).

    Returns:
        The matching entries under their stripped names.
    """
    out: Dict[str, object] = {}
    for key, value in state_dict.items():
        for prefix, repl in prefixes.items():
            if key.startswith(prefix):
                out[repl + key[len(prefix) :]] = value
                break
    return out
