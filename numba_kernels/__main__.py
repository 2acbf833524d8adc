"""``python -m numba_kernels``: check and time every op on every available backend (see _demo.py)."""
import sys

from numba_kernels._demo import main

sys.exit(main())
