from nemo_neo import _compat

"""nemo_neo: Minitron pruning + distillation, LLM-Neo and KD-LoRA on megatron-core.

The package is a library of building blocks (models, parallel, checkpoint, data, train, distill,
peft, prune, eval, export) with the workflows that compose them above it (`nemo_neo.recipes`) and
the command lines on top (`nemo_neo.cli`, `nemo_neo.nemo`). Importing it changes nothing in the
process: compatibility patches are switched on explicitly with `enable_compat()`.
"""

__version__ = "0.1.0"


def enable_compat() -> bool:
    """Switch on what megatron-core needs on this machine (see `nemo_neo._compat`); call once, before
    `nemo_neo.parallel.initialize`. Returns True when the CPU layer is active."""

    return _compat.enable()
