"""Seeded searches that run trials at once and still repeat exactly: trials in rounds.

Optuna's samplers and pruners read the trials that have finished so far. With several trials
training at once, which ones have finished when a trial draws its config, or when its pruner
judges an epoch, depends on timing, so a seed alone does not fix the search. `Rounds` fixes
what each trial may see: trials are numbered in rounds of `size` (the trials that run at
once); every trial of a round draws its config, in number order, once the previous round has
finished and before any trial of its round trains; its pruner sees only earlier rounds
(`RoundPruner`). Then the configs, the pruning and, with seeded fits, the scores follow from
the seed alone. The cost: a round waits for its slowest trial.
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["RoundPruner", "Rounds"]


class Rounds:
    """The schedule of a search's new trials, numbered from `first` on, `size` at a time.

    Parameters
    ----------
    first : int
        The number of the search's first new trial (a resumed study holds earlier ones).
    size : int
        Trials per round: the trials that train at once.
    total : int
        New trials the search will start (the last round may be smaller).
    timeout_s : float, optional
        The search's `timeout_s`: when Optuna starts no more trials, a round that will not
        fill up goes on without the missing ones instead of waiting for them.
    """

    def __init__(self, first: int, size: int, total: int, timeout_s: float | None) -> None:
        self.first, self.size, self.total = first, size, total
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._finished: set[int] = set()
        self._drawn: set[int] = set()
        self._changed = threading.Condition()

    def round_start(self, number: int) -> int:
        """The number of the first trial of `number`'s round."""
        return self.first + (number - self.first) // self.size * self.size

    def _members(self, number: int) -> range:
        start = self.round_start(number)
        return range(start, min(start + self.size, self.first + self.total))

    def _wait_for(self, ready: Any) -> None:
        with self._changed:
            while not ready():
                if self._deadline is not None and time.monotonic() > self._deadline:
                    return  # no more trials will start: go on with the round as it is
                self._changed.wait(timeout=1.0)

    def before_draw(self, number: int) -> None:
        """Wait until every earlier round has finished and earlier trials of this one drew."""
        start = self.round_start(number)
        self._wait_for(
            lambda: (
                all(n in self._finished for n in range(self.first, start))
                and all(n in self._drawn for n in range(start, number))
            )
        )

    def after_draw(self, number: int) -> None:
        """Record that `number` drew its config; wait until its whole round has drawn."""
        with self._changed:
            self._drawn.add(number)
            self._changed.notify_all()
        self._wait_for(lambda: all(n in self._drawn for n in self._members(number)))

    def finished(self, number: int) -> None:
        """Record that `number` finished (complete, pruned or failed)."""
        with self._changed:
            self._finished.add(number)
            self._drawn.add(number)  # a trial that failed before drawing holds up nobody
            self._changed.notify_all()


class _EarlierRounds:
    """The study as a pruner may see it: only the trials numbered before `before`."""

    def __init__(self, study: Any, before: int) -> None:
        self._study, self._before = study, before

    def get_trials(self, *args: Any, **kwargs: Any) -> list[Any]:
        return [t for t in self._study.get_trials(*args, **kwargs) if t.number < self._before]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class RoundPruner:
    """An Optuna pruner that judges a trial against the earlier rounds' trials only."""

    def __init__(self, pruner: Any, rounds: Rounds) -> None:
        self.pruner, self.rounds = pruner, rounds

    def prune(self, study: Any, trial: Any) -> bool:
        view = _EarlierRounds(study, self.rounds.round_start(trial.number))
        return bool(self.pruner.prune(view, trial))
