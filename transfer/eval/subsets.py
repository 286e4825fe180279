"""Label subsets of a training set: the semi-supervised protocol's 1% / 10% of the labels.

Two ways to choose the labelled images (``data.train_subset`` / ``data.train_fraction``):

* a **subset file** in the format of SimCLR's ``1percent.txt`` / ``10percent.txt`` (the lists
  the semi-supervised results of SimCLR, BYOL, Barlow Twins and VICReg use: one training file
  name per line, e.g. ``n01440764_10026.JPEG``; 12,811 and 128,116 lines for ImageNet). A name
  matches the training sample whose file name (the path's last part) it equals; blank lines and
  lines starting with ``#`` are ignored. A name with no training sample is an error naming the
  names and their count, and so is a file name that two training samples share;
* a **per-class fraction** with a seed, for other data: ``max(1, round(f * n_c))`` images of
  each class c with n_c images, drawn without replacement by NumPy's PCG64 generator seeded
  with ``[seed, c]`` (so a class's draw does not depend on the other classes).

The subset's description (how it was chosen and a sha256 of the chosen sample list) goes into
the trainer's checkpoint and results.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from pretrain.config import ConfigError
from pretrain.errors import IMSVDError
from transfer.eval.feature_cache import file_sha256

__all__ = ["SubsetError", "read_subset_file", "select_by_names", "select_fraction", "apply_subset"]


class SubsetError(IMSVDError, ValueError):
    """A label subset cannot be taken (unreadable file, unknown or ambiguous names)."""


def read_subset_file(path: str | os.PathLike) -> list[str]:
    """The file names listed in a subset file (SimCLR's format), in file order.

    Raises:
        SubsetError: the file cannot be read, is not text, lists no name or a name twice.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SubsetError(f"data.train_subset {str(p)!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SubsetError(f"data.train_subset {str(p)!r} cannot be read as text: {e}") from None
    names = [line.strip() for line in text.splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise SubsetError(f"data.train_subset {str(p)!r} lists no file names")
    seen, twice = set(), []
    for n in names:
        if n in seen:
            twice.append(n)
        seen.add(n)
    if twice:
        raise SubsetError(
            f"data.train_subset {str(p)!r} lists {len(twice)} name(s) more than once, e.g. "
            f"{twice[:3]}"
        )
    return names


def select_by_names(samples: list[tuple[str, int]], names: list[str], source: str) -> list[int]:
    """Indices (ascending) of the samples whose file names are ``names``.

    Args:
        samples: the training set's (path, label) list.
        names: file names (e.g. from :func:`read_subset_file`).
        source: where the names come from (for messages).
    Raises:
        SubsetError: a name matches no sample (the count and the first ones are named), or
            matches several.
    """
    by_name: dict[str, list[int]] = defaultdict(list)
    for i, (path, _) in enumerate(samples):
        by_name[os.path.basename(path)].append(i)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SubsetError(
            f"{source}: {len(unknown)} of its {len(names)} file names are not in the training "
            f"data ({len(samples)} images), e.g. {unknown[:5]}"
        )
    shared = [n for n in names if len(by_name[n]) > 1]
    if shared:
        raise SubsetError(
            f"{source}: {len(shared)} of its file names match several training images (the "
            f"names must be unique in the training data), e.g. {shared[0]!r}: "
            f"{[samples[i][0] for i in by_name[shared[0]][:3]]}"
        )
    return sorted(by_name[n][0] for n in names)


def select_fraction(labels: list[int], fraction: float, seed: int) -> list[int]:
    """Indices (ascending) of a seeded per-class fraction: ``max(1, round(fraction * n_c))``
    images of each class (all of a class when that is more than it has).

    Args:
        labels: the training label of every sample.
        fraction: in (0, 1].
        seed: the draw's seed.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"data.train_fraction must be in (0, 1], got {fraction}")
    per_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        per_class[int(y)].append(i)
    chosen: list[int] = []
    for c in sorted(per_class):
        idx = per_class[c]
        k = min(len(idx), max(1, int(round(fraction * len(idx)))))
        rng = np.random.default_rng([int(seed), c])
        chosen.extend(int(idx[j]) for j in rng.choice(len(idx), size=k, replace=False))
    return sorted(chosen)


def apply_subset(dataset, data_cfg: dict) -> dict | None:
    """Restrict ``dataset`` (a :class:`pretrain.data.datasets.ImageDataset`) to the configured
    label subset, in place; ``dataset.classes`` stays (so labels keep their meaning).

    Args:
        dataset: has ``samples`` [(path, label)] and ``targets``.
        data_cfg: the ``data`` section: ``train_subset`` (file, "" for none),
            ``train_fraction`` (0: none) and ``subset_seed``.
    Returns:
        None when no subset is configured, else {"kind": "file" | "fraction", "file",
        "file_sha256" | "fraction", "seed", "num_samples", "of"}.
    Raises:
        ConfigError: both keys set. SubsetError: see :func:`read_subset_file` and
            :func:`select_by_names`.
    """
    file, fraction = str(data_cfg["train_subset"]), float(data_cfg["train_fraction"])
    if file and fraction:
        raise ConfigError(
            "data.train_subset and data.train_fraction are alternatives: set one of them"
        )
    if not file and not fraction:
        return None
    of = len(dataset.samples)
    if file:
        keep = select_by_names(
            dataset.samples, read_subset_file(file), f"data.train_subset {file!r}"
        )
        info = {"kind": "file", "file": os.path.abspath(file), "file_sha256": file_sha256(file)}
    else:
        seed = int(data_cfg["subset_seed"])
        keep = select_fraction([y for _, y in dataset.samples], fraction, seed)
        info = {"kind": "fraction", "fraction": fraction, "seed": seed}
    dataset.samples = [dataset.samples[i] for i in keep]
    dataset.targets = [y for _, y in dataset.samples]
    return {**info, "num_samples": len(keep), "of": of}
