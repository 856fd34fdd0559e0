"""A decoder LM as a GLUE classifier: the LM's scores of label words at the last prompt token.

Each task has a prompt template ending in a cue ("...\\nSentiment:") and one label word per class
(" negative" / " positive"); the class logits are the LM logits at the last prompt token restricted
to the label words' token ids. Why: no new head (nothing randomly initialised; an untrained model
already has a meaningful zero-shot prediction, which is the baseline the student is measured
against), teacher and student share the same "head" (the tied vocabulary rows of the label words),
so their class logits live in the same space for the KL, and a merged student stays a plain LM
checkpoint. Only those rows of the output layer are computed (the [b, C] product at the last token
instead of [b, s, 49152] logits): the same numbers as slicing the full logits, at a fraction of the
cost.
"""

from __future__ import annotations

import contextlib

import torch

from nemo_neo.data.glue import GlueTask, compute_metrics
from nemo_neo.errors import ConfigError, DataError


def load_tokenizer(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt))


def label_token_ids(tokenizer, spec: GlueTask) -> list[int]:
    """One token id per class: the label word must be a single token, and the ids distinct."""
    ids = []
    for word in spec.label_words:
        toks = tokenizer.encode(word, add_special_tokens=False)
        if len(toks) != 1:
            raise ValueError(f"label word {word!r} of {spec.name} is {len(toks)} tokens for this tokenizer; "
                             "pick single-token label words")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {spec.label_words} of {spec.name} map to the same token")
    return ids


def encode_examples(tokenizer, spec: GlueTask, examples, max_length: int) -> list[list[int]]:
    """Token ids of each prompt, at most `max_length`: the texts are cut (longest first, from the
    end), never the template, so the prompt always ends with its cue."""
    fixed_cache = {}
    out = []
    for ex in examples:
        pieces = []
        for p in spec.template:
            if p in ("{a}", "{b}"):
                text = ex.text_a if p == "{a}" else ex.text_b
                pieces.append([p, tokenizer.encode(" " + text, add_special_tokens=False)])
            else:
                if p not in fixed_cache:
                    fixed_cache[p] = tokenizer.encode(p, add_special_tokens=False)
                pieces.append([None, fixed_cache[p]])
        fixed = sum(len(t) for k, t in pieces if k is None)
        budget = max_length - fixed
        if budget < len([1 for k, _ in pieces if k is not None]):
            raise ValueError(f"max_length={max_length} leaves no room for the text of {spec.name} "
                             f"(the template alone is {fixed} tokens)")
        while sum(len(t) for k, t in pieces if k is not None) > budget:
            longest = max((pc for pc in pieces if pc[0] is not None), key=lambda pc: len(pc[1]))
            excess = sum(len(t) for k, t in pieces if k is not None) - budget
            longest[1] = longest[1][:max(len(longest[1]) - excess, 1)]
        out.append([t for _, toks in pieces for t in toks])
    return out


def collate(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [b, s] ids and the index of each row's last real token. Causal attention means
    the padding after it never reaches that token, so no attention mask is needed."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)


@contextlib.contextmanager
def _label_word_head(model, last_idx: torch.Tensor, label_ids: list[int]):
    """Make the output layer return only [1, b, C]: hidden state at each row's last token times the
    label words' output rows (identical to slicing the full [b, s, V] logits)."""
    layer = model.output_layer
    rows = torch.tensor(label_ids, dtype=torch.long)

    def forward(input_, weight=None, runtime_gather_output=None):  # input_: [s, b, h]
        w = layer.weight if weight is None else weight
        h = input_[last_idx.to(input_.device), torch.arange(input_.shape[1], device=input_.device)]
        logits = h @ w[rows.to(w.device)].t()
        if getattr(layer, "bias", None) is not None:
            logits = logits + layer.bias[rows.to(w.device)]
        return logits.unsqueeze(0), None

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward


def check_single_stage(model) -> None:
    """The label-word head reads whole vocabulary rows at the last stage's hidden states: TP = PP = 1."""
    tp = getattr(model.config, "tensor_model_parallel_size", 1)
    pp = getattr(model.config, "pipeline_model_parallel_size", 1)
    if tp != 1 or pp != 1:
        raise ConfigError(f"the label-word classifier runs at tensor_parallel = pipeline_parallel = 1 (got TP={tp}, "
                          f"PP={pp}); use data parallelism alone (torchrun --nproc_per_node N) for more processes")


def class_logits(model, input_ids: torch.Tensor, last_idx: torch.Tensor, label_ids: list[int]) -> torch.Tensor:
    """[b, C] class logits: LM logits at each row's last prompt token, at the label words."""
    check_single_stage(model)
    device = next(model.parameters()).device
    with _label_word_head(model, last_idx, label_ids):
        out = model(input_ids.to(device), position_ids=None, attention_mask=None)
    return out[:, 0, :].float()


@torch.no_grad()
def predict_logits(model, encoded, label_ids, batch_size: int, pad_id: int) -> torch.Tensor:
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    out = []
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # length-bucketed: less padding
    for start in tqdm(range(0, len(order), batch_size), desc="predict", unit="batch", leave=False, dynamic_ncols=True):
        idx = order[start:start + batch_size]
        ids, last = collate([encoded[i] for i in idx], pad_id)
        out.append((idx, class_logits(model, ids, last, label_ids).cpu()))
    model.train(was_training)
    logits = torch.empty(len(encoded), len(label_ids))
    for idx, chunk in out:
        logits[torch.tensor(idx)] = chunk
    return logits


def evaluate(model, task: str, encoded, labels, label_ids, batch_size: int, pad_id: int) -> dict:
    preds = predict_logits(model, encoded, label_ids, batch_size, pad_id).argmax(-1).tolist()
    return compute_metrics(task, preds, labels)


class ClassifierExamples:
    """Encoded prompts with their labels (and a teacher's class logits) as a training set for
    `nemo_neo.train.loop.Trainer`: `examples[index_tensor]` is the micro-batch dict

        input_ids [b, s] (right-padded), last_index [b] (each row's last prompt token, carried
        explicitly: the pad id may be a real token), labels [b], teacher_logits [b, C] (if given).
    """

    def __init__(self, encoded: list[list[int]], labels: list[int], pad_id: int,
                 teacher_logits: torch.Tensor | None = None):
        if len(encoded) != len(labels):
            raise DataError(f"{len(encoded)} prompts but {len(labels)} labels")
        if teacher_logits is not None and teacher_logits.shape[0] != len(encoded):
            raise DataError(f"teacher logits for {teacher_logits.shape[0]} examples, but {len(encoded)} prompts")
        self.encoded, self.pad_id = encoded, pad_id
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.teacher_logits = None if teacher_logits is None else teacher_logits.float()

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        ids, last = collate([self.encoded[i] for i in index.tolist()], self.pad_id)
        batch = {"input_ids": ids, "last_index": last, "labels": self.labels[index]}
        if self.teacher_logits is not None:
            batch["teacher_logits"] = self.teacher_logits[index]
        return batch


class LabelWordClassifier(torch.nn.Module):
    """A GPT (TP = PP = 1) as the module megatron-core's DDP and schedule drive: forward returns the
    [b, C] class logits (`class_logits`) at `last_index`, which the Trainer passes from the batch
    (`batch_inputs`). The GPT stays `self.lm`; checkpoints are written from it alone."""

    batch_inputs = ("last_index",)

    def __init__(self, lm: torch.nn.Module, label_ids: list[int]):
        super().__init__()
        check_single_stage(lm)
        self.lm = lm
        self.label_ids = list(label_ids)
        self.config = lm.config  # megatron's schedule reads the model's config

    # --- what megatron-core's schedule and finalize_model_grads ask of a model -------------------
    @property
    def model_type(self):
        return self.lm.model_type

    @property
    def pre_process(self):
        return self.lm.pre_process

    @property
    def post_process(self):
        return self.lm.post_process

    @property
    def share_embeddings_and_output_weights(self):
        return self.lm.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.lm.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor):
        self.lm.set_input_tensor(input_tensor)

    def forward(self, input_ids, position_ids=None, attention_mask=None, labels=None, last_index=None):
        if last_index is None:
            raise ValueError("LabelWordClassifier needs last_index (each row's last prompt token)")
        return class_logits(self.lm, input_ids, last_index, self.label_ids)
