"""MEDS (memory-enhanced dynamic reward shaping, arXiv:2604.11297) for OpenRLHF and any other trainer.

The names below load lazily: the import hook that every Python process of the environment runs at start-up
imports this package, and must not pay for numpy, torch or hdbscan there.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "MEDSConfig": "meds_patch.core.config",
    "find_answer_positions": "meds_patch.core.features",
    "layer_logit_features": "meds_patch.core.features",
    "AnswerHiddenStates": "meds_patch.core.features",
    "ErrorMemory": "meds_patch.core.memory",
    "AnswerMemory": "meds_patch.core.memory",
    "prompt_key": "meds_patch.core.memory",
    "apply_penalties": "meds_patch.core.penalty",
    "penalty_term": "meds_patch.core.penalty",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'meds_patch' has no attribute {name!r}")
