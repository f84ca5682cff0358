"""fedtransfer benchmark suite: speed, memory, communication, privacy-utility and scale.

Run ``python -m benchmarks --mode quick`` (``make bench``) or ``--mode full``
(``make bench-full``). Results go to ``benchmarks/results/<date>-<machine>.json``
with plots beside them, and ``benchmarks/BENCHMARKS.md`` is rewritten from them.
"""
