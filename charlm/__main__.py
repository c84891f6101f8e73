"""`python -m charlm ...` (and `torchrun -m charlm train ...`): the same commands as the `charlm` script."""

from __future__ import annotations

import sys

from charlm.cli import main

if __name__ == "__main__":
    sys.exit(main())
