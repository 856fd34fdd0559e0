"""`python tools/plan.py ...` is the console command `nemo-neo-plan` (see nemo_neo/cli/plan.py)."""

import sys

from nemo_neo.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
