"""The one exception type users see from the engine.

Every mistake a user can make (a bad option, a missing model folder, an unreachable Hub id) raises
`SDMagicError` with a one-line message that says what to do. The magics turn it into IPython's
`UsageError`; plain Python callers catch it like any `ValueError`.
"""


class SDMagicError(ValueError):
    """A user-facing problem with a message that says how to fix it."""


class ModelLoadError(SDMagicError):
    """The model could not be found, reached or read."""
