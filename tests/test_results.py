"""Results people keep: saving with A1111 parameters, round trips, history, per-line options, %config."""

import io
import os

import numpy as np
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from PIL import Image

import sdmagic
from sdmagic.history import HistoryTrimmedWarning
from sdmagic.saving import parse_parameters, parameters_text, slug
from sdmagic.session import PromptTruncatedWarning, SaveFailedWarning

from conftest import STEPS


def run_cell(ip, line, body):
    with capture_output() as captured:
        outcome = ip.run_cell(f"%%sd {line}\n{body}", store_history=True)
    if outcome.error_in_exec is not None:
        raise outcome.error_in_exec
    return outcome.result, captured


def pixels(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def all_files(root):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)


# ------------------------------------------------------------------------------------ saving


def test_saving_twice_keeps_every_file_inside_the_folder(tiny_shell, tmp_path):
    out = tmp_path / "out"
    body = "../../escape/me\n/etc/passwd\na red fox, in snow: at dusk\n"
    first, _ = run_cell(tiny_shell, f"--seed 100 --save {out}", body)
    second, _ = run_cell(tiny_shell, f"--seed 100 --save {out}", body)
    files = all_files(tmp_path)
    assert all(os.path.dirname(f) == str(out) for f in files), files  # nothing escaped, no subfolders
    images = [f for f in files if "-grid-" not in os.path.basename(f)]
    grids = [f for f in files if "-grid-" in os.path.basename(f)]
    assert len(images) == 6 and len(grids) == 2  # the second run overwrote nothing
    assert [p.name[:5] for p in first.saved + second.saved] == ["00001", "00002", "00003", "00005", "00006", "00007"]
    for result in (first, second):
        for i, (path, prompt) in enumerate(zip(result.saved, body.splitlines())):
            text = Image.open(path).text["parameters"]
            assert text.startswith(prompt + "\n")
            assert "Steps: " in text and f"Seed: {100 + i}," in text and "Sampler: PLMS" in text
            assert "Size: 64x64" in text and "Model: tiny" in text
            assert "/" not in path.name[6:] and ".." not in path.name
    # A1111 quotes values with , or : — the prompt line never is; the file reads back exactly.
    parsed = sdmagic.read_parameters(first.saved[2])
    assert parsed["prompt"] == "a red fox, in snow: at dusk" and parsed["seed"] == 102 and parsed["steps"] == STEPS
    with Image.open(first.grid_file) as grid:
        assert grid.size == first.grid().size  # saved at full size


def test_slugs_are_safe_and_bounded():
    for prompt in ["../../x", "/etc/passwd", "..", "a" * 500, "日本語", "C:\\\\windows\\\\x", "a/../b\x00c"]:
        name = slug(prompt)
        assert name and len(name) <= 48 and "/" not in name and "\\" not in name and "." not in name


def test_parameters_round_trip_with_quotes_and_negative():
    from sdmagic.output import ImageInfo

    info = ImageInfo("a cat\nwith a hat", 7, "blurry, dark", 5.5, 25, 512, 768)
    text = parameters_text(info, "org/model:v2", "dpm")
    assert text.startswith("a cat\nwith a hat\nNegative prompt: blurry, dark\nSteps: 25, Sampler: DPM++ 2M, CFG scale: 5.5")
    assert 'Model: "org/model:v2"' in text
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "a cat\nwith a hat" and parsed["negative"] == "blurry, dark"
    assert (parsed["steps"], parsed["guidance"], parsed["seed"]) == (25, 5.5, 7)
    assert (parsed["width"], parsed["height"], parsed["model"], parsed["sampler"]) == (512, 768, "org/model:v2", "DPM++ 2M")


def test_a_disk_error_keeps_the_images(tiny_shell, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(SaveFailedWarning, match="could not save to .*the images are still in memory"):
        result, _ = run_cell(tiny_shell, f"--seed 1 --save {blocker}/sub", "a fox")
    assert len(result.images) == 1 and not result.saved
    assert tiny_shell.magics_manager.registry["SDMagics"].session.history[result.number] is result


# ------------------------------------------------------------------------------------ round trip


def test_from_png_makes_the_same_image(tiny_shell, tmp_path):
    made, _ = run_cell(tiny_shell, f"--seed 31 --guidance 4.5 --negative 'dark, blurry' --save {tmp_path}", "a lighthouse\na tree")
    again = tiny_shell.run_line_magic("sd_from_png", str(made.saved[1]))
    assert again.prompts == ["a tree"] and again.seeds == [32] and again.negative == "dark, blurry"
    assert again.guidance == 4.5 and again.steps == STEPS
    assert np.abs(pixels(again.images) - pixels(made.images[1:])).max() <= 2


@pytest.mark.parametrize(
    "setup, make_file, message",
    [
        (None, lambda p: p / "missing.png", "no such file"),
        (None, lambda p: (Image.new("RGB", (8, 8)).save(p / "plain.png"), p / "plain.png")[1], "no 'parameters' text"),
        ("--model tiny --scheduler dpm", "saved", "run %sd_setup --model tiny --scheduler pndm"),
    ],
)
def test_from_png_errors_say_what_to_do(tiny_shell, tmp_path, setup, make_file, message):
    if make_file == "saved":
        made, _ = run_cell(tiny_shell, f"--seed 3 --save {tmp_path}", "a fox")
        path = made.saved[0]
    else:
        path = make_file(tmp_path)
    magics = tiny_shell.magics_manager.registry["SDMagics"]
    before = magics.session
    if setup:
        with capture_output():
            tiny_shell.run_line_magic("sd_setup", setup)
    try:
        with pytest.raises(UsageError, match=message):
            tiny_shell.run_line_magic("sd_from_png", str(path))
    finally:
        if setup:
            with capture_output():
                tiny_shell.run_line_magic("sd_setup", "--model tiny")
    assert magics.session is not None and (setup or magics.session is before)


# ------------------------------------------------------------------------------------ history


def test_history_lists_and_shows_runs(tiny_shell, tmp_path):
    first, _ = run_cell(tiny_shell, f"--seed 5 --save {tmp_path}", "history one\nhistory two")
    second, _ = run_cell(tiny_shell, "--seed 9", "history three")
    with capture_output() as captured:
        tiny_shell.run_line_magic("sd_history", "")
    lines = captured.stdout.splitlines()
    assert lines[0].split()[:3] == ["#", "images", "prompts"]
    row = next(line for line in lines if line.split()[0] == str(first.number))
    assert "history one (+1 more)" in row and "5..6" in row and "64x64" in row and str(tmp_path) in row
    assert tiny_shell.run_line_magic("sd_show", str(second.number)) is second
    with pytest.raises(UsageError, match="there is no run 9999"):
        tiny_shell.run_line_magic("sd_show", "9999")


def test_history_cap_drops_oldest_images_and_says_so(tiny_dir, tmp_path):
    session = sdmagic.setup("tiny", devices=1, cache=False)
    session.history.max_images = 3
    a = session.generate(["a", "b"], seed=1, steps=STEPS, save=tmp_path)
    b = session.generate(["c"], seed=1, steps=STEPS)
    with pytest.warns(HistoryTrimmedWarning, match="dropped the images of run 1"):
        c = session.generate(["d", "e"], seed=1, steps=STEPS)
    assert not a.images_in_memory and b.images_in_memory and c.images_in_memory
    assert all(p.exists() for p in a.saved)  # never from disk
    assert "images dropped from memory" in repr(a) and str(tmp_path) in repr(a)
    session.close()


# ------------------------------------------------------------------------------------ per-line options


def test_per_line_options_group_by_shape(tiny_shell, compiles):
    body = (
        "a red fox in snow -- --seed 7 --n 2 --guidance 5\n"
        "a plain line\n"
        "a wide one -- --width 128 --negative 'dark, cold'\n"
        "a c--d e\n"
    )
    result, _ = run_cell(tiny_shell, "--seed 100", body)
    assert result.prompts == ["a red fox in snow", "a red fox in snow", "a plain line", "a wide one", "a c--d e"]
    # A line's own seed counts from itself; other lines keep the cell's numbering (image i: S + i).
    assert result.seeds == [7, 8, 102, 103, 104]
    assert [i.guidance for i in result.info] == [5.0, 5.0, 7.5, 7.5, 7.5]
    assert [i.width for i in result.info] == [64, 64, 64, 128, 64] and result.info[3].negative == "dark, cold"
    assert result.images[3].size == (128, 64)
    assert "seeds 7..8, 102..104" in repr(result)
    # Two shapes: two compiled calls at most, the 64x64 lines together.
    alone, _ = run_cell(tiny_shell, "--seed 102", "a plain line")
    assert np.abs(pixels(alone.images) - pixels(result.images[2:3])).max() <= 2
    with compiles:
        run_cell(tiny_shell, "--seed 1", "x -- --seed 3\ny -- --guidance 2 --n 3\nz -- --width 128")
    assert compiles.count == 0  # shapes seen before, whatever the per-line values


@pytest.mark.parametrize(
    "body, message",
    [
        ("a fox -- --bogus 3", r"line 1 of the cell: unrecognized arguments: --bogus 3"),
        ("ok\na fox -- --seed", r"line 2 of the cell: argument --seed: expected one argument"),
        ("a fox -- --seed x", r"prompt 1 \('a fox'\): --seed must be a whole number"),
        ("a\nb -- --width 65", r"prompt 2 \('b'\): --width 65 is not a multiple of 2"),
        ("a fox -- --negative 'open", "line 1 of the cell: no closing quotation"),
    ],
)
def test_per_line_option_errors_name_the_line(tiny_shell, body, message):
    with pytest.raises(UsageError, match=message):
        tiny_shell.run_cell_magic("sd", "--seed 1", body)


# ------------------------------------------------------------------------------------ %config and display


def test_config_defaults_apply_to_every_option(tiny_shell, tmp_path):
    config = {
        "default_seed": 77, "default_guidance": 3.0, "default_height": 32, "default_width": 128,
        "default_negative": "blurry", "default_n": 2, "default_cols": 1, "save_dir": str(tmp_path),
    }
    try:
        for name, value in config.items():
            tiny_shell.run_line_magic("config", f"SDMagics.{name} = {value!r}")
        result, _ = run_cell(tiny_shell, "", "configured")
        assert result.seeds == [77, 78] and result.guidance == 3.0 and result.negative == "blurry"
        assert (result.width, result.height, result.display_cols, result.steps) == (128, 32, 1, STEPS)
        assert len(result.saved) == 2
        # A cell's own options still win, and --no-save skips the default folder.
        result, _ = run_cell(tiny_shell, "--seed 1 --n 1 --guidance 9 --no-save", "configured")
        assert result.seeds == [1] and result.guidance == 9.0 and not result.saved
    finally:
        for name, default in [("default_seed", None), ("default_guidance", 7.5), ("default_height", None),
                              ("default_width", None), ("default_negative", None), ("default_n", 1),
                              ("default_cols", None), ("save_dir", None)]:
            tiny_shell.run_line_magic("config", f"SDMagics.{name} = {default!r}")


def test_long_prompts_and_large_grids_display_well(tiny_shell):
    long_prompt = "an extremely detailed painting of " + "many colourful birds " * 40  # past 600 tokens
    with pytest.warns(PromptTruncatedWarning):
        result, _ = run_cell(tiny_shell, "--seed 1 --height 128 --width 128 --n 16 --cols 16", long_prompt)
    html = result._repr_html_()
    assert f'title="{long_prompt.strip()}"' in html  # full prompt on hover
    assert "…" in result.captions()[0] and len(result.captions()[0]) < 80
    full, shown = result.grid(16), Image.open(io.BytesIO(result._repr_png_()))
    assert full.width > 1600 >= shown.width  # shown downscaled...
    assert result.images[0].size == (128, 128)  # ...the images and saved grids stay full size


def test_terminal_ipython_gets_a_table(tiny_shell, tmp_path):
    result, _ = run_cell(tiny_shell, f"--seed 4 --save {tmp_path}", "a fox\na cat")
    formatter = tiny_shell.display_formatter
    active = formatter.active_types
    formatter.active_types = ["text/plain"]  # what a terminal IPython renders
    try:
        data, _ = formatter.format(result)
    finally:
        formatter.active_types = active
    text = data["text/plain"]
    assert set(data) == {"text/plain"}
    assert "seed 4" in text and "seed 5" in text and str(result.saved[0]) in text and "a cat" in text


def test_new_magics_before_setup_are_usage_errors(tiny_dir):
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "sdmagic")
    saved = ip.magics_manager.registry["SDMagics"].session
    ip.magics_manager.registry["SDMagics"].session = None
    try:
        for magic, line in [("sd_history", ""), ("sd_show", "1"), ("sd_from_png", "x.png")]:
            with pytest.raises(UsageError, match="run %sd_setup first"):
                ip.run_line_magic(magic, line)
    finally:
        ip.magics_manager.registry["SDMagics"].session = saved


# ------------------------------------------------------------------------------------ progress


def test_step_progress_reports_every_denoising_step(tiny_dir, capsys):
    session = sdmagic.setup("tiny", devices=2, cache=False)
    plain = session.generate(["a", "b", "c"], seed=1, steps=STEPS, progress=False)
    session.step_progress = True
    before = session.steps_reported
    stepped = session.generate(["a", "b", "c"], seed=1, steps=STEPS)
    assert stepped.calls == 2 and session.steps_reported - before == 2 * STEPS  # once per step, not per device
    assert f"{2 * STEPS}/{2 * STEPS}" in capsys.readouterr().err  # the bar reached its end
    np.testing.assert_array_equal(pixels(plain.images), pixels(stepped.images))
    session.close()


def test_step_progress_is_a_config_option(tiny_shell):
    magics = tiny_shell.magics_manager.registry["SDMagics"]
    tiny_shell.run_line_magic("config", "SDMagics.step_progress = True")
    try:
        assert magics.session.step_progress
        before = magics.session.steps_reported
        run_cell(tiny_shell, "--seed 1", "a fox")
        assert magics.session.steps_reported - before == STEPS
    finally:
        tiny_shell.run_line_magic("config", "SDMagics.step_progress = False")
    assert not magics.session.step_progress
