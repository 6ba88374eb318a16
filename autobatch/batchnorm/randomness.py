"""Phase 1's random draws (dropout, stochastic depth), replayed to each micro-batch in phase 2.

two_pass normalizes each micro-batch with statistics that phase 1 measured under its own dropout
and stochastic-depth masks. Drawn afresh, phase 2's masks give every BatchNorm activations that
phase 1 never saw, normalized with phase 1's statistics; nothing corrects the mismatch, and it
compounds with depth (stock EfficientNet's first gradient reached 1e17). `RandomDraws`
records every random draw of phase 1 in order and gives each micro-batch's k-th draw phase 1's
k-th draw, sliced to the micro-batch's rows (whole when the draw is not per sample)::

    draws = RandomDraws()
    with draws.record(first_row=0, rows=16):
        phase_1(batch)                              # 16 samples: masks of 16 rows
    with draws.replay(first_row=4, rows=4):
        loss = loss_fn(model(batch[4:8]), ...)      # rows 4:8 of each mask
    with draws.recompute():
        loss.backward()                             # checkpointing's recomputation: the same masks

Draws are intercepted with a `torch.overrides.TorchFunctionMode`: per thread, unwound by
the ``with`` block, and traced by ``torch.compile``. Memory: a dropout mask costs one byte per
element of its input for the whole logical batch, other draws their own size, and only draws
made before phase 1's last BatchNorm call are kept (phase 1 stops there); they live until the step
ends, and the planner adds them to every micro-batch's predicted peak (autobatch.planning.micro_batches).
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from autobatch.batchnorm.rows import rows_per_sample
from autobatch.interrupts import held_interrupts

__all__ = ["RandomDraws"]

_is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)  # torch >= 2.3

#: Dropouts by qualified name (torch.compile traces string lookups reliably, function-keyed ones not),
#: with their argument names; those that zero whole channels give the dimensions of a batched input.
_DROPOUTS = {F.dropout: ("input", "p", "training", "inplace"), torch.dropout: ("input", "p", "train"),
             torch.dropout_: ("input", "p", "train"), F.dropout1d: ("input", "p", "training", "inplace"),
             F.dropout2d: ("input", "p", "training", "inplace"), F.dropout3d: ("input", "p", "training", "inplace")}
_DROPOUT_ARGUMENTS = {func.__qualname__: names for func, names in _DROPOUTS.items()}
_CHANNEL_DROPOUT_DIMS = {F.dropout1d.__qualname__: 3, F.dropout2d.__qualname__: 4, F.dropout3d.__qualname__: 5}
#: Functions whose output is the draw itself; those that fill a tensor in place first.
_IN_PLACE_DRAWS = {func.__qualname__ for func in (
    torch.Tensor.bernoulli_, torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.exponential_,
    torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.cauchy_, torch.Tensor.random_)}
_DRAWS = _IN_PLACE_DRAWS | {func.__qualname__ for func in (
    torch.Tensor.bernoulli, torch.bernoulli, torch.rand, torch.randn, torch.randint, torch.rand_like,
    torch.randn_like, torch.randint_like, torch.normal, torch.poisson, torch.multinomial, torch.Tensor.multinomial)}
# Not torch.randperm: a permutation of the batch is not per sample (sliced, it would index past a
# micro-batch); a forward that permutes its batch mixes samples, which the check against phase 1 reports.


def _short(qualname: str) -> str:
    """``rand`` for ``_VariableFunctionsClass.rand``, ``bernoulli_`` for ``TensorBase.bernoulli_``."""
    return qualname.rsplit(".", 1)[-1]


def _kind(func: Callable) -> Optional[str]:
    """"draw", "dropout", or None for a function that draws nothing."""
    name = getattr(func, "__qualname__", None)
    return "draw" if name in _DRAWS else "dropout" if name in _DROPOUT_ARGUMENTS else None


@dataclass
class _Recording:
    """The draws of one phase-1 forward over ``rows`` samples starting at ``first_row``."""

    first_row: int
    rows: int = 0
    funcs: list[Callable] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)


@dataclass
class _Replayed:
    """Phase 1's draw number k, ready for one micro-batch before its forward starts: nothing that
    depends on the micro-batch's rows is left to compute while torch.compile traces the forward."""

    qualname: str
    #: Phase 1's draw (its first forward's, under a chunked phase 1), for a draw not per sample.
    whole: Tensor
    #: The shape a per-sample draw has in this micro-batch; None for a draw that is not per sample.
    micro_shape: Optional[tuple[int, ...]]
    #: The micro-batch's rows of a per-sample draw; None where phase 1 did not run them.
    rows: Optional[Tensor]


class _Intercept(TorchFunctionMode):
    """Hands every random draw to ``draw(func, args, kwargs)``; everything else runs as called."""

    def __init__(self, draw: Callable[[Callable, tuple, dict], Any]):
        super().__init__()
        self._draw = draw

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__qualname__", None)
        if name == _ATTENTION and _attention_dropout(args, kwargs) > 0:
            return _explicit_attention(self._draw, *args, **kwargs)
        if name == _MULTI_HEAD:
            return self._multi_head(func, args, kwargs)
        if _kind(func) is None:
            return func(*args, **kwargs)
        return self._draw(func, args, kwargs)


    def _multi_head(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """``F.multi_head_attention_forward``, whose attention dropout is a call inside it that a mode does not
        see from its own handler: while it runs, this thread's calls of the module's ``dropout`` and
        ``scaled_dot_product_attention`` (looked up there at each call) come here."""
        thread = threading.get_ident()
        query, heads = args[0], (args[4] if len(args) > 4 else kwargs["num_heads"])
        # Its attention weights hold (samples x heads) rows, sequence first: (L, N, E) queries.
        samples = query.shape[1] if query.dim() == 3 else None

        def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
            if threading.get_ident() != thread:
                return _DROPOUT(input, p, training, inplace)
            options = {"training": training, "inplace": inplace}
            if samples is None or input.dim() != 3 or input.shape[0] != samples * heads:
                return self._draw(_DROPOUT, (input, p), options)
            per_sample = input.view(samples, heads, *input.shape[1:])  # a mask per sample, as replay slices it
            return self._draw(_DROPOUT, (per_sample, p), options).view(input.shape)

        def attention(*args: Any, **kwargs: Any) -> Tensor:
            if threading.get_ident() != thread or _attention_dropout(args, kwargs) == 0:
                return _SDPA(*args, **kwargs)
            return _explicit_attention(self._draw, *args, **kwargs)

        # Patched inside the try, put back unconditionally: a Ctrl-C at any line leaves PyTorch's functions.
        try:
            with held_interrupts():
                F.dropout, F.scaled_dot_product_attention = dropout, attention
            return func(*args, **kwargs)
        finally:
            with held_interrupts():
                F.dropout, F.scaled_dot_product_attention = _DROPOUT, _SDPA


#: PyTorch's own functions, whatever replaces them in torch.nn.functional for a while.
_DROPOUT, _SDPA = F.dropout, F.scaled_dot_product_attention
_ATTENTION = F.scaled_dot_product_attention.__qualname__
_MULTI_HEAD = F.multi_head_attention_forward.__qualname__
_ATTENTION_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _attention_dropout(args: tuple, kwargs: dict) -> float:
    return float(dict(zip(_ATTENTION_ARGUMENTS, args), **kwargs).get("dropout_p", 0.0))


def _explicit_attention(draw: Callable[[Callable, tuple, dict], Any], query: Tensor, key: Tensor, value: Tensor,
                        attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                        scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` with dropout, as its documentation spells it out: the attention
    weights' dropout is then an ``F.dropout`` call, recorded in phase 1 and replayed per sample, where the
    fused kernel's mask could be neither. A two_pass step's forwards only; the same maths, unfused."""
    length, source = query.size(-2), key.size(-2)
    scale = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    bias = torch.zeros(length, source, dtype=query.dtype, device=query.device)
    if is_causal:
        bias.masked_fill_(torch.ones(length, source, dtype=torch.bool, device=query.device).tril().logical_not(),
                          float("-inf"))
    if attn_mask is not None:
        bias = bias.masked_fill(attn_mask.logical_not(), float("-inf")) if attn_mask.dtype == torch.bool \
            else bias + attn_mask
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    weights = torch.softmax(query @ key.transpose(-2, -1) * scale + bias, dim=-1)
    weights = draw(_DROPOUT, (weights, dropout_p), {"training": True})
    return weights @ value


def _dropout_arguments(func: Callable, args: tuple, kwargs: dict) -> tuple[Tensor, float, bool, bool]:
    names = _DROPOUT_ARGUMENTS[func.__qualname__]
    bound = dict(zip(names, args), **kwargs)
    training = bound.get("training", bound.get("train", True))
    return bound["input"], bound.get("p", 0.5), bool(training), bool(bound.get("inplace", func is torch.dropout_))


def _mask_shape(func: Callable, input: Tensor) -> Optional[tuple[int, ...]]:
    """The shape of the dropout's mask, None for an input the dropout does not take per channel."""
    batched = _CHANNEL_DROPOUT_DIMS.get(func.__qualname__)
    if batched is None:
        return tuple(input.shape)
    if input.dim() == batched:
        return tuple(input.shape[:2]) + (1,) * (batched - 2)
    if input.dim() == batched - 1:  # no batch dimension: channels first
        return (input.shape[0],) + (1,) * (batched - 2)
    return None


def _drawing_dropout(func: Callable, args: tuple, kwargs: dict) -> Optional[tuple[Tensor, float, bool, tuple]]:
    """(input, p, inplace, mask shape) of a dropout call that draws a mask; None for one that draws
    nothing (eval mode, p=0, an input it does not take per channel, or a bad p, which PyTorch reports)."""
    input, p, training, inplace = _dropout_arguments(func, args, kwargs)
    shape = _mask_shape(func, input)
    if not training or shape is None or not 0 < p <= 1:
        return None
    return input, p, inplace, shape


def _masked(input: Tensor, mask: Tensor, p: float, inplace: bool) -> Tensor:
    """What the dropout returns for this 0/1 ``mask``."""
    scale = mask.to(input.dtype) * (1 / (1 - p) if p < 1 else 0.0)
    return input.mul_(scale) if inplace else input * scale


def _rng_key(device: torch.device) -> Tensor:
    """The state of the generator that draws on ``device``: checkpointing restores it to recompute."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _device_of(args: tuple, kwargs: dict) -> torch.device:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, Tensor):
            return value.device
    device = kwargs.get("device")
    return torch.device(device) if device is not None else torch.empty(0).device


class RandomDraws:
    """Phase 1's random draws, recorded per forward and replayed, sliced, to micro-batches."""

    def __init__(self) -> None:
        self._recordings: list[_Recording] = []
        self._cursor = 0
        self._prepared: list[_Replayed] = []
        #: Each draw of the last micro-batch's forward: (generator state before it, the replayed
        #: values, or None for a fresh draw, which checkpointing's restored generator draws again).
        self._given: list[tuple[Optional[Tensor], Optional[Tensor]]] = []

    def clear(self) -> None:
        """Forget the last step's draws (before a new phase 1)."""
        self._recordings = []
        self._given = []

    @property
    def recorded(self) -> int:
        return sum(len(recording.values) for recording in self._recordings)

    @property
    def nbytes(self) -> int:
        """What the recorded draws hold, resident from phase 1 to the end of the step."""
        return sum(value.numel() * value.element_size() for recording in self._recordings for value in recording.values)

    # -- phase 1 --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def record(self, first_row: int, rows: int) -> Iterator[None]:
        """Record the draws of a phase-1 forward over ``rows`` samples starting at ``first_row``."""
        recording = _Recording(first_row, rows)
        self._recordings.append(recording)
        with _Intercept(lambda func, args, kwargs: self._record(recording, func, args, kwargs)):
            yield

    def _record(self, recording: _Recording, func: Callable, args: tuple, kwargs: dict) -> Any:
        if _kind(func) == "draw":
            drawn = func(*args, **kwargs)
            if isinstance(drawn, Tensor):
                recording.funcs.append(func)
                recording.values.append(drawn.detach().clone())
            return drawn
        dropout = _drawing_dropout(func, args, kwargs)
        if dropout is None:
            return func(*args, **kwargs)
        input, p, inplace, shape = dropout
        # The mask PyTorch's own dropout draws (the same generator calls), kept at one byte per element.
        mask = torch.empty(shape, dtype=input.dtype, device=input.device).bernoulli_(1 - p)
        recording.funcs.append(func)
        recording.values.append(mask.bool())
        return _masked(input, mask, p, inplace)

    # -- phase 2 --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def replay(self, first_row: int, rows: int, start: int = 0) -> Iterator[None]:
        """A micro-batch's forward over ``rows`` samples from ``first_row``: phase 1's draws, in order
        (``start``: from draw number ``start`` on, for a forward that begins part-way through the model)."""
        self._cursor, self._given = start, []
        self._prepared = self._prepare(first_row, first_row + rows)
        with _Intercept(self._replay):
            yield

    def _prepare(self, start: int, stop: int) -> list[_Replayed]:
        """Every draw phase 1 made, with the rows ``start:stop`` of those that are per sample."""
        prepared = []
        for index in range(min((len(recording.values) for recording in self._recordings), default=0)):
            first = self._recordings[0]
            whole = first.values[index]
            # Per sample: k rows each, samples first (autobatch.batchnorm.rows); the micro-batch's own draw then
            # has the shape of its rows, which is how `_recorded` tells it from a draw for the whole batch.
            per_sample = rows_per_sample(whole.shape[0], first.rows) if whole.dim() > 0 else None
            pieces = []
            for recording in self._recordings if per_sample is not None else ():
                value = recording.values[index]
                if value.dim() > 0 and value.shape[0] == recording.rows * per_sample:
                    low, high = max(start, recording.first_row), min(stop, recording.first_row + recording.rows)
                    if low < high:
                        pieces.append(value[(low - recording.first_row) * per_sample:
                                            (high - recording.first_row) * per_sample])
            covered = bool(pieces) and sum(len(piece) for piece in pieces) == (stop - start) * per_sample
            prepared.append(_Replayed(
                first.funcs[index].__qualname__, whole,
                ((stop - start) * per_sample,) + tuple(whole.shape[1:]) if per_sample is not None else None,
                (pieces[0] if len(pieces) == 1 else torch.cat(pieces)) if covered else None))
        return prepared

    def _replay(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        # Draw k of the micro-batch is phase 1's draw k: a call that `_record` kept nothing of (a dropout with p=0,
        # as nn.Dropout(0.0) between drop paths in torchvision's MaxViT) takes no number here either.
        kind = _kind(func)
        dropout = _drawing_dropout(func, args, kwargs) if kind == "dropout" else None
        if kind == "dropout" and dropout is None:
            return func(*args, **kwargs)
        # Checkpointing recomputes with the generator as it was; the state then finds the draw again.
        key = None if _is_compiling() else _rng_key(_device_of(args, kwargs))
        if kind == "draw":
            drawn = func(*args, **kwargs)
            if not isinstance(drawn, Tensor):
                return drawn  # kept by no recording
            replayed = self._recorded(self._next(), func, drawn.shape)
            if replayed is not None:
                drawn = drawn.copy_(replayed) if func.__qualname__ in _IN_PLACE_DRAWS else replayed.to(drawn.dtype)
            self._given.append((key, None if replayed is None else drawn.detach().clone()))
            return drawn
        replayed = self._recorded(self._next(), func, torch.Size(dropout[3]))
        if replayed is None:
            self._given.append((key, None))
            return func(*args, **kwargs)
        input, p, inplace, _ = dropout
        # The dropout itself, output unused, advances the generator exactly as its recomputation will.
        func(input.detach().clone() if inplace else input.detach(), *args[1:], **kwargs)
        mask = replayed.to(input.dtype)
        self._given.append((key, mask))
        return _masked(input, mask, p, inplace)

    def _next(self) -> int:
        """The number of the micro-batch's next draw, in phase 1's order."""
        self._cursor += 1
        return self._cursor - 1

    def _recorded(self, index: int, func: Callable, shape: torch.Size) -> Optional[Tensor]:
        """Phase 1's draw number ``index`` for this micro-batch's rows; None where phase 1 has none
        (draws after its last BatchNorm call, or rows it did not run)."""
        if index >= len(self._prepared):
            return None
        replayed = self._prepared[index]
        if replayed.qualname != func.__qualname__:
            raise RuntimeError(
                f"random draw #{index} of the micro-batch forward is {_short(func.__qualname__)} but phase 1's "
                f"was {_short(replayed.qualname)}; bn='two_pass' replays phase 1's random draws in order and needs "
                "the same sequence of them for every batch. Use bn='micro' for such models.")
        if replayed.micro_shape is not None and tuple(shape) == replayed.micro_shape:
            return replayed.rows
        if replayed.whole.shape == shape:
            return replayed.whole  # not per sample: the same draw for every micro-batch
        raise RuntimeError(
            f"random draw #{index} ({_short(func.__qualname__)}) has shape {tuple(shape)} in the micro-batch "
            f"forward but {tuple(replayed.whole.shape)} in phase 1; bn='two_pass' can replay draws that are per "
            "sample (the samples first, k rows each) or the same for the whole batch. Use bn='micro' for such models.")

    @contextlib.contextmanager
    def recompute(self) -> Iterator[None]:
        """The micro-batch's backward: a draw that activation checkpointing makes again gets what the
        forward's draw got, found by the generator state that checkpointing restored (preserve_rng_state,
        its default). Autograd runs backward without torch-function modes, so this one is a dispatch
        mode, entered only when the forward replayed a draw."""
        if not any(given is not None for _, given in self._given):
            yield
            return
        with _Recompute(self._given):
            yield


class _Recompute(TorchDispatchMode):
    """Gives an aten random op whose generator state matches a forward draw that forward's values."""

    def __init__(self, given: list[tuple[Optional[Tensor], Optional[Tensor]]]):
        super().__init__()
        self._given = given
        self._used: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded not in getattr(func, "tags", ()):
            return func(*args, **kwargs)
        key = _rng_key(_device_of(args, kwargs))
        index = next((i for i, (seen, _) in enumerate(self._given)
                      if i not in self._used and seen is not None and torch.equal(seen, key)), None)
        result = func(*args, **kwargs)  # advances the generator as the forward's draw did
        if index is None or self._given[index][1] is None:
            return result  # a fresh draw: the restored generator draws it again
        self._used.add(index)
        given = self._given[index][1]
        if func.overloadpacket is torch.ops.aten.native_dropout:  # fused dropout (CUDA): (output, mask)
            p = args[1]
            return args[0] * given.to(args[0].dtype) * (1 / (1 - p) if p < 1 else 0.0), given.bool()
        if isinstance(result, Tensor) and result.shape == given.shape:
            return result.copy_(given)
        raise RuntimeError(
            f"activation checkpointing recomputed a random draw ({func}) of shape "
            f"{tuple(getattr(result, 'shape', ()))} where the forward's had {tuple(given.shape)}")
