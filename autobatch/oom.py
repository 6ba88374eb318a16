"""Out of memory, recognised in every spelling, and the memory a failed attempt held, freed.

    try:
        step()
    except BaseException as error:
        if not is_out_of_memory(error):
            raise
        message = first_line(error)
    release_memory(device)       # outside the except block, whose frames pin tensors
"""
from __future__ import annotations

import gc

import torch

__all__ = ["PlanDoesNotFit", "first_line", "is_out_of_memory", "release_memory"]

#: How allocation failures read when they come as a plain RuntimeError: the host allocator's, CUDA's
#: own (outside the caching allocator), and cuBLAS/cuDNN failing to allocate their handles or workspaces.
_OUT_OF_MEMORY_TEXTS = ("can't allocate memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                        "CUDNN_STATUS_ALLOC_FAILED")


class PlanDoesNotFit(MemoryError):
    """No way of running the logical batch fits the memory budget (nothing smaller is left to try).

    A ``MemoryError``, so that ``except MemoryError`` catches it; never an out-of-memory error that a
    smaller plan recovers: autobatch raises it after it has tried what there is."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says an allocation failed (CUDA's OutOfMemoryError, the host allocator's, cuBLAS's...);
    `PlanDoesNotFit` does not: it is autobatch's verdict after trying, not a failed allocation."""
    if isinstance(error, PlanDoesNotFit):
        return False
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _OUT_OF_MEMORY_TEXTS)


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name when the message is empty (``MemoryError()``)."""
    text = str(error)
    return text.splitlines()[0] if text.strip() else type(error).__name__


def release_memory(device: torch.device) -> None:
    """Free what a failed attempt held; called outside the except block, whose frames pin tensors."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
