"""What `sdmagic run` keeps in its output folder, so that a run can be resumed and checked.

`DIR/manifest.jsonl`: one JSON object per line, one line per image written, appended (and flushed
and fsynced) only after the PNG is complete under its final name:

    {"index": 3, "file": "00004-3-a_red_fox.png", "sha256": "…", "bytes": 5123, "run": 1,
     "setup": "…", "prompt": "a red fox", "negative": null, "seed": 3, "steps": 25,
     "guidance": 7.5, "width": 512, "height": 512, "strength": null, "mask_blur": null,
     "init": null, "init_sha256": null, "mask_sha256": null, "nsfw": false}

`index` is the image's place among all the images of the prompt file (from 0, prompt-major, as
in a %%sd cell); `file` is its PNG in DIR; `sha256` and `bytes` are the file's; `run` numbers the
runs in DIR (run.json counts them); `setup` is a digest of the model-level settings (model,
dtype, scheduler, safety checker, LoRAs) it was made with; the rest are the image's own settings.

Several processes (a multi-host run): each process writes only the images its own devices made
and appends their lines to its own manifest, `manifest.jsonl` for process 0 and
`manifest-<i>.jsonl` for process i > 0, so no two processes ever append to one file. A reader
merges them: for each index the line of the highest `run` counts (one run writes each index at
most once, whichever process made it). `merged` does that.

A kill can cut the last line short: a line that is not a complete JSON object of the right shape
is ignored (and the writer starts its next line on a fresh line), and the image it was about is
made again. A line whose file is missing, of another size or of another hash does not count either.

`DIR/run.json` holds the settings of the command that last ran in DIR (those that change the
images), the number of runs so far and the number of images; a run with other settings is
refused unless forced (`differences` names them). It is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import SDMagicError
from .text import printable

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"
FORMAT = 1
_OTHER_MANIFEST = re.compile(r"^manifest-([1-9]\d{0,5})\.jsonl$")
# A real line is a few hundred bytes (a prompt is cut at 16K characters when tokenized, but the
# text is kept whole); anything much longer is not one of ours and is skipped without reading it.
MAX_LINE_BYTES = 1 << 20
MAX_RUN_FILE_BYTES = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def manifest_path(directory: Path, process_index: int = 0) -> Path:
    """The manifest process `process_index` appends to."""
    return Path(directory) / (MANIFEST if process_index == 0 else f"manifest-{process_index}.jsonl")


def manifest_files(directory: Path) -> list[Path]:
    """Every process's manifest in `directory`: process 0's first, then by process number."""
    directory = Path(directory)
    found = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        if name == MANIFEST:
            found.append((0, directory / name))
        elif match := _OTHER_MANIFEST.match(name):
            found.append((int(match.group(1)), directory / name))
    return [path for _, path in sorted(found)]


def _is_entry(value: Any) -> bool:
    def whole(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    return (
        isinstance(value, dict)
        and whole(value.get("index"))
        and whole(value.get("bytes"))
        and whole(value.get("run"))
        and isinstance(value.get("file"), str)
        and isinstance(value.get("sha256"), str)
        and _HEX64.match(value["sha256"]) is not None
    )


def read_entries(path: Path) -> Iterator[dict]:
    """The well-formed lines of one manifest, in order; torn, overlong or foreign lines are skipped."""
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        return
    with file:
        while True:
            line = file.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_LINE_BYTES:  # skip the rest of an overlong line unread
                while line and not line.endswith(b"\n"):
                    line = file.readline(MAX_LINE_BYTES)
                continue
            if not line.endswith(b"\n"):
                return  # the last line, cut short by a kill
            try:
                value = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if _is_entry(value):
                yield value


def merged(directory: Path, images: int | None = None) -> dict[int, dict]:
    """index -> the entry that counts: of all processes' manifests, the one of the latest run
    (and, within a run, the last written). Indices at or beyond `images` (a prompt file that was
    made shorter since) are left out when `images` is given."""
    out: dict[int, dict] = {}
    for path in manifest_files(directory):
        for entry in read_entries(path):
            index = entry["index"]
            if images is not None and index >= images:
                continue
            if index not in out or entry["run"] >= out[index]["run"]:
                out[index] = entry
    return out


def latest_run(directory: Path) -> int:
    """The highest run number of any line in any manifest (0 if none): a new run must number above
    it even if run.json, which counts runs, was removed."""
    return max((entry["run"] for path in manifest_files(directory) for entry in read_entries(path)), default=0)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_matches(directory: Path, entry: Mapping[str, Any]) -> bool:
    """The entry's file is a plain file in `directory` with the entry's size and sha256."""
    name = entry.get("file")
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        return False
    path = Path(directory) / name
    try:
        info = os.lstat(path)  # a link is not a file we wrote
        if not stat.S_ISREG(info.st_mode) or info.st_size != entry.get("bytes"):
            return False
        return sha256_file(path) == entry.get("sha256")
    except OSError:
        return False


class ManifestWriter:
    """Appends entries to one process's manifest; each line is on disk (fsynced) when `append` returns."""

    def __init__(self, directory: Path, process_index: int = 0):
        self.path = manifest_path(directory, process_index)
        self._file = open(self.path, "ab")
        try:
            # A kill mid-line left a torn last line: the next entry starts on a line of its own.
            if self._file.tell() > 0:
                with open(self.path, "rb") as reader:
                    reader.seek(-1, os.SEEK_END)
                    if reader.read(1) != b"\n":
                        self._file.write(b"\n")
        except BaseException:
            self._file.close()
            raise

    def append(self, entry: Mapping[str, Any]) -> None:
        line = json.dumps(dict(entry), ensure_ascii=False, separators=(",", ":")) + "\n"
        self._file.write(line.encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_run(directory: Path) -> dict | None:
    """run.json of the last run in `directory` (None if there was none). A file that is not one
    (too large, not JSON, not an object of our format) raises SDMagicError saying what to do."""
    path = Path(directory) / RUN_FILE
    shown = repr(printable(str(path), 120))
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_RUN_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise SDMagicError(f"{shown} is a folder: give --out a folder of its own for sdmagic run") from None
    except OSError as err:
        raise SDMagicError(f"could not read {shown}: {printable(err.strerror or err)}") from None
    problem = None
    value = None
    if len(data) > MAX_RUN_FILE_BYTES:
        problem = "it is too large"
    else:
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):
            problem = "it is not JSON"
    if problem is None and not (isinstance(value, dict) and value.get("format") == FORMAT
                                and isinstance(value.get("settings"), dict)
                                and isinstance(value.get("runs"), int) and not isinstance(value.get("runs"), bool)):
        problem = "it is not sdmagic run's"
    if problem:
        raise SDMagicError(
            f"{shown} cannot be read ({problem}): give --out a folder of its own, or remove the file to start over there"
        )
    return value


def write_run(directory: Path, value: Mapping[str, Any]) -> None:
    """Replace run.json in one step (a kill leaves the old file or the new one, never a part)."""
    path = Path(directory) / RUN_FILE
    temp = path.with_name(f".{RUN_FILE}.{os.getpid()}.partial")
    try:
        with open(temp, "w", encoding="utf-8") as file:
            json.dump(dict(value), file, ensure_ascii=False, indent=1)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return printable(text, 60)


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'name old -> new' for every setting that differs (in `new`'s order, then settings only `old` has)."""
    out = []
    for key in list(new) + [k for k in old if k not in new]:
        if old.get(key) != new.get(key):
            out.append(f"{printable(key, 30)} {_shown(old.get(key))} -> {_shown(new.get(key))}")
    return out
