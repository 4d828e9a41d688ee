"""`python -m tsforge COMMAND ...`: the same command line as the `tsforge` console script (tsforge/_main.py)."""

import sys

from tsforge._main import main

if __name__ == "__main__":
    sys.exit(main())
