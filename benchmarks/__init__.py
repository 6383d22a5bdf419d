"""Benchmarks for ``cluster`` against ``ThreadPoolExecutor`` and a minimal priority pool.

Run them all with ``python3 -m benchmarks.run`` from the repository root
(``--quick`` for tiny sizes, ``--only NAME`` to select scenarios, ``--json PATH``).
"""
