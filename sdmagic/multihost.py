"""Many processes, one mesh: sdmagic on JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same program: `initialize` joins them (before any other use of JAX), the
session's mesh then spans every process's devices, each process starts the same calls, and reads
back only the rows its own devices hold (`local_rows`; pixels never cross hosts). Small host values
travel through the coordination service JAX already runs for `jax.distributed` (a key-value store on
process 0): `agree` (process 0's value to all) and `gather` (every process's value to all).

    multihost.initialize("10.0.0.1:8476", 2, 0)   # process 1 passes 1; all before other JAX use
    multihost.initialize(None, None, None)       # Cloud TPU pod, SLURM, Open MPI: JAX finds them;
                                                 # elsewhere a single process: nothing to do
    todo = multihost.agree(todo)                 # process 0's list, on every process
    for row, pixels in multihost.local_rows(images): ...

On the CPU the processes' collectives use gloo (`jax_cpu_collectives_implementation`), which is how
the tests run two processes of 4 simulated devices as one 8-device mesh on 127.0.0.1.

Dead peers, measured (jax 0.10.2 and 0.12.0.1 alike; two CPU processes on one host, gloo, SIGKILL):
- JAX by itself never hangs for ever, but its own ending is an abort: the coordination service on
  process 0 notices a silent process `heartbeat_timeout_seconds` after its last heartbeat (JAX's
  default 100 s; 7-10 s after the kill with 10 s) and tells every process, whose JAX client then
  aborts it (SIGABRT, status 134) with "Terminating process because the JAX distributed service
  detected fatal errors. This most likely indicates that another task died" and a C++ stack trace.
  When process 0 itself dies, the others abort that way within 0.1-0.5 s (their error poll to the
  service breaks). A gloo collective in flight fails at once with a JaxRuntimeError ("Connection
  closed by peer") while the peer's host is up (its kernel closes the sockets), and at exit JAX's
  shutdown barrier then waits for the dead process until the heartbeat timeout and aborts as above.
  A process that cannot reach the others within `initialization_timeout` aborts the same way.
  The compiled generate calls have no collectives (each device makes its own images; checked in
  the HLO), so a survivor keeps computing and writing until one of the above stops it.
- What sdmagic adds: a watchdog thread per process posts a beat to the coordination service's
  key-value store every `peer_timeout / 6` s (0.5 to 5 s) and reads everyone's. A process silent
  for `peer_timeout` (default 60 s, `$SDMAGIC_PEER_TIMEOUT`) makes the others print ONE line, e.g.
  "sdmagic run: error: process 1 of 2 has not been heard from for 60 s: it has stopped or hangs (see
  its output); stopping here too. Run the same command again on every host to go on", and exit with
  status 75 (EX_TEMPFAIL), skipping JAX's exit handler (its shutdown barrier would wait for the dead
  one). Measured: 4.1-5.0 s after the SIGKILL with peer_timeout 4, mid-run, no JAX abort. JAX's
  heartbeat timeout is set to peer_timeout + max(10, peer_timeout / 2), so for a dead worker the
  watchdog speaks first. When process 0 (which hosts the service) dies, JAX's abort (0.5 s) comes
  before the watchdog's line: then JAX's "Terminating process ... another task died" is the message.
- `abandon(status)`: a process ending because of an error of its own tells the others, which stop
  at once with one line each ("process 1 of 2 stopped with an error (see its output)"). Without it
  the others run on alone to the end of their own work (or to their next `agree`/`gather`, which
  raises), while the failed one waits in JAX's shutdown barrier (bounded by JAX's
  shutdown_timeout_seconds, 300 s by default; not measured here). Process 0 always leaves last
  (bounded wait), since the others lose their coordinator when it ends.
- A process that ends normally posts that it did, so that its silence alarms nobody, and stops its
  watchdog (from then on JAX's shutdown barrier waits for the others, as above). `agree` and
  `gather` wait for a peer's value in slices and raise SDMagicError at once if that peer has ended.
- Joining has a timer too: a process that cannot join all `num_processes` within `init_timeout`
  (default 300 s, `$SDMAGIC_INIT_TIMEOUT`) says so in one line and exits (75) just before JAX aborts.
A process killed in the middle of writing a file leaves it partial; the runner's manifest (size and
hash) makes it again on the next run.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import sys
import threading
import time
from typing import Any

import numpy as np

from .errors import SDMagicError, example, option

# EX_TEMPFAIL: the run can go on (the same command resumes it) once every process runs again.
EXIT_PEER_LOST = 75
DEFAULT_PEER_TIMEOUT = 60.0  # seconds a process may be silent before the others stop
DEFAULT_INIT_TIMEOUT = 300  # seconds for every process to join (JAX's own default)
# How long `agree`/`gather` wait for a value from a live process: process 0 may be compiling for
# many minutes while the others loaded the same code from disk; a dead one is the watchdog's job.
DEFAULT_VALUE_TIMEOUT = 3 * 3600.0
MAX_VALUE_BYTES = 2**20  # gRPC's default message limit, which the coordination service uses, is 4 MiB
_PREFIX = "sdmagic"
_WAIT_SLICE_MS = 2000

_state: "_State | None" = None
_state_lock = threading.Lock()


class _State:
    """What `initialize` set up in this process: the JAX client, the watchdog and the counters that
    give each `agree`/`gather` its key (every process makes the same calls in the same order)."""

    def __init__(self, client: Any, index: int, count: int, label: str, peer_timeout: float):
        self.client = client
        self.index = index
        self.count = count
        self.label = label
        self.peer_timeout = peer_timeout
        self.agreed = 0
        self.gathered = 0
        self.watchdog: _Watchdog | None = None


# ---------------------------------------------------------------------------- who am I


def process_index() -> int:
    """This process's index among all (0 on a single process)."""
    import jax

    return jax.process_index()


def process_count() -> int:
    """How many processes run this program (1 without `initialize`)."""
    import jax

    return jax.process_count()


def is_main() -> bool:
    """Whether this is process 0: the one that decides, logs and shows progress."""
    return process_index() == 0


# ---------------------------------------------------------------------------- joining


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise SDMagicError(f"${name} must be a number of seconds, got {text!r}: e.g. {name}={default:g}") from None
    if not (math.isfinite(value) and 1 <= value <= 86400):
        raise SDMagicError(f"${name} must be from 1 to 86400 seconds, got {text!r}: e.g. {name}={default:g}")
    return value


def _seconds(keyword: str, value: Any, variable: str, default: float) -> float:
    """A timeout: given, else from `$variable`, else `default`; 1 s to a day."""
    if value is None:
        return _env_seconds(variable, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and 1 <= value <= 86400):
        raise SDMagicError(f"{option(keyword)} must be from 1 to 86400 seconds, got {value!r}: e.g. {example(keyword, default)}")
    return float(value)


def _check_coordinator(coordinator: Any) -> str:
    """HOST:PORT ([v6 address]:PORT too), as every process must give it."""
    hint = f"give the first host's address and a free port, e.g. {example('coordinator', '10.0.0.1:8476')}"
    if not isinstance(coordinator, str) or not coordinator.strip():
        raise SDMagicError(f"{option('coordinator')} must be HOST:PORT: {hint}")
    text = coordinator.strip()
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})", text)
    if not match or not 1 <= int(match.group(2)) <= 65535:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise SDMagicError(f"{option('coordinator')} must be HOST:PORT (port 1 to 65535), got {shown!r}: {hint}")
    return text


def _check_count(keyword: str, value: Any, minimum: int, maximum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SDMagicError(f"{option(keyword)} must be a whole number, got {value!r}: {hint}")
    if not minimum <= int(value) <= maximum:
        raise SDMagicError(f"{option(keyword)} must be from {minimum} to {maximum}, got {int(value)}: {hint}")
    return int(value)


def _detected_cluster() -> str | None:
    """The multi-process cluster `jax.distributed.initialize()` would find by itself (a Cloud TPU
    pod slice, SLURM with several tasks, Open MPI, ...), or None. Uses JAX's own list of cluster
    kinds (not public API; if it moves, no flags means a single process and the flags still work)."""
    try:
        from jax._src.clusters import ClusterEnv
    except Exception:  # noqa: BLE001 - a JAX without it: nothing detected
        return None
    import importlib.util

    for env in list(getattr(ClusterEnv, "_cluster_types", ())):
        if getattr(env, "opt_in_only_method", False):
            continue  # e.g. mpi4py: JAX only uses it when asked by name
        if "k8s" in env.__name__.lower() and importlib.util.find_spec("kubernetes") is None:
            continue  # JAX would only warn that the package is missing
        try:
            if env.is_env_present() and int(env.get_process_count()) > 1:
                return env.__name__
        except Exception:  # noqa: BLE001 - a half-configured environment is not a cluster
            continue
    return None


def _client() -> Any:
    """JAX's distributed-runtime client (its coordination-service key-value store), or None."""
    try:
        from jax._src.distributed import global_state
    except Exception:  # noqa: BLE001
        return None
    return getattr(global_state, "client", None)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    init_timeout: float | None = None,
    peer_timeout: float | None = None,
    label: str = "sdmagic",
) -> bool:
    """Join this process to the others; returns whether the run has several processes.

    Must come before any other use of JAX in the process. All three of `coordinator` (HOST:PORT of
    process 0, the same on every process), `num_processes` and `process_id` (0 .. n-1), or none: then
    on a Cloud TPU pod slice, SLURM or Open MPI `jax.distributed.initialize()` finds them itself,
    and anywhere else it is a single process and nothing happens. `init_timeout` (default 300 s or
    `$SDMAGIC_INIT_TIMEOUT`): how long to wait for every process to join. `peer_timeout` (default
    60 s or `$SDMAGIC_PEER_TIMEOUT`): how long a process may be silent before the others stop (see
    the module docstring). `label` starts the one-line messages (e.g. "sdmagic run").
    Calling it again, or after the caller ran `jax.distributed.initialize` itself, only starts the
    watchdog (once).
    """
    import jax

    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    missing = [name for name, value in given.items() if value is None]
    cluster = None
    if len(missing) == 3:
        if jax.distributed.is_initialized():
            return _start(label, peer_timeout)
        cluster = _detected_cluster()
        if cluster is None:
            return False  # one process: nothing to join
    elif missing:
        together = ", ".join(option(name) for name in given)
        raise SDMagicError(
            f"{together} go together: give all three on every process (or none on a Cloud TPU pod or"
            f" under SLURM, where JAX finds them), e.g. {example('coordinator', '10.0.0.1:8476')}"
            f" {example('num_processes', 2)} {example('process_id', 0)}"
        )
    else:
        coordinator = _check_coordinator(coordinator)
        num_processes = _check_count("num_processes", num_processes, 1, 65536,
                                     f"the number of processes, e.g. {example('num_processes', 2)}")
        process_id = _check_count("process_id", process_id, 0, num_processes - 1,
                                  f"0 on the first process, 1 on the second, ... ({num_processes} in all)")
        if num_processes == 1:
            return False
    init_seconds = _seconds("init_timeout", init_timeout, "SDMAGIC_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT)
    peer_seconds = _seconds("peer_timeout", peer_timeout, "SDMAGIC_PEER_TIMEOUT", DEFAULT_PEER_TIMEOUT)
    if jax.distributed.is_initialized():
        return _start(label, peer_seconds)

    # gloo is what lets CPU processes run collectives together (JAX 0.10+ default to it already;
    # an implementation the user chose, e.g. mpi, is kept). On GPU and TPU it only concerns JAX's
    # secondary CPU backend.
    if not getattr(jax.config, "jax_cpu_collectives_implementation", "gloo"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = f"the coordinator {coordinator}" if coordinator else f"the other processes ({cluster})"
    who = f"process {process_id} of {num_processes}" if process_id is not None else "this process"
    # JAX aborts (SIGABRT and a stack trace) when the join times out; say it in one line just before.
    timer = threading.Timer(
        max(1.0, init_seconds - 1.0), _die,
        (label, f"{who} could not join {where} within {init_seconds:.0f} s: start every process with the same"
                f" {option('coordinator')} and {option('num_processes')}, each with its own {option('process_id')}"
                f" (process 0 first reachable at that address), or set $SDMAGIC_INIT_TIMEOUT for a slower start"),
    )
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(
            coordinator, num_processes, process_id,
            initialization_timeout=int(math.ceil(init_seconds)),
            heartbeat_timeout_seconds=int(math.ceil(peer_seconds + max(10.0, peer_seconds / 2))),
        )
    except RuntimeError as err:
        if "before any JAX" in str(err) or "must be called before" in str(err):
            raise SDMagicError(
                "the processes must be joined before anything else uses JAX: call"
                " sdmagic.multihost.initialize first (in a notebook: restart the kernel)"
            ) from None
        raise
    finally:
        timer.cancel()
    return _start(label, peer_seconds)


def _start(label: str, peer_timeout: float | None) -> bool:
    """Remember the client and start the watchdog, once. Returns whether there are several processes."""
    global _state
    import jax

    with _state_lock:
        if _state is not None:
            return _state.count > 1
        seconds = _seconds("peer_timeout", peer_timeout, "SDMAGIC_PEER_TIMEOUT", DEFAULT_PEER_TIMEOUT)
        state = _State(_client(), jax.process_index(), jax.process_count(), label, seconds)
        if state.count > 1 and state.client is not None:
            state.watchdog = _Watchdog(state)
            state.watchdog.start()
            # Runs before JAX's own exit handler (atexit runs the last registered first; JAX's
            # comes with `import jax`): see _at_exit.
            atexit.register(_at_exit)
        _state = state
        return state.count > 1


def _at_exit() -> None:
    """At a normal exit (registered after JAX's own handler, so it runs first): say so, wait in
    JAX's shutdown barrier for the others while the watchdog still watches them (one that dies
    meanwhile stops this process with its line, instead of JAX's abort at the heartbeat timeout),
    then stop the watchdog before the interpreter shuts down."""
    state = _state
    if state is None or state.watchdog is None:
        return
    state.watchdog.leave()
    try:
        import jax

        jax.distributed.shutdown()  # JAX's handler calls it again: then it does nothing
    except Exception:  # noqa: BLE001 - an exit handler must not raise; JAX reports its own failures
        pass
    finally:
        state.watchdog.halt()


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not keep us from exiting
            pass


def _say(label: str, message: str) -> None:
    """One line on stderr (stdout flushed first, so that the line comes last)."""
    _flush()
    try:
        sys.stderr.write(f"{label}: error: {' '.join(message.split())}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass


def _die(label: str, message: str, status: int = EXIT_PEER_LOST) -> None:
    """One line and out at once, skipping exit handlers: JAX's would wait for the lost process."""
    _say(label, message)
    os._exit(status)


# A process's key holds its beat (a counter) while it runs, then one of these.
_EXITED = "exited"  # ended on purpose (normally): nobody waits for it any more
_FAILED = "failed"  # ends because of an error of its own (`abandon`): the others stop
_STOPPED = "stopped"  # ends because another process failed or died: the others stop
_OUT = (_EXITED, _FAILED, _STOPPED)
_RESUME = "Run the same command again on every host to go on"


class _Watchdog(threading.Thread):
    """Posts this process's beat to the coordination service and watches everyone else's.

    Key `sdmagic/alive/I` holds process I's beat counter while it runs, then `_EXITED`, `_FAILED`
    or `_STOPPED`. A peer whose beat stops changing for `peer_timeout`, a peer that failed or
    stopped, or a service that no longer answers (process 0 died) ends this process with one line
    and status 75 (`stop`). Process 0 hosts the service, so it leaves last: it waits (bounded) until
    the others are out, since a process whose coordinator vanishes is aborted by JAX."""

    def __init__(self, state: _State):
        super().__init__(name="sdmagic-multihost-watchdog", daemon=True)
        self.state = state
        self.period = min(5.0, max(0.5, state.peer_timeout / 6))
        self.leaving = threading.Event()
        self._halt = threading.Event()  # the thread ends (normal exit, after JAX's shutdown barrier)
        self._posting = threading.Lock()  # a beat and this process's last word never cross
        self.out: dict[int, str] = {}  # peer -> how it ended
        self._lock = threading.Lock()
        self._stopping = threading.Lock()
        self._last: dict[int, tuple[str | None, float]] = {}
        self._began = time.monotonic()

    def _key(self, index: int) -> str:
        return f"{_PREFIX}/alive/{index}"

    def _send(self, value: str) -> None:
        try:
            self.state.client.key_value_set(self._key(self.state.index), value, allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the service may already be gone (or a read reports it)
            pass

    def _post(self, value: str) -> None:
        """This process's last word: no beat can land after it (a beat over "exited" would read
        as a process that died)."""
        with self._posting:
            self.leaving.set()
            self._send(value)

    def _post_beat(self, beat: int) -> None:
        with self._posting:
            if not self.leaving.is_set():
                self._send(str(beat))

    def leave(self) -> None:
        """This process ends normally: say so and stop beating; the thread goes on watching the
        others (JAX's shutdown barrier waits for them) until `halt`."""
        with self._posting:
            self.leaving.set()
            self._send(_EXITED)

    def halt(self) -> None:
        """End the thread and wait for it (bounded). A daemon thread caught inside a C++ call by
        Python 3.12's finalization aborts the process ("FATAL: exception not rethrown", seen with
        jax 0.12), so it is stopped before that, not left to die."""
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2 * self.period + 5)

    def ended(self, index: int) -> str | None:
        """How process `index` ended (`_EXITED`, `_FAILED`, `_STOPPED`), or None while it runs."""
        with self._lock:
            return self.out.get(index)

    def _read(self) -> dict[str, str]:
        return dict(self.state.client.key_value_dir_get(f"{_PREFIX}/alive/"))

    def _silent(self, peer: int, value: str | None, now: float) -> bool:
        """Whether `peer` has not beaten for `peer_timeout` (its value did not change)."""
        previous, since = self._last.get(peer, (None, self._began))
        if value != previous:
            self._last[peer] = (value, now)
            return False
        return now - since > self.state.peer_timeout

    def stop(self, message: str) -> None:
        """End this process because another failed or died: one line, status 75. Does not return."""
        self.end(_STOPPED, EXIT_PEER_LOST, message)

    def end(self, mark: str, status: int, message: str | None = None) -> None:
        """End this process: `message` as one line, `mark` posted for the others, and on process 0
        a bounded wait until the others are out (they lose their coordinator when it ends: JAX
        aborts them). Exit handlers do not run: JAX's would wait for the lost ones. Does not return."""
        state = self.state
        with self._stopping:  # one ending only, whichever thread gets here first
            if message:
                _say(state.label, message)
            else:
                _flush()
            self._post(mark)
            if state.index == 0:
                deadline = time.monotonic() + state.peer_timeout + 2 * self.period
                while time.monotonic() < deadline:
                    try:
                        seen = self._read()
                    except Exception:  # noqa: BLE001
                        break
                    now = time.monotonic()
                    if all(seen.get(self._key(p)) in _OUT or self._silent(p, seen.get(self._key(p)), now)
                           for p in range(1, state.count)):
                        break
                    time.sleep(min(0.2, self.period))
                time.sleep(0.3)  # the last ones are between their line and their exit
            os._exit(status)

    def run(self) -> None:
        state = self.state
        beat = 0
        while not self._halt.is_set():
            beat += 1
            self._post_beat(beat)  # not once leaving
            try:
                seen = self._read()
            except Exception as err:  # noqa: BLE001 - whatever the RPC says, the service is gone
                if self.leaving.is_set():
                    return
                detail = " ".join(str(err).split())[:160]
                _die(state.label, f"process {state.index} of {state.count} lost the coordinator (process 0) ({detail}):"
                                  f" it has stopped or its host is unreachable (see its output); stopping here too. {_RESUME}")
            now = time.monotonic()
            for peer in range(state.count):
                if peer == state.index:
                    continue
                value = seen.get(self._key(peer))
                if self._halt.is_set():
                    return
                if value in _OUT:
                    with self._lock:
                        self.out[peer] = value
                    if value == _FAILED:
                        self.stop(f"process {peer} of {state.count} stopped with an error (see its output);"
                                  f" stopping here too. {_RESUME}")
                    if value == _STOPPED:
                        self.stop(f"process {peer} of {state.count} stopped the run (see its output for why);"
                                  f" stopping here too. {_RESUME}")
                elif self._silent(peer, value, now):
                    self.stop(f"process {peer} of {state.count} has not been heard from for {state.peer_timeout:.0f} s:"
                              f" it has stopped or hangs (see its output); stopping here too. {_RESUME}")
            self._halt.wait(self.period)



def abandon(status: int = 1) -> None:
    """End this process now because of an error of its own, with exit status `status`: the other
    processes are told and stop at once with one line each (instead of running on alone until JAX's
    shutdown barrier gives up on this one, minutes later, with an abort). Process 0 first waits
    (bounded by the peer timeout) until the others are out. Call it after printing your error.
    A single process: returns and does nothing. Otherwise never returns, and exit handlers do not
    run (JAX's would wait for the others)."""
    state = _state
    if state is None or state.count < 2:
        return
    if state.watchdog is None:
        _flush()
        os._exit(status)
    state.watchdog.end(_FAILED, status)


def shutdown() -> None:
    """Leave the run on purpose now, as a normal exit does: say so, wait in JAX's shutdown barrier
    until every process got there (the watchdog still watching), and stop the watchdog. Mostly for
    tests; a program that just exits gets the same."""
    global _state
    import jax

    if _state is not None and _state.watchdog is not None:
        _at_exit()
    elif jax.distributed.is_initialized():
        jax.distributed.shutdown()
    _state = None


# ---------------------------------------------------------------------------- rows


def local_rows(array: Any) -> list[tuple[int, np.ndarray]]:
    """(row, host value) for each row of `array`'s first axis that this process's devices hold,
    in row order, each row once (a replicated array gives all of them). Nothing crosses hosts.

    Waits for the array by polling, so that Ctrl-C is not held off by a blocking fetch."""
    if isinstance(array, np.ndarray):
        return list(enumerate(array))
    if getattr(array, "ndim", 0) < 1:
        raise ValueError("local_rows needs an array with a batch axis")
    while not array.is_ready():
        time.sleep(0.005)
    rows: dict[int, np.ndarray] = {}
    length = array.shape[0]
    for shard in array.addressable_shards:
        first = shard.index[0] if shard.index else slice(None)
        data = None
        for k, row in enumerate(range(*first.indices(length))):
            if row not in rows:
                if data is None:
                    data = np.asarray(shard.data)
                rows[row] = data[k]
    return sorted(rows.items(), key=lambda item: item[0])


# ---------------------------------------------------------------------------- small host values


def _encode(value: Any, what: str) -> str:
    try:
        text = json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise SDMagicError(f"{what} takes JSON values (lists, numbers, text, dicts): {err}") from None
    if len(text.encode()) > MAX_VALUE_BYTES:
        raise SDMagicError(f"{what}: the value is {len(text.encode())} bytes; at most {MAX_VALUE_BYTES} travel between processes")
    return text


def _wait_for(state: _State, key: str, peer: int, what: str, timeout: float) -> str:
    """The value at `key` that process `peer` sets; raises SDMagicError if it exited (or does not
    set it within `timeout`). A dead process is the watchdog's: it ends this one meanwhile."""
    import jax

    deadline = time.monotonic() + timeout
    while True:
        try:
            return state.client.blocking_key_value_get(key, _WAIT_SLICE_MS)
        except jax.errors.JaxRuntimeError as err:
            if "DEADLINE_EXCEEDED" not in str(err):
                raise SDMagicError(f"lost the coordinator while waiting for {what} from process {peer}"
                                   f" ({' '.join(str(err).split())[:160]})") from None
        if state.watchdog is not None and state.watchdog.ended(peer):
            try:  # it may have set the value just before it ended
                return state.client.key_value_try_get(key)
            except Exception:  # noqa: BLE001 - not there: it never will be
                pass
            raise SDMagicError(f"process {peer} of {state.count} ended (see its output) before sending {what};"
                               f" stopping here too. {_RESUME}")
        if time.monotonic() > deadline:
            raise SDMagicError(f"process {peer} of {state.count} did not send {what} within {timeout:.0f} s")


def _ready_state() -> _State | None:
    """The state of a multi-process run (started lazily if JAX was joined by someone else), or None."""
    if _state is None:
        import jax

        if jax.process_count() == 1:
            return None
        _start("sdmagic", None)
    return _state if _state is not None and _state.count > 1 else None


def agree(value: Any, *, timeout: float = DEFAULT_VALUE_TIMEOUT) -> Any:
    """Process 0's `value` on every process (what the others pass is ignored), so that all of them
    decide alike, e.g. the images still to make. A small JSON value; every process gets it as JSON
    gives it back (tuples become lists), process 0 included. Every process must make the same
    `agree` calls in the same order. A single process gets `value` back unchanged."""
    state = _ready_state()
    if state is None:
        return value
    state.agreed += 1
    key = f"{_PREFIX}/agree/{state.agreed}"
    if state.client is None:
        return json.loads(_broadcast_text(_encode(value, "agree") if state.index == 0 else ""))
    if state.index == 0:
        text = _encode(value, "agree")
        state.client.key_value_set(key, text)
        return json.loads(text)
    return json.loads(_wait_for(state, key, 0, "its decision (agree)", timeout))


def gather(value: Any, *, timeout: float = DEFAULT_VALUE_TIMEOUT) -> list:
    """Every process's `value`, in process order, on every process (e.g. the files each wrote, for
    process 0's manifest). Small JSON values, as `agree`; the same calls in the same order on every
    process. A single process gets `[value]`."""
    state = _ready_state()
    if state is None:
        return [value]
    state.gathered += 1
    n = state.gathered
    text = _encode(value, "gather")
    if state.client is None:
        return [json.loads(t) for t in _allgather_text(text)]
    state.client.key_value_set(f"{_PREFIX}/gather/{n}/{state.index}", text)
    values = []
    for peer in range(state.count):
        if peer == state.index:
            values.append(json.loads(text))
        else:
            values.append(json.loads(_wait_for(state, f"{_PREFIX}/gather/{n}/{peer}", peer, "its part (gather)", timeout)))
    if n > 2:
        # Everyone has read gather n-2 (even n-1) by now: this process has everyone's value n, and
        # each process set it only after reading all of n-1. The store stays small.
        try:
            state.client.key_value_delete(f"{_PREFIX}/gather/{n - 2}/{state.index}")
        except Exception:  # noqa: BLE001 - only housekeeping
            pass
    return values


# Without JAX's client (a JAX that moved it): the same through collectives over every device.
def _bucket(size: int) -> int:
    return 1 << max(6, (max(size, 1) - 1).bit_length())  # few distinct shapes, few compiles


def _broadcast_text(text: str) -> str:
    from jax.experimental import multihost_utils

    data = text.encode()
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buffer = np.zeros(_bucket(size), np.uint8)
    buffer[: len(data)] = np.frombuffer(data, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))[:size]).decode()


def _allgather_text(text: str) -> list[str]:
    from jax.experimental import multihost_utils

    data = text.encode()
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    buffer = np.zeros(_bucket(int(sizes.max())), np.uint8)
    buffer[: len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buffer))
    return [bytes(rows[i][: int(sizes[i])]).decode() for i in range(len(sizes))]
