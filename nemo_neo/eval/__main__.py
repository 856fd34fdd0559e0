"""`python -m nemo_neo.eval ...` is `python -m nemo_neo.eval.cli ...` (lm-eval with nemo_neo)."""

from nemo_neo.eval.cli import main

main()
