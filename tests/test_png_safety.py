"""PNGs are hostile input and saved files are kept: linear-time parsing, bounded text, no pixel
decoding, no spoofed settings, exact round trips, atomic and race-free saving, names in any script,
grids that say what they are. No JAX: results are built from PIL images directly."""

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import unicodedata
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

import sdmagic
from sdmagic.errors import SDMagicError
from sdmagic.output import GenerationResult, ImageInfo
from sdmagic.saving import parse_parameters, read_parameters, save_result, slug

# The sdmagic under test (the subprocesses below must import the same one).
SDMAGIC_ROOT = str(Path(sdmagic.__file__).resolve().parent.parent)
# Old code took 39 s for a 64 KB line and hours for 1 MB; the new one takes milliseconds.
KILL_AFTER_S = 10


def make_result(prompts, negative=None, seed=1, guidance=7.5):
    images = [Image.new("RGB", (8, 8), (40 * i % 256, 90, 200)) for i in range(len(prompts))]
    info = [ImageInfo(p, seed + i, negative, guidance, 20, 8, 8) for i, p in enumerate(prompts)]
    return GenerationResult(
        images=images, info=info, model="tiny", scheduler="pndm", compile_seconds=0.0, run_seconds=0.0, calls=1
    )


def png_with_text(path, text, *, key="parameters", zipped=False):
    pnginfo = PngImagePlugin.PngInfo()
    pnginfo.add_text(key, text, zip=zipped)
    Image.new("RGB", (8, 8)).save(path, pnginfo=pnginfo)
    return path


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming_size(path, width, height):
    """A few hundred bytes whose header claims width x height pixels, with parameters before them."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    text = b"parameters\0a fox\nSteps: 20, Sampler: PLMS, CFG scale: 7, Seed: 1, Size: 64x64"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"tEXt", text)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 400, message
    assert "\x1b" not in message and "Traceback" not in message
    return message


def read_isolated(paths):
    """read_parameters on each path in a fresh process killed after KILL_AFTER_S, so a parser that
    hangs fails this test at once: [{'seconds', 'error'} or {'seconds', 'params'}]."""
    script = textwrap.dedent(
        f"""
        import json, sys, time
        sys.path.insert(0, {SDMAGIC_ROOT!r})
        from sdmagic.saving import read_parameters
        for path in {[str(p) for p in paths]!r}:
            start = time.perf_counter()
            try:
                out = {{"params": read_parameters(path)}}
            except Exception as err:
                out = {{"error": str(err), "type": type(err).__name__}}
            out["seconds"] = time.perf_counter() - start
            print(json.dumps(out), flush=True)
        """
    )
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=KILL_AFTER_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {len(paths)} PNGs took more than {KILL_AFTER_S} s")
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


# ------------------------------------------------------------------------ linear, bounded parsing


def test_long_parameters_lines_parse_in_linear_time(tmp_path):
    # Each of these took the old quadratic pattern 10 s to hours; zTXt keeps the files tiny.
    lines = {
        "letters": "a fox\n" + "a" * 64000,
        "words": "a fox\n" + "a " * 32000,
        "after settings": "a fox\nSteps: 20, Seed: 3, Size: 64x64, Junk: " + "x" * 63000,
        "quotes": "a fox\n" + 'Key: "\\' * 9000,
    }
    paths = [png_with_text(tmp_path / f"{i}.png", text, zipped=True) for i, text in enumerate(lines.values())]
    assert os.path.getsize(paths[0]) < 1000
    outcomes = read_isolated(paths)
    for name, outcome in zip(lines, outcomes):
        assert outcome["seconds"] < 2, (name, outcome["seconds"])  # milliseconds in fact
        assert "params" in outcome or outcome["type"] == "SDMagicError", (name, outcome)
    assert outcomes[2]["params"]["seed"] == 3 and outcomes[2]["params"]["other"] == {"Junk": "x" * 63000}


def test_parameters_over_64_kb_are_refused_in_one_line(tmp_path):
    megabyte = png_with_text(tmp_path / "megabyte.png", "a fox\n" + "a" * 1_000_000, zipped=True)
    just_over = png_with_text(tmp_path / "over.png", "Steps: 1, Seed: 2, Size: 3x3, " + "b" * 66000)
    assert os.path.getsize(megabyte) < 3000
    for outcome in read_isolated([megabyte, just_over]):
        assert outcome.get("type") == "SDMagicError", outcome
        assert "KB" in outcome["error"] and "\n" not in outcome["error"] and len(outcome["error"]) < 300
        assert outcome["seconds"] < 2
    with pytest.raises(SDMagicError, match="KB"):
        parse_parameters("x" * 70000)


def test_ztxt_and_itxt_bombs_are_one_line_errors(tmp_path):
    ztxt = png_with_text(tmp_path / "ztxt.png", "a" * 3_000_000, zipped=True)  # 3 MB in a few KB
    itxt = tmp_path / "itxt.png"
    pnginfo = PngImagePlugin.PngInfo()
    pnginfo.add_itxt("parameters", "ä" * 2_000_000, zip=True)
    Image.new("RGB", (8, 8)).save(itxt, pnginfo=pnginfo)
    for path in (ztxt, itxt):
        assert os.path.getsize(path) < 10_000
        with pytest.raises(SDMagicError) as excinfo:
            read_parameters(path)
        assert "text chunk" in one_line_error(excinfo)


def test_decompression_bomb_headers_are_one_line_errors_without_warnings(tmp_path):
    for width, height in [(100_000, 100_000), (10_000, 10_000)]:  # Pillow's error and warning sizes
        path = png_claiming_size(tmp_path / f"{width}.png", width, height)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(SDMagicError) as excinfo:
                read_parameters(path)
        assert f"{width}x{height} pixels" in one_line_error(excinfo)
        assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_pixels_are_never_decoded(tmp_path, monkeypatch):
    path = save_result(make_result(["a fox"]), tmp_path)[0]

    def refuse(self):
        raise AssertionError("read_parameters decoded the pixels")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", refuse)
    assert read_parameters(path)["prompt"] == "a fox"


def test_truncated_and_garbage_files_are_one_line_errors(tmp_path):
    good = save_result(make_result(["a fox"]), tmp_path / "good")[0].read_bytes()
    cases = {
        "empty.png": b"",
        "garbage.png": os.urandom(300),
        "header-only.png": good[:30],
        "half.png": good[: len(good) // 2],
        "bad-crc.png": good[:40] + bytes([good[40] ^ 0xFF]) + good[41:],
        "jpeg.png": b"\xff\xd8\xff\xe0" + b"\0" * 100,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SDMagicError) as excinfo:
            read_parameters(tmp_path / name)
        one_line_error(excinfo)
    with pytest.raises(SDMagicError, match="folder"):
        read_parameters(tmp_path)


# ------------------------------------------------------------------------ settings cannot be spoofed


SETTINGS = "Steps: 20, Sampler: PLMS, CFG scale: 7, Seed: 3, Size: 64x64, Model: real/model"


def test_lowercase_keys_in_the_settings_line_do_not_override(tmp_path):
    text = f"a red fox\n{SETTINGS}, prompt: X, model: tiny, seed: 77, negative: N, steps: 1, width: 9"
    for parsed in (parse_parameters(text), read_parameters(png_with_text(tmp_path / "spoof.png", text))):
        assert parsed["prompt"] == "a red fox" and parsed["negative"] is None
        assert (parsed["model"], parsed["seed"], parsed["steps"], parsed["width"]) == ("real/model", 3, 20, 64)
        assert parsed["other"] == {"prompt": "X", "model": "tiny", "seed": "77", "negative": "N", "steps": "1", "width": "9"}
    # Without a Model key, a lowercase one still does not set the model (which would skip the check).
    assert "model" not in parse_parameters("a fox\nSteps: 20, Seed: 3, Size: 64x64, model: tiny")


def test_a_known_key_given_twice_is_refused():
    with pytest.raises(SDMagicError, match="Model twice"):
        parse_parameters(f"a fox\n{SETTINGS}, Model: tiny")


def test_strings_from_a_png_are_printable_in_messages(tmp_path):
    hostile = "\x1b]0;owned\x07\x1b[31m" + "x" * 5000
    path = png_with_text(tmp_path / "hostile.png", f"a fox\nSteps: {hostile}, Seed: 1, Size: 8x8")
    with pytest.raises(SDMagicError) as excinfo:
        read_parameters(path)
    assert "owned" not in one_line_error(excinfo)  # the escape sequence went whole
    with pytest.raises(SDMagicError) as excinfo:
        parse_parameters(f"a fox\n{SETTINGS}, Model: {hostile}")
    one_line_error(excinfo)
    # A model name is echoed in "run %sd_setup --model NAME": one with escapes is refused outright.
    quoted = json.dumps(hostile[:20])  # JSON-quoted, so the escape characters are real once read
    path = png_with_text(tmp_path / "model.png", f"a fox\nSteps: 20, Seed: 1, Size: 8x8, Model: {quoted}")
    with pytest.raises(SDMagicError, match="control characters") as excinfo:
        read_parameters(path)
    assert "owned" not in one_line_error(excinfo)


# ------------------------------------------------------------------------ exact round trips


TRICKY = [
    ("a cat\nwith a hat", "blurry,\ndark"),
    ("Negative prompt: this is the prompt\nstill the prompt", None),
    ("two\nNegative prompt: lines", "Negative prompt: also mine"),
    ("the prompt\nSteps: 1, Sampler: X, Seed: 9, Size: 1x1", None),
    ("  spaced out  ", " neg "),
    ('"quoted", with: colons', "Steps: 2, Seed: 3, Size: 4x4"),
]


def test_tricky_prompts_round_trip_exactly(tmp_path):
    for i, (prompt, negative) in enumerate(TRICKY):
        result = make_result([prompt], negative=negative, seed=10 + i, guidance=7.123456789)
        (path,) = save_result(result, tmp_path)
        parsed = read_parameters(path)
        assert (parsed["prompt"], parsed["negative"]) == (prompt, negative), path.name
        assert (parsed["seed"], parsed["guidance"], parsed["model"]) == (10 + i, 7.123456789, "tiny")
        # The parameters chunk is still A1111 text that A1111's rules read the settings from.
        with Image.open(path) as image:
            a1111 = parse_parameters(image.info["parameters"])
        assert (a1111["seed"], a1111["steps"], a1111["width"], a1111["sampler"]) == (10 + i, 20, 8, "PLMS")


def test_an_edited_parameters_text_wins_over_a_stale_exact_copy(tmp_path):
    (path,) = save_result(make_result(["Negative prompt: original"]), tmp_path)
    with Image.open(path) as image:
        chunks = dict(image.info)
        pixels = image.copy()
    pnginfo = PngImagePlugin.PngInfo()
    pnginfo.add_text("parameters", chunks["parameters"].replace("original", "edited"))
    pnginfo.add_text("sdmagic", chunks["sdmagic"])
    pixels.save(path, pnginfo=pnginfo)
    assert read_parameters(path)["negative"] == "edited"  # as A1111 reads it
    pnginfo = PngImagePlugin.PngInfo()
    pnginfo.add_text("parameters", chunks["parameters"])
    pnginfo.add_text("sdmagic", "[" * 50_000)  # nested deeper than json's recursion limit
    pixels.save(path, pnginfo=pnginfo)
    assert read_parameters(path)["negative"] == "original"


# ------------------------------------------------------------------------ atomic, race-free saving


def test_an_interrupted_save_leaves_no_half_png_and_no_temporary(tmp_path, monkeypatch):
    real_save = Image.SAVE["PNG"]
    calls = []

    def interrupted_after(n):
        def save(image, fp, filename):
            calls.append(filename)
            if len(calls) > n:
                fp.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)  # some bytes, then Ctrl-C
                raise KeyboardInterrupt
            return real_save(image, fp, filename)

        return save

    monkeypatch.setitem(Image.SAVE, "PNG", interrupted_after(0))
    with pytest.raises(KeyboardInterrupt):
        save_result(make_result(["a fox", "a hare"]), tmp_path / "first")
    assert os.listdir(tmp_path / "first") == []

    calls.clear()
    monkeypatch.setitem(Image.SAVE, "PNG", interrupted_after(2))  # the two images, then the grid
    result = make_result(["a fox", "a hare"])
    with pytest.raises(KeyboardInterrupt):
        save_result(result, tmp_path / "grid")
    left = sorted(os.listdir(tmp_path / "grid"))
    assert len(left) == 2 and not any("grid" in name or name.startswith(".") for name in left), left
    assert [read_parameters(tmp_path / "grid" / name)["prompt"] for name in left] == ["a fox", "a hare"]

    def disk_full(image, fp, filename):
        fp.write(b"\x89PNG")
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(Image.SAVE, "PNG", disk_full)
    with pytest.raises(SDMagicError, match="No space left on device"):
        result.save(tmp_path / "full")
    assert os.listdir(tmp_path / "full") == [] and not result.saved


WORKER = """
import os, sys, threading, time
sys.path.insert(0, {root!r})
from PIL import Image
from sdmagic.output import GenerationResult, ImageInfo
from sdmagic.saving import save_result

directory, name = sys.argv[1], sys.argv[2]
open(os.path.join(directory, "..", name + ".ready"), "w").close()
while not os.path.exists(os.path.join(directory, "..", "go")):
    time.sleep(0.001)

def save_ten(thread):
    for i in range(10):
        prompts = [f"{{name}} {{thread}} {{i}} {{k}}" for k in range(3)]
        info = [ImageInfo(p, k, None, 7.5, 20, 8, 8) for k, p in enumerate(prompts)]
        images = [Image.new("RGB", (8, 8)) for _ in prompts]
        save_result(GenerationResult(images=images, info=info, model="m", scheduler="pndm",
                                     compile_seconds=0, run_seconds=0, calls=1), directory)

threads = [threading.Thread(target=save_ten, args=(t,)) for t in range(2)]
for t in threads: t.start()
for t in threads: t.join()
"""


def test_two_processes_saving_into_one_folder_never_share_a_counter(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = WORKER.format(root=SDMAGIC_ROOT)
    workers = [subprocess.Popen([sys.executable, "-c", script, str(out), f"p{n}"], stderr=subprocess.PIPE) for n in range(2)]
    try:
        for _ in range(3000):  # both imported and waiting, then both start at once
            if all((tmp_path / f"p{n}.ready").exists() for n in range(2)) or any(w.poll() is not None for w in workers):
                break
            time.sleep(0.01)
        (tmp_path / "go").touch()
        for worker in workers:
            _, errors = worker.communicate(timeout=60)
            assert worker.returncode == 0, errors.decode()[-3000:]
    finally:
        for worker in workers:
            worker.kill()
    names = sorted(os.listdir(out))
    assert len(names) == 2 * 2 * 10 * 4 and all(name.endswith(".png") for name in names)  # 3 images + a grid each
    counters = [name.split("-")[0] for name in names]
    assert len(set(counters)) == len(counters), [c for c in counters if counters.count(c) > 1][:10]


# ------------------------------------------------------------------------ names and grids


def test_slugs_keep_letters_of_any_script():
    assert slug("富士山の夜明け、浮世絵") == "富士山の夜明け_浮世絵"
    assert slug("Лиса в снегу") == "Лиса_в_снегу"
    assert slug("αλεπού στο χιόνι") == "αλεπού_στο_χιόνι"
    assert slug("नमस्ते दुनिया") == "नमस्ते_दुनिया"  # the vowel signs stay with their letters
    assert slug("cafe\u0301") == "caf\u00e9"  # NFC
    assert slug('a<b>c:d"e/f\\g|h?i*j.k') == "a_b_c_d_e_f_g_h_i_j_k"
    for prompt in ["..", "．．／etc", "\u202etxt.exe", "a\x00b\x1b[31mc", "…", "日" * 100]:
        name = slug(prompt)
        assert name and len(name) <= 48 and not name.startswith(".") and name == unicodedata.normalize("NFC", name)
        assert not any(c in name for c in '<>:"/\\|?*.\x00\x1b\u202e')


def test_saved_files_are_named_in_the_prompts_script(tmp_path):
    saved = save_result(make_result(["東京の夜", "Москва ночью"]), tmp_path)
    assert [p.name for p in saved] == ["00001-1-東京の夜.png", "00002-2-Москва_ночью.png"]


def test_a_grid_says_it_is_a_grid(tmp_path):
    result = make_result(["a fox", "a hare"])
    save_result(result, tmp_path)
    with pytest.raises(SDMagicError) as excinfo:
        read_parameters(result.grid_file)
    message = one_line_error(excinfo)
    assert "grid" in message and "image file" in message
    # A grid saved before grids were marked is known by its name.
    legacy = tmp_path / "00009-grid-a_fox.png"
    Image.new("RGB", (8, 8)).save(legacy)
    with pytest.raises(SDMagicError, match="grid.*image file"):
        read_parameters(legacy)
