"""Minitron pruning of a NeMo 2 checkpoint: NeMo 2 in, NeMo 2 out.

The checkpoint is converted to nemo_neo (bit-exact), pruned by nemo_neo's `prune_checkpoint`
(activation-based importance on calibration text, width and/or depth), and converted back to a NeMo
2 ``LlamaModel`` checkpoint whose config has the pruned shape. The tokenizer travels with it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from nemo_neo.checkpoint import atomic
from nemo_neo.nemo.connectors import neo_to_nemo
from nemo_neo.nemo.convert import check_nemo_checkpoint, nemo_to_neo
from nemo_neo.recipes.prune import prune_checkpoint


def prune_nemo_checkpoint(nemo_ckpt, out, target: dict, overwrite: bool = False, **prune_options) -> dict:
    """target: e.g. {"hidden_size": 1024, "ffn_hidden_size": 3072, "num_layers": 12}; prune_options go to
    `nemo_neo.recipes.prune.prune_checkpoint` (calib_data, num_samples, seq_length, drop, scores_path, ...)."""
    check_nemo_checkpoint(nemo_ckpt)
    atomic.check_output_dir(out, overwrite)  # fail before any work
    with tempfile.TemporaryDirectory(prefix="nemo_neo_prune_") as tmp:
        source, pruned = Path(tmp) / "source", Path(tmp) / "pruned"
        nemo_to_neo(nemo_ckpt, source)
        report = prune_checkpoint(source, pruned, target, **prune_options)
        neo_to_nemo(pruned, out, overwrite=overwrite)
    report.update(source=str(nemo_ckpt), out=str(out))
    return report
