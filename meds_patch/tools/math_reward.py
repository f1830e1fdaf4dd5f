"""Math answers checked by math-verify in worker processes, each answer under a hard wall-clock limit.

``examples/reward_func_math.py`` uses this. OpenRLHF runs that reward function in threads of each vLLM actor,
where math-verify's own timeouts (``signal.alarm``) cannot work, and answers such as ``9^{9^{9^{9}}}`` or
``(10^{10})!`` keep sympy busy for minutes holding the GIL, which stalls the whole actor. Here a worker that
passes the limit is killed and replaced, and its answer scores 0.

The workers belong to a grading process: a fresh interpreter whose main module is this module's ``_serve``, not
the caller's. Processes that multiprocessing starts import their parent's main module again (a script by its
path), so a pool started by the caller itself would re-run an unguarded script, fail under ``python -``, and
carry the caller's state; started from the grading process, every worker's process tree begins with this
package. The grading process serves ``judge`` over a ``multiprocessing.managers`` connection, keeps a pebble pool
whose workers are forked from a forkserver with math-verify loaded (a killed worker is replaced by a fork, not a
new interpreter importing sympy), and exits when the caller closes its standard input or dies. A grading process
whose workers cannot start is an error (``RuntimeError`` with its output), not answers scored 0.

This is a module of the package, not part of the example file, because OpenRLHF loads that file by path: a
function defined there cannot be pickled by reference for a worker process, and every load would start a pool.

Environment variables:

* ``MEDS_REWARD_TIMEOUT``: seconds one answer may take, parsing label and answer and comparing them (default 5).
* ``MEDS_REWARD_WORKERS``: worker processes per process that computes rewards (default the smaller of 4 and the
  number of CPUs); the pool starts at the first call with the value set then.
"""

import atexit
import collections
import json
import logging
import math
import multiprocessing
import os
import secrets
import subprocess
import sys
import threading
from concurrent.futures import TimeoutError
from multiprocessing.managers import BaseManager
from typing import List, Optional, Sequence, Tuple, Union

import math_verify.grader
import math_verify.parser
from math_verify import parse, verify
from pebble import ProcessPool

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_MAX_WORKERS = 4
# How long the grading process may take to start and grade "1 = 1" in a worker (imports sympy twice on a busy
# machine) before it counts as unable to start.
START_TIMEOUT_SECONDS = 300.0
# The grading process's main: nothing of the caller's main module runs there, nor in its workers. It forks once
# and its first process exits, so that it is not a child of the caller: Ray SIGKILLs a worker's children when the
# worker exits, before exit handlers run, which left its semaphores to the resource tracker (with a warning).
# A grandchild outlives that and stops cleanly when the caller's end of its standard input closes.
_BOOT = "import os\nif os.fork():\n    os._exit(0)\nfrom meds_patch.tools.math_reward import _serve\n_serve()"

_grading: Optional["_GradingProcess"] = None
_grading_lock = threading.Lock()
_pool: Optional[ProcessPool] = None  # in the grading process
_pool_lock = threading.Lock()

# One answer's outcome in the grading process: whether it is correct, None when stopped at the limit, or the
# repr of the error that ended its check (e.g. its worker died).
Outcome = Union[bool, None, str]


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


# --- in the grading process -------------------------------------------------------------------------------------


def _running_pool(workers: int) -> ProcessPool:
    global _pool
    with _pool_lock:
        if _pool is None or not _pool.active:
            # forkserver: workers are forked from a fresh server process that has math-verify loaded, and
            # replacing a killed one costs a fork instead of a new interpreter importing sympy. This process's
            # main module has no file, so nothing else is preloaded or imported again in the workers.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            _pool = ProcessPool(max_workers=workers, context=context)
            # Stopped before interpreter exit tears down the semaphores it shares with workers: a replacement
            # worker started during the teardown (e.g. just after a timeout) would print a traceback.
            atexit.register(_stop, _pool)
        return _pool


def _stop(pool: ProcessPool):
    pool.stop()
    pool.join()


class _Grader:
    """What the grading process serves: the outcome of each (answer, label) pair, checked in its pool."""

    def __init__(self, workers: int):
        self.workers = workers

    def check(self, pairs: Sequence[Tuple[str, str]], timeout: float) -> List[Outcome]:
        pool = _running_pool(self.workers)
        futures = [pool.schedule(is_correct, pair, timeout=timeout) for pair in pairs]
        outcomes: List[Outcome] = []
        for future in futures:
            try:
                outcomes.append(future.result())
            except TimeoutError:
                outcomes.append(None)
            except Exception as error:  # the worker died (e.g. out of memory) or the pool broke
                outcomes.append(repr(error))
        return outcomes


class _Manager(BaseManager):
    pass


_Manager.register("Grader", _Grader)


def _serve():
    """Main of the grading process. Reads its settings as one JSON line on standard input, starts the pool, grades
    1 = 1 in a worker, answers one JSON line ({"address"} or {"error"}), then serves until standard input closes."""
    settings = json.loads(sys.stdin.readline())
    # The answer goes out on the original stdout; everything else this process and its workers print, on stderr.
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    grader = _Grader(settings["workers"])
    try:
        if grader.check([("1", "1")], START_TIMEOUT_SECONDS) != [True]:
            raise RuntimeError(f"its workers could not grade 1 = 1 within {START_TIMEOUT_SECONDS:g} s")
    except Exception as error:
        answer.write(json.dumps({"error": f"its workers could not start ({error})"}) + "\n")
        answer.close()
        sys.exit(1)
    server = _Manager(authkey=bytes.fromhex(settings["authkey"])).get_server()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    answer.write(json.dumps({"address": server.address}) + "\n")
    answer.close()
    sys.stdin.buffer.read()  # until the caller closes it, or exits or dies


# --- in the caller ----------------------------------------------------------------------------------------------


class _GradingProcess:
    """The caller's handle on a started grading process; raises RuntimeError, with its output, if it cannot start."""

    def __init__(self, workers: int):
        # The caller's import path, so that the grading process finds this package where the caller did.
        path = [entry or os.getcwd() for entry in sys.path]
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(path)),
        )
        # Its stderr is copied to the caller's, and its last lines kept for the error if it cannot start.
        self.last_lines = collections.deque(maxlen=20)
        self.copier = threading.Thread(target=self._copy_stderr, daemon=True)
        self.copier.start()
        authkey = secrets.token_bytes(32)
        self.process.stdin.write(json.dumps({"authkey": authkey.hex(), "workers": workers}).encode() + b"\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline() or "{}")
        code = self.process.wait()  # the first process, gone once it forked (non-zero: the interpreter failed)
        self.broken = False  # set when a call finds the grading process gone
        if "address" not in reply:
            self.copier.join(timeout=10)
            reason = reply.get("error", f"it exited with code {code}" if code else "it exited before it was ready")
            output = "".join(self.last_lines).strip() or "(no output)"
            raise RuntimeError(f"math reward: the grading process could not start: {reason}. Its output:\n{output}")
        manager = _Manager(address=reply["address"], authkey=authkey)
        manager.connect()
        self.grader = manager.Grader(workers)

    def _copy_stderr(self):
        for line in iter(self.process.stderr.readline, b""):
            text = line.decode(errors="replace")
            self.last_lines.append(text)
            try:
                sys.stderr.write(text)
            except Exception:  # e.g. the caller's stderr closed at its exit
                pass

    def stop(self):
        self.process.stdin.close()  # the grading process stops its workers and exits


def _running_grader(workers: int) -> "_GradingProcess":
    global _grading
    with _grading_lock:
        if _grading is None or _grading.broken:
            _grading = _GradingProcess(workers)
            atexit.register(_grading.stop)
        return _grading


def judge(answers: Sequence[Optional[str]], labels: Sequence[str]) -> Tuple[List[bool], List[bool]]:
    """Whether each answer equals its label, and whether its check was stopped at the limit.

    All answers are submitted to the pool first, then collected. An answer of None (no box) is wrong and not
    checked. The limit (``MEDS_REWARD_TIMEOUT``) counts from when a worker takes the answer up; a stopped check,
    or one whose worker died, scores False with a logged warning. Raises RuntimeError if the grading process
    (started at the first call) cannot start."""
    timeout = _positive_env("MEDS_REWARD_TIMEOUT", DEFAULT_TIMEOUT_SECONDS, float)
    # Checked at every call, used only when the pool starts: a bad value is reported wherever it is set.
    workers = _positive_env("MEDS_REWARD_WORKERS", min(DEFAULT_MAX_WORKERS, os.cpu_count() or 1), int)
    grading = _running_grader(workers)
    pairs = [(answer, str(label)) for answer, label in zip(answers, labels, strict=True) if answer is not None]
    try:
        outcomes = iter(grading.grader.check(pairs, timeout) if pairs else [])
    except (OSError, EOFError) as error:  # the grading process died (e.g. out of memory); restarted next call
        grading.broken = True
        outcomes = iter([repr(error)] * len(pairs))
    correct, timed_out = [], []
    for answer in answers:
        outcome = False if answer is None else next(outcomes)
        if outcome is None:
            logger.warning("math reward: checking answer %r took over %g s; scored 0", answer[:200], timeout)
        elif isinstance(outcome, str):
            logger.warning("math reward: checking answer %r failed (%s); scored 0", answer[:200], outcome)
        correct.append(outcome is True)
        timed_out.append(outcome is None)
    return correct, timed_out
