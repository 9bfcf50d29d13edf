"""Give back the calling thread's idle OpenMP workers before another thread runs the steps.

libgomp (torch's OpenMP on Linux) keeps a pool of worker threads for every thread that has started a
parallel region, for the life of that thread. Once the process holds more of these threads than it has
CPUs, libgomp stops spinning between regions and every region wakes its workers through the kernel.
AsyncEngine steps on a thread of its own, so a caller that ran one parallel torch op first (a matmul
on the main thread, a sync LLM run) left a second pool behind and made every step pay that: on a
2-core Xeon with 2 threads, a batch-1 step of the tiny model in benchmarks/step_overhead.py took 2.39
instead of 1.19 ms, a small parallel add 155 instead of 43 us. Freeing the caller's pool
(omp_pause_resource_all, OpenMP 5.0) brings the steps back; the caller gets a new pool the next time
it runs a parallel op itself.
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: threads go, the runtime's settings stay


def release_thread_pool() -> bool:
    """Free the calling thread's libgomp worker threads. True if libgomp took the request; False where the
    process does not run libgomp (another OpenMP runtime, whose pause would act on every thread, or none)
    or libgomp refused (called inside a parallel region)."""
    try:  # only a libgomp already in the process (torch's): never load one
        libgomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
        pause = libgomp.omp_pause_resource_all
    except (OSError, AttributeError):
        return False
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    refused = pause(OMP_PAUSE_SOFT)
    if refused:
        log.debug("libgomp kept this thread's pool (omp_pause_resource_all returned %d)", refused)
    return refused == 0
