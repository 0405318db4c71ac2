"""Which positions of a micro-batch become history rows, and their metadata columns.

A row is one trained token: a position whose target (the token the model is trained to predict there)
is not ``IGNORE`` and whose attention mask is not 0. Targets are aligned with the positions; HF causal
LMs take ``labels`` instead, shifted inside the model, which :func:`targets_from_labels` converts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

IGNORE = -100  # the ignore_index of torch's cross entropy and of HF labels
# Columns every recording has; user metadata columns come after them.
BASE_COLUMNS = ("step", "micro_batch", "sequence", "position", "token", "target")
NO_TOKEN = -1  # the token column where the model's input is not token ids


def targets_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with positions from HF-style ``labels`` [B, T], which the model shifts itself:
    the target of position p is ``labels[:, p + 1]``; the last position has none."""
    _check_int_tensor("labels", labels, dims=(2,))
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return targets


def labels_as_targets(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The targets of a HF causal LM's forward: from its ``labels`` argument (None if it has none)."""
    labels = kwargs.get("labels")
    return None if labels is None else targets_from_labels(labels)


@dataclass
class MicroBatchRows:
    """The rows of one micro-batch: flat indices into its B*T positions (CPU int64) and their columns."""

    batch_size: int
    positions_per_sequence: int
    kept: torch.Tensor  # flat position indices that become rows, ascending
    dropped: torch.Tensor  # flat position indices that do not
    columns: dict[str, torch.Tensor]  # per row: sequence-in-batch, position, token, target, user columns

    @property
    def num_positions(self) -> int:
        return self.batch_size * self.positions_per_sequence


def micro_batch_rows(targets: torch.Tensor, attention_mask: Optional[torch.Tensor], tokens: Optional[torch.Tensor],
                     metadata: Mapping[str, torch.Tensor], user_columns: Mapping[str, str]) -> MicroBatchRows:
    """Validate one micro-batch's inputs and select its rows.

    ``targets`` is [B, T] (or [B] for one position per sequence); ``attention_mask`` and ``tokens`` have
    its shape; ``metadata`` gives every user column (and no other) as [B] (per sequence) or [B, T] (per
    position) integers. Errors name the offending argument or column.
    """
    _check_int_tensor("targets", targets, dims=(1, 2))
    targets = targets.detach().cpu()
    if targets.dim() == 1:
        targets = targets[:, None]
    shape = tuple(targets.shape)
    if bool(((targets < 0) & (targets != IGNORE)).any()):
        raise ValueError(f"targets must be token ids >= 0 or {IGNORE} (no target), got {int(targets.min())}")
    trained = targets != IGNORE
    if attention_mask is not None:
        trained &= _per_position("attention_mask", attention_mask, shape) != 0
    token = _per_position("tokens", tokens, shape) if tokens is not None else torch.full(shape, NO_TOKEN)
    flat = trained.reshape(-1)
    kept, dropped = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
    b, p = kept // shape[1], kept % shape[1]
    columns = {"sequence": b, "position": p, "token": token.reshape(-1)[kept], "target": targets.reshape(-1)[kept]}
    missing, unknown = set(user_columns) - set(metadata), set(metadata) - set(user_columns)
    if missing or unknown:
        raise ValueError(f"metadata must give exactly the recorder's columns {sorted(user_columns)}: missing "
                         f"{sorted(missing)}, unknown {sorted(unknown)}")
    for name in user_columns:
        value = metadata[name]
        _check_int_tensor(f"metadata column {name!r}", value, dims=(1, 2))
        value = value.detach().cpu()
        if tuple(value.shape) == shape[:1]:
            columns[name] = value[b]
        elif tuple(value.shape) == shape:
            columns[name] = value.reshape(-1)[kept]
        else:
            raise ValueError(f"metadata column {name!r} has shape {list(value.shape)}: it must be per sequence "
                             f"[{shape[0]}] or per position {list(shape)} (the targets' shape)")
    return MicroBatchRows(shape[0], shape[1], kept, dropped, columns)


def _per_position(what: str, value: torch.Tensor, shape: tuple) -> torch.Tensor:
    _check_int_tensor(what, value, dims=(1, 2), allow_bool=True)
    value = value.detach().cpu()
    if value.dim() == 1:
        value = value[:, None]
    if tuple(value.shape) != shape:
        raise ValueError(f"{what} has shape {list(value.shape)} but the targets are {list(shape)}")
    return value.long()


def _check_int_tensor(what: str, value, dims: tuple, allow_bool: bool = False) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of integers, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or (value.dtype == torch.bool and not allow_bool):
        raise TypeError(f"{what} must hold integers, got {value.dtype}")
    if value.dim() not in dims:
        raise ValueError(f"{what} must have {' or '.join(f'{d} dimensions' for d in dims)}, got shape {list(value.shape)}")
