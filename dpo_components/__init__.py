"""The shared pieces of the DPO recipes (``recipes/``), each small and tested, in rooms: the run around a recipe's
loop, losses, log-probs, the reference, settings, metrics, precision, samples, the FSDP2 pieces, ``data/``,
``checkpointing/``, ``models/``, ``online/``, ``tiny/``, ``tools/``.

Every module, what it owns, its tests and where to change what: ``docs/architecture.md`` (the one module index,
checked by ``tests/components/test_architecture.py``).
"""
