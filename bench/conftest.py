"""Benchmark session setup: one thread everywhere, so kernel figures are per-core and comparable.

Set before numpy (and its BLAS) is imported by any benchmark module; ``setdefault`` lets a caller still
override a value from the shell.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
