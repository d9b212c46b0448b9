"""Old names kept working for one release: renamed keywords, attributes and argument orders.

One concept has one name across deepspark (``docs/glossary.md``). Where a public argument or
attribute had another name, the old one still works until `REMOVED_IN`, with a
`DeprecationWarning` that names the new one; giving both names at once is a `TypeError`.

This module imports nothing heavy (rank-side modules may use it).

Examples
--------
>>> import warnings
>>> @renamed_keywords(features_col="feature_cols")
... def columns(*, feature_cols="features"):
...     return feature_cols
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     columns(features_col="x")
'x'
>>> print(caught[0].message)
columns: features_col= is deprecated, use feature_cols= (the old name goes in deepspark 0.2)
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = [
    "REMOVED_IN",
    "RENAMED_SEARCH_OPTIONS",
    "keyword_only_after",
    "renamed_attribute",
    "renamed_keywords",
]

# The release that drops the old names.
REMOVED_IN = "0.2"

# AutoEstimator's (and AutoTS's, which passes them on) old option names -> their names now
RENAMED_SEARCH_OPTIONS = {"workers_per_trial": "num_workers", "directory": "checkpoint_dir"}

_F = TypeVar("_F", bound=Callable[..., Any])

# warnings.warn's stacklevel that points at the user's call: _warn, the wrapper, the caller
_CALLER = 3


def _warn(message: str) -> None:
    warnings.warn(message, DeprecationWarning, stacklevel=_CALLER)


def _title(function: Callable[..., Any]) -> str:
    return function.__qualname__.replace(".__init__", "")


def renamed_keywords(**renames: str) -> Callable[[_F], _F]:
    """Accept each old keyword (a key of `renames`) as its new name (the value), with a warning.

    Parameters
    ----------
    **renames : str
        ``old_name="new_name"`` for each renamed keyword argument.

    Returns
    -------
    callable
        A decorator for the function that takes the new names.
    """

    def decorate(function: _F) -> _F:
        title = _title(function)

        @functools.wraps(function)
        def with_old_names(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(
                        f"{title}: give {new}= only ({old}= is its deprecated old name)"
                    )
                _warn(
                    f"{title}: {old}= is deprecated, use {new}= "
                    f"(the old name goes in deepspark {REMOVED_IN})"
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return with_old_names  # type: ignore[return-value]

    return decorate


def keyword_only_after(count: int, old_order: Sequence[str]) -> Callable[[_F], _F]:
    """Arguments past the first `count` positional ones became keyword-only.

    A call that still passes them by position, in their old order `old_order`, keeps its old
    meaning with a warning; a name given both ways, or more positions than the old order had,
    is a `TypeError`. So an old positional call never lands in another argument silently.

    Parameters
    ----------
    count : int
        Positional parameters the function keeps (``self`` counts for a method).
    old_order : sequence of str
        The names the next positions had before they became keyword-only.

    Returns
    -------
    callable
        A decorator for the function with the keyword-only signature.
    """

    def decorate(function: _F) -> _F:
        title = _title(function)

        @functools.wraps(function)
        def with_old_positions(*args: Any, **kwargs: Any) -> Any:
            extra = args[count:]
            if not extra:
                return function(*args, **kwargs)
            if len(extra) > len(old_order):
                raise TypeError(
                    f"{title} takes {count} positional arguments but {len(args)} were given; "
                    "pass the others by keyword"
                )
            names = list(old_order[: len(extra)])
            both = [name for name in names if name in kwargs]
            if both:
                raise TypeError(f"{title}: {both[0]} given by position and by keyword")
            shown = ", ".join(f"{name}=" for name in names)
            _warn(
                f"{title}: pass {shown} by keyword; their positions are deprecated and go in "
                f"deepspark {REMOVED_IN}"
            )
            kwargs.update(zip(names, extra, strict=True))
            return function(*args[:count], **kwargs)

        return with_old_positions  # type: ignore[return-value]

    return decorate


class renamed_attribute:
    """A class attribute that reads and writes `new` under its old name, with a warning.

    Examples
    --------
    >>> import warnings
    >>> class Model:
    ...     history_ = renamed_attribute("history")
    ...     def __init__(self):
    ...         self.history = [1.0]
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     Model().history_
    [1.0]
    """

    def __init__(self, new: str) -> None:
        self.new = new
        self.old = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.old = name

    def _message(self, instance: Any) -> str:
        owner = type(instance).__name__
        return (
            f"{owner}.{self.old} is deprecated, use {owner}.{self.new} "
            f"(the old name goes in deepspark {REMOVED_IN})"
        )

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        warnings.warn(self._message(instance), DeprecationWarning, stacklevel=2)
        return getattr(instance, self.new)

    def __set__(self, instance: Any, value: Any) -> None:
        warnings.warn(self._message(instance), DeprecationWarning, stacklevel=2)
        setattr(instance, self.new, value)
