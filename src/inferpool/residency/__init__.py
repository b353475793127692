"""Model residency: one worker process holding several models within a memory budget.

- ``budget``: reading ``--memory-budget`` and models' footprints (the registry's ``memory_gb``, else what a
  first load measured).
- ``manager``: ``ResidentModels``, which loads a model when work for it arrives, keeps it while it is used
  and for ``keep_alive`` after, and evicts the least recently used idle model when the next does not fit.
- ``serve``: the worker process (``inferpool worker --models a b c``).
"""
