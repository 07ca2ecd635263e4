"""`sdmagic run` on one process of 8 simulated devices: the notebook's pixels and files, the
manifest, resuming after a kill, refusing other settings, and one-line errors.

Runs the real entry point (`sdmagic.cli.main`, and `python -m sdmagic` in a subprocess) on the tiny
model at 32x32 with 3 steps; every run after the first loads the executable from the test's
compile cache, so the file costs one compile.
"""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdmagic import cli, manifest
from sdmagic.prompts import prompts_of_text

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
SIZE = 32
SETTINGS = ["--model", "tiny", "--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE)]
# Ten prompts, one with options of its own (two images, its own seeds, guidance and negative),
# plus a comment and a blank line: 11 images, two calls of 8.
PROMPTS = """\
# ten prompts; the second has options of its own
a red fox in the snow
a lighthouse at dusk -- --seed 100 --n 2 --guidance 3 --negative 'blurry, dark'
a cat knight in heavy armour

a bowl of ramen, studio photo
an old map of an imaginary island
a robot reading in a library
a watercolour of a mountain lake
a steam train crossing a bridge
a city street in the rain at night
a close-up of a sunflower
"""
IMAGES = 11
NAME = re.compile(r"^(\d{5})-(\d+)-.+\.png$")


def run_cli(*args, stdin: bytes | None = None) -> tuple[int, str, str]:
    """cli.main in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in args])
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def error_line(stderr: str) -> str:
    """The one line an error prints (after, at most, the line describing the loaded model); no traceback."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and lines and lines[-1].startswith("sdmagic"), stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("sdmagic: ") and "model" in lines[0]), stderr
    return lines[-1]


def pngs(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.png")) if "-grid-" not in p.name}


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def assert_complete(directory: Path, images: int) -> dict[int, dict]:
    """Every image exactly once, readable, each with one manifest entry that verifies; no temp files."""
    files = sorted(p.name for p in directory.glob("*.png"))
    numbers = [int(NAME.match(name).group(1)) for name in files]
    assert numbers == list(range(1, images + 1)), files
    for name in files:
        with Image.open(directory / name) as image:
            image.load()
    entries = manifest.merged(directory)
    assert sorted(entries) == list(range(images))
    for index, entry in entries.items():
        assert entry["file"] == files[index]
        assert manifest.file_matches(directory, entry), entry
    assert not [p for p in directory.iterdir() if p.name.endswith(".partial")]
    return entries


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(PROMPTS, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def first_run(tiny_dir, prompt_file, tmp_path_factory):
    """The command run once into a fresh folder: (folder, exit status, stdout, stderr, PNG bytes)."""
    out = tmp_path_factory.mktemp("run") / "images"
    code, stdout, stderr = run_cli("run", prompt_file, "--out", out, *SETTINGS)
    return out, code, stdout, stderr, pngs(out)


def copy_of(first_run, tmp_path) -> Path:
    target = tmp_path / "images"
    shutil.copytree(first_run[0], target)
    return target


def test_cli_matches_the_notebook_pixel_for_pixel_and_file_for_file(first_run, session8, tmp_path):
    out, code, stdout, stderr, files = first_run
    assert code == 0, stderr
    # The last line: images, seconds, images/s, devices, processes.
    summary = stdout.strip().splitlines()[-1]
    assert re.search(r"11 images made, 0 already there \| [\d.]+ s.*\| [\d.]+ images/s \| 8 devices, 1 process \|", summary), summary
    result = session8.generate(prompts_of_text(PROMPTS, "the cell"), seed=0, steps=STEPS, height=SIZE, width=SIZE,
                               progress=False, save=tmp_path / "notebook")
    notebook = pngs(tmp_path / "notebook")
    assert list(files) == list(notebook)  # the same names: NNNNN-SEED-slug.png in cell order
    for name, data in files.items():
        assert np.array_equal(pixels(data), pixels(notebook[name])), name
        assert data == notebook[name], name  # the same bytes: pixels and A1111 parameters alike
    for image, data in zip(result.images, files.values()):
        assert np.array_equal(np.asarray(image), pixels(data))
    # Seeds as in a cell: image i uses 0 + i, the line with --seed 100 --n 2 uses 100 and 101.
    assert [int(NAME.match(n).group(2)) for n in files] == [0, 100, 101, 3, 4, 5, 6, 7, 8, 9, 10]
    entries = assert_complete(out, IMAGES)
    assert entries[2]["guidance"] == 3.0 and entries[2]["negative"] == "blurry, dark" and entries[2]["seed"] == 101
    assert entries[0]["prompt"] == "a red fox in the snow" and entries[0]["steps"] == STEPS
    assert entries[0]["width"] == entries[0]["height"] == SIZE
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["steps"] == STEPS and run["images"] == IMAGES and run["runs"] == 1


def test_a_second_run_writes_nothing(first_run, prompt_file, tmp_path):
    out = copy_of(first_run, tmp_path)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    code, stdout, stderr = run_cli("run", prompt_file, "--out", out, *SETTINGS)
    assert code == 0, stderr
    assert "0 images made, 11 already there" in stdout
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert after == before


def test_missing_partial_and_altered_files_are_made_again(first_run, prompt_file, tmp_path):
    out = copy_of(first_run, tmp_path)
    files = sorted(out.glob("*.png"))
    files[0].unlink()
    files[3].write_bytes(files[3].read_bytes()[:100])  # partial
    data = bytearray(files[5].read_bytes())
    data[-20] ^= 0xFF  # same size, other hash
    files[5].write_bytes(bytes(data))
    with open(out / "manifest.jsonl", "ab") as file:
        file.write(b'{"index": 7, "file": "00008-')  # a line torn by a kill
    (out / ".00009-8-x.png.sdmagic-run-0.partial").write_bytes(b"half a png")  # a temp file left by a kill
    code, stdout, stderr = run_cli("run", prompt_file, "--out", out, *SETTINGS, "--quiet")
    assert code == 0, stderr
    assert "3 images made, 8 already there" in stdout
    assert "0%|" not in stderr and "█" not in stderr  # --quiet: log lines, no bar
    assert pngs(out) == first_run[4]  # made again, the same bytes
    assert_complete(out, IMAGES)


def test_a_changed_setting_is_refused_unless_forced(first_run, prompt_file, tmp_path):
    out = copy_of(first_run, tmp_path)
    before = pngs(out)
    code, stdout, stderr = run_cli("run", prompt_file, "--out", out, *SETTINGS, "--guidance", "5")
    assert code == 2
    assert "guidance 7.5 -> 5.0" in error_line(stderr) and "--force" in stderr
    assert pngs(out) == before
    edited = prompt_file.parent / "edited.txt"
    edited.write_text(PROMPTS.replace("a close-up of a sunflower", "a close-up of a daisy"), encoding="utf-8")
    code, _, stderr = run_cli("run", edited, "--out", out, *SETTINGS)
    assert code == 2 and "prompts 10 prompt lines" in error_line(stderr)
    # Forced: the images of the new guidance are made; the line with a guidance of its own is kept.
    code, stdout, stderr = run_cli("run", prompt_file, "--out", out, *SETTINGS, "--guidance", "5", "--force")
    assert code == 0, stderr
    assert "9 images made, 2 already there" in stdout
    after = pngs(out)
    assert sorted(after) == sorted(before)
    assert [after[n] == before[n] for n in sorted(before)] == [False, True, True] + [False] * 8
    entries = assert_complete(out, IMAGES)
    assert entries[0]["guidance"] == 5.0 and entries[1]["guidance"] == 3.0
    # The settings are now the forced ones: the same command again has nothing to do.
    code, stdout, _ = run_cli("run", prompt_file, "--out", out, *SETTINGS, "--guidance", "5")
    assert code == 0 and "0 images made, 11 already there" in stdout


def test_a_removed_run_json_does_not_make_old_lines_win(first_run, prompt_file, tmp_path):
    """Without run.json nothing is refused, and the new run's lines still outrank older ones."""
    out = copy_of(first_run, tmp_path)
    next(out.glob("00005-*.png")).unlink()
    assert run_cli("run", prompt_file, "--out", out, *SETTINGS)[0] == 0  # run 2 makes image 4 again
    (out / "run.json").unlink()
    code, stdout, stderr = run_cli("run", prompt_file, "--out", out, *SETTINGS, "--guidance", "5")
    assert code == 0 and "9 images made, 2 already there" in stdout, stderr
    assert json.loads((out / "run.json").read_text())["runs"] == 3
    code, stdout, _ = run_cli("run", prompt_file, "--out", out, *SETTINGS, "--guidance", "5")
    assert code == 0 and "0 images made, 11 already there" in stdout
    assert manifest.merged(out)[4]["guidance"] == 5.0


def test_prompts_from_stdin(first_run, tmp_path):
    lines = PROMPTS.splitlines()[:3]  # the comment and the first two prompt lines: 3 images, seeds 0, 100, 101
    out = tmp_path / "from-stdin"
    code, stdout, stderr = run_cli("run", "-", "--out", out, *SETTINGS, stdin="\n".join(lines).encode())
    assert code == 0, stderr
    made = pngs(out)
    assert made == {name: data for name, data in first_run[4].items() if name[:5] in ("00001", "00002", "00003")}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_killed_run_resumes_with_every_image_once(first_run, prompt_file, tmp_path, sig):
    """A signal once the first images are on disk (SIGKILL: no chance to clean up; SIGTERM and
    Ctrl-C: a clean stop); then the same command completes the folder, every image once."""
    out = tmp_path / "killed"
    args = ["run", str(prompt_file), "--out", str(out), *SETTINGS, "--n", "3", "--quiet"]
    total = 9 * 3 + 2  # nine lines at --n 3 and the line with --n 2 of its own: four calls of 8
    process = subprocess.Popen([sys.executable, "-m", "sdmagic", *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if len(manifest.merged(out)) >= 1:
                break
            time.sleep(0.02)
        assert time.monotonic() < deadline, "the run wrote no image in 120 s"
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    if sig != signal.SIGKILL and process.returncode != 0:  # 0: it had finished before the signal came
        assert process.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], stderr
        last = stderr.decode().strip().splitlines()[-1]
        assert "run the same command again" in last and "Traceback" not in stderr.decode(), stderr
    # Whatever the signal interrupted, every final name holds a whole PNG.
    for path in out.glob("*.png"):
        with Image.open(path) as image:
            image.load()
    written = len(manifest.merged(out))
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr
    assert f"{total - written} images made, {written} already there" in stdout
    assert_complete(out, total)
    made = pngs(out)
    assert made["00001-0-a_red_fox_in_the_snow.png"] == first_run[4]["00001-0-a_red_fox_in_the_snow.png"]


def test_help_lists_every_option():
    from sdmagic.magics import SDMagics

    code, stdout, _ = run_cli("run", "--help")
    assert code == 0
    cli_options = {o for a in cli.build_parser().run_parser._actions for o in a.option_strings}
    magic_options = {o for magic in (SDMagics.sd_setup, SDMagics.sd) for a in magic.parser._actions for o in a.option_strings}
    # Everything of %sd_setup and %%sd that makes sense for files, plus the run's own options.
    expected = (magic_options - {"--warmup", "--cols", "--save", "--no-save", "-h", "--help"}) | {
        "--out", "--force", "--quiet", "--coordinator", "--num-processes", "--process-id"}
    assert expected <= cli_options
    for name in cli_options:
        assert re.search(rf"(^|\s|\[){re.escape(name)}\b", stdout), name
    assert "examples:" in stdout and "sdmagic run prompts.txt --out images" in stdout
    code, stdout, _ = run_cli("--version")
    assert code == 0


@pytest.mark.parametrize(
    "content, message",
    [
        (b"a fox\n\x00\x01binary", "is not text"),
        (b"a fox\n\xff\xfe caf\xe9\n", "is not UTF-8"),
        (b"a fox -- --sed 3\n", "line 1 of bad.txt"),
        (b"# only a comment\n\n", "no prompts in bad.txt"),
        (None, "no such prompt file"),
    ],
)
def test_a_bad_prompt_file_is_one_line_and_exit_2(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content)
    code, stdout, stderr = run_cli("run", path, "--out", tmp_path / "out", *SETTINGS)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_usage_errors_are_one_line_and_exit_2(tmp_path, first_run):
    for args, message in [
        (["run", "p.txt"], "--out"),
        (["run", "p.txt", "--out", "x", "--steps", "many"], "--steps: must be a whole number"),
        (["run", "p.txt", "--out", "x", "--bogus"], "unrecognized arguments: --bogus"),
        (["run", "p.txt", "--out", "x", "--cache-dir", "c", "--no-cache"], "contradict"),
    ]:
        code, _, stderr = run_cli(*args)
        assert code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr, (args, stderr)
    # A value only the engine can check (after loading the model) is one line too, naming the flag.
    prompt = tmp_path / "p.txt"
    prompt.write_text("a fox -- --seed -4\n")
    code, _, stderr = run_cli("run", prompt, "--out", tmp_path / "out", *SETTINGS)
    assert code == 2 and "--seed" in error_line(stderr), stderr
    (tmp_path / "file").write_text("")
    code, _, stderr = run_cli("run", prompt, "--out", tmp_path / "file", *SETTINGS)
    assert code == 2 and "is a file" in error_line(stderr)
    # As a real process: `python -m sdmagic`, no traceback.
    done = subprocess.run([sys.executable, "-m", "sdmagic", "run", str(tmp_path / "missing.txt"), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "no such prompt file" in done.stderr


def test_manifest_merges_processes_and_ignores_torn_and_foreign_lines(tmp_path):
    png = tmp_path / "00001-0-a.png"
    png.write_bytes(b"\x89PNG fake")
    sha = manifest.sha256_file(png)
    good = {"index": 0, "file": png.name, "sha256": sha, "bytes": png.stat().st_size, "run": 1}
    with manifest.ManifestWriter(tmp_path, 0) as writer:
        writer.append(good)
    with open(tmp_path / "manifest.jsonl", "ab") as file:
        file.write(b'{"index": 1, "fi')  # torn by a kill
    with manifest.ManifestWriter(tmp_path, 0) as writer:  # the next line starts on a line of its own
        writer.append({**good, "index": 2})
    (tmp_path / "manifest-1.jsonl").write_text(
        json.dumps({**good, "index": 3, "run": 2}) + "\n"
        + json.dumps({**good, "index": 0, "run": 2, "sha256": "0" * 64}) + "\n"  # a later run's entry wins
        + '{"index": -1, "file": "x", "sha256": "y", "bytes": 1, "run": 1}\n[1, 2]\nnot json\n'
    )
    (tmp_path / "manifest-x.jsonl").write_text(json.dumps({**good, "index": 9}) + "\n")  # not a process's manifest
    entries = manifest.merged(tmp_path)
    assert sorted(entries) == [0, 2, 3]
    assert entries[0]["sha256"] == "0" * 64 and not manifest.file_matches(tmp_path, entries[0])
    assert manifest.file_matches(tmp_path, entries[2])
    assert sorted(manifest.merged(tmp_path, images=3)) == [0, 2]
    assert not manifest.file_matches(tmp_path, {**good, "file": "../" + png.name})
    os.symlink(png, tmp_path / "link.png")
    assert not manifest.file_matches(tmp_path, {**good, "file": "link.png"})
    (tmp_path / "run.json").write_text("[not ours")
    with pytest.raises(manifest.SDMagicError, match="cannot be read"):
        manifest.read_run(tmp_path)


def test_one_run_per_folder_at_a_time(first_run, prompt_file, tmp_path):
    from sdmagic.batch_run import _Lock

    out = copy_of(first_run, tmp_path)
    lock = _Lock(out)  # as a run in progress holds it
    try:
        code, _, stderr = run_cli("run", prompt_file, "--out", out, *SETTINGS)
    finally:
        lock.release()
    assert code == 2 and "another sdmagic run is writing to" in error_line(stderr)


def test_plan_keeps_file_order_across_shapes(session8):
    """Lines of other steps or sizes make requests of their own; the plan numbers images in file
    order all the same, and a subset of a request keeps each image's place."""
    from sdmagic.batch_run import _subset, plan_images

    text = "a fox\na cat -- --steps 2 --n 2\na dog -- --width 48\nan owl\n"
    requests = session8.make_requests(prompts_of_text(text, "x"), seed=10, steps=STEPS, height=SIZE, width=SIZE)
    assert len(requests) == 3
    planned = plan_images(requests)
    assert [p.index for p in planned] == [0, 1, 2, 3, 4]
    assert [p.file for p in planned] == ["00001-10-a_fox.png", "00002-11-a_cat.png", "00003-12-a_cat.png",
                                         "00004-13-a_dog.png", "00005-14-an_owl.png"]
    assert [p.record["steps"] for p in planned] == [STEPS, 2, 2, STEPS, STEPS]
    assert planned[3].record["width"] == 48 and planned[3].record["height"] == SIZE
    part = _subset(requests[0], [1])  # "an owl" only
    assert part.prompts == ("an owl",) and part.seeds == (14,) and part.positions == (4,)
    assert len(part.guidances) == len(part.negatives) == len(part.inits) == 1


def test_image_to_image_matches_the_notebook_and_its_init_image_is_a_setting(session8, tmp_path):
    rng = np.random.default_rng(0)
    init = tmp_path / "init.png"
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(init)
    prompt = tmp_path / "p.txt"
    prompt.write_text("a fox\na cat -- --strength 0.9\n")
    out = tmp_path / "out"
    args = ["run", prompt, "--out", out, *SETTINGS, "--init", init, "--strength", "0.7"]
    code, _, stderr = run_cli(*args)
    assert code == 0, stderr
    result = session8.generate(prompts_of_text(prompt.read_text(), "x"), seed=0, steps=STEPS, height=SIZE, width=SIZE,
                               init_image=init, strength=0.7, progress=False, save=tmp_path / "notebook")
    assert pngs(out) == pngs(tmp_path / "notebook")
    entries = manifest.merged(out)
    assert [entries[i]["strength"] for i in (0, 1)] == [0.7, 0.9] and entries[0]["init"] == "init.png"
    assert len(result.images) == 2
    # Another picture under the same name changes the images: refused like any other setting.
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(init)
    code, _, stderr = run_cli(*args)
    assert code == 2 and "init_images 1 init/mask image" in error_line(stderr)
