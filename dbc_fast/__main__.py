"""`python -m dbc_fast ...` is the `dbc-fast` command line (also what torchrun runs with `-m dbc_fast`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
