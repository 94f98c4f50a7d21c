"""``python -m services.demo``: see ``services.demo.job``."""

import sys

from services.demo.job import main

if __name__ == "__main__":
    sys.exit(main())
