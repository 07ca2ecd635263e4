"""Compiled code kept across restarts, per-device batches, warm-up and the progress bar."""

import numpy as np
import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import jax
import sdmagic
from sdmagic.compile_cache import configure_jax_cache
from sdmagic.devices import default_per_device_batch

from conftest import STEPS

PROMPTS = ["a red fox in the snow", "a cat knight", "a planet"]


def pixels(result):
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def test_a_restarted_session_loads_its_executable_from_disk(tmp_path, compiles):
    first = sdmagic.setup("tiny", cache_dir=tmp_path)
    cold = first.generate(PROMPTS, seed=11, steps=STEPS + 1)
    first.close()
    assert cold.compiled_from == "compiled"
    assert list((tmp_path / "executables").glob("*.jaxexe")), "the executable was not saved"

    # A new session is what a restarted kernel builds: nothing in memory, the same disk cache.
    second = sdmagic.setup("tiny", cache_dir=tmp_path)
    with compiles:
        warm = second.generate(PROMPTS, seed=11, steps=STEPS + 1)
    assert warm.compiled_from == "disk" and compiles.count == 0
    assert warm.compile_seconds < 0.25 * cold.compile_seconds
    np.testing.assert_array_equal(pixels(warm), pixels(cold))
    # Once loaded it is in memory: a further cell costs nothing.
    again = second.generate(["something new"], seed=1, steps=STEPS + 1)
    assert again.compiled_from == "memory" and again.compile_seconds == 0
    second.close()


def test_jax_persistent_cache_points_into_the_cache_dir(tmp_path):
    session = sdmagic.setup("tiny", cache_dir=tmp_path)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    session.close()


def test_no_cache_reads_and_writes_nothing(tmp_path, session8):
    session8.generate(PROMPTS, seed=1, steps=STEPS)  # the shape is on disk in the default cache
    session = sdmagic.setup("tiny", cache=False)
    assert not session.executable_store.enabled and jax.config.jax_compilation_cache_dir is None
    result = session.generate(PROMPTS, seed=1, steps=STEPS)
    assert result.compiled_from == "compiled"
    session.close()
    configure_jax_cache(sdmagic.compile_cache.default_cache_dir())  # back on for the tests that follow


def test_a_cache_dir_the_user_gave_jax_is_left_alone(tmp_path):
    mine = str(tmp_path / "my-jax-cache")
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", mine)
    try:
        session = sdmagic.setup("tiny", cache_dir=tmp_path / "sdmagic")
        assert jax.config.jax_compilation_cache_dir == mine
        session.generate(PROMPTS[:1], seed=1, steps=STEPS)
        assert list((tmp_path / "sdmagic" / "executables").glob("*.jaxexe"))  # sdmagic's own store still works
        session.close()
        session = sdmagic.setup("tiny", cache=False)
        assert jax.config.jax_compilation_cache_dir == mine  # nor does --no-cache switch the user's off
        session.close()
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


def test_an_unreadable_executable_file_is_compiled_again(tmp_path):
    session = sdmagic.setup("tiny", cache_dir=tmp_path)
    session.generate(PROMPTS[:1], seed=1, steps=STEPS + 2)
    session.close()
    (saved,) = (tmp_path / "executables").glob("*.jaxexe")
    saved.write_bytes(b"not an executable")
    session = sdmagic.setup("tiny", cache_dir=tmp_path)
    with pytest.warns(UserWarning, match="compiling again"):
        result = session.generate(PROMPTS[:1], seed=1, steps=STEPS + 2)
    assert result.compiled_from == "compiled" and saved.stat().st_size > 1000  # rewritten
    session.close()


def test_per_device_batch_fills_devices_with_the_same_images(session8, capsys):
    prompts = [f"prompt {i}" for i in range(20)]
    one = session8.generate(prompts, seed=40, steps=STEPS, progress=False)
    two = session8.generate(prompts, seed=40, steps=STEPS, per_device_batch=2)
    assert (one.batch, one.calls) == (8, 3) and (two.batch, two.calls) == (16, 2)
    assert np.abs(pixels(one) - pixels(two)).max() <= 2
    # Two calls: a progress bar across them (text in a terminal).
    assert "sdmagic" in capsys.readouterr().err
    session8.generate(prompts[:8], seed=40, steps=STEPS)
    assert "sdmagic" not in capsys.readouterr().err  # one call: no bar


def test_setup_per_device_batch_sets_the_call_size(tiny_dir):
    session = sdmagic.setup("tiny", devices=2, per_device_batch=3, cache=False)
    assert session.batch == 6 and "3 images per device per call" in session.describe()
    result = session.generate(PROMPTS, seed=1, steps=STEPS, images_per_prompt=3)
    assert len(result.images) == 9 and result.calls == 2
    session.close()
    configure_jax_cache(sdmagic.compile_cache.default_cache_dir())


class FakeDevice:
    def __init__(self, platform, kind, limit=None):
        self.platform, self.device_kind, self._limit = platform, kind, limit

    def memory_stats(self):
        return None if self._limit is None else {"bytes_limit": self._limit}


class FakePlan:
    def __init__(self, device):
        self.devices, self.backend = (device,), device.platform


@pytest.mark.parametrize(
    "device, expected",
    [
        (FakeDevice("cpu", "cpu"), 1),
        (FakeDevice("tpu", "TPU v2"), 1),
        (FakeDevice("tpu", "TPU v3"), 1),
        (FakeDevice("tpu", "TPU v5 lite"), 2),
        (FakeDevice("gpu", "NVIDIA H200", 139 * 2**30), 8),
        (FakeDevice("gpu", "NVIDIA A10G", 22 * 2**30), 4),
        (FakeDevice("gpu", "Tesla T4", 14 * 2**30), 2),
        (FakeDevice("gpu", "small", 6 * 2**30), 1),
    ],
)
def test_default_per_device_batch_suits_the_backend(device, expected):
    assert default_per_device_batch(FakePlan(device)) == expected


def test_warmup_compiles_the_default_shape(tiny_dir):
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "sdmagic")
    magics = ip.magics_manager.registry["SDMagics"]
    magics.default_steps = STEPS + 3  # a shape no other test compiled
    try:
        with capture_output() as captured:
            ip.run_line_magic("sd_setup", "--model tiny --warmup")
        assert f"warm-up: 8 x 64x64, {STEPS + 3} pndm steps" in captured.stdout
        assert "compiled in" in captured.stdout
        result = ip.run_line_magic("sd", "--seed 1 a fox after warm-up")
        assert result.compiled_from == "memory" and result.compile_seconds == 0
        # Set up again (as after a restart): the warm-up now loads from the disk cache.
        with capture_output() as captured:
            ip.run_line_magic("sd_setup", "--model tiny --warmup")
        assert "loaded from the compile cache" in captured.stdout
    finally:
        ip.run_line_magic("unload_ext", "sdmagic")


def test_the_compiled_call_moves_no_data_between_devices(session8):
    """Each device keeps its own images (and their guidance pairs): no collectives in the loop."""
    import re

    key = session8.shape_key(session8.make_request(["a"], seed=0, steps=STEPS))
    executable, _, _ = session8.executable(key)
    text = executable.as_text()
    for op in ("all-to-all", "collective-permute", "all-gather", "all-reduce", "reduce-scatter"):
        assert not re.search(op + r"(-start)?\(", text), f"{op} in the compiled generate"
