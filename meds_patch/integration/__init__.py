"""MEDS inside OpenRLHF 0.11.2: what the patch series' inserted lines call (``glue``), the import hook that applies
the series (``hook``, imported in every Python process: keep this package free of heavy imports), and the memory
sharded over Ray actors (``sharded``)."""
