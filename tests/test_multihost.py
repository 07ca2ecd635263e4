"""Several processes, one mesh (sdmagic.multihost): two CPU processes of 4 simulated devices each,
joined on 127.0.0.1 with gloo, against this process's 8 devices.

Every subprocess runs this file as a script (`python tests/test_multihost.py MODE ...`, the worker
at the bottom) with its own device count; each has a timeout, gets a free port, and is killed and
reaped in a `finally`. Tiny model, 3 steps, 64x64.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
STEPS, SIZE = 3, 64
# Ten prompts, one with options of its own (its seed and guidance), as a prompt file has them.
PROMPTS = "\n".join(
    [f"a small red house number {i}" for i in range(6)]
    + ["a lighthouse at dusk -- --seed 99 --guidance 5"]
    + [f"a blue bird number {i}" for i in range(3)]
)
SEED = 11
PEER_TIMEOUT = 4  # seconds; a short watchdog so the dead-peer tests end quickly


# ---------------------------------------------------------------------------- the worker (a subprocess)


def _worker(argv: list[str]) -> int:
    mode, process_id, processes, port, out = argv[0], int(argv[1]), int(argv[2]), argv[3], Path(argv[4])
    import sdmagic
    from sdmagic import multihost
    from sdmagic.errors import SDMagicError

    try:
        if mode == "join-alone":
            multihost.initialize(f"127.0.0.1:{port}", processes, process_id, init_timeout=3)
            return 0
        if processes > 1:
            assert multihost.initialize(f"127.0.0.1:{port}", processes, process_id, label="worker")
        import jax

        if mode == "exit-early":
            if process_id == 1:
                return 3  # a clean exit: not a dead process, but process 0 must not wait for its part
            time.sleep(PEER_TIMEOUT + 2)  # meanwhile process 1's silence is no alarm: it said it ended
            multihost.gather("after you")
            return 0
        if mode == "die-at-the-end":
            if process_id == 1:
                time.sleep(1)  # process 0 is waiting in JAX's shutdown barrier by now
                os.kill(os.getpid(), signal.SIGKILL)
            return 0
        if mode.startswith("abandon-"):
            if process_id == int(mode[-1]):
                time.sleep(1)
                print("worker: error: something went wrong here", file=sys.stderr, flush=True)
                multihost.abandon(5)
            time.sleep(60)  # the other one works on until it is told
            return 0
        agreed = multihost.agree({"from": process_id, "list": [3, 1, 2]})
        gathered = multihost.gather(process_id * 10)
        # the fallback without JAX's client: through collectives over every device (gloo)
        fallback = [multihost._broadcast_text("from 0" if process_id == 0 else "ignored"),
                    multihost._allgather_text("é" * (process_id + 1))]
        cache = os.environ.get("MULTIHOST_TEST_CACHE")
        session = sdmagic.setup("tiny", cache=bool(cache), cache_dir=cache or None)
        status = {"agreed": agreed, "gathered": gathered, "fallback": fallback, "devices": jax.device_count(),
                  "local": jax.local_device_count(), "processes": multihost.process_count(),
                  "index": multihost.process_index(), "main": multihost.is_main()}
        rows = _make_images(session, loop=mode == "loop")
        np.savez(out / f"rows-{processes}-{process_id}.npz", **{str(k): v for k, v in rows.items()})
        print("STATUS " + json.dumps(status), flush=True)
        return 0
    except SDMagicError as err:
        print(f"worker: error: {err}", file=sys.stderr, flush=True)
        return 2


def _make_images(session, loop: bool = False) -> dict[int, np.ndarray]:
    """Every image of PROMPTS through the runner's API: the rows this process's devices hold."""
    from sdmagic import multihost
    from sdmagic.prompts import prompts_of_text

    requests = session.make_requests(prompts_of_text(PROMPTS, "the prompts"), seed=SEED, steps=STEPS,
                                      height=SIZE, width=SIZE)
    rows: dict[int, np.ndarray] = {}
    for round_ in range(1000 if loop else 1):
        for request in requests:
            key = session.shape_key(request)
            session.executable(key)
            for call in session.plan_calls(request, key, []):
                pixels, _ = session.start_call(call)
                for row, value in multihost.local_rows(pixels):
                    if row < call.count:
                        position = request.positions[call.first + row]
                        assert position not in rows or loop, f"image {position} made twice"
                        rows[position] = value
                multihost.gather(len(rows))  # as a runner that reports its files per call
        if loop:
            print(f"ROUND {round_}", flush=True)
    return rows


# ---------------------------------------------------------------------------- the tests' side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["SDMAGIC_PEER_TIMEOUT"] = str(PEER_TIMEOUT)
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Workers:
    """Processes of this file's worker; all killed and reaped on leaving the `with`."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []

    def start(self, mode: str, processes: int, devices: int, ids=None, **env) -> list[subprocess.Popen]:
        port = _free_port()
        started = []
        for i in ids if ids is not None else range(processes):
            log = open(self.tmp / f"{mode}-{processes}-{i}.log", "w+")
            proc = subprocess.Popen(
                [sys.executable, str(HERE), mode, str(i), str(processes), str(port), str(self.tmp)],
                cwd=ROOT, env=_env(devices, **env), stdout=log, stderr=subprocess.STDOUT,
            )
            proc.log = log
            started.append(proc)
        self.procs += started
        return started

    @staticmethod
    def output(proc) -> str:
        proc.log.flush()
        proc.log.seek(0)
        return proc.log.read()

    @staticmethod
    def wait(procs, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"a worker still runs after {timeout} s:\n" + Workers.output(proc)[-3000:]) from None
        return codes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.log.close()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A compile cache every two-process run of this module shares (each process of 4 devices
    compiles the 8-device executable once; later runs load it)."""
    return tmp_path_factory.mktemp("multihost-compiled")


@pytest.fixture(scope="module")
def reference(session8):
    """The images of PROMPTS from this process's 8 devices: what a notebook cell makes."""
    return _make_images(session8)


def _status(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("STATUS ")]
    assert lines, output[-3000:]
    return json.loads(lines[-1][len("STATUS "):])


def test_two_processes_make_the_images_of_one(request, compiled, tmp_path):
    """Two processes of 4 devices form one 8-device mesh; the rows each process's devices hold are
    the images this process's 8 devices make, pixel for pixel, and every image is made once."""
    with Workers(tmp_path) as workers:
        procs = workers.start("images", 2, 4, MULTIHOST_TEST_CACHE=compiled)
        reference = request.getfixturevalue("reference")  # meanwhile, here: one process of 8 devices
        codes = workers.wait(procs, 240)
        outputs = [workers.output(p) for p in procs]
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    for i, output in enumerate(outputs):
        status = _status(output)
        assert status["devices"] == 8 and status["local"] == 4 and status["processes"] == 2
        assert status["index"] == i and status["main"] == (i == 0)
        # process 0's value, as JSON gives it back, on both; everyone's part, in process order
        assert status["agreed"] == {"from": 0, "list": [3, 1, 2]}
        assert status["gathered"] == [0, 10]
        assert status["fallback"] == ["from 0", ["é", "éé"]]
    parts = [dict(np.load(tmp_path / f"rows-2-{i}.npz")) for i in range(2)]
    assert parts[0] and parts[1], "each process holds some of the images"
    assert not set(parts[0]) & set(parts[1]), "an image was made on both processes"
    made = {int(k): v for part in parts for k, v in part.items()}
    assert sorted(made) == sorted(reference) == list(range(10))
    for position, image in reference.items():
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(made[position], image, err_msg=f"image {position}")
    assert len({made[i].tobytes() for i in made}) == 10, "the images differ from each other"


def test_a_killed_process_stops_the_other_with_one_line(compiled, tmp_path):
    """SIGKILL process 1 mid-run: process 0 (which keeps computing: the generate calls have no
    collectives) ends within PEER_TIMEOUT and a little, with one clear line and status 75."""
    with Workers(tmp_path) as workers:
        first, second = workers.start("loop", 2, 4, MULTIHOST_TEST_CACHE=compiled)
        deadline = time.monotonic() + 180
        while "ROUND 0" not in workers.output(second):
            assert second.poll() is None and first.poll() is None, workers.output(first)[-2000:] + workers.output(second)[-2000:]
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        os.kill(second.pid, signal.SIGKILL)
        killed = time.monotonic()
        (code,) = workers.wait([first], 60)
        took = time.monotonic() - killed
        output = workers.output(first)
    assert code == 75, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("worker: error:")]
    assert len(errors) == 1 and "process 1 of 2 has not been heard from" in errors[0], output[-3000:]
    assert "Terminating process" not in output  # JAX's own abort did not come first
    print(f"process 0 stopped {took:.1f} s after process 1 was killed")


def test_a_peer_that_exited_is_not_waited_for(tmp_path):
    """Process 1 exits (cleanly) without sending its part: process 0's gather raises at once
    instead of waiting hours for it, and both processes end."""
    with Workers(tmp_path) as workers:
        procs = workers.start("exit-early", 2, 1)
        codes = workers.wait(procs, 60)
        output = workers.output(procs[0])
    assert codes == [2, 3], output[-3000:]
    assert "process 1 of 2 ended (see its output) before sending its part (gather)" in output
    assert "has not been heard from" not in output


def test_a_process_that_dies_while_the_other_ends_stops_it_with_one_line(tmp_path):
    """Process 0 is done and waits in JAX's shutdown barrier when process 1 dies: the watchdog,
    still watching there, ends it with one line and status 75, before JAX's own abort."""
    with Workers(tmp_path) as workers:
        procs = workers.start("die-at-the-end", 2, 1)
        codes = workers.wait(procs, 60)
        output = workers.output(procs[0])
    assert codes == [75, -signal.SIGKILL], output[-3000:]
    assert [line for line in output.splitlines() if "error:" in line] == [
        "worker: error: process 1 of 2 has not been heard from for 4 s: it has stopped or hangs (see its output);"
        " stopping here too. Run the same command again on every host to go on"], output[-3000:]


def test_a_process_that_abandons_stops_the_others(tmp_path):
    """`abandon` (an error of its own) on a worker or on process 0: the other process stops at once
    with one line and status 75; the one that failed exits with its own status (process 0 after the
    others are out, since they would lose their coordinator)."""
    with Workers(tmp_path) as workers:
        pairs = [workers.start("abandon-1", 2, 1), workers.start("abandon-0", 2, 1)]
        results = [(workers.wait(procs, 60), [workers.output(p) for p in procs]) for procs in pairs]
    for failed, (codes, outputs) in zip((1, 0), results):
        other = 1 - failed
        assert codes[failed] == 5 and codes[other] == 75, "\n".join(o[-2000:] for o in outputs)
        lines = [line for line in outputs[other].splitlines() if line.startswith("worker: error:")]
        assert lines == [f"worker: error: process {failed} of 2 stopped with an error (see its output); stopping"
                         " here too. Run the same command again on every host to go on"], outputs[other][-2000:]
        assert "Terminating process" not in outputs[0] + outputs[1]  # no JAX abort on either


def test_a_process_alone_gives_up_joining_with_one_line(tmp_path):
    """The other process never comes: one line, status 75, before JAX's own abort."""
    with Workers(tmp_path) as workers:
        (alone,) = workers.start("join-alone", 2, 1, ids=[1])
        (code,) = workers.wait([alone], 60)
        output = workers.output(alone)
    assert code == 75, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("sdmagic: error:")]
    assert len(lines) == 1 and "process 1 of 2 could not join the coordinator 127.0.0.1:" in lines[0], output[-3000:]
    assert "within 3 s" in lines[0]


# ---------------------------------------------------------------------------- one process


def test_flags_are_checked_before_anything_joins():
    from sdmagic import multihost
    from sdmagic.errors import SDMagicError, magic_style

    assert multihost.initialize(None, None, None) is False  # one process, no cluster: nothing to do
    assert multihost.initialize("127.0.0.1:1234", 1, 0) is False  # one of one: nothing to join
    with magic_style(), pytest.raises(SDMagicError, match="--coordinator, --num-processes, --process-id go together"):
        multihost.initialize("127.0.0.1:1234", 2, None)
    with magic_style(), pytest.raises(SDMagicError, match="--coordinator must be HOST:PORT"):
        multihost.initialize("127.0.0.1", 2, 0)
    with pytest.raises(SDMagicError, match="port 1 to 65535"):
        multihost.initialize("host:70000", 2, 0)
    with pytest.raises(SDMagicError, match="process_id must be from 0 to 1, got 2"):
        multihost.initialize("[::1]:1234", 2, 2)
    with pytest.raises(SDMagicError, match="num_processes must be a whole number"):
        multihost.initialize("h:1", "2", 0)
    # timeouts are checked before joining too (nothing listens on port 1)
    with pytest.raises(SDMagicError, match="peer_timeout must be from 1 to 86400 seconds, got 0"):
        multihost.initialize("127.0.0.1:1", 2, 0, peer_timeout=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDMAGIC_INIT_TIMEOUT", "soon")
        with pytest.raises(SDMagicError, match=r"\$SDMAGIC_INIT_TIMEOUT must be a number of seconds, got 'soon'"):
            multihost.initialize("127.0.0.1:1", 2, 0)
    import jax

    jax.devices()  # JAX is in use here: too late to join
    with pytest.raises(SDMagicError, match="must be joined before anything else uses JAX"):
        multihost.initialize("127.0.0.1:1", 2, 0)
    assert multihost.process_count() == 1 and multihost.process_index() == 0 and multihost.is_main()
    assert multihost.agree([1, 2]) == [1, 2] and multihost.gather("x") == ["x"]


def test_local_rows_on_one_process():
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from sdmagic import multihost

    mesh = Mesh(np.array(jax.devices()), ("data",))
    values = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    sharded = jax.device_put(values, NamedSharding(mesh, PartitionSpec("data")))
    replicated = jax.device_put(values, NamedSharding(mesh, PartitionSpec()))
    for array in (sharded, replicated, values):
        rows = multihost.local_rows(array)
        assert [r for r, _ in rows] == list(range(8))  # each row once, in order
        np.testing.assert_array_equal(np.stack([v for _, v in rows]), values)


def test_text_travels_through_collectives_without_jax_client():
    """The fallback for a JAX whose client moved: sizes round up to few shapes."""
    from sdmagic import multihost

    assert multihost._bucket(0) == multihost._bucket(64) == 64
    assert multihost._bucket(65) == 128 and multihost._bucket(1000) == 1024
    assert multihost._broadcast_text('{"a": [1, 2]}') == '{"a": [1, 2]}'
    assert multihost._allgather_text("héllo") == ["héllo"]


# ---------------------------------------------------------------------------- `sdmagic run` on two processes


def _has_cli() -> bool:
    try:
        from sdmagic import cli
    except ImportError:
        return False
    return callable(getattr(cli, "main", None))


needs_cli = pytest.mark.skipif(not _has_cli(), reason="`sdmagic run` (sdmagic/cli.py main) is not there yet")
RUN_OPTIONS = ["--model", "tiny", "--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE),
               "--seed", str(SEED), "--quiet"]


def _start_run(workers: Workers, prompts: Path, out: Path, processes: int, devices: int, cache: Path,
               extra=()) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for i in range(processes):
        hosts = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)]
        log = open(workers.tmp / f"run-{out.name}-{len(workers.procs)}-{i}.log", "w+")
        proc = subprocess.Popen(
            [sys.executable, "-m", "sdmagic", "run", str(prompts), "--out", str(out), "--cache-dir", str(cache),
             *RUN_OPTIONS, *extra, *(hosts if processes > 1 else [])],
            cwd=ROOT, env=_env(devices), stdout=log, stderr=subprocess.STDOUT,
        )
        proc.log = log
        procs.append(proc)
    workers.procs += procs
    return procs


def _run(workers, prompts, out, processes, devices, cache, extra=(), timeout=180) -> list[str]:
    procs = _start_run(workers, prompts, out, processes, devices, cache, extra)
    codes = workers.wait(procs, timeout)
    outputs = [workers.output(p) for p in procs]
    assert codes == [0] * processes, "\n".join(o[-3000:] for o in outputs)
    return outputs


def _manifest_lines(out: Path) -> list[dict]:
    """Every complete line of every process's manifest."""
    lines = []
    for path in sorted(out.glob("manifest*.jsonl")):
        for text in path.read_text().splitlines():
            try:
                lines.append(json.loads(text))
            except ValueError:  # a line cut by a kill
                pass
    return lines


def _check_folder(out: Path, images: int) -> dict[int, dict]:
    """Every image exactly once: per index the latest run's line; each file intact and recorded,
    and no PNG in the folder that no line records."""
    import hashlib

    latest: dict[int, dict] = {}
    for line in _manifest_lines(out):
        index = line["index"]
        if index in latest and latest[index]["run"] == line["run"]:
            raise AssertionError(f"image {index} recorded twice in run {line['run']}")
        if index not in latest or line["run"] > latest[index]["run"]:
            latest[index] = line
    assert sorted(latest) == list(range(images))
    for line in latest.values():
        data = (out / line["file"]).read_bytes()
        assert len(data) == line["bytes"] and hashlib.sha256(data).hexdigest() == line["sha256"], line["file"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(line["file"] for line in latest.values())
    return latest


@needs_cli
def test_sdmagic_run_on_two_processes(reference, compiled, tmp_path):
    """The command on two processes of 4 devices: the PNGs hold the pixels one process of 8 makes,
    each image once in one consistent manifest; running it again writes nothing."""
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# ten prompts, one with options of its own\n" + PROMPTS + "\n")
    out = tmp_path / "two"
    with Workers(tmp_path) as workers:
        outputs = _run(workers, prompts, out, 2, 4, compiled)
        assert "10 images made, 0 already there" in outputs[0] and "2 processes" in outputs[0]
        latest = _check_folder(out, 10)
        assert len(_manifest_lines(out)) == 10
        for index, line in latest.items():
            pixels = np.asarray(Image.open(out / line["file"]).convert("RGB"))
            np.testing.assert_array_equal(pixels, reference[index], err_msg=line["file"])
        assert latest[6]["seed"] == 99 and latest[6]["guidance"] == 5  # the line's own options
        before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()}
        outputs = _run(workers, prompts, out, 2, 4, compiled)
        assert "0 images made, 10 already there" in outputs[0]
        after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()}
        pictures = {name: v for name, v in after.items() if name.endswith((".png", ".jsonl"))}
        assert pictures == {name: v for name, v in before.items() if name.endswith((".png", ".jsonl"))}


@needs_cli
def test_sdmagic_run_with_a_killed_process_resumes(compiled, tmp_path):
    """SIGKILL process 1 once it has written an image: process 0 stops with one line (status 75)
    within a bounded time; the same command again completes every image exactly once."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS + "\n")
    out = tmp_path / "killed"
    images = 60  # --n 6: 8 calls of 8
    with Workers(tmp_path) as workers:
        first, second = _start_run(workers, prompts, out, 2, 4, compiled, ["--n", "6"])
        deadline = time.monotonic() + 180
        while not ((out / "manifest-1.jsonl").exists() and (out / "manifest-1.jsonl").read_text().strip()):
            assert first.poll() is None and second.poll() is None, workers.output(first)[-3000:] + workers.output(second)[-3000:]
            assert time.monotonic() < deadline, "process 1 wrote nothing"
            time.sleep(0.05)
        os.kill(second.pid, signal.SIGKILL)
        killed = time.monotonic()
        (code,) = workers.wait([first], 60)
        took = time.monotonic() - killed
        output = workers.output(first)
        assert code == 75, output[-3000:]
        errors = [line for line in output.splitlines() if "error:" in line]
        assert len(errors) == 1 and "process 1 of 2 has not been heard from" in errors[0], output[-3000:]
        assert "Terminating process" not in output
        made_before = {line["index"] for line in _manifest_lines(out)}
        assert 0 < len(made_before) < images, "killed midway"
        outputs = _run(workers, prompts, out, 2, 4, compiled, ["--n", "6"])
        assert f"{images - len(made_before)} images made, {len(made_before)} already there" in outputs[0], outputs[0][-2000:]
        _check_folder(out, images)
    print(f"process 0 stopped {took:.1f} s after process 1 was killed; {len(made_before)} of {images} images were made")


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
