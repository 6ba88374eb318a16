"""What a captured graph baked in of its module, to tell before each step whether it still holds.

torch.fx runs ``forward`` once with proxies: a plain attribute it reads (a temperature, a drop
probability), a submodule it calls and a parameter it reads become constants and references of
the graph. A model changed after that (a new head, a drop-path schedule, frozen layers) must be
captured again, never run through the old graph::

    seen = Fingerprint.of(model)        # when the graph is captured
    ...
    if Fingerprint.of(model) != seen:   # before each step
        capture again

The fingerprint holds, for every module: its name in the tree, identity and type, training flag,
its own parameters' and buffers' identity, shape, dtype, device and requires_grad, its hooks, and
its plain attributes (numbers, strings, booleans, None). Tensor values are not in it: the graph
reads them at run time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor, nn

__all__ = ["Fingerprint"]

_PLAIN = (bool, int, float, str, type(None))
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_state_dict_hooks", "_load_state_dict_pre_hooks")


def _tensor(tensor: Optional[Tensor]) -> Any:
    if tensor is None:
        return None
    return id(tensor), tuple(tensor.shape), tensor.dtype, tensor.device, tensor.requires_grad


def _module(name: str, module: nn.Module) -> tuple:
    state = vars(module)
    plain = tuple(sorted((key, value) for key, value in state.items()
                         if isinstance(value, _PLAIN) and not isinstance(value, type)))
    tensors = tuple((key, _tensor(value)) for group in ("_parameters", "_buffers")
                    for key, value in state.get(group, {}).items())
    hooks = tuple(tuple(id(hook) for hook in state.get(kind, {}).values()) for kind in _HOOKS)
    return name, id(module), type(module), plain, tensors, hooks


@dataclass(frozen=True)
class Fingerprint:
    """A module tree as a captured graph depends on it; equal fingerprints, the same graph."""

    modules: tuple

    @classmethod
    def of(cls, root: nn.Module) -> "Fingerprint":
        return cls(tuple(_module(name, module) for name, module in root.named_modules(remove_duplicate=False)))

    def changed(self, other: "Fingerprint") -> Optional[str]:
        """Where ``other`` (taken later) first differs, in words; None where nothing changed."""
        if self == other:
            return None
        if len(self.modules) != len(other.modules):
            return f"the module tree has {len(other.modules)} modules, {len(self.modules)} when captured"
        fields = ("name", "module", "type", "plain attributes", "parameters and buffers", "hooks")
        for before, after in zip(self.modules, other.modules):
            for index, field_name in enumerate(fields):
                if before[index] != after[index]:
                    where = after[0] or "the model"
                    if field_name == "plain attributes":
                        changed = sorted(set(before[3]) ^ set(after[3]))
                        return f"{where}: attribute {changed[0][0]!r} changed" if changed else f"{where}: attributes"
                    return f"{where}: its {field_name} changed"
        return "the model changed"
