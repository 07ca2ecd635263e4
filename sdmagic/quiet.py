"""Silence the frozen upstream's deprecation chatter, and nothing else.

diffusers 0.39 logs "Flax classes are deprecated ..." on every Flax class it loads, and transformers
notes missing PyTorch/TensorFlow. A notebook user can do nothing about either, so those exact messages
are dropped; every other warning still reaches the user.
"""

from __future__ import annotations

import logging
import os
import warnings

# Substrings of upstream messages that carry no information for a sdmagic user.
_NOISE = (
    "Flax classes are deprecated",
    "TensorFlow and JAX classes are deprecated",
    "PyTorch was not found",
    "None of PyTorch, TensorFlow",
    "You have disabled the safety checker",  # sdmagic reports the checker's state itself
    "You have passed `None` for safety_checker",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _NOISE)


_installed = False


def silence_upstream_noise() -> None:
    """Install the filters once, before diffusers/transformers are imported by sdmagic."""
    global _installed
    if _installed:
        return
    _installed = True
    # transformers checks this before logging its "no PyTorch / TensorFlow" advisory.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for noise in _NOISE:
        warnings.filterwarnings("ignore", message=f".*{noise}.*")
    drop = _DropNoise()
    for name in ("diffusers", "transformers"):
        logger = logging.getLogger(name)
        # Records from child loggers skip the parent's filters but not its handlers' filters,
        # so the filter goes on the library's handlers (created on import) and on the logger.
        logger.addFilter(drop)
        for handler in logger.handlers:
            handler.addFilter(drop)
