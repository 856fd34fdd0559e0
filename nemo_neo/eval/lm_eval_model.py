"""lm-evaluation-harness model `nemo_neo`: our megatron-core models (any TP/PP/DP) under lm-eval.

Importing this module registers the model, after which

    lm_eval.simple_evaluate(model="nemo_neo", model_args="checkpoint=<dir>", tasks=[...])

works; on the command line use `python -m nemo_neo.cli.eval ...` (lm-eval has no plugin
discovery for external models: its `--model` names come from its own registry, which this import
fills). Tokenisation, context/continuation splitting, truncation, rolling windows and stop
sequences follow lm-eval's `hf` model (`HFLM`) step by step, so the same checkpoint exported to
Hugging Face scores the same under `--model hf` (tests/eval/test_eval_lm.py checks it per document).

Under torchrun every process is given every request (lm-eval sees rank 0 of a world of 1); the
model-parallel ranks compute together and data-parallel replicas split the batches internally
(nemo_neo.eval.engine), so results are identical to a single process.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

from nemo_neo.optional import require

require("lm_eval", "the nemo_neo lm-eval model")
from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text  # noqa: E402

from nemo_neo.checkpoint.hf_io import has_tokenizer  # noqa: E402
from nemo_neo.checkpoint.load import load_model  # noqa: E402
from nemo_neo.checkpoint.native import INDEX, is_neo_checkpoint  # noqa: E402
from nemo_neo.errors import EvalError  # noqa: E402
from nemo_neo.eval.engine import ModelRunner  # noqa: E402
from nemo_neo.models.dtype import parse_dtype  # noqa: E402
from nemo_neo.parallel import ParallelConfig, initialize  # noqa: E402
from nemo_neo.parallel.state import ParallelContext  # noqa: E402

log = logging.getLogger(__name__)


class EvalSetupError(EvalError):
    """The checkpoint or the arguments cannot be evaluated (one line: problem and fix)."""


def _parse_batch_size(value) -> int:
    if value is None:
        return 8
    text = str(value)
    if text.startswith("auto"):
        log.warning("batch_size=%s: automatic batch sizing is not implemented for nemo_neo; using 8.", text)
        return 8
    return max(1, int(text))


def check_checkpoint_tokenizer_only(tokenizer) -> None:
    if not tokenizer or not has_tokenizer(tokenizer):
        raise EvalSetupError(f"an in-memory model needs tokenizer=<dir with tokenizer files>; got {tokenizer!r}.")
    return None


def check_checkpoint(checkpoint, tokenizer=None) -> tuple[Path, Path]:
    """(checkpoint dir, tokenizer dir) or one clear error."""

    if checkpoint is None:
        raise EvalSetupError("model_args needs checkpoint=<nemo_neo checkpoint dir>.")
    ckpt = Path(checkpoint).expanduser()
    if not is_neo_checkpoint(ckpt):
        if (ckpt / "config.json").is_file():
            raise EvalSetupError(f"{ckpt} is a Hugging Face directory, not a nemo_neo checkpoint; evaluate it with "
                                 f"--model hf --model_args pretrained={ckpt}, or convert it with tools/convert_checkpoint.py hf-to-neo.")
        raise EvalSetupError(f"{ckpt} is not a nemo_neo checkpoint (no {INDEX}); pass checkpoint=<dir written by nemo_neo>.")
    tok = Path(tokenizer).expanduser() if tokenizer else ckpt
    if not has_tokenizer(tok):
        raise EvalSetupError(f"{tok} has no tokenizer files (tokenizer.json / tokenizer.model / vocab.json); copy them into "
                             "the checkpoint directory or pass tokenizer=<dir with the tokenizer> in model_args.")
    return ckpt, tok


@register_model("nemo_neo", "nemo-neo")
class NeoLM(TemplateLM):
    """lm-eval LM over a nemo_neo checkpoint.

    model_args: checkpoint (required), tokenizer (dir; default: the checkpoint's files),
    tensor_parallel, pipeline_parallel, dtype (auto|float32|bfloat16), max_length,
    max_gen_toks, add_bos_token, prefix_token_id, batch_size.
    """

    _DEFAULT_MAX_LENGTH = 2048

    def __init__(self, checkpoint=None, tokenizer=None, tensor_parallel=1, pipeline_parallel=1, dtype="auto",
                 batch_size=8, max_length=None, max_gen_toks=256, add_bos_token=None, prefix_token_id=None,
                 device=None, max_batch_size=None, model=None, ctx: ParallelContext | None = None, arch=None, **unused):
        super().__init__()
        if unused:
            log.warning("nemo_neo: ignoring unknown model_args %s", sorted(unused))
        from transformers import AutoTokenizer

        if model is None:
            ckpt, tok_dir = check_checkpoint(checkpoint, tokenizer)
        else:  # an in-memory model (e.g. the recipe's evaluate stage): needs its tokenizer and ctx
            ckpt, tok_dir = check_checkpoint_tokenizer_only(tokenizer), Path(tokenizer)
        if ctx is None:
            ctx = initialize(ParallelConfig(tensor_parallel=int(tensor_parallel), pipeline_parallel=int(pipeline_parallel)))
        if model is None:
            model, arch, _ = load_model(ckpt, ctx, parse_dtype(dtype))
        self.ctx = ctx
        self._device = ctx.device
        self.checkpoint = str(ckpt or checkpoint)
        tok_kwargs = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
        self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), **tok_kwargs)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self.runner = ModelRunner(model, ctx, pad_id=self.tokenizer.pad_token_id or 0)
        limit = arch.max_position_embeddings if arch is not None else self._DEFAULT_MAX_LENGTH
        self._max_length = int(max_length) if max_length else limit
        self._max_gen_toks = int(max_gen_toks)
        self.batch_size = _parse_batch_size(batch_size)
        self.vocab_size = arch.vocab_size if arch is not None else None

    # ------------------------------------------------------------------ properties lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def _show(self, disable_tqdm: bool) -> bool:
        return not disable_tqdm and self.ctx.rank == 0

    # ------------------------------------------------------------------ tokenisation (as HFLM)
    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context_enc, continuation_enc). Longest first
        (so the padded width of a batch is its first row's), as HFLM does; returned in input order."""
        items = []
        for cache_key, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc:
                raise ValueError("context and continuation must each encode to at least one token")
            if len(continuation_enc) > self.max_length:
                raise ValueError(f"continuation of {len(continuation_enc)} tokens exceeds max_length={self.max_length}")
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            items.append((whole[:-1], continuation_enc, cache_key))
        order = sorted(range(len(items)), key=lambda i: (-len(items[i][0]) - 1, tuple(items[i][0])))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        bar = tqdm(total=len(items), desc="loglikelihood", disable=not self._show(disable_tqdm), dynamic_ncols=True)

        def run(batch):
            out = self.runner.score([items[i][0] for i in batch], [items[i][1] for i in batch])
            bar.update(len(batch) * max(1, self.ctx.dp_size))
            return out

        scored = self.runner.map_batches(batches, run)
        bar.close()
        results = [None] * len(items)
        for batch, answers in zip(batches, scored):
            for i, answer in zip(batch, answers):
                results[i] = answer
                if items[i][2] is not None:
                    self.cache_hook.add_partial("loglikelihood", items[i][2], answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scoring: the whole text in disjoint max_length windows (HFLM's windows)."""
        windows, owners = [], []
        for n, (string,) in enumerate(tqdm([r.args for r in requests], desc="rolling windows", disable=not self._show(disable_tqdm))):
            token_windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)
            for ctx_tokens, cont_tokens in map(lm_utils.make_disjoint_window, token_windows):
                windows.append((None, ctx_tokens, cont_tokens))
                owners.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, scores):
            totals[n] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until a stop string, EOS, or max_gen_toks (sampling is not supported:
        do_sample=True / temperature > 0 raise)."""
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items(), key=str)), []).append(i)
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=not self._show(disable_tqdm), dynamic_ncols=True)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
                raise EvalSetupError("nemo_neo generates greedily only; use do_sample=False / temperature=0 for this task.")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise EvalSetupError(f"max_gen_toks={max_gen} must be smaller than max_length={self.max_length}.")
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=max_ctx) for i in indices}
            ordered = sorted(indices, key=lambda i: -len(prompts[i]))
            batches = [ordered[k : k + self.batch_size] for k in range(0, len(ordered), self.batch_size)]

            def run(batch):
                def stop(row, new_tokens):
                    text = self.tok_decode(new_tokens)
                    return any(s and s in text for s in until)

                out = self.runner.greedy_generate([prompts[i] for i in batch], max_gen, stop, eos_ids=[self.eot_token_id])
                bar.update(len(batch) * max(1, self.ctx.dp_size))
                return out

            for batch, generated in zip(batches, self.runner.map_batches(batches, run)):
                for i, tokens in zip(batch, generated):
                    text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.close()
        return results
