"""The compiled-code cache stores only code that runs, and only in a directory it can trust (issue 9,
items 3 and 4)."""

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdmagic
from sdmagic import compile_cache
from sdmagic.compile_cache import ExecutableStore, configure_jax_cache, default_cache_dir

ROOT = Path(__file__).resolve().parents[1]  # the checkout under test: children import its sdmagic
NOBODY = 65534


class OneDevicePlan:
    devices = tuple(jax.devices()[:1])


class JaxCacheEvents:
    """'/jax/compilation_cache/...' events while active (JAX has no way to remove a listener)."""

    def __init__(self):
        self.events, self.active = [], False

    def __call__(self, event, **kwargs):
        if self.active and event.startswith("/jax/compilation_cache/"):
            self.events.append(event)

    @contextmanager
    def recording(self):
        self.events, self.active = [], True
        try:
            yield self.events
        finally:
            self.active = False


_jax_cache_events = JaxCacheEvents()
jax.monitoring.register_event_listener(_jax_cache_events)


def compile_fused():
    """A fresh compile (a new function: nothing from JAX's in-memory caches) of a function whose
    fusions XLA:CPU keeps apart from the executable, the kind a re-serialised cache hit no longer
    finds ("NOT_FOUND: Function ... not found")."""

    def fused(x):
        return jnp.where(x > 0, x + 1, x * 2).sum()

    return jax.jit(fused).lower(jnp.ones(1000)).compile()


@contextmanager
def jax_cache_in(directory):
    """JAX's persistent cache on in `directory` for the block, writing even sub-second compiles."""
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    configure_jax_cache(directory)
    try:
        yield
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
        configure_jax_cache(default_cache_dir())  # back to the test run's cache for the tests that follow


def load_and_run(path):
    from jax.experimental.serialize_executable import deserialize_and_load

    executable = deserialize_and_load(*pickle.loads(path.read_bytes()), execution_devices=jax.devices()[:1])
    return float(executable(jnp.ones(1000)))


# ------------------------------------------------------------------------------------ 3: only code that runs


def test_compile_and_store_compiles_from_scratch_even_when_jax_has_it_cached(tmp_path):
    with jax_cache_in(tmp_path):
        compile_fused()  # now in JAX's persistent cache, as after an earlier kernel
        store = ExecutableStore(tmp_path)
        with _jax_cache_events.recording() as events:
            executable = store.compile_and_store("k", compile_fused)
        assert "/jax/compilation_cache/cache_hits" not in events
        assert jax.config.jax_enable_compilation_cache  # switched back on after the compile
        with _jax_cache_events.recording() as events:
            compile_fused()
        assert "/jax/compilation_cache/cache_hits" in events, "JAX's cache is in use again"
    assert float(executable(jnp.ones(1000))) == 2000.0
    assert load_and_run(tmp_path / "executables" / "k.jaxexe") == 2000.0


def test_the_bypass_is_undone_when_compiling_fails(tmp_path):
    def failing():
        raise RuntimeError("compile failed")

    with jax_cache_in(tmp_path):
        with pytest.raises(RuntimeError, match="compile failed"):
            ExecutableStore(tmp_path).compile_and_store("k", failing)
        assert jax.config.jax_enable_compilation_cache
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    assert not list((tmp_path / "executables").glob("*.jaxexe"))


def test_why_the_bypass_is_needed_a_stored_cache_hit_does_not_run(tmp_path):
    """The bug itself, kept as a check on JAX: if a JAX release fixes it, the bypass can go."""
    with jax_cache_in(tmp_path):
        compile_fused()
        ExecutableStore(tmp_path).store("hit", compile_fused())  # a cache hit, stored the old way
    with pytest.raises(jax.errors.JaxRuntimeError, match="NOT_FOUND"):
        load_and_run(tmp_path / "executables" / "hit.jaxexe")


CHILD = """
import json, os, sys, warnings
cache, mode = sys.argv[1], sys.argv[2]
if mode == "drop-root-override":
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    # CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH out of the bounding set (PR_CAPBSET_DROP): after the
    # exec, root obeys permission bits like any user.
    if any(libc.prctl(24, capability, 0, 0, 0) != 0 for capability in (1, 2)):
        print(json.dumps({"skip": "cannot drop capabilities here"}))
        sys.exit(0)
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[3], cache, "plain", sys.argv[3]])
if mode == "no-bypass":  # compile as sdmagic before this fix did: the generate goes into JAX's cache too
    import contextlib
    from sdmagic import compile_cache
    compile_cache._jax_cache_bypassed = contextlib.nullcontext
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import numpy as np, sdmagic
    session = sdmagic.setup("tiny", devices=1, cache_dir=cache)
    result = session.generate(["a red fox"], seed=1, steps=2)
print(json.dumps({"source": result.compiled_from, "images": len(result.images),
                  "pixels": int(np.asarray(result.images[0], dtype=np.int64).sum()),
                  "warnings": [f"{w.category.__name__}: {w.message}" for w in caught
                               if "sdmagic" in w.filename or "Compile" in w.category.__name__]}))
"""


def run_child(cache, *, mode="plain", timeout=150):
    """A fresh process (a restarted kernel): set up the tiny model on `cache`, generate one image.
    Returns its report: where the executable came from, the image's pixels' sum, sdmagic's warnings
    (or the error it ended with)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The test process's XLA_FLAGS (JAX's cache keys include them), and every compile goes into JAX's
    # cache however fast it was (as a slow GPU compile does).
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    out = subprocess.run([sys.executable, "-c", CHILD, str(cache), mode, CHILD], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        return {"source": None, "error": out.stderr[-3000:], "warnings": []}
    report = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(report["skip"])
    return report


@pytest.fixture(scope="module")
def three_restarts(tiny_dir, tmp_path_factory):
    """Process 1 fills both caches (JAX's with the generate too, as sdmagic did before this fix, or
    as a JAX cache of the user's own may be); the executable file is lost; process 2 compiles with
    JAX's cache still full; process 3 runs what process 2 stored. Returns the cache, the files
    process 2 stored and the three reports."""
    cache = tmp_path_factory.mktemp("restarts") / "cache"
    first = run_child(cache, mode="no-bypass")
    for path in (cache / "executables").glob("*.jaxexe"):
        path.unlink()
    second = run_child(cache)
    stored = list((cache / "executables").glob("*.jaxexe"))
    third = run_child(cache)
    return cache, stored, (first, second, third)


def test_a_restart_after_losing_the_executable_file_still_runs(three_restarts):
    """Process 3 used to fail on every run of the shape: `NOT_FOUND: Function ... not found`."""
    _, stored, (first, second, third) = three_restarts
    assert first["source"] == "compiled" and second["source"] == "compiled", (first, second)
    assert stored, "process 2 stored its executable"
    assert third["source"] == "disk", third.get("error") or third
    assert not third["warnings"], "the stored executable ran as loaded"
    assert third["pixels"] == first["pixels"] == second["pixels"]


def test_a_stored_executable_that_does_not_run_is_deleted_and_replaced(three_restarts):
    """With a real broken file (a JAX cache hit stored without the bypass): the cell still succeeds,
    warns once, and the next session loads a replacement that runs. Needs Session to call discard()
    and compile_and_store() when a loaded executable fails."""
    from sdmagic.session import CompiledCodeWarning

    # In place: JAX's cache keys include its directory's path, so a copy would not hit. This test
    # leaves a good executable there again, as the other users of the fixture expect.
    cache, (saved,) = three_restarts[0], three_restarts[1]
    saved.unlink()
    expected = three_restarts[2][0]["pixels"]
    broken = run_child(cache, mode="no-bypass")  # a JAX cache hit (process 1's entry), stored
    assert broken["source"] == "compiled" and saved.exists(), broken
    try:
        session = sdmagic.setup("tiny", devices=1, cache_dir=cache)
        with pytest.warns(CompiledCodeWarning, match="did not run"):
            result = session.generate(["a red fox"], seed=1, steps=2)
        session.close()
        assert pixel_sum(result) == expected
        session = sdmagic.setup("tiny", devices=1, cache_dir=cache)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompiledCodeWarning)
            again = session.generate(["a red fox"], seed=1, steps=2)
        session.close()
        assert again.compiled_from == "disk" and pixel_sum(again) == expected
        assert saved.exists()  # the replacement, under the same name
    finally:
        configure_jax_cache(default_cache_dir())


def pixel_sum(result):
    return int(np.asarray(result.images[0], dtype=np.int64).sum())


# ------------------------------------------------------------------------------------ 4: a cache you cannot write


def test_a_read_only_cache_warns_once_and_never_fails(three_restarts, tmp_path):
    """A cache this user may read but not write (root ignores permission bits, so the child drops
    that privilege): a file that cannot be loaded, nor deleted, means a compile in memory and one
    warning per folder and per file, never a PermissionError (unlink and os.utime used to raise)."""
    cache = tmp_path / "cache"
    shutil.copytree(three_restarts[0], cache)
    (saved,) = (cache / "executables").glob("*.jaxexe")
    saved.write_bytes(b"torn")
    for folder in (cache / "executables", cache / "xla", cache):
        folder.chmod(0o500)
    try:
        report = run_child(cache, mode="drop-root-override" if os.geteuid() == 0 else "plain")
    finally:
        for folder in (cache, cache / "executables", cache / "xla"):
            folder.chmod(0o700)
    assert report["source"] == "compiled" and report["images"] == 1, report.get("error") or report
    assert saved.read_bytes() == b"torn"  # really could not be deleted
    assert len(report["warnings"]) == 2, report["warnings"]
    unreadable, unwritable = sorted(report["warnings"], key=lambda w: "cannot write" in w)
    assert "ignoring unreadable compiled-code file" in unreadable and "cannot write" in unwritable
    assert all("\n" not in w for w in report["warnings"])


def test_a_store_that_cannot_write_warns_once_and_raises_nothing(tmp_path, monkeypatch):
    store = ExecutableStore(tmp_path)
    executable = compile_fused()
    assert store.store("good", executable)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(compile_cache.tempfile, "mkstemp", denied)
    monkeypatch.setattr(compile_cache.os, "utime", denied)
    monkeypatch.setattr(Path, "unlink", denied)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert store.load("good", OneDevicePlan()) is not None  # utime fails quietly: still loaded
        store.discard("good")  # cannot delete: never raises ...
        assert store.load("good", OneDevicePlan()) is None  # ... and is not loaded again
        assert not caught
        assert not store.store("new", executable)
        assert not store.store("newer", executable)
    assert len(caught) == 1 and "could not save" in str(caught[0].message), [str(w.message) for w in caught]
    assert "\n" not in str(caught[0].message) and caught[0].category.__name__ == "CompileCacheWarning"


# ------------------------------------------------------------------------------------ 4: a cache you should not trust


class PlantedCode:
    """A pickle that creates a file when it is loaded: what someone else's file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(directory, key, marker):
    (directory / "executables").mkdir(parents=True, exist_ok=True)
    (directory / "executables" / f"{key}.jaxexe").write_bytes(pickle.dumps(PlantedCode(marker)))


def refuses(directory, marker):
    """Nothing is unpickled from `directory`, nothing written into it, JAX is not pointed at it, one
    one-line warning says why."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            assert ExecutableStore(directory).load("planted", OneDevicePlan()) is None
            assert not marker.exists(), "the planted file was unpickled"
            assert configure_jax_cache(directory) is None
            assert not ExecutableStore(directory).store("new", compile_fused())
            compiled = ExecutableStore(directory).compile_and_store("new", compile_fused)  # in memory only
        finally:
            configure_jax_cache(default_cache_dir())
    assert float(compiled(jnp.ones(1000))) == 2000.0
    assert not (directory / "xla").exists() and not (directory / "executables" / "new.jaxexe").exists()
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert caught[0].category.__name__ == "CompileCacheWarning"
    assert "\n" not in message and str(directory) in message
    return message


@pytest.mark.parametrize("mode", [0o770, 0o707], ids=["group", "others"])
def test_a_cache_others_can_write_is_refused(tmp_path, mode):
    directory, marker = tmp_path / "shared", tmp_path / "ran"
    plant(directory, "planted", marker)
    directory.chmod(mode)
    assert "writable by group or others" in refuses(directory, marker)


def test_a_cache_inside_a_folder_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    directory, marker = shared / "mine", tmp_path / "ran"
    plant(directory, "planted", marker)
    shared.chmod(0o777)  # not sticky: anyone can rename `mine` away and put their own there
    assert f"{shared} is writable by group or others" in refuses(directory, marker)


def test_a_cache_someone_else_owns_is_refused(tmp_path):
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    directory, marker = tmp_path / "theirs", tmp_path / "ran"
    plant(directory, "planted", marker)
    os.chown(directory, NOBODY, NOBODY)
    assert "belongs to another user" in refuses(directory, marker)


def test_a_file_others_can_write_in_a_private_cache_is_not_loaded(tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "cache", "planted", marker)
    (tmp_path / "cache" / "executables" / "planted.jaxexe").chmod(0o666)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ExecutableStore(tmp_path / "cache").load("planted", OneDevicePlan()) is None
    assert not marker.exists(), "the planted file was unpickled"
    assert [w.category.__name__ for w in caught] == ["CompileCacheWarning"]
    assert "writable by group or others" in str(caught[0].message)


def test_setting_up_on_an_untrusted_cache_warns_once_and_leaves_it_alone(tiny_dir, tmp_path):
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o777)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):  # set up again on the same folder: no second warning
                session = sdmagic.setup("tiny", devices=1, cache_dir=directory)
                assert jax.config.jax_compilation_cache_dir != str(directory / "xla")
                assert session.executable_store.load("any", session.plan) is None
                session.close()
    finally:
        configure_jax_cache(default_cache_dir())
    assert list(directory.iterdir()) == []
    caught = [w for w in caught if "cache" in str(w.message)]
    assert len(caught) == 1 and "writable by group or others" in str(caught[0].message)
    assert caught[0].category.__name__ == "CompileCacheWarning"


def test_a_cache_under_root_owned_sticky_tmp_is_trusted():
    if not os.stat(tempfile.gettempdir()).st_mode & stat.S_ISVTX:
        pytest.skip("the temporary folder here is not sticky")
    directory = Path(tempfile.mkdtemp(prefix="sdmagic-sticky-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ExecutableStore(directory).store("k", compile_fused())
            assert ExecutableStore(directory).load("k", OneDevicePlan()) is not None
    finally:
        shutil.rmtree(directory)


# ------------------------------------------------------------------------------------ 4: private folders, tidy leftovers


def test_created_cache_folders_are_private(tmp_path):
    directory = tmp_path / "new" / "deeper" / "cache"
    try:
        assert configure_jax_cache(directory) == str(directory / "xla")
        assert ExecutableStore(directory).store("k", compile_fused())
    finally:
        configure_jax_cache(default_cache_dir())
    for path in (tmp_path / "new", tmp_path / "new" / "deeper", directory, directory / "xla", directory / "executables"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert stat.S_IMODE((directory / "executables" / "k.jaxexe").stat().st_mode) == 0o600


def test_stale_part_files_are_pruned_and_fresh_ones_kept(tmp_path):
    folder = tmp_path / "executables"
    folder.mkdir(mode=0o700)
    stale, fresh = folder / "tmpold.part", folder / "tmpnew.part"
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y" * 100)  # another process writing right now
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    assert ExecutableStore(tmp_path).store("k", compile_fused())
    assert not stale.exists() and fresh.exists()
