"""What the two weight converters share: the conversion report, the walk over a torchvision
state_dict, the output checks and the conversion command.

The Detectron2 converter (``transfer.detection.d2``: ``weights``, ``convert``) and the
MMDetection one (``transfer.detection.mmdet``: ``weights``, ``convert``) differ only in the names
they give the tensors, the file they write and what their report counts; the rest is here.
Neither framework is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
)

import torch

from pretrain.checkpoint import (
    add_weights_args,
    load_backbone,
    weights_kwargs,
    with_accepted_inputs,
)
from pretrain.errors import IMSVDError
from transfer.detection.resnet_keys import (
    drop_category,
    is_backbone_key,
    missing_stages,
    unknown_keys_message,
)

__all__ = [
    "ConversionReport",
    "backbone_entries",
    "check_stages",
    "fp32_cpu",
    "check_output",
    "load_standard_backbone",
    "conversion_summary",
    "conversion_main",
]


@dataclass
class ConversionReport:
    """What a conversion did; each converter's report adds what it counts.

    Attributes:
        converted: number of tensors written.
        dropped: category -> list of dropped source keys.
    """

    converted: int = 0
    dropped: Dict[str, List[str]] = field(default_factory=dict)

    def dropped_line(self) -> str:
        """What the renaming itself left out: ``dropped in the conversion: fc (2),
        num_batches_tracked (53)`` (or ``nothing``; what the reader dropped are its notes)."""
        if not self.dropped:
            return "dropped in the conversion: nothing"
        return "dropped in the conversion: " + ", ".join(
            f"{cat} ({len(keys)})" for cat, keys in self.dropped.items()
        )

    @staticmethod
    def values_lines(counts: Mapping[str, int], width: int) -> List[str]:
        """One ``  <stage> <values>`` line per stage, the names padded to ``width``."""
        return [f"  {stage:<{width}} {n:>12,d} values" for stage, n in counts.items()]


def backbone_entries(
    state_dict: Mapping[str, Any],
    report: ConversionReport,
    error: Type[Exception],
    keep: Sequence[str] = (),
) -> Iterator[Tuple[str, Any]]:
    """Yield the ResNet backbone entries of a torchvision state_dict, in order.

    Keys dropped on purpose (``fc.*``, ``projector.*``, BatchNorm ``num_batches_tracked`` unless
    kept) are recorded in ``report.dropped``; once every key is seen, any key that is neither
    raises ``error`` naming them.

    Args:
        state_dict: torchvision-named tensors (as returned by pretrain.checkpoint.load_backbone).
        report: receives the dropped keys.
        error: the converter's error class.
        keep: drop categories that are backbone entries for this converter
            (``("num_batches_tracked",)`` where the target holds the counters).

    Yields:
        ``(key, value)`` of each backbone tensor.

    Raises:
        error: after the last entry, when some keys are not ResNet backbone tensors.
    """
    unknown: List[str] = []
    with_counters = "num_batches_tracked" in keep
    for key, value in state_dict.items():
        category = drop_category(key, keep=keep)
        if category is not None:
            report.dropped.setdefault(category, []).append(key)
        elif is_backbone_key(key, with_num_batches=with_counters):
            yield key, value
        else:
            unknown.append(key)
    if unknown:
        raise error(unknown_keys_message(unknown))


def check_stages(
    keys: Sequence[str],
    converted: int,
    error: Type[Exception],
    stage_name: Callable[[str], str] = str,
) -> None:
    """Refuse a backbone without a stem or without one of the four stages.

    Args:
        keys: the torchvision-named backbone keys that were converted.
        converted: number of tensors converted (for the message).
        error: the converter's error class.
        stage_name: the target framework's name of a torchvision stage ("layer4" -> "res5").

    Raises:
        error: naming the absent stages.
    """
    absent = missing_stages([k for k in keys if is_backbone_key(k)])
    if absent:
        raise error(
            f"incomplete ResNet backbone: no tensors for {', '.join(map(stage_name, absent))} "
            f"(got {converted} backbone tensors)"
        )


def fp32_cpu(value: torch.Tensor) -> torch.Tensor:
    """A detached CPU tensor, floating point widened to float32 (both frameworks train in fp32;
    fp16 / bf16 exports are widened), integers (BatchNorm counters) kept."""
    value = value.detach().to("cpu")
    return value.float() if value.is_floating_point() else value


def check_output(path: str, force: bool, error: Type[Exception]) -> str:
    """Refuse an existing output (unless ``force``) or one whose folder is missing.

    Args:
        path: the file to write.
        force: overwrite an existing file.
        error: the converter's error class.

    Returns:
        ``os.fspath(path)``.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not force:
        raise error(f"output {path!r} already exists (pass --force to overwrite)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise error(f"output folder {folder!r} does not exist")
    return path


def load_standard_backbone(
    input_path: str,
    output_path: str,
    force: bool,
    error: Type[Exception],
    needs: str,
    allow_unsafe: bool = False,
    checkpoint_key: Optional[str] = None,
    prefix: Optional[str] = None,
    stem: Optional[str] = None,
) -> Tuple[Dict[str, Any], Dict[str, Any], str]:
    """Load the backbone to convert; refuse an existing output first and any stem but 7x7.

    Args:
        input_path: checkpoint accepted by ``pretrain.checkpoint.load_backbone``.
        output_path: the file to write.
        force: overwrite an existing output.
        error: the converter's error class.
        needs: who needs the standard stem, for the message ("Detectron2 needs").
        allow_unsafe: let load_backbone fully unpickle a trusted file the safe readers refuse.
        checkpoint_key: entry of INPUT holding the weights (other layouts).
        prefix: key prefix of the ResNet weights inside that entry.
        stem: the stem of a file that does not record it (``load_backbone``'s ``stem``).

    Returns:
        ``(state_dict, meta, stem)`` from load_backbone.

    Raises:
        error: existing output, or a stem other than "standard" (a 7x7/2 conv + max-pool);
            CheckpointError: unreadable input.
    """
    if os.path.exists(output_path) and not force:
        raise error(f"output {output_path!r} already exists (pass --force)")
    opts = dict(allow_unsafe=allow_unsafe, checkpoint_key=checkpoint_key, prefix=prefix)
    state_dict, meta = load_backbone(input_path, stem=stem, **opts)
    stem = meta.get("stem", "standard")
    if stem != "standard":
        raise error(f"{input_path}: backbone stem is {stem!r}; {needs} the 'standard' stem")
    return state_dict, meta, stem


def conversion_summary(
    input_path: str, output_path: str, meta: Mapping[str, Any], details: str, report: Any
) -> str:
    """What the conversion command prints.

    Args:
        input_path: the source checkpoint.
        output_path: the written file.
        meta: load_backbone's metadata (``source_format``, ``notes``).
        details: the converter's line on the source (arch, stem, epoch, sha256, ...).
        report: the converter's report (its ``summary()`` ends the text).

    Returns:
        The text; its first line names the format that was read.
    """
    lines = [f"read {input_path} as {meta['source_format']}", f"{input_path} -> {output_path}"]
    lines += [details] + [f"note: {n}" for n in meta.get("notes", [])]
    return "\n".join(lines) + "\n" + report.summary()


def conversion_main(
    argv: Optional[Sequence[str]],
    convert: Callable[..., str],
    *,
    prog: Optional[str],
    description: str,
    output_help: str,
    error_prefix: str,
    options: Sequence[Tuple[str, Dict[str, Any]]] = (),
) -> int:
    """The conversion command: INPUT OUTPUT [--force] [options] [weights options].

    Args:
        argv: arguments (defaults to sys.argv[1:]).
        convert: the converter's ``convert(input, output, force=..., **options, **weights)``.
        prog: the program name in --help (None: from argv[0]).
        description: the --help description.
        output_help: the help of OUTPUT.
        error_prefix: starts the one ``error:`` line.
        options: the converter's own options, ``(flag, add_argument keywords)``; passed to
            ``convert`` by their dest.

    Returns:
        Exit code: 0 on success, 2 on a bad input or output.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("input", help="backbone checkpoint (.pth)")
    parser.add_argument("output", help=output_help)
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    own = [parser.add_argument(flag, **kwargs) for flag, kwargs in options]
    add_weights_args(parser)
    args = parser.parse_args(argv)
    kwargs = {action.dest: getattr(args, action.dest) for action in own}
    try:
        print(convert(args.input, args.output, force=args.force, **kwargs, **weights_kwargs(args)))
    except IMSVDError as exc:
        print(f"{error_prefix}: error: {with_accepted_inputs(exc)}", file=sys.stderr)
        return 2
    return 0


def conversion_command(
    convert: Callable[..., str],
    **kwargs: Any,
) -> Callable[[Optional[Sequence[str]]], int]:
    """A converter's ``main(argv=None) -> exit code``: :func:`conversion_main` over ``convert``.

    Args:
        convert: as for :func:`conversion_main`.
        **kwargs: ``prog``, ``description``, ``output_help``, ``error_prefix``, ``options`` of
            :func:`conversion_main`.

    Returns:
        ``main(argv)``: parses ``argv`` (defaults to sys.argv[1:]), converts and returns the exit
        code (0 on success, 2 on a bad input or output).
    """

    def main(argv: Optional[Sequence[str]] = None) -> int:
        return conversion_main(argv, convert, **kwargs)

    main.__doc__ = f"Command-line entry point ({kwargs.get('prog') or 'conversion'}): " + (
        "returns the exit code, 0 on success, 2 on a bad input or output."
    )
    return main
