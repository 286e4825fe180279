"""BatchNorm over the global batch of all processes, on every device.

torch's :class:`torch.nn.SyncBatchNorm` has CUDA (and XPU) kernels only; :class:`GlobalBatchNorm`
computes the same statistics with two autograd-aware all-reduces
(:func:`pretrain.dist.all_reduce_sum_with_grad`), so
that N gloo processes on CPU train exactly like one process with the whole batch.
:func:`convert_sync_batchnorm` picks torch's module on CUDA and this one elsewhere.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn

from pretrain.dist import all_reduce_sum_with_grad

__all__ = ["GlobalBatchNorm", "Float32SyncBatchNorm", "convert_sync_batchnorm"]


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm{1,2,3}d whose training statistics are those of the global batch.

    In training mode with a process group of more than one process, the mean and the biased
    variance (two passes: the mean first, then the mean squared deviation) are sums over every
    process's rows, all-reduced with autograd, so the gradients are those of one process holding
    the whole batch; the running statistics are updated with the unbiased variance of the
    global batch, as BatchNorm does. A process may hold zero rows. Otherwise (eval mode, one
    process) it is plain BatchNorm.

    Input: (N, C) or (N, C, *) with C = ``num_features``; output of the same shape.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(
                f"GlobalBatchNorm expects (N, C, ...) input, got shape {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and tdist.is_available() and tdist.is_initialized()):
            return super().forward(x)
        if tdist.get_world_size() == 1:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor(
            [float(x.numel() // max(x.shape[1], 1))], device=x.device, dtype=torch.float32
        )
        sums = all_reduce_sum_with_grad(torch.cat([xf.sum(dims), count]))
        n = sums[-1].detach()
        if float(n) < 2:
            raise ValueError(
                f"GlobalBatchNorm needs at least 2 values per channel over all processes, got "
                f"{int(n)}"
            )
        mean = sums[:-1] / n
        var = all_reduce_sum_with_grad(((xf - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum
                if m is None:  # cumulative moving average, as BatchNorm
                    m = 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)) * m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class Float32SyncBatchNorm(nn.SyncBatchNorm):
    """torch's SyncBatchNorm on a float32 copy of its input (output in the input's dtype).

    Under bf16 / fp16 autocast a process with an empty share would send its statistics in the
    half dtype while the others send float32 ones; computing in float32 keeps every process's
    messages alike (and the statistics exact), as :class:`GlobalBatchNorm` does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def _convert_to_global(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlobalBatchNorm
    ):
        out = GlobalBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_to_global(child))
    return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm layer normalising over the global batch.

    CUDA: :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` (computing in float32,
    :class:`Float32SyncBatchNorm`); other devices (CPU with gloo):
    :class:`GlobalBatchNorm`. Parameters and running statistics are shared with the original
    layers (not copied), state-dict keys are unchanged.

    Args:
        module: a model (or a single BatchNorm layer).
        device: where the model runs.
    Returns:
        The converted module (the same object when it is not itself a BatchNorm layer).
    """
    if device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        for m in module.modules():
            if type(m) is nn.SyncBatchNorm:
                m.__class__ = Float32SyncBatchNorm
        return module
    return _convert_to_global(module)
