"""Tokenize .jsonl / .txt / Hugging Face datasets into a Megatron indexed dataset (PREFIX.bin/.idx + PREFIX.json).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus_text_document \
        --tokenizer path/to/model --workers 4

Same as the `nemo-neo-preprocess` console command; see nemo_neo/data/preprocess.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemo_neo.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
