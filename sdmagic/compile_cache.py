"""Compiled code that survives a kernel restart.

Two layers, both under one directory (default `~/.cache/sdmagic/compiled`, or `$SDMAGIC_CACHE_DIR`):

- `executables/`: sdmagic's own store of serialised executables (`jax.experimental.
  serialize_executable`), one file per shape key, model architecture and library versions. A hit
  skips tracing, lowering and compiling: a restarted kernel's first cell of a known shape pays only
  for reading the file.
- `xla/`: JAX's persistent compilation cache, for everything else JAX compiles. A cache directory
  the user configured in JAX themselves is left alone.

Only executables compiled from scratch are stored: an executable JAX loaded from its persistent
cache serialises to a file that loads but does not run ("NOT_FOUND: Function ... not found" on
XLA:CPU), so JAX's cache is bypassed for compiles that will be stored (`compile_and_store`). That
also keeps the large generate executables out of `xla/`, whose size JAX does not bound.

Loading an executable can run code (it is unpickled), so a cache directory is trusted only as ssh
trusts a key file: it, and every directory above it, must belong to you or root and not be writable
by group or others (a root-owned sticky directory such as /tmp may hold it). An untrusted directory
is not read, written or handed to JAX: sdmagic warns once and keeps compiled code in memory.
Directories sdmagic creates are private (0700). Problems with files never fail a cell: they warn
once (per directory, or per file) and compile instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import stat
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import jax

EXECUTABLES = "executables"
XLA = "xla"
# Old entries are pruned beyond this many bytes, least recently used first (an SD 1.x executable
# is tens to hundreds of MB on an accelerator).
MAX_EXECUTABLE_BYTES = 8 * 2**30
# A `.part` file this old is a leftover of an interrupted write; a younger one may be another
# process writing right now (a big executable on a slow disk takes seconds, never an hour).
STALE_PART_SECONDS = 3600
_VERSIONED = ("jax", "jaxlib", "sdmagic")


class CompileCacheWarning(UserWarning):
    """The compiled-code cache could not be used (untrusted, unwritable or unreadable); the cell
    compiled instead."""


# JAX's compilation-cache settings are process-wide; remember the directory sdmagic put there so
# that a directory the user set is never overwritten, and ours can be moved or switched off again.
# The lock keeps a bypassed compile and a reconfiguration from interleaving.
_jax_dir_set_by_sdmagic: str | None = None
_jax_config_lock = threading.RLock()
# Each directory (or file) warns at most once per process: a broken cache must not repeat itself
# on every cell.
_warned: set[str] = set()
# Files found not to run in this process; not loaded again even where they could not be deleted.
_discarded: set[str] = set()


def _warn_once(about: Path | str, message: str) -> None:
    if str(about) in _warned:
        return
    _warned.add(str(about))
    # One line even for a folder name with a line break in it.
    warnings.warn(message.replace("\r", "\\r").replace("\n", "\\n"), CompileCacheWarning, stacklevel=3)


def sdmagic_home() -> Path:
    """Where sdmagic keeps what it makes (the tiny model, compiled code): `$SDMAGIC_HOME`, else
    `sdmagic/` in the user's cache folder (`$XDG_CACHE_HOME` or ~/.cache)."""
    root = os.environ.get("SDMAGIC_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdmagic"
    )
    return Path(root)


def default_cache_dir() -> Path:
    """`$SDMAGIC_CACHE_DIR`, else `compiled/` in sdmagic's home (`$SDMAGIC_HOME` or ~/.cache/sdmagic)."""
    configured = os.environ.get("SDMAGIC_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return sdmagic_home() / "compiled"


def configure_jax_cache(directory: Path | None) -> str | None:
    """Point JAX's persistent compilation cache at `directory/xla` (None: switch sdmagic's off).

    The folder is created private (0700); one that cannot be created, trusted or written leaves
    JAX's cache off, with a warning. Returns the directory JAX now uses, which is the user's own
    if they configured one.
    """
    global _jax_dir_set_by_sdmagic
    with _jax_config_lock:
        current = jax.config.jax_compilation_cache_dir
        if current and current != _jax_dir_set_by_sdmagic:
            return current  # the user's choice wins
        usable = None if directory is None else _usable_directory(Path(directory), XLA, create=True, writing=True)
        wanted = None if usable is None else str(usable)
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


@contextmanager
def _jax_cache_bypassed() -> Iterator[None]:
    """JAX's persistent cache neither read nor written inside the block.

    An executable JAX deserialised from its cache serialises again to a file that loads but fails
    when run, so whatever goes into the store must be compiled from scratch. Toggling
    `jax_enable_compilation_cache` alone does not do it: JAX decides whether to use its cache once
    per process (then only the key changes, and the entry is written anyway); a reset makes it look
    again, on the way in and on the way out.
    """
    with _jax_config_lock:
        if not (jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache):
            yield
            return
        jax.config.update("jax_enable_compilation_cache", False)
        _reset_jax_cache()
        try:
            yield
        finally:
            jax.config.update("jax_enable_compilation_cache", True)
            _reset_jax_cache()


def _untrusted_because(directory: Path) -> str | None:
    """Why code in `directory` (which exists) could have been put there by someone else, or None.

    ssh's StrictModes rule: the directory and each one above it (on the path as given and on the
    resolved path, so a symlink cannot be swapped under us) belongs to you or root and is not
    writable by group or others; above it, a root-owned sticky directory (/tmp) is fine, since
    nobody else can rename or replace what you own in it.
    """
    if not hasattr(os, "geteuid"):  # Windows: ACLs, not mode bits; not checked
        return None
    me = os.geteuid()
    given, resolved = Path(os.path.abspath(directory)), Path(os.path.realpath(directory))
    for target in dict.fromkeys((given, resolved)):
        for path in (target, *target.parents):
            info = os.stat(path)
            if info.st_uid not in (me, 0):
                return f"{path} belongs to another user (uid {info.st_uid})"
            if info.st_mode & 0o022:
                shared_but_sticky = path != target and info.st_uid == 0 and info.st_mode & stat.S_ISVTX
                if not shared_but_sticky:
                    mode = stat.S_IMODE(info.st_mode)
                    return f"{path} is writable by group or others (mode {mode:o}; `chmod go-w {path}` fixes that)"
    return None


def _make_private_dirs(path: Path) -> None:
    """Create `path` and any missing parents with mode 0700 (Path.mkdir gives parents the default)."""
    missing = []
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            break
        missing.append(candidate)
    for candidate in reversed(missing):
        try:
            candidate.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile by another process; its mode is checked next
            pass


def _usable_directory(root: Path, name: str, *, create: bool, writing: bool) -> Path | None:
    """`root/name` if it can be trusted (and written, for `writing`), else None with one warning per
    `root`. `create`: make it (private) if missing; otherwise a missing one is just None."""
    path = root / name
    reason = None
    try:
        if not path.is_dir():
            if not create:
                return None  # nothing stored yet
            # Nothing is created inside a directory that is not trusted either.
            existing = next(p for p in path.parents if p.is_dir())
            reason = _untrusted_because(existing)
            if reason is None:
                _make_private_dirs(path)
        if reason is None:
            reason = _untrusted_because(path)
    except OSError as err:
        _warn_once(root, f"cannot use the compiled-code cache {root}: {_short(err)}; compiling in memory"
                         " (a restart compiles again)")
        return None
    if reason is not None:
        _warn_once(root, f"not using the compiled-code cache {root}: {reason}, so code in it may not be yours;"
                         " compiling in memory (a restart compiles again)")
        return None
    if writing and not os.access(path, os.W_OK | os.X_OK):
        _warn_once(root, f"cannot write the compiled-code cache {path} (no write permission); compiled"
                         " code is kept in memory (a restart compiles again)")
        return None
    return path


def _short(err: BaseException) -> str:
    """An OS error on one line: `PermissionError: [Errno 13] Permission denied: '/x'`."""
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


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
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def executable_key(model: Any, shape_key: Any, plan: Any, arguments: Any) -> str:
    """A digest of everything a compiled generate depends on, and nothing that changes per cell.

    Weights are arguments, not constants, so a fine-tune of the same architecture reuses the
    executable; configs (read at trace time), argument shapes/dtypes/shardings, devices and versions
    all take part.
    """
    leaves, tree = jax.tree_util.tree_flatten(arguments)
    parts = {
        "shape": repr(shape_key),
        "model": model.model.digest(),
        "sampler": model.sampler.cache_key(),
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
    """Serialised executables on disk, keyed by `executable_key`. `directory=None`: a no-op store.

    Nothing here raises for a file problem: a missing, unreadable, untrusted or unwritable cache
    warns (once) and the caller compiles in memory.
    """

    def __init__(self, directory: Path | None, max_bytes: int = MAX_EXECUTABLE_BYTES):
        self.root = None if directory is None else Path(os.path.abspath(directory))
        self.directory = None if self.root is None else self.root / EXECUTABLES
        self.max_bytes = max_bytes

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.jaxexe"

    def load(self, key: str, plan: Any) -> Any | None:
        """The stored executable for `key` loaded onto the plan's devices, or None if there is none
        (or it cannot be read or trusted). A loaded one may still fail when called: `discard` it."""
        if self.directory is None:
            return None
        directory = _usable_directory(self.root, EXECUTABLES, create=False, writing=False)
        if directory is None:
            return None
        path = self._path(key)
        if str(path) in _discarded:
            return None
        payload = self._read(path)
        if payload is None:
            return None
        from jax.experimental.serialize_executable import deserialize_and_load

        try:
            serialized, in_tree, out_tree = pickle.loads(payload)
            executable = deserialize_and_load(
                serialized, in_tree, out_tree, backend=plan.devices[0].client, execution_devices=list(plan.devices)
            )
        except Exception as err:  # a file from another build or a torn write: compile instead
            _warn_once(path, f"ignoring unreadable compiled-code file {path} ({type(err).__name__}); compiling again")
            self.discard(key)
            return None
        try:
            os.utime(path)  # recently used: pruned last
        except OSError:  # a read-only cache is still worth reading; its order just stays
            pass
        return executable

    def _read(self, path: Path) -> bytes | None:
        """The file's bytes if it is a regular file that only you (or root) could have written."""
        # No symlink followed out of the trusted directory; a FIFO must not block the open.
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        try:
            with os.fdopen(os.open(path, flags), "rb") as file:
                info = os.fstat(file.fileno())
                reason = None
                if not stat.S_ISREG(info.st_mode):
                    reason = "not a regular file"
                elif hasattr(os, "geteuid") and info.st_uid not in (os.geteuid(), 0):
                    reason = f"it belongs to another user (uid {info.st_uid})"
                elif hasattr(os, "geteuid") and info.st_mode & 0o022:
                    reason = f"it is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
                elif info.st_size > self.max_bytes:
                    reason = f"{info.st_size} bytes, over the cache's {self.max_bytes}"
                if reason is None:
                    return file.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            reason = _short(err)
        _warn_once(path, f"not loading compiled-code file {path}: {reason}; compiling again")
        return None

    def compile_and_store(self, key: str, compile_fn: Callable[[], Any]) -> Any:
        """`compile_fn()`'s executable, compiled from scratch and stored if the cache can take it.

        JAX's persistent cache is bypassed while compiling one that will be stored (see
        `_jax_cache_bypassed`); where nothing can be stored, JAX's cache is used as usual.
        Exceptions from `compile_fn` propagate; file problems only warn.
        """
        if self.directory is None or _usable_directory(self.root, EXECUTABLES, create=True, writing=True) is None:
            return compile_fn()
        with _jax_cache_bypassed():
            executable = compile_fn()
        self.store(key, executable)
        return executable

    def store(self, key: str, executable: Any) -> bool:
        """Write `executable` for later sessions; False (with a warning) if it cannot be written.

        Only for an executable compiled from scratch in this process: one that JAX loaded from its
        persistent cache is stored broken. `compile_and_store` guarantees that.
        """
        if self.directory is None:
            return False
        directory = _usable_directory(self.root, EXECUTABLES, create=True, writing=True)
        if directory is None:
            return False
        from jax.experimental.serialize_executable import serialize

        try:
            payload = pickle.dumps(serialize(executable), protocol=pickle.HIGHEST_PROTOCOL)
        except (ValueError, NotImplementedError, TypeError, pickle.PicklingError) as err:
            _warn_once(f"{self.root} (serialise)", f"this backend cannot save compiled code ({_short(err)});"
                                                    " restarts will compile again")
            return False
        temporary = None
        try:
            # Written beside the target and renamed: a reader never sees half a file. mkstemp: 0600.
            handle, temporary = tempfile.mkstemp(dir=directory, suffix=".part")
            with os.fdopen(handle, "wb") as file:
                file.write(payload)
            os.replace(temporary, self._path(key))
        except OSError as err:
            if temporary is not None:
                self._remove(Path(temporary))
            _warn_once(self.root, f"could not save compiled code under {directory} ({_short(err)});"
                                  " restarts will compile again")
            return False
        _discarded.discard(str(self._path(key)))
        self._prune()
        return True

    def discard(self, key: str) -> None:
        """Forget the stored executable for `key` (it failed when called): delete its file, and do
        not load it again in this process even if it cannot be deleted. Never raises."""
        if self.directory is None:
            return
        path = self._path(key)
        _discarded.add(str(path))
        self._remove(path)

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError:  # a read-only cache: the in-process record keeps it from being loaded again
            pass

    def _prune(self) -> None:
        """Delete stale `.part` leftovers, then the least recently used executables over `max_bytes`."""
        now = time.time()
        entries = []
        try:
            for entry in os.scandir(self.directory):
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:  # removed meanwhile by another process
                    continue
                if entry.name.endswith(".part"):
                    if now - info.st_mtime > STALE_PART_SECONDS:
                        self._remove(Path(entry.path))
                elif entry.name.endswith(".jaxexe"):
                    entries.append((info.st_mtime, info.st_size, Path(entry.path)))
        except OSError:
            return
        total = 0
        for _, size, path in sorted(entries, key=lambda e: e[0], reverse=True):
            total += size
            if total > self.max_bytes:
                self._remove(path)
