"""Test-only switches, inert unless a test's cluster puts this folder on every node's PYTHONPATH and sets them:
- ``MEDS_TEST_FEATURE_DUMP=1``: the first ``record_outcomes`` of a trainer saves each Experience's sequences, masks
  and the features MEDS attached to it, to ``<--ckpt.path>/../feature-dump.pt``;
- ``MEDS_TEST_FAIL_CAPTURE_RANK=R``: on policy rank R, every capture expects one token more than the forward has, so
  the hooks' token-count check never matches and that rank's capture fails (as a layout MEDS misreads would).

Python imports this module at start-up in every process of such a cluster, so it only watches for the import of
``meds_patch.integration.glue`` and wraps the function once that module has loaded."""

import importlib.abc
import os
import sys

ENV = "MEDS_TEST_FEATURE_DUMP"
FAIL_ENV = "MEDS_TEST_FAIL_CAPTURE_RANK"
GLUE = "meds_patch.integration.glue"


def wrap(glue):
    record_outcomes = glue.record_outcomes

    def dumping_record_outcomes(maker, experiences):
        record_outcomes(maker, experiences)
        path = os.path.join(os.path.dirname(os.path.abspath(maker.args.ckpt.path)), "feature-dump.pt")
        if not os.path.exists(path):
            import torch

            rows = [{"sequences": e.sequences, "attention_mask": e.attention_mask, "action_mask": e.action_mask,
                     "features": e.meds.features} for e in experiences]  # fmt: skip
            torch.save(rows, path)

    if os.environ.get(ENV) == "1":
        glue.record_outcomes = dumping_record_outcomes
    start_capture = glue.start_capture

    def failing_start_capture(policy, *args):
        import torch

        capture = start_capture(policy, *args)
        if capture is not None and capture.hidden is not None and str(torch.distributed.get_rank()) == failing_rank:
            capture.hidden.num_tokens += 1
        return capture

    failing_rank = os.environ.get(FAIL_ENV)
    if failing_rank is not None:
        glue.start_capture = failing_start_capture


class GlueWatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != GLUE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            wrap(module)

        spec.loader.exec_module = exec_and_wrap
        return spec


if os.environ.get(ENV) == "1" or os.environ.get(FAIL_ENV) is not None:
    import importlib.util

    sys.meta_path.insert(0, GlueWatcher())
