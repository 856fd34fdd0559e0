"""`python tools/cache_teacher.py ...` is the console command `nemo-neo-cache-teacher` (see nemo_neo/cli/cache_teacher.py).

    python tools/cache_teacher.py run_dir=runs/x cache_teacher.top_k=32
"""

import sys

from nemo_neo.cli.cache_teacher import main

if __name__ == "__main__":
    sys.exit(main())
