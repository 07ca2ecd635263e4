"""sdmagic: Stable Diffusion on JAX from a notebook cell.

    %load_ext sdmagic
    %sd_setup --model tiny
    %%sd --seed 3
    a red fox in the snow

(also `--init photo.png --strength 0.6`, `--mask`, `%sd_setup --lora FILE:0.8`, `%sd_lora`), or from plain Python:

    import sdmagic
    session = sdmagic.setup(model="tiny")
    result = session.generate(["a red fox in the snow"], seed=3)

JAX is imported on first use, so `%load_ext sdmagic` is instant.
"""

from __future__ import annotations

__version__ = "0.3.0"

__all__ = [
    "GenerationResult",
    "LoraWarning",
    "Prompt",
    "SDMagicError",
    "Session",
    "load_ipython_extension",
    "read_parameters",
    "setup",
    "unload_ipython_extension",
]

from .errors import SDMagicError

_LAZY = {
    "setup": ("session", "setup"),
    "Session": ("session", "Session"),
    "GenerationResult": ("output", "GenerationResult"),
    "Prompt": ("prompts", "Prompt"),
    "LoraWarning": ("lora", "LoraWarning"),
    "read_parameters": ("saving", "read_parameters"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attribute)
    raise AttributeError(f"module 'sdmagic' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazy names are part of the API: dir() and tab completion must show them.
    return sorted(set(globals()) | set(_LAZY))


def load_ipython_extension(ipython) -> None:
    """`%load_ext sdmagic`: register %sd_setup, %sd / %%sd, %sd_lora, %sd_time, %sd_history, %sd_show, %sd_from_png."""
    from .magics import SDMagics

    ipython.register_magics(SDMagics)


def unload_ipython_extension(ipython) -> None:
    """`%unload_ext sdmagic`: remove the magics and free the session's device memory."""
    from .magics import SDMagics

    magics = ipython.magics_manager.registry.pop(SDMagics.__name__, None)
    if magics is not None and magics.session is not None:
        magics.session.close()
    if magics is not None and magics in getattr(ipython, "configurables", []):
        ipython.configurables.remove(magics)
    for kind in ("line", "cell"):
        table = ipython.magics_manager.magics[kind]
        for name in ("sd_setup", "sd", "sd_lora", "sd_time", "sd_history", "sd_show", "sd_from_png"):
            table.pop(name, None)
