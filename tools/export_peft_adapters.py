"""`python tools/export_peft_adapters.py ...` is the console command `nemo-neo-export-peft` (see nemo_neo/cli/export_peft.py)."""

import sys

from nemo_neo.cli.export_peft import main

if __name__ == "__main__":
    sys.exit(main())
