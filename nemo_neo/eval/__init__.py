"""Evaluation: LM validation loss / perplexity, and lm-evaluation-harness integration.

- `validation_loss` (lm_loss.py): mean next-token loss of a sharded model on packed text.
- `nemo_neo.eval.lm_eval_model.NeoLM`: the lm-eval model `nemo_neo` (importing it registers it).
- `nemo_neo.eval.harness.evaluate`: run lm-eval tasks on a checkpoint from Python.
- `python -m nemo_neo.cli.eval`: lm-eval's command line with `--model nemo_neo` available.
- `nemo_neo.eval.tasks`: offline task pack (local files).
- `nemo_neo.recipes.throughput`: the generation throughput study (tools/throughput_bench.py).

lm-eval is optional (pip install -e ".[eval]"); only the modules that need it import it.
"""

from nemo_neo.eval.lm_loss import validation_loss

__all__ = ["validation_loss"]
