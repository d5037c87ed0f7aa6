"""Benchmark-script runs in the background while the rest of the suite runs.

Each script test starts a separate Python process (importing torch alone takes seconds) and waits for it.
The tests marked ``@pytest.mark.background(key)`` declare their runs in their module's ``BACKGROUND``
dict; when the session's tests are collected, ``conftest.py`` hands the selected ones to :func:`start`,
and one worker thread runs them one after another, at the lowest scheduling priority, while the other
tests run. A test takes its result with :func:`result`, which waits for it (and runs it there and then
if it was not started: a test run by node id without collection of the marker, say). The environment and the working folder are taken when the
run is queued, so a test's monkeypatched variables never reach another test's process.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_runs: dict = {}
_lock = threading.Lock()


def _lowest_priority():
    """In the child: the lowest scheduling priority, so a run takes only the CPU time the tests leave
    idle (the tests' own multi-threaded kernels keep both cores when they want them)."""
    os.nice(19)


def _execute(runs, out: str, env: dict, cwd: str):
    done = []
    for argv, options in runs:
        argv = [out if a == "{out}" else a for a in argv]
        done.append(subprocess.run([sys.executable, *argv], cwd=cwd, env=options.get("env", env), capture_output=True,
                                   text=True, timeout=options.get("timeout", 300), preexec_fn=_lowest_priority))
    return done


def start(key: str, runs) -> None:
    """Queue ``runs`` (a list of ``(argv, options)``: the script and its arguments, ``"{out}"`` standing
    for a fresh output folder; options ``env`` (the whole environment, else this process's as it is now) and
    ``timeout``) under ``key``, once."""
    global _pool
    with _lock:
        if key in _runs:
            return
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="script-runs")
        out = tempfile.mkdtemp(prefix=f"scnet-fused-{key}-")
        atexit.register(shutil.rmtree, out, True)
        _runs[key] = (_pool.submit(_execute, runs, out, dict(os.environ), os.getcwd()), pathlib.Path(out))


def result(key: str, runs):
    """``(completed processes, output folder)`` of ``key``'s runs, waiting for them (queued here if they
    were not)."""
    start(key, runs)
    future, out = _runs[key]
    return future.result(), out


def stop() -> None:
    """Drop the runs no test has started to wait for (the session is over)."""
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
