"""The projector: the MLP after the backbone whose N x D output the loss reads (``model.projector``
widths, the optional ``model.out_norm``), with the same state-dict keys in training and when
rebuilt from a checkpoint.
"""

from __future__ import annotations

from torch import nn

from pretrain.config import ConfigError


def parse_projector_spec(spec: str) -> list[int]:
    """Parse "8192-8160" into [8192, 8160] with a clear error."""
    try:
        dims = [int(x) for x in str(spec).split("-")]
    except ValueError:
        raise ConfigError(
            f"config key 'model.projector': '{spec}' must look like '8192-8160'"
        ) from None
    if not dims or any(d <= 0 for d in dims):
        raise ConfigError(f"config key 'model.projector': '{spec}' must list positive widths")
    return dims


OUT_NORMS = ("none", "bn")


def output_norm(dim: int) -> nn.BatchNorm1d:
    """The norm of ``model.out_norm: bn``: ``BatchNorm1d(dim, affine=False)`` on N x dim logits."""
    return nn.BatchNorm1d(dim, affine=False)


class Projector(nn.Sequential):
    """MLP projector: (Linear + BatchNorm1d + ReLU) x (k-1), then Linear without bias, and with
    ``out_norm="bn"`` a last layer ``BatchNorm1d(out_dim, affine=False)`` (beyond the paper: each
    logit standardised over the batch before the loss).

    The same module, with the same state-dict keys (``<i>.weight`` ..., the norm at the last
    index), in training and when rebuilt from a checkpoint.

    Args:
        in_dim: input width (the backbone's pooled features).
        spec: the Linear widths, e.g. "8192-8160".
        out_norm: "none" or "bn".
    Raises:
        ConfigError: a malformed spec or an unknown out_norm (naming the config key).
    """

    def __init__(self, in_dim: int, spec: str = "8192-8160", out_norm: str = "none") -> None:
        if out_norm not in OUT_NORMS:
            raise ConfigError(
                f"config key 'model.out_norm': {out_norm!r} is not one of {', '.join(OUT_NORMS)}"
            )
        dims = [in_dim] + parse_projector_spec(spec)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-2], dims[1:-1]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
        if out_norm == "bn":
            layers.append(output_norm(dims[-1]))
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = dims[-1]
        self.spec = str(spec)
        self.out_norm = out_norm
