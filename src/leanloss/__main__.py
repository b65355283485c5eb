"""``python -m leanloss``: the same command line as the ``leanloss`` console script."""
import sys

from .cli import main

sys.exit(main())
