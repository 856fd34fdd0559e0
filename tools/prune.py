"""`python tools/prune.py ...` is the console command `nemo-neo-prune` (see nemo_neo/cli/prune.py)."""

import sys

from nemo_neo.cli.prune import main

if __name__ == "__main__":
    sys.exit(main())
