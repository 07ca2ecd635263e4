"""Compiled code that survives a kernel restart.

Two layers, both under one directory (default `~/.cache/sdmagic/compiled`, or `$SDMAGIC_CACHE_DIR`):

- `executables/`: sdmagic's own store of serialised executables (`jax.experimental.
  serialize_executable`), one file per shape key, model architecture and library versions. A hit
  skips tracing, lowering and compiling: a restarted kernel's first cell of a known shape pays only
  for reading the file.
- `xla/`: JAX's persistent compilation cache, for everything else JAX compiles (and as a second
  chance when an executable file is missing). A cache directory the user configured in JAX
  themselves is left alone.

Like JAX's own cache, the directory is trusted: loading an executable can run code, so it must
not be writable by people you do not trust.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

EXECUTABLES = "executables"
XLA = "xla"
# Old entries are pruned beyond this many bytes, least recently used first (an SD 1.x executable
# is tens to hundreds of MB on an accelerator).
MAX_EXECUTABLE_BYTES = 8 * 2**30
_VERSIONED = ("jax", "jaxlib", "flax", "diffusers", "transformers", "sdmagic")

# JAX's compilation-cache setting is process-wide; remember the value sdmagic put there so that a
# directory the user set is never overwritten, and ours can be moved or switched off again.
_jax_dir_set_by_sdmagic: str | None = None


def default_cache_dir() -> Path:
    """`$SDMAGIC_CACHE_DIR`, else `compiled/` in sdmagic's home (`$SDMAGIC_HOME` or ~/.cache/sdmagic)."""
    configured = os.environ.get("SDMAGIC_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    home = os.environ.get("SDMAGIC_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdmagic"
    )
    return Path(home) / "compiled"


def configure_jax_cache(directory: Path | None) -> str | None:
    """Point JAX's persistent compilation cache at `directory/xla` (None: switch sdmagic's off).

    Returns the directory JAX now uses, which is the user's own if they configured one.
    """
    global _jax_dir_set_by_sdmagic
    current = jax.config.jax_compilation_cache_dir
    if current and current != _jax_dir_set_by_sdmagic:
        return current  # the user's choice wins
    wanted = None if directory is None else str(Path(directory) / XLA)
    if wanted != current:
        jax.config.update("jax_compilation_cache_dir", wanted)
        _reset_jax_cache()
    _jax_dir_set_by_sdmagic = wanted
    return wanted


def _reset_jax_cache() -> None:
    # JAX opens its cache once per process; a new directory only takes effect after a reset.
    try:
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):  # a JAX without it reads the new setting anyway
        pass


def _versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "-"
    return found


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """sdmagic's own code is part of the key: an edited checkout must not reuse stale executables."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _config_dict(obj: Any) -> Any:
    config = getattr(obj, "config", None)
    if config is None:
        return None
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def executable_key(model: Any, shape_key: Any, plan: Any, arguments: Any) -> str:
    """A digest of everything a compiled generate depends on, and nothing that changes per cell.

    Weights are arguments, not constants, so a fine-tune of the same architecture reuses the
    executable; configs (read at trace time), argument shapes/dtypes/shardings, devices and versions
    all take part.
    """
    pipe = model.pipeline
    leaves, tree = jax.tree_util.tree_flatten(arguments)
    parts = {
        "shape": repr(shape_key),
        "configs": {
            name: _config_dict(getattr(pipe, name, None))
            for name in ("unet", "vae", "text_encoder", "safety_checker")
        },
        "scheduler": [type(model.scheduler).__name__, _config_dict(model.scheduler)],
        "feature_extractor": model.feature_extractor.to_dict() if model.feature_extractor is not None else None,
        "arguments": [str(tree)] + [(x.shape, str(x.dtype), str(getattr(x, "sharding", ""))) for x in leaves],
        "devices": [(d.platform, getattr(d, "device_kind", ""), d.id) for d in plan.devices],
        "platform_version": getattr(plan.devices[0].client, "platform_version", ""),
        "versions": _versions(),
        # Flags change the generated code (and JAX's own cache key includes them too).
        "flags": [os.environ.get(name, "") for name in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")],
        "source": _source_digest(),
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ExecutableStore:
    """Serialised executables on disk, keyed by `executable_key`. `directory=None`: a no-op store."""

    def __init__(self, directory: Path | None, max_bytes: int = MAX_EXECUTABLE_BYTES):
        self.directory = None if directory is None else Path(directory) / EXECUTABLES
        self.max_bytes = max_bytes

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.jaxexe"

    def load(self, key: str, plan: Any) -> Any | None:
        """The stored executable for `key` loaded onto the plan's devices, or None if there is none."""
        if self.directory is None:
            return None
        path = self._path(key)
        try:
            payload = path.read_bytes()
        except OSError:
            return None
        from jax.experimental.serialize_executable import deserialize_and_load

        try:
            serialized, in_tree, out_tree = pickle.loads(payload)
            executable = deserialize_and_load(
                serialized, in_tree, out_tree, backend=plan.devices[0].client, execution_devices=list(plan.devices)
            )
        except Exception as err:  # a file from another build or a torn write: compile instead
            warnings.warn(f"ignoring unreadable compiled-code file {path} ({type(err).__name__}); compiling again")
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # recently used: pruned last
        return executable

    def store(self, key: str, executable: Any) -> bool:
        """Write `executable` for later sessions; False (with a warning) if it cannot be written."""
        if self.directory is None:
            return False
        from jax.experimental.serialize_executable import serialize

        try:
            payload = pickle.dumps(serialize(executable), protocol=pickle.HIGHEST_PROTOCOL)
        except (ValueError, NotImplementedError, TypeError, pickle.PicklingError) as err:
            warnings.warn(f"this backend cannot save compiled code ({err}); restarts will compile again")
            return False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Written beside the target and renamed: a reader never sees half a file.
            handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".part")
            with os.fdopen(handle, "wb") as file:
                file.write(payload)
            os.replace(temporary, self._path(key))
        except OSError as err:
            warnings.warn(f"could not save compiled code under {self.directory} ({err}); restarts will compile again")
            return False
        self._prune()
        return True

    def _prune(self) -> None:
        files = sorted(self.directory.glob("*.jaxexe"), key=lambda p: p.stat().st_mtime, reverse=True)
        total = 0
        for path in files:
            total += path.stat().st_size
            if total > self.max_bytes:
                path.unlink(missing_ok=True)
