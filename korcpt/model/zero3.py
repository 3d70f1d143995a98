"""DeepSpeed ZeRO-3 parameter helpers: the one place that reads DeepSpeed's parameter attributes.

Under ZeRO-3 each rank holds only a partition of a parameter: ``param.data`` is (nearly) empty and
DeepSpeed adds ``ds_id`` (the mark of a partitioned parameter), ``ds_shape`` (the full shape) and
``ds_numel`` (the full element count). A parameter is fetched before a module's forward only if the
module owns it, so a module that uses another module's parameter must declare it
(``register_external_parameter``); code outside a forward sees full values only inside
``GatheredParameters``. Without DeepSpeed every helper here is the plain-tensor answer, and DeepSpeed
is imported only when a partitioned parameter or a declaration needs it.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a parameter that ZeRO-3 has partitioned across ranks."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's full shape, also under ZeRO-3 (where ``param.shape`` is the local partition's)."""
    return getattr(param, "ds_shape", param.shape)


def full_numel(param: torch.Tensor) -> int:
    """The parameter's full number of elements, also under ZeRO-3."""
    return int(getattr(param, "ds_numel", param.numel()))


def register_external(module: nn.Module, params: Iterable[nn.Parameter]) -> None:
    """Declare parameters that ``module``'s forward uses but another module owns, so that ZeRO-3
    gathers them for it; nothing to do (and nothing imported) without DeepSpeed."""
    try:
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    except ImportError:  # no DeepSpeed, no partitioning: nothing to declare
        return
    for param in params:
        register_external_parameter(module, param)


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = 0) -> Iterator[bool]:
    """Full tensors of ``params`` inside the block; yields whether this process should write them.

    Partitioned parameters are gathered on every rank (all ranks must enter the block together);
    with ``modifier_rank`` set, that rank's edits are scattered back when the block ends, and only
    it is told to write. Without partitioned parameters the block runs as is and every process writes.
    """
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield True
        return
    import deepspeed
    import torch.distributed as dist

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield modifier_rank is None or not dist.is_initialized() or dist.get_rank() == modifier_rank
