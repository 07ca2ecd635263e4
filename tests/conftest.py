"""Test setup: 8 simulated devices (a TPU host's count) and one shared tiny-model session.

XLA_FLAGS must be set before JAX is imported anywhere, which is why it happens at the top of this
file, before any sdmagic import.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tiny model is built once (well under a second) into the repo's ignored pytest cache and reused.
os.environ.setdefault(
    "SDMAGIC_HOME", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "sdmagic-home")
)
# Compiled code is cached on disk by default; every test run starts from an empty cache so that
# "compiled" means compiled, and tests about the cache say so explicitly.
os.environ["SDMAGIC_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdmagic-test-cache-")
atexit.register(shutil.rmtree, os.environ["SDMAGIC_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

STEPS = 3  # few denoising steps keep each generate call well under a second on the CPU


@pytest.fixture(scope="session")
def tiny_dir():
    from sdmagic.models import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def session8(tiny_dir):
    import sdmagic

    assert jax.device_count() == 8
    session = sdmagic.setup("tiny")
    yield session
    session.close()


@pytest.fixture(scope="session")
def session1(tiny_dir):
    import sdmagic

    session = sdmagic.setup("tiny", devices=1)
    yield session
    session.close()


@pytest.fixture(scope="module")
def tiny_shell(tiny_dir):
    """A real IPython shell with sdmagic loaded and `tiny` set up, defaulting to STEPS steps: what a
    user has after the first two cells. One per test module (the shell itself is a singleton)."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "sdmagic")
    with capture_output():
        ip.run_line_magic("sd_setup", "--model tiny")
    ip.run_line_magic("config", f"SDMagics.default_steps = {STEPS}")
    yield ip
    ip.run_line_magic("unload_ext", "sdmagic")


class CompileCounter:
    """Counts XLA backend compiles (and their seconds) through jax.monitoring, like equinox's tests."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self.active = False

    def __call__(self, event, duration, **kwargs):
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1
            self.seconds += duration

    def __enter__(self):
        self.count, self.seconds, self.active = 0, 0.0, True
        return self

    def __exit__(self, *exc):
        self.active = False


_counter = CompileCounter()
jax.monitoring.register_event_duration_secs_listener(_counter)


@pytest.fixture
def compiles():
    return _counter
