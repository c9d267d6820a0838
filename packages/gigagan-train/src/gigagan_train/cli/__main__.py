"""``python -m gigagan_train.cli``: the ``gigagan`` command (torchrun starts it this way)."""

import sys

from gigagan_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
