"""Test-only: with ``MEDS_TEST_FEATURE_DUMP=1`` in a process's environment (the multi-node tests' cluster puts it,
and this folder, on every node), the first ``record_outcomes`` of a trainer saves each Experience's sequences,
masks and the features MEDS attached to it, to ``<--ckpt.path>/../feature-dump.pt``. A normal run has neither.

Python imports this module at start-up in every process of such a cluster, so it only watches for the import of
``meds_patch.integration.glue`` and wraps the function once that module has loaded."""

import importlib.abc
import os
import sys

ENV = "MEDS_TEST_FEATURE_DUMP"
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

    glue.record_outcomes = dumping_record_outcomes


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


if os.environ.get(ENV) == "1":
    import importlib.util

    sys.meta_path.insert(0, GlueWatcher())
