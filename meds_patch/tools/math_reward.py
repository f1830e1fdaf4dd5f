"""Math answers checked by math-verify in worker processes, each answer under a hard wall-clock limit.

``examples/reward_func_math.py`` uses this. OpenRLHF runs that reward function in threads of each vLLM actor,
where math-verify's own timeouts (``signal.alarm``) cannot work, and answers such as ``9^{9^{9^{9}}}`` or
``(10^{10})!`` keep sympy busy for minutes holding the GIL, which stalls the whole actor. Here a worker that
passes the limit is killed and replaced, and its answer scores 0.

This is a module of the package, not part of the example file, because OpenRLHF loads that file by path: a
function defined there cannot be pickled by reference for a worker process, and every load would start a pool.

Environment variables:

* ``MEDS_REWARD_TIMEOUT``: seconds one answer may take, parsing label and answer and comparing them (default 5).
* ``MEDS_REWARD_WORKERS``: worker processes per process that computes rewards (default the smaller of 4 and the
  number of CPUs); the pool starts at the first call with the value set then.
"""

import atexit
import logging
import math
import multiprocessing
import os
import threading
from concurrent.futures import TimeoutError
from typing import List, Optional, Sequence, Tuple

import math_verify.grader
import math_verify.parser
from math_verify import parse, verify
from pebble import ProcessPool

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_MAX_WORKERS = 4

_pool: Optional[ProcessPool] = None
_pool_lock = threading.Lock()


def is_correct(answer: str, label: str) -> bool:
    """Whether math-verify finds ``answer`` (the content of a box) equal to ``label``; False on any error.

    Runs in a worker. math-verify's own timeouts are off: the pool's limit replaces them. Its flags silence the
    warning it would otherwise print on every call about that."""
    math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    try:
        gold = parse("\\boxed{" + label + "}", parsing_timeout=None)
        pred = parse("\\boxed{" + answer + "}", parsing_timeout=None)
        return bool(verify(gold, pred, timeout_seconds=None))
    except Exception:
        return False


def _positive_env(name: str, default: float, kind: type) -> float:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive, finite {kind.__name__}, got {text!r}")
    return value


def _running_pool(workers: int) -> ProcessPool:
    global _pool
    with _pool_lock:
        if _pool is None or not _pool.active:
            # forkserver: workers are forked from a fresh server process that has math-verify loaded, so they
            # inherit nothing of the caller's torch/vLLM/CUDA state, and replacing a killed one costs a fork
            # instead of a new interpreter importing sympy. Preloading __main__ too (multiprocessing's default)
            # imports the caller's main script once in the server rather than in every worker.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["__main__", __name__])
            _pool = ProcessPool(max_workers=workers, context=context)
            # Stopped before interpreter exit tears down the semaphores it shares with workers: a replacement
            # worker started during the teardown (e.g. just after a timeout) would print a traceback.
            atexit.register(_stop, _pool)
        return _pool


def _stop(pool: ProcessPool):
    pool.stop()
    pool.join()


def judge(answers: Sequence[Optional[str]], labels: Sequence[str]) -> Tuple[List[bool], List[bool]]:
    """Whether each answer equals its label, and whether its check was stopped at the limit.

    All answers are submitted to the pool first, then collected. An answer of None (no box) is wrong and not
    checked. The limit (``MEDS_REWARD_TIMEOUT``) counts from when a worker takes the answer up; a stopped check,
    or one whose worker died, scores False with a logged warning."""
    timeout = _positive_env("MEDS_REWARD_TIMEOUT", DEFAULT_TIMEOUT_SECONDS, float)
    # Checked at every call, used only when the pool starts: a bad value is reported wherever it is set.
    workers = _positive_env("MEDS_REWARD_WORKERS", min(DEFAULT_MAX_WORKERS, os.cpu_count() or 1), int)
    pool = _running_pool(workers)
    futures = [
        None if answer is None else pool.schedule(is_correct, (answer, str(label)), timeout=timeout)
        for answer, label in zip(answers, labels, strict=True)
    ]
    correct, timed_out = [], []
    for answer, future in zip(answers, futures):
        ok = stopped = False
        if future is not None:
            try:
                ok = future.result()
            except TimeoutError:
                stopped = True
                logger.warning("math reward: checking answer %r took over %g s; scored 0", answer[:200], timeout)
            except Exception as error:  # the worker died (e.g. out of memory) or the pool broke
                logger.warning("math reward: checking answer %r failed (%r); scored 0", answer[:200], error)
        correct.append(ok)
        timed_out.append(stopped)
    return correct, timed_out
