"""The MEDS algorithm, framework-agnostic: answer positions, layer-logit features, the error memory with its
clustering (or the answer memory), the penalty, collapse metrics. Imports numpy, torch, scikit-learn (with scipy)
and hdbscan only, so a veRL or TRL trainer can take it as it is (docs/ALGORITHM.md)."""

# The name under which a trainer's checkpoint state holds ErrorMemory.state_dict(); the report looks for it.
CHECKPOINT_KEY = "meds_memory"
