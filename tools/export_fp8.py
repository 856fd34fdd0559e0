"""`python tools/export_fp8.py ...` is the console command `nemo-neo-export-fp8` (see nemo_neo/cli/export_fp8.py)."""

import sys

from nemo_neo.cli.export_fp8 import main

if __name__ == "__main__":
    sys.exit(main())
