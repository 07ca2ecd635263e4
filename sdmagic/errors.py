"""The one exception type users see from the engine.

Every mistake a user can make (a bad option, a missing model folder, an unreachable Hub id) raises
`SDMagicError` with a one-line message that says what to do. The magics turn it into IPython's
`UsageError`; plain Python callers catch it like any `ValueError`.

A message names an option the way the user wrote it: `seed=3` from Python, `--seed 3` in a magic.
The magics switch the style for the duration of a call (a context variable: safe across threads).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager


class SDMagicError(ValueError):
    """A user-facing problem with a message that says how to fix it."""


class ModelLoadError(SDMagicError):
    """The model could not be found, reached or read."""


_IN_MAGIC = contextvars.ContextVar("sdmagic_in_magic", default=False)

# API keyword -> magic flag, where they differ from `--` + the keyword with '-' for '_'.
_FLAGS = {"images_per_prompt": "--n", "init_image": "--init", "cache": "--no-cache", "safety_checker": "--no-safety-checker"}


@contextmanager
def magic_style():
    """Within this block, messages name options as magic flags (`--seed 3`)."""
    token = _IN_MAGIC.set(True)
    try:
        yield
    finally:
        _IN_MAGIC.reset(token)


def in_magic() -> bool:
    return _IN_MAGIC.get()


def option(keyword: str) -> str:
    """The option's name as the user writes it: `seed` in Python, `--seed` in a magic."""
    if in_magic():
        return _FLAGS.get(keyword, "--" + keyword.replace("_", "-"))
    return keyword


def example(keyword: str, value: object) -> str:
    """An example setting: `seed=3` in Python, `--seed 3` in a magic."""
    if in_magic():
        # Switches (`--no-cache`, `--trust-pickle`) take no value.
        return option(keyword) if isinstance(value, bool) else f"{option(keyword)} {value}"
    return f"{keyword}={value!r}"
