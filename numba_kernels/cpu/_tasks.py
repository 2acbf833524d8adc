"""Run a list of independent tasks on the calling thread plus helper threads, without waiting for a helper
that has not started.

An njit ``parallel=True`` region ends in a barrier that waits for every OpenMP thread, so on a machine whose
cores are busy with other processes a short call waits for the scheduler to wake its second thread (12-24 ms
time slices were measured, against a 0.7 ms call). Here the calling thread drains a shared atomic task
counter itself; helper threads (a small pool, ``nthreads - 1``) drain the same counter when they get a
core, and the call returns as soon as every task that was taken has finished. A helper that starts late
finds the counter exhausted and returns at once. The drain functions are serial njit code that releases
the GIL (``nogil``), so the threads really run in parallel.

``drain(counter, ntask, *args)`` must loop ``t = atomic_fetch_add(counter, 0, 1)`` while ``t < ntask``,
run task t, then ``atomic_fetch_add(counter, 1, 1)`` (the done count).
"""
import concurrent.futures
import os
import threading
import time

import numpy as np

_pool = None
_lock = threading.Lock()


def executor():
    """The helper-thread pool shared by the CPU kernels (os.cpu_count() - 1 threads, made on first use)."""
    global _pool
    with _lock:
        if _pool is None:
            from numba_kernels.cpu._blas import pin_thread  # kernel tasks call BLAS single-threaded

            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) - 1),
                                                          thread_name_prefix="nk_tasks", initializer=pin_thread)
        return _pool


def run_tasks(drain, ntask, args, nthreads=None):
    """Run tasks 0..ntask-1 through ``drain`` on this thread and up to ``nthreads - 1`` helpers
    (default: os.cpu_count()); returns when all are done. A helper's exception is re-raised here."""
    counter = np.zeros(2, dtype=np.int64)  # [next task, tasks done]
    T = min(nthreads or os.cpu_count() or 1, ntask)
    futs = [executor().submit(drain, counter, ntask, *args) for _ in range(T - 1)]
    drain(counter, ntask, *args)
    while counter[1] < ntask:  # only tasks a helper has taken are still running: wait for those
        for f in futs:
            if f.done() and f.exception() is not None:
                raise f.exception()
        time.sleep(0)
    return None
