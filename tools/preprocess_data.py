"""`python tools/preprocess_data.py ...` is the console command `nemo-neo-preprocess` (see nemo_neo/cli/preprocess.py).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus_text_document \
        --tokenizer path/to/model --workers 4
"""

import sys

from nemo_neo.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
