"""`python tools/throughput_bench.py ...` is the console command `nemo-neo-throughput` (see nemo_neo/cli/throughput.py)."""

import sys

from nemo_neo.cli.throughput import main

if __name__ == "__main__":
    sys.exit(main())
