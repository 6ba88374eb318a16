"""autobatch with Hugging Face Accelerate: prepare as usual, then wrap.

    accelerator = Accelerator(mixed_precision="bf16")
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ab = autobatch.integrations.accelerate.wrap(accelerator, model, optimizer, target_batch=64, loss_fn=criterion)
    for inputs, targets in loader:              # each process's share of a logical batch
        loss = ab.step(inputs, targets)

Accelerate's prepared model is DistributedDataParallel when launched on several processes (autobatch
then syncs gradients once per logical batch and merges BatchNorm statistics over them), and runs its
forward under Accelerate's autocast. autobatch steps the optimizer inside Accelerate's wrapper and
scales the loss with Accelerate's GradScaler (fp16) itself, so each logical batch is one update.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autobatch.step import AutoBatch
from autobatch.step import wrap as autobatch_wrap

__all__ = ["wrap"]


def wrap(accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer, target_batch: int,
         loss_fn: Any = None, **options: Any) -> AutoBatch:
    """``autobatch.wrap`` (with its keywords) for a model and optimizer that ``accelerator.prepare``
    returned. ``target_batch`` is the logical batch over all processes, as with plain DDP."""
    inner = getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer holds the real one
    options.setdefault("scaler", accelerator.scaler)
    options.setdefault("device", accelerator.device)
    return autobatch_wrap(model, inner, target_batch, loss_fn, **options)
