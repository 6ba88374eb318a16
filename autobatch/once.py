"""What a wrap says or checks once: one record, shared by the step and the BatchNorm strategies.

    once = Once()                         # one per wrap (MicroStep.once)
    if once.first("chunks"):              # True the first time only
        log.warning("...")
    if "watched" not in once:             # a check marked done only once it has passed
        ...
        once.add("watched")
"""
from __future__ import annotations

__all__ = ["Once"]


class Once:
    """The keys of what has been said or checked; each warning or check names its own key."""

    def __init__(self) -> None:
        self._done: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._done

    def add(self, key: str) -> None:
        self._done.add(key)

    def first(self, key: str) -> bool:
        """Whether ``key`` comes up for the first time; it is marked done either way."""
        if key in self._done:
            return False
        self._done.add(key)
        return True
