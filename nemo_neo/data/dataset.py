"""Training data: text sources -> held-out split -> (indexed format, `from_text`) -> per-DP-rank micro-batches.

* `read_documents` reads .txt / .jsonl / Hugging Face `save_to_disk` sources and `split_documents`
  holds out each source's last share BEFORE tokenization (so validation tokens are never trained
  on); `nemo_neo.data.from_text` tokenizes the two parts once into Megatron indexed datasets, read
  back through megatron-core's GPTDataset like any cluster dataset (one loader for all data).
* `DistributedBatchSampler` turns a number of rows into the micro-batches (row indices) that one
  data-parallel rank processes at each optimizer step: deterministic per-epoch shuffles, disjoint
  rows across DP ranks, and a `state_dict` (steps consumed) so that a resumed run sees exactly the
  batches it would have seen without the interruption.
* `collate` makes the model inputs of a micro-batch of rows.

Documents and the split
-----------------------
A .txt file is one document; every line of a .jsonl file (its "text" field) and every row of a
Hugging Face dataset (its "text" column) is one document; an empty `sources` list means the default
corpus (`default_corpus()`, one document). Within each source the last `valid_fraction` of the
characters is held out: the cut is moved forward to the next paragraph boundary ("\\n\\n") of the
document it falls in; with several documents and no paragraph boundary after the cut, the cut moves
to the next document boundary instead. For a single document this is exactly `split_train_valid`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from nemo_neo.data.text import default_corpus
from nemo_neo.errors import ConfigError, DataError, DataFileNotFoundError, MissingDependencyError

CACHE_FORMAT = 1
_HF_DATASET_MARKERS = ("dataset_info.json", "state.json")


# ---------------------------------------------------------------------------------------------
# Reading sources
# ---------------------------------------------------------------------------------------------


def _is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _HF_DATASET_MARKERS)


def _check_source(path: Path) -> None:
    if path.is_file() or _is_hf_dataset_dir(path):
        return
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(
            f"{path} is a Hugging Face DatasetDict with splits {splits}; pass one split's directory "
            f"(e.g. {path / (splits[0] if splits else 'train')}) as a data source."
        )
    what = "is a directory without dataset_info.json/state.json" if path.is_dir() else "does not exist"
    raise DataFileNotFoundError(
        f"data source {path} {what}. Pass existing .txt files, .jsonl files with a \"text\" field, "
        "or directories written by datasets' Dataset.save_to_disk (or no sources for the built-in "
        "default corpus)."
    )


def read_utf8(path: Path) -> str:
    """The text of a file, or one `DataError` naming the file and the first byte that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text: byte {e.start} (0x{data[e.start]:02x}) cannot be decoded. Pass .txt / "
            ".jsonl files in UTF-8 (e.g. convert with `iconv -t utf-8`), not binary files."
        ) from None


def jsonl_documents(path: Path, key: str = "text",
                    fix: str = 'every JSON line must be an object with the document in "text".'):
    """(line, byte length) of each non-empty `key` field of a .jsonl file, streamed line by line; a line
    that is not UTF-8, not JSON or has no `key` is one `DataError` naming the file, the line and `fix`."""
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 text: byte {offset + e.start} (line {line_no}) cannot be "
                                "decoded. Pass .jsonl files in UTF-8 (e.g. convert with `iconv -t utf-8`).") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no} is not valid JSON ({e.msg}).") from None
            if not isinstance(record, dict) or key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f'{path}:{line_no} has no "{key}" field (found {keys}); {fix}')
            if record[key]:
                yield record[key], len(raw)


def _read_jsonl(path: Path) -> list[str]:
    return [doc for doc, _ in jsonl_documents(path)]


def _read_hf_dataset(path: Path) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(
            f"{path} is a Hugging Face dataset directory (save_to_disk format); reading it needs the "
            "`datasets` package: pip install datasets (or export the text to .txt/.jsonl)."
        ) from None
    dataset = datasets.load_from_disk(str(path))
    columns = list(getattr(dataset, "column_names", []) or [])
    if "text" not in columns:
        raise DataError(f'Hugging Face dataset {path} has no "text" column (columns: {columns}).')
    return list(dataset["text"])


def read_documents(source) -> list[str]:
    """The non-empty documents of one source (.txt file, .jsonl file, or HF dataset directory)."""
    path = Path(source)
    _check_source(path)
    if path.is_dir():
        docs = _read_hf_dataset(path)
    elif path.suffix == ".jsonl":
        docs = _read_jsonl(path)
    else:
        docs = [read_utf8(path)]
    return [d for d in docs if d]


def read_text(sources) -> str:
    """The documents of one or several sources (as `read_documents`), joined by blank lines."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    return "\n\n".join(doc for source in sources for doc in read_documents(source))


def split_documents(docs: Sequence[str], valid_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the last `valid_fraction` of the characters of `docs` (see the module docstring)."""
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}.")
    if valid_fraction == 0.0:
        return list(docs), []
    cut = int(sum(map(len, docs)) * (1 - valid_fraction))
    train, valid, pos = [], [], 0
    for doc in docs:
        end = pos + len(doc)
        if end <= cut:
            train.append(doc)
        elif pos >= cut:
            valid.append(doc)
        else:  # the cut falls inside this document
            local = cut - pos
            boundary = doc.find("\n\n", local)
            if boundary == -1 and len(docs) > 1:
                valid.append(doc)
            else:
                local = boundary if boundary != -1 else local
                train.append(doc[:local])
                valid.append(doc[local:])
        pos = end
    return [d for d in train if d], [d for d in valid if d]


# ---------------------------------------------------------------------------------------------
# The text cache key (nemo_neo.data.from_text tokenizes each source once per key)
# ---------------------------------------------------------------------------------------------


def _file_fingerprint(path: Path) -> list:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.relative_to(path)) if path.is_dir() else "", st.st_size, st.st_mtime_ns])
    return out


def _tokenizer_fingerprint(tokenizer) -> dict:
    info = {
        "class": type(tokenizer).__name__,
        "name": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None),
        "eos": getattr(tokenizer, "eos_token_id", None),
        "bos": getattr(tokenizer, "bos_token_id", None),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers: the full definition
    if backend is not None:
        info["definition_sha1"] = hashlib.sha1(backend.to_str().encode()).hexdigest()
    return info


def _cache_key(paths: list[Path], tokenizer, seq_length: int, valid_fraction: float) -> str:
    if paths:
        sources = [[str(p.resolve()), _file_fingerprint(p)] for p in paths]
    else:
        sources = [["default_corpus", sys.version, hashlib.sha1(default_corpus().encode()).hexdigest()]]
    material = {
        "format": CACHE_FORMAT,
        "sources": sources,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "seq_length": seq_length,
        "valid_fraction": valid_fraction,
    }
    return hashlib.sha1(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


class DistributedBatchSampler:
    """Row indices of the micro-batches one data-parallel rank processes, one optimizer step at a time.

    A global batch is `global_batch_size = micro_batch_size * num_microbatches * dp_size` rows.
    Epoch e visits the rows in the order `torch.randperm(num_rows, generator=manual_seed(seed + e))`
    in `steps_per_epoch = num_rows // global_batch_size` global batches; the last
    `num_rows % global_batch_size` rows of that order are skipped in that epoch only (the next
    epoch reshuffles), so no global batch holds a row twice. Global batch k of an epoch is
    `order[k * G : (k + 1) * G]`, viewed as `[num_microbatches, dp_size, micro_batch_size]`: micro-batch
    m of DP rank r is `[m, r, :]` -- the DP ranks' rows are disjoint. Iteration is endless (epochs
    follow one another); each yielded step is a list of `num_microbatches` LongTensors
    `[micro_batch_size]`.

    `state_dict()` holds the number of steps consumed (yielded) so far; a new sampler that loads it
    continues with exactly the batches the original would have produced next. The DP layout
    (dp_rank, dp_size, micro_batch_size) may change across a resume; the rows of each global
    batch do not.

    shuffle=False is for rows that are already shuffled (megatron-core's GPTDataset / BlendedDataset
    via `nemo_neo.data.indexed`): global batch k of an epoch is then rows `[k * G, (k + 1) * G)`, so
    the rows a step gets follow from the consumed-sample count alone.
    """

    def __init__(
        self,
        num_rows: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        for name, value in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size),
                            ("dp_size", dp_size)):
            if value < 1:
                raise DataError(f"{name} must be >= 1, got {value}.")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}.")
        per_microbatch = micro_batch_size * dp_size
        if global_batch_size % per_microbatch:
            lower = global_batch_size // per_microbatch * per_microbatch
            hint = f"{lower} or {lower + per_microbatch}" if lower else f"{per_microbatch}"
            raise ConfigError(
                f"global_batch_size={global_batch_size} is not divisible by micro_batch_size * dp_size "
                f"= {micro_batch_size} * {dp_size} = {per_microbatch}: choose a global batch size that "
                f"is a multiple of {per_microbatch} (e.g. {hint}) or change micro_batch_size."
            )
        if num_rows < global_batch_size:
            raise DataError(
                f"only {num_rows} rows of data, fewer than one global batch of global_batch_size="
                f"{global_batch_size} rows: pass more text (or a smaller seq_length, which gives more "
                "rows), or lower global_batch_size."
            )
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_microbatches = global_batch_size // per_microbatch
        self.steps_per_epoch = num_rows // global_batch_size
        self.consumed_steps = 0
        self._order_epoch, self._order = None, None

    @property
    def epoch(self) -> int:
        """The epoch of the next step."""
        return self.consumed_steps // self.steps_per_epoch

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order, self._order_epoch = torch.randperm(self.num_rows, generator=generator), epoch
        return self._order

    def global_batch(self, step: int) -> torch.Tensor:
        """All row indices of global batch `step` (0-based, counted across epochs), `[G]`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        g = self.global_batch_size
        if not self.shuffle:  # no per-epoch permutation: it would cost 8 bytes per row of a huge dataset
            return torch.arange(k * g, (k + 1) * g)
        return self._epoch_order(epoch)[k * g : (k + 1) * g]

    def step_micro_batches(self, step: int) -> list[torch.Tensor]:
        """This DP rank's micro-batches (row indices) of global batch `step`."""
        grid = self.global_batch(step).view(self.num_microbatches, self.dp_size, self.micro_batch_size)
        return [grid[m, self.dp_rank].clone() for m in range(self.num_microbatches)]

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        while True:
            batches = self.step_micro_batches(self.consumed_steps)
            self.consumed_steps += 1
            yield batches

    def state_dict(self) -> dict:
        return {
            "consumed_steps": self.consumed_steps,
            "num_rows": self.num_rows,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        mismatched = [
            f"{k}: saved {state[k]}, now {getattr(self, k)}"
            for k in ("num_rows", "global_batch_size", "seed", "shuffle")
            if k in state and state[k] != getattr(self, k)
        ]
        if mismatched:
            raise DataError(
                "cannot resume the data order: the sampler was saved with different settings ("
                + "; ".join(mismatched)
                + "). Resume with the same data, seq_length, global_batch_size and seed."
            )
        self.consumed_steps = int(state["consumed_steps"])


def collate(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs of packed rows `[n, s + 1]`: input_ids `[n, s]`, labels (shifted by one), and
    a float loss_mask of ones (every position of a packed row is a real token)."""
    input_ids = rows[:, :-1].contiguous()
    return {
        "input_ids": input_ids,
        "labels": rows[:, 1:].contiguous(),
        "loss_mask": torch.ones(input_ids.shape, dtype=torch.float32),
    }
