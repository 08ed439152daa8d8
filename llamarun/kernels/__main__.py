"""`python -m llamarun.kernels`: compile the kernels ahead of use (kernels/compile.py)."""
import sys

from .compile import main

sys.exit(main())
