"""The magics through a real IPython InteractiveShell."""

import numpy as np
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from conftest import STEPS


@pytest.fixture(scope="module")
def shell(tiny_dir):
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "sdmagic")
    yield ip
    ip.run_line_magic("unload_ext", "sdmagic")


def cell(ip, line, body):
    """Run a %%sd cell as a user would, returning (result, captured display output)."""
    with capture_output() as captured:
        outcome = ip.run_cell(f"%%sd {line}\n{body}", store_history=True)
    if outcome.error_in_exec is not None:
        raise outcome.error_in_exec
    return outcome.result, captured


def test_sd_before_setup_is_a_usage_error(shell):
    with pytest.raises(UsageError, match="run %sd_setup first"):
        shell.run_cell_magic("sd", "--seed 1", "a red fox")


def test_help_lists_every_option(shell):
    setup_doc = shell.find_line_magic("sd_setup").__doc__
    for option in ("--model", "--revision", "--dtype", "--scheduler", "--no-safety-checker", "--per-device-batch",
                   "--cache-dir", "--no-cache", "--warmup"):
        assert option in setup_doc
    sd_doc = shell.find_cell_magic("sd").__doc__
    for option in ("--seed", "--steps", "--guidance", "--height", "--width", "--negative", "--n", "--cols",
                   "--per-device-batch"):
        assert option in sd_doc
    with capture_output() as captured:
        shell.run_cell("%sd_time?")
    assert "--runs" in captured.stdout


def test_cells_compile_once_and_show_a_grid(shell, compiles):
    # --no-cache: the first cell must really compile here (tests/test_compile_cache.py covers disk).
    with capture_output() as captured:
        shell.run_line_magic("sd_setup", "--model tiny --no-cache")
    assert "8 x cpu, 1 image per device per call" in captured.stdout and "model tiny" in captured.stdout and "loaded in" in captured.stdout

    with compiles:
        first, shown = cell(shell, f"--seed 3 --steps {STEPS}", "a red fox in the snow\n# a comment\n\na cat knight\nconcept art of a planet\n")
    first_compile = compiles.seconds
    assert first_compile > 0
    assert first.prompts == ["a red fox in the snow", "a cat knight", "concept art of a planet"]
    assert len(first.images) == 3 and first.seeds == [3, 4, 5]
    # The cell's value is the result: it is displayed (as a grid) and `_` holds it.
    assert shell.user_ns["_"] is first
    assert "<GenerationResult #1: 3 images" in shown.stdout  # the displayhook showed the cell's value
    data, _ = shell.display_formatter.format(first)  # what a notebook front end receives
    assert data["image/png"].startswith(b"\x89PNG") and data["text/html"].count("<figcaption") == 3

    with compiles:
        for count, extra in [(1, "--seed 10 --guidance 3"), (8, "--seed 20 --guidance 9 --negative blurry"),
                             (11, "--seed 30 --guidance 1.5 --negative 'dark, low quality'")]:
            result, _ = cell(shell, f"{extra} --steps {STEPS}", "\n".join(f"prompt {i}" for i in range(count)))
            assert len(result.images) == count
    assert compiles.count == 0 and compiles.seconds < 0.1 * first_compile
    assert result.negative == "dark, low quality" and result.seeds[-1] == 40


def test_line_form_options_and_cols(shell):
    result = shell.run_line_magic("sd", f"--seed 5 --steps {STEPS} --n 2 a red fox")
    assert result.prompts == ["a red fox", "a red fox"] and result.seeds == [5, 6]
    result, _ = cell(shell, f"--seed 5 --steps {STEPS} --cols 1", "a\nb")
    assert result.display_cols == 1
    assert result.grid(1).size[0] < result.grid(2).size[0]
    with capture_output() as captured:
        result = shell.run_line_magic("sd", f"--steps {STEPS} a random fox")
    assert f"random seed {result.seeds[0]}" in captured.stdout


def test_sd_time_reports_compile_apart_from_inference(shell):
    with capture_output() as captured:
        shell.run_line_magic("sd_time", "")
    assert "compile" in captured.stdout and "inference" in captured.stdout and "images/s" in captured.stdout
    assert "mostly compile" in captured.stdout
    with capture_output() as captured:
        report = shell.run_line_magic("sd_time", "--runs 2 -o")
    assert len(report.seconds) == 2 and "median of 2 runs" in captured.stdout
    assert shell.run_line_magic("sd_time", "--runs 1") is None


@pytest.mark.parametrize(
    "line, body, message",
    [
        ("--seed 1", "\n# only a comment\n\n", "no prompts"),
        ("--bogus 2", "a", "unrecognized arguments: --bogus"),
        ("--seed -3", "a", "seed must be from 0"),
        ("--seed x", "a", "seed must be a whole number"),
        ("--steps 0", "a", "steps must be from 1"),
        ("--guidance high", "a", "guidance must be a number"),
        ("--height 0", "a", "height must be from 1"),
        ("--width 65", "a", "width 65 is not a multiple of 2"),
        ("--height 999999", "a", "height must be from 1 to 4096"),
        ("--cols 0", "a", "--cols must be from 1"),
        ("stray words", "a", "put prompts in the cell"),
        ("--negative 'unclosed", "a", "close every quote"),
        ("--per-device-batch 0", "a", "--per-device-batch must be from 1 to 64"),
        ("--per-device-batch two", "a", "--per-device-batch must be a whole number"),
    ],
)
def test_sd_errors_are_usage_errors(shell, line, body, message):
    before = len(shell.magics_manager.registry["SDMagics"].session.timings.runs)
    with pytest.raises(UsageError, match=message):
        shell.run_cell_magic("sd", f"{line} --steps {STEPS}" if "--steps" not in line else line, body)
    assert len(shell.magics_manager.registry["SDMagics"].session.timings.runs) <= before + ("cols" in line)


@pytest.mark.parametrize(
    "line, message",
    [
        ("--dtype float8", "unknown dtype"),
        ("--scheduler heun", "unknown scheduler"),
        ("--model ./does/not/exist", "does not exist"),
        ("--devices 0", "--devices must be at least 1"),
        ("--nope", "unrecognized arguments"),
        ("--model tiny --per-device-batch 0", "--per-device-batch must be from 1 to 64"),
        ("--model tiny --no-cache --cache-dir /tmp/x", "contradict"),
        ("--model tiny --cache-dir " + __file__, "is a file"),
    ],
)
def test_setup_errors_keep_the_loaded_model(shell, line, message):
    magics = shell.magics_manager.registry["SDMagics"]
    loaded = magics.session
    with pytest.raises(UsageError, match=message):
        shell.run_line_magic("sd_setup", line)
    assert magics.session is loaded
    result = shell.run_line_magic("sd", f"--seed 1 --steps {STEPS} still works")
    assert len(result.images) == 1


def test_setup_again_replaces_the_model(shell):
    magics = shell.magics_manager.registry["SDMagics"]
    old = magics.session
    with capture_output():
        shell.run_line_magic("sd_setup", "--model tiny --scheduler dpm --no-safety-checker --devices 2")
    assert magics.session is not old and old._closed
    assert "dpm" in magics.session.describe() and "safety checker: off" in magics.session.describe()
    result = shell.run_line_magic("sd", f"--seed 1 --steps {STEPS} a fox")
    assert np.asarray(result.images[0]).std() > 5


def test_unload_removes_the_magics(tiny_dir):
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "sdmagic")
    assert ip.find_line_magic("sd_setup") is not None
    ip.run_line_magic("unload_ext", "sdmagic")
    assert ip.find_line_magic("sd_setup") is None and ip.find_cell_magic("sd") is None
    ip.run_line_magic("load_ext", "sdmagic")
