"""The pass over the analysed images of :mod:`transfer.analysis.analyze`: the dataset items
(a clean view and two augmented views per image), their batches, the image subset, the shuffled
loader and :func:`stream_statistics`, which accumulates every statistic in one pass.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from pretrain.data.transforms import AugmentConfig, reference_two_views, sample_two_views
from pretrain.progress import progress
from transfer.analysis.codes import (
    CodeStatsAccumulator,
    JointAccumulator,
    UnitExemplars,
    model_codes,
)


class AnalysisViews(Dataset):
    """Items (clean view, augmented view 1, view 2, dataset index) of an image dataset.

    Augmented views reuse the pretraining augmentation with parameters drawn from
    (seed, 0, index), so they do not depend on worker count or order. An unreadable image gives
    None (see :class:`pretrain.data.datasets.ImageDataset`).

    Args:
        base: dataset returning (PIL image, label) or None (transform None).
        indices: dataset indices to analyse.
        clean: transform of the clean view.
        augment: augmentation config of the two views; None: no augmented views.
        seed: augmentation seed.
    """

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int],
        clean: Any,
        augment: AugmentConfig | None,
        seed: int = 0,
    ) -> None:
        self.base, self.indices, self.clean = base, list(indices), clean
        self.augment, self.seed = augment, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos: int):
        index = self.indices[pos]
        item = self.base[index]
        if item is None:  # unreadable image (non-strict): left out by collate_views
            return None
        img, _ = item
        clean = self.clean(img)
        if self.augment is None:
            return clean, clean, clean, index
        params = sample_two_views(self.seed, 0, index, img.width, img.height, self.augment)
        v1, v2 = reference_two_views(img, params, self.augment)
        return clean, v1, v2, index


def collate_views(items: Sequence[Any]) -> tuple[Any, int]:
    """Batch the readable items of :class:`AnalysisViews`.

    Returns:
        ((clean, view 1, view 2, indices) or None when no item was readable, items left out).
    """
    good = [it for it in items if it is not None]
    return (default_collate(good) if good else None), len(items) - len(good)


def analysis_indices(n_total: int, num_images: int, seed: int) -> list[int]:
    """The dataset indices analysed: ``num_images`` of the ``n_total`` drawn at random from
    ``seed`` (in increasing order) when 0 < num_images < n_total, else all of them."""
    if 0 < num_images < n_total:
        g = torch.Generator().manual_seed(seed)
        indices = torch.randperm(n_total, generator=g)[:num_images].sort().values
        return indices.tolist()
    return list(range(n_total))


def analysis_loader(
    views: AnalysisViews, batch_size: int, num_workers: int, seed: int, device: torch.device
) -> DataLoader:
    """The loader of the pass: batches of :func:`collate_views`, in an order shuffled from
    ``seed``."""
    # Shuffled: the independence floor pairs each sample with the one streamed before it, which
    # in a class-sorted tree would be an image of the same class (a dependent pair). Every other
    # statistic is a sum and does not depend on the order.
    return DataLoader(
        views,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_views,
    )


@torch.no_grad()
def stream_statistics(
    model: nn.Module,
    loader: DataLoader,
    bin_size: int,
    temperature: float,
    device: torch.device,
    two_views: bool,
    variables: Sequence[int],
    top_n: int,
    floor: bool = True,
) -> tuple[CodeStatsAccumulator, JointAccumulator, UnitExemplars, int]:
    """One pass over ``loader`` (items of :class:`AnalysisViews`) accumulating every statistic.

    Batches come from :func:`collate_views`: unreadable images are left out and counted.

    Returns:
        (clean-view statistics, joint accumulator, unit exemplars, unreadable images).
    """
    dim = model.projector.out_dim
    stats_acc = CodeStatsAccumulator(dim // bin_size, bin_size, device=device)
    joint_acc = JointAccumulator(dim, bin_size, device=device, floor=floor)
    exemplars = UnitExemplars(variables, bin_size, top_n=top_n)
    unreadable = 0
    for batch, dropped in progress(loader, total=len(loader), desc="analyze"):
        unreadable += dropped
        if batch is None:  # every image of this batch was unreadable
            continue
        clean, v1, v2, idx = batch
        q0 = model_codes(model, clean, bin_size, temperature, device)
        stats_acc.update(q0)
        exemplars.update(q0, idx)
        if two_views:
            q1 = model_codes(model, v1, bin_size, temperature, device)
            q2 = model_codes(model, v2, bin_size, temperature, device)
            joint_acc.update(q1, q2)
        else:
            joint_acc.update(q0)
    return stats_acc, joint_acc, exemplars, unreadable
