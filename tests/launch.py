"""torchrun for tests: every process it starts ends with the call, whatever happens.

torchrun starts each worker in a session of its own, so killing the launcher (as a plain
``subprocess.run(timeout=...)`` does) leaves the workers running, orphaned. Here every process of the
launch carries a marker in its environment, and on a timeout, or when the call ends for any other
reason, every process that still carries it is killed (on a timeout after printing its stacks).
"""
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Optional, Sequence

import psutil

MARKER = "TMT_PYG_TEST_LAUNCH"


def marked(token: str) -> list:
    """Live processes whose environment carries ``MARKER=token``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == token:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def describe(proc: psutil.Process) -> str:
    try:
        return f"  pid {proc.pid} ({proc.status()}, parent {proc.ppid()}, RANK={proc.environ().get('RANK', '-')}): " \
               f"{' '.join(proc.cmdline())[:120]}"
    except psutil.Error:
        return f"  pid {proc.pid} (gone)"


def dump_stacks(token: str) -> None:
    """Ask every process of the launch for its threads' Python stacks (``tmt-pyg train`` prints them to
    its stderr on SIGUSR1, see ``faulthandler`` in the CLI) before it is killed."""
    for proc in marked(token):
        try:
            proc.send_signal(signal.SIGUSR1)
        except psutil.NoSuchProcess:
            pass
    time.sleep(2)


def kill_marked(token: str) -> int:
    """SIGKILL every process of the launch ``token``; returns how many were alive."""
    procs = marked(token)
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    return len(procs)


def torchrun(args: Sequence[str], timeout: float, nproc: int = 2, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node nproc *args``, output captured.

    Raises ``TimeoutError`` (with the output so far) when it runs past ``timeout`` seconds; no process
    of the launch outlives the call.
    """
    token = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}), MARKER: token}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        alive = "\n".join(describe(p) for p in marked(token))
        dump_stacks(token)
        kill_marked(token)
        out, err = proc.communicate()
        raise TimeoutError(f"torchrun {' '.join(args)} still running after {timeout:.0f} s; killed:\n{alive}\n"
                           f"--- stdout\n{out[-2000:]}\n--- stderr\n{err[-4000:]}") from None
    finally:
        kill_marked(token)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
