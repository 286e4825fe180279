"""The one reader and writer of checkpoint artifacts (spec: docs/CHECKPOINT_FORMAT.md).

Two artifacts are written by this project:

* the training state (``"imsvd-train-state"``): everything needed to resume a run exactly
  (model with backbone + projector, optimizer, gradient scaler, position, RNG streams, config),
  with a content hash of its tensors;
* the exported backbone (``"imsvd-backbone"``): torchvision-named ResNet weights without ``fc``,
  with metadata and a content hash, the artifact every downstream evaluation reads.

Every file written here loads with ``torch.load(path, weights_only=True)``. Reading never runs
code from a file unless ``allow_unsafe`` is given. Modules:

* ``common``: format constants, :class:`CheckpointError`, the content hash, key-diff helpers;
* ``atomic``: :func:`atomic_torch_save` (plain content checked, then
  :func:`pretrain.fileio.atomic_write`);
* ``safe_load``: reading torch files and weight pickles without executing code;
* ``rng``: RNG streams; ``train_state``: the training state and run-folder files;
* ``readers``: one reader per checkpoint layout, in one ordered table;
* ``backbone``: exported backbones, :func:`load_backbone` (validated against torchvision's
  ResNet, :mod:`pretrain.models.resnet`), :func:`read_projector`,
  :func:`load_backbone_and_projector` (both from one read of the file); ``projector``: which
  layouts carry a projector, and its layout read from its keys;
* ``cli``: the shared ``--allow-unsafe`` / ``--checkpoint-key`` / ``--prefix`` options.

The package reads and writes state dicts and their metadata and imports no model: the modules
are built from what it reads in the model layer (``pretrain.models.build``:
``model_from_checkpoint``, ``load_projector``).
"""

from .atomic import atomic_torch_save, check_plain
from .backbone import (
    STEM_ASSUMED,
    NonFiniteWeightsError,
    check_finite_tensors,
    check_finite_weights,
    export_backbone,
    export_torchvision_state_dict,
    load_backbone,
    load_backbone_and_projector,
    read_projector,
    reference_backbone,
    validate_backbone,
)
from .cli import add_weights_args, weights_kwargs, with_accepted_inputs
from .common import (
    BACKBONE_FORMAT,
    BACKBONE_VERSION,
    CHECKPOINT_RE,
    HASH_SCHEME,
    TRAIN_HASH_SCHEME,
    TRAIN_STATE_FORMAT,
    TRAIN_STATE_VERSION,
    CheckpointError,
    CheckpointPathError,
    tensor_sha256,
    unwrap_model,
)
from .readers import READERS, Reader, accepted_inputs
from .rng import capture_rng_state, restore_rng_state, rng_state_for_rank
from .safe_load import UnresolvedGlobal, load_plain, read_torch_file, read_weights_pickle
from .train_state import (
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_latest_training_state,
    load_training_state,
    prune_checkpoints,
    restore_training_state,
    save_training_state,
    train_state_sha256,
)

__all__ = [
    "BACKBONE_FORMAT",
    "BACKBONE_VERSION",
    "CHECKPOINT_RE",
    "HASH_SCHEME",
    "READERS",
    "TRAIN_HASH_SCHEME",
    "TRAIN_STATE_FORMAT",
    "TRAIN_STATE_VERSION",
    "CheckpointError",
    "CheckpointPathError",
    "NonFiniteWeightsError",
    "STEM_ASSUMED",
    "Reader",
    "UnresolvedGlobal",
    "accepted_inputs",
    "add_weights_args",
    "atomic_torch_save",
    "capture_rng_state",
    "check_plain",
    "check_finite_tensors",
    "check_finite_weights",
    "checkpoint_name",
    "export_backbone",
    "export_torchvision_state_dict",
    "latest_checkpoint",
    "list_checkpoints",
    "load_backbone",
    "load_backbone_and_projector",
    "load_latest_training_state",
    "load_plain",
    "load_training_state",
    "prune_checkpoints",
    "read_projector",
    "read_torch_file",
    "read_weights_pickle",
    "reference_backbone",
    "restore_rng_state",
    "restore_training_state",
    "rng_state_for_rank",
    "save_training_state",
    "tensor_sha256",
    "train_state_sha256",
    "unwrap_model",
    "validate_backbone",
    "weights_kwargs",
    "with_accepted_inputs",
]
