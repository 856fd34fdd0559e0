"""NeMo ``ModelConnector``s for nemo_neo checkpoints, so NeMo's own entry points convert them:

    llm.import_ckpt(model=llm.LlamaModel(), source="nemo_neo:///path/to/neo_ckpt", output_path=...)
    llm.export_ckpt(path=nemo_ckpt, target="nemo_neo", output_path=...)

They are registered (on import of `nemo_neo.nemo`) for NeMo's GPTModel, LlamaModel, MistralModel and
Qwen2Model and for nemo_neo's NeMo subclasses, the same way NeMo registers its "hf" connectors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from nemo.collections import llm
from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
from nemo.lightning import io
from nemo.lightning.base import teardown

from nemo_neo.checkpoint import atomic
from nemo_neo.checkpoint.hf_io import has_tokenizer
from nemo_neo.checkpoint.native import load_full_state, read_index
from nemo_neo.nemo import config as nemo_config
from nemo_neo.nemo.convert import copy_neo_state_into, nemo_to_neo


class NeoCheckpointImporter(io.ModelConnector):
    """nemo_neo checkpoint -> NeMo 2 checkpoint (a NeMo LlamaModel with the same weights)."""

    dtype: torch.dtype | None = None  # None: the dtype of the stored tensors
    model_class = None  # None: nemo.collections.llm.LlamaModel

    def init(self):
        arch, index = read_index(str(self))
        dtype = self.dtype or getattr(torch, index["tensors"]["embedding.word_embeddings.weight"]["dtype"])
        tokenizer = None
        if has_tokenizer(str(self)):
            tokenizer = AutoTokenizer(str(self))
        # megatron-core refuses to even construct a config asking for fused kernels it lacks (CPU);
        # on GPU the context keeps NeMo's defaults.
        overrides = {} if torch.cuda.is_available() else nemo_config.cpu_overrides()
        config = nemo_config.nemo_config_from_arch(arch, dtype, **overrides)
        model = (self.model_class or llm.LlamaModel)(config, tokenizer=tokenizer)
        return model

    def apply(self, output_path: Path) -> Path:
        arch, state, _ = load_full_state(str(self))
        target = self.init()
        trainer = self.nemo_setup(target)
        copy_neo_state_into(target.module, arch, state)
        self.nemo_save(Path(output_path), trainer)
        teardown(trainer, target)
        return Path(output_path)


class NeoCheckpointExporter(io.ModelConnector):
    """NeMo 2 checkpoint -> nemo_neo checkpoint."""

    def init(self):  # no model is built: megatron-core reads the weights straight into nemo_neo's GPT
        return None

    def apply(self, output_path: Path) -> Path:
        nemo_to_neo(str(self), output_path, overwrite=True)
        return Path(output_path)


def neo_to_nemo(neo_ckpt, out, overwrite: bool = False, dtype: torch.dtype | None = None, model_class=None) -> Path:
    """nemo_neo checkpoint -> NeMo 2 checkpoint of a NeMo ``LlamaModel`` (or `model_class`).

    The tokenizer files of the nemo_neo checkpoint become the NeMo model's HF ``AutoTokenizer``."""
    atomic.check_output_dir(out, overwrite)
    importer = NeoCheckpointImporter(str(neo_ckpt))
    importer.dtype, importer.model_class = dtype, model_class
    with atomic.atomic_directory(out, overwrite) as tmp:
        importer.apply(tmp)
    return Path(out)


def register(model_classes) -> None:
    for cls in model_classes:
        io.model_importer(cls, "nemo_neo")(NeoCheckpointImporter)
        io.model_exporter(cls, "nemo_neo")(NeoCheckpointExporter)
