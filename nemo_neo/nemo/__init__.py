"""NeMo 2.x integration (optional extra ``nemo_neo[nemo]``: nemo-toolkit[llm] 2.7.3, see docs/nemo.md).

* `NeoDistillationLlamaModel` / `NeoDistillationGPTModel`: subclasses of NeMo's ``llm.LlamaModel`` /
  ``llm.GPTModel`` that distill a frozen teacher into the student with nemo_neo's vocab-parallel
  chunked KD loss, optionally with LoRA adapters on the student only (LLM-Neo).
* `nemo_to_neo` / `neo_to_nemo` (also ``llm.import_ckpt`` / ``llm.export_ckpt`` with "nemo_neo"):
  checkpoint conversion, bit-exact both ways.
* `prune_nemo_checkpoint`: Minitron pruning of a NeMo 2 checkpoint into a NeMo 2 checkpoint.

This is the only part of nemo_neo that imports ``nemo``; the rest works without NeMo installed.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("nemo") is None:
    raise ImportError(
        "nemo_neo.nemo needs NeMo 2.x with its LLM collection: pip install 'nemo_neo[nemo]' "
        "(nemo-toolkit[llm]==2.7.3; nemo-toolkit 3.x has no nemo.collections.llm). See docs/nemo.md."
    )

from nemo_neo import _compat  # noqa: E402

if not _compat.is_nemo_enabled():
    # NeMo 2.7.3 on megatron-core 0.16 needs bridges that must be in place before NeMo's first import;
    # they are an explicit switch of the entry point, never a side effect of importing this package.
    raise ImportError(
        "nemo_neo.nemo needs nemo_neo's NeMo compatibility layer switched on first: call "
        "nemo_neo._compat.enable_nemo() before importing NeMo or nemo_neo.nemo (python -m nemo_neo.nemo does)."
    )

from nemo.collections import llm  # noqa: E402

from nemo_neo.nemo import connectors  # noqa: E402
from nemo_neo.nemo.config import (  # noqa: E402
    UnsupportedNemoModelError,
    arch_from_nemo_config,
    nemo_config_from_arch,
)
from nemo_neo.nemo.connectors import neo_to_nemo  # noqa: E402
from nemo_neo.nemo.convert import check_nemo_checkpoint, nemo_arch, nemo_to_neo  # noqa: E402
from nemo_neo.nemo.models import (  # noqa: E402
    NeoDistillationGPTModel,
    NeoDistillationLlamaModel,
    NeoKDLossReduction,
)
from nemo_neo.nemo.prune import prune_nemo_checkpoint  # noqa: E402

connectors.register([llm.GPTModel, llm.LlamaModel, llm.MistralModel, llm.Qwen2Model,
                     NeoDistillationGPTModel, NeoDistillationLlamaModel])

__all__ = [
    "NeoDistillationGPTModel",
    "NeoDistillationLlamaModel",
    "NeoKDLossReduction",
    "UnsupportedNemoModelError",
    "arch_from_nemo_config",
    "check_nemo_checkpoint",
    "nemo_arch",
    "nemo_config_from_arch",
    "nemo_to_neo",
    "neo_to_nemo",
    "prune_nemo_checkpoint",
]
