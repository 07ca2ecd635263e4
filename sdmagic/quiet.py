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


_DROP = _DropNoise()


def silence_upstream_noise() -> None:
    """Filter the noise on every diffusers/transformers logger and handler that exists now.

    A record logged on a child logger (`diffusers.models.resnet_flax`) skips its parents' logger
    filters on the way up, so the filter goes on each logger itself. diffusers imports its modules
    lazily; call this again after importing more of it (it is idempotent and cheap).
    """
    # transformers checks this before logging its "no PyTorch / TensorFlow" advisory.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for noise in _NOISE:
        warnings.filterwarnings("ignore", message=f".*{noise}.*")
    names = [name for name in logging.root.manager.loggerDict if name.split(".")[0] in ("diffusers", "transformers")]
    for name in names + ["diffusers", "transformers"]:
        logger = logging.getLogger(name)
        if _DROP not in logger.filters:
            logger.addFilter(_DROP)
        for handler in logger.handlers:
            if _DROP not in handler.filters:
                handler.addFilter(_DROP)
