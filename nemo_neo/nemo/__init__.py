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

from nemo_neo.nemo import cpu_compat, mcore_compat  # noqa: E402

# Before NeMo's first import: its checkpoint IO imports a module megatron-core 0.16 no longer has.
mcore_compat.install_tensorstore_stub()

from nemo.collections import llm  # noqa: E402

mcore_compat.patch_optimizer_factory()
cpu_compat.activate_if_needed()

from nemo_neo.nemo import connectors  # noqa: E402
from nemo_neo.nemo.config import (  # noqa: E402
    UnsupportedNemoModelError,
    arch_from_nemo_config,
    nemo_config_from_arch,
)
from nemo_neo.nemo.convert import check_nemo_checkpoint, nemo_arch, nemo_to_neo, neo_to_nemo  # noqa: E402
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
