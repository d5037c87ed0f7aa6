"""Benchmark-script runs in the background while the rest of the suite runs.

Each script test starts a separate Python process (importing torch alone takes seconds) and waits for it.
The tests marked ``@pytest.mark.background(key)`` declare their runs in their module's ``BACKGROUND``
dict; when the session's tests are collected, ``conftest.py`` hands the selected ones to :func:`start`,
and one worker thread runs them one after another, at the lowest scheduling priority (``nice -n 19``),
while the other tests run: those take the CPU whenever they want it. A test takes its result with
:func:`result`, which waits for it (and runs it there and then if it was not started: a test run by node
id without collection of the marker, say). The time limits count from when a test starts waiting, when
the runs have the CPU to themselves. The environment and the working folder are taken when the run is
queued, so a test's monkeypatched variables never reach another test's process. At the session's end
:func:`stop` drops the runs not started and kills the one running.
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
_running: list = []  # the process the worker waits on, if any
_stopped = False
_NICE = [shutil.which("nice"), "-n", "19"] if shutil.which("nice") else []


def _execute(runs, out: str, env: dict, cwd: str):
    done = []
    for argv, options in runs:
        argv = [out if a == "{out}" else a for a in argv]
        with _lock:
            if _stopped:
                raise RuntimeError("the session ended before this run")
            proc = subprocess.Popen([*_NICE, sys.executable, *argv], cwd=cwd, env=options.get("env", env),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _running.append(proc)
        try:
            stdout, stderr = proc.communicate()
        finally:
            with _lock:
                _running.remove(proc)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


def start(key: str, runs) -> None:
    """Queue ``runs`` (a list of ``(argv, options)``: the script and its arguments, ``"{out}"`` standing
    for a fresh output folder; options ``env`` (the whole environment, else this process's as it is now) and
    ``timeout`` in seconds, default 300) under ``key``, once."""
    global _pool
    with _lock:
        if key in _runs:
            return
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="script-runs")
        out = tempfile.mkdtemp(prefix=f"scnet-fused-{key}-")
        atexit.register(shutil.rmtree, out, True)
        future = _pool.submit(_execute, runs, out, dict(os.environ), os.getcwd())
        _runs[key] = (future, pathlib.Path(out), sum(options.get("timeout", 300) for _, options in runs))


def result(key: str, runs):
    """``(completed processes, output folder)`` of ``key``'s runs, waiting for them (queued here if they
    were not) at most their time limits, and those of the runs not yet done, from now; past them the
    running process is killed and this raises."""
    start(key, runs)
    future, out, _ = _runs[key]
    with _lock:  # this run's limit and those of the runs queued before it and not yet done
        limit = 0
        for other, (f, _, own) in _runs.items():  # in the order queued
            if not f.done():
                limit += own
            if other == key:
                break
    try:
        return future.result(timeout=limit), out
    except concurrent.futures.TimeoutError:
        with _lock:
            for proc in _running:
                proc.kill()
        raise AssertionError(f"the script runs of {key!r} took more than {limit} s") from None


def stop() -> None:
    """The session is over: drop the runs not started, kill the one running."""
    global _stopped
    with _lock:
        _stopped = True
        for proc in _running:
            proc.kill()
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
