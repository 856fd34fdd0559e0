"""`python tools/convert_checkpoint.py ...` is the console command `nemo-neo-convert` (see nemo_neo/cli/convert.py)."""

import sys

from nemo_neo.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
