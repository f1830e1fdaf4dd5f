"""The CPU harness: upstream's real entry point on machines without GPUs. The CPU backend (switched on by
``MEDS_CPU_BACKEND=1``, never on a GPU run), the tiny arithmetic model and the demo with its local Ray cluster."""
