"""Network modules only (no I/O, no checkpoint handling): architectures that spandrel does not provide.

Loading, key mapping and detection of their checkpoints live in :mod:`realisr.weights`.
"""
