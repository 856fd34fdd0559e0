"""Training samples from Megatron indexed datasets and weighted blends, through megatron-core.

megatron-core does the work: `IndexedDataset` (mmap'd `.bin`/`.idx`), `GPTDataset` (document / sample
/ shuffle indices, cached as .npy and mmap'd) and `BlendedMegatronDatasetBuilder` (weighted blends,
`split="969,30,1"` or one blend per split). This module adds what a training job needs around it:

* validation before anything is built, with one clear error each: missing `.bin`/`.idx`, a dataset
  tokenized with another tokenizer than the model's (the sidecar written by
  `nemo_neo.data.preprocess`), a blend of odd length or with negative / all-zero weights, a split
  that leaves a dataset fewer tokens than one sample (megatron-core would loop forever on zero);
* index caches built once per node: local rank 0 of each node builds them into a private temporary
  directory (in a subprocess without torch.distributed, because megatron-core's own build step only
  ever runs on global rank 0 and so cannot fill a node-local cache on the other nodes), renames it
  into place, then every rank opens the cache after a barrier. The cache directory is keyed by the
  whole spec including the data files' sizes and mtimes: a re-tokenized prefix never meets stale
  indices;
* `TokenSamples`: `len`, `.shape` and row-gather (`samples[LongTensor] -> [b, seq + 1]`), which the
  Trainer and `DistributedBatchSampler` accept in place of a row tensor. The samples are already
  shuffled by megatron-core, so the sampler walks them in order: step k of DP rank r reads samples
  determined by the consumed-sample count only (disjoint across DP ranks, exact on resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import torch

from nemo_neo.data.preprocess import tokenizer_fingerprint
from nemo_neo.errors import DataError, DataFileNotFoundError

SPLITS = ("train", "valid", "test")


# --- the blend -----------------------------------------------------------------------------------


def _number(x) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def parse_blend(spec, what: str = "data.blend") -> tuple[list[str], list[float] | None]:
    """`[w1, prefix1, w2, prefix2, ...]` (Megatron-LM's --data-path layout) -> (prefixes, weights);
    `prefix` or `[prefix, ...]` without weights -> (prefixes, None): sampled by their sizes.
    Zero-weight entries are dropped (megatron-core refuses them)."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec or [])
    if not items:
        raise DataError(f"{what} is empty: give [weight, prefix, weight, prefix, ...] or [prefix].")
    if _number(items[0]) is None:
        bad = [x for x in items if _number(x) is not None]
        if bad:
            raise DataError(f"{what} mixes weights and prefixes out of order ({items}): write [weight, prefix, ...].")
        return [str(x) for x in items], None
    if len(items) % 2:
        raise DataError(f"{what} has {len(items)} entries, an odd number: it must alternate weight, prefix "
                        f"(e.g. [0.3, /data/a_text_document, 0.7, /data/b_text_document]).")
    weights, prefixes = [_number(w) for w in items[0::2]], [str(p) for p in items[1::2]]
    for w, p in zip(weights, prefixes):
        if w is None or _number(p) is not None:
            raise DataError(f"{what} must alternate weight, prefix; got {items}.")
        if w < 0:
            raise DataError(f"{what}: weight {w} of {p} is negative; weights must be >= 0.")
    if sum(weights) <= 0:
        raise DataError(f"{what}: all weights are zero ({weights}); give at least one positive weight.")
    kept = [(p, w) for p, w in zip(prefixes, weights) if w > 0]
    return [p for p, _ in kept], [w for _, w in kept]


# --- the data files ------------------------------------------------------------------------------


def read_sidecar(prefix) -> dict | None:
    path = Path(f"{prefix}.json")
    return json.loads(path.read_text()) if path.is_file() else None


def check_prefix(prefix, tokenizer=None) -> dict | None:
    """Both files exist and (when the sidecar says how it was made) the tokenizer matches."""
    missing = [ext for ext in ("bin", "idx") if not Path(f"{prefix}.{ext}").is_file()]
    if missing:
        raise DataFileNotFoundError(
            f"indexed dataset {prefix} has no {' / '.join('.' + m for m in missing)} file: pass the prefix without "
            "extension (e.g. /data/corpus_text_document) of files made by nemo-neo-preprocess or Megatron-LM's "
            "preprocess_data.py, or re-run the preprocessing (an interrupted run leaves no .idx).")
    sidecar = read_sidecar(prefix)
    if sidecar is not None and tokenizer is not None:

        ours, theirs = tokenizer_fingerprint(tokenizer), sidecar.get("tokenizer", {})
        if ours["sha1"] != theirs.get("sha1"):
            raise DataError(
                f"indexed dataset {prefix} was tokenized with a different tokenizer (vocab {theirs.get('vocab_size')}, "
                f"fingerprint {str(theirs.get('sha1'))[:12]}) than the model's (vocab {ours['vocab_size']}, "
                f"fingerprint {ours['sha1'][:12]}); re-run nemo-neo-preprocess with --tokenizer <the model's directory>.")
    return sidecar


def _split_tokens(prefix: str, split_range: tuple[float, float]) -> tuple[int, int]:
    """(documents, tokens) of one split of one dataset, cut exactly as megatron-core cuts it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)  # kept alive while its mmap'd lengths are read (it unmaps on del)
    lengths = dataset.sequence_lengths
    beg, end = (int(round(b * float(len(lengths)))) for b in split_range)
    tokens = int(lengths[beg:end].sum())
    del lengths, dataset
    return end - beg, tokens


class _Tokenizer:
    """What megatron-core's GPT datasets read from a tokenizer: `unique_identifiers` (part of the
    index cache key), `eod` and `vocab_size`. No `pad`: then megatron-core pads with -1, an id that
    never occurs, so no real token is masked."""

    def __init__(self, sha1: str, eod: int, vocab_size: int | None):
        self.unique_identifiers = OrderedDict(**{"class": "nemo_neo", "fingerprint": sha1})
        self.eod, self.vocab_size = eod, vocab_size


# --- building ------------------------------------------------------------------------------------


def _spec(blend, blend_per_split, split, seq_length, seed, sizes, tokenizer) -> dict:
    if (blend is None) == (blend_per_split is None):
        raise DataError("give exactly one of data.blend (with data.split) or data.blend_per_split.")
    if seq_length < 1:
        raise DataError(f"seq_length must be >= 1, got {seq_length}.")
    if blend is not None:
        per_split = [parse_blend(blend)] * 3
        if not split:
            raise DataError("data.blend needs data.split, e.g. 969,30,1 (train, valid, test shares of each dataset).")
        from megatron.core.datasets.blended_megatron_dataset_config import (
            convert_split_vector_to_split_matrix,
            parse_and_normalize_split,
        )

        try:
            matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(str(split)))
        except (AssertionError, ZeroDivisionError):
            raise DataError(f"data.split={split!r} must be up to three non-negative numbers that do not all "
                            "equal zero, e.g. 969,30,1.") from None
    else:
        if isinstance(blend_per_split, dict):
            unknown = set(blend_per_split) - set(SPLITS)
            if unknown:
                raise DataError(f"data.blend_per_split has unknown splits {sorted(unknown)}; use train / valid / test.")
            blend_per_split = [blend_per_split.get(s) for s in SPLITS]
        per_split = [parse_blend(b, f"data.blend_per_split.{s}") if b else None for s, b in zip(SPLITS, blend_per_split)]
        matrix = [(0.0, 1.0) if b else None for b in per_split]
    sizes = [int(s) if s is not None else None for s in sizes]
    for i, name in enumerate(SPLITS):
        if per_split[i] is not None and len(per_split[i][0]) == 1:  # one dataset: no blending step
            per_split[i] = (per_split[i][0], None)
        if sizes[i] == 0 or per_split[i] is None:  # not asked for: megatron-core must not build it
            matrix[i], sizes[i] = None, 0
            if blend is None:
                per_split[i] = None
        elif matrix[i] is None:
            raise DataError(f"{sizes[i]} {name} samples were asked for but data.split={split} gives the {name} split "
                            "no share; give it a non-zero share.")
        elif sizes[i] is None and per_split[i][1] is not None and len(per_split[i][0]) > 1:
            raise DataError(f"a weighted {name} blend needs a number of {name} samples (megatron-core draws the "
                            "weights' shares of it); pass one.")
    prefixes = sorted({p for b in per_split if b for p in b[0]})
    sidecars = {p: check_prefix(p, tokenizer) for p in prefixes}
    for i, name in enumerate(SPLITS):
        if matrix[i] is None:
            continue
        for p in per_split[i][0]:
            docs, tokens = _split_tokens(p, matrix[i])
            if tokens < seq_length + 1:
                raise DataError(
                    f"the {name} split {tuple(round(x, 4) for x in matrix[i])} of {p} holds {docs} documents and "
                    f"{tokens} tokens, fewer than one sample of seq_length + 1 = {seq_length + 1}: give that split "
                    f"a larger share (data.split), more data, or a smaller seq_length.")
    if tokenizer is not None:

        fp = tokenizer_fingerprint(tokenizer)
        tok = {"sha1": fp["sha1"], "eod": fp["eos"] if fp["eos"] is not None else 0, "vocab_size": fp["vocab_size"]}
    else:
        eods = {(s or {}).get("eod") for s in sidecars.values()} - {None}
        tok = {"sha1": "unchecked", "eod": eods.pop() if len(eods) == 1 else 0, "vocab_size": None}
    files = {p: [os.stat(f"{p}.{e}").st_size for e in ("bin", "idx")] + [os.stat(f"{p}.idx").st_mtime_ns]
             for p in prefixes}
    return {"per_split": [[b[0], b[1]] if b else None for b in per_split], "split_matrix": matrix,
            "split": str(split) if blend is not None else None, "seq_length": int(seq_length), "seed": int(seed),
            "sizes": sizes, "tokenizer": tok, "files": files}


def _megatron_build(spec: dict, path_to_cache: str, mmap_bin_files: bool = False):
    """megatron-core's BlendedMegatronDatasetBuilder on the spec; [train, valid, test] (None = not built).

    mmap_bin_files=False reads each sample with one pread of the `.bin` (megatron-core's file reader)
    instead of mapping it: a mapped `.bin` puts every page the kernel faults in around a random sample
    into the process's RSS, which then grows with the corpus (measured in BENCHMARKS.md), while the
    reads cost one system call per sample. The `.idx` and the index caches stay mmap'd either way."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    blends = [tuple(b) if b else None for b in spec["per_split"]]
    common = dict(random_seed=spec["seed"], sequence_length=spec["seq_length"], path_to_cache=path_to_cache,
                  tokenizer=_Tokenizer(**spec["tokenizer"]), reset_position_ids=False, reset_attention_mask=False,
                  eod_mask_loss=False, create_attention_mask=False, mmap_bin_files=mmap_bin_files)
    if spec["split"] is not None:
        config = GPTDatasetConfig(blend=blends[0], split=spec["split"], **common)
        config.split_matrix = [tuple(m) if m else None for m in spec["split_matrix"]]  # unasked splits: None
    else:
        config = GPTDatasetConfig(blend_per_split=blends, **common)
    return BlendedMegatronDatasetBuilder(GPTDataset, spec["sizes"], lambda: True, config).build()


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _build_alone(spec: dict, path_to_cache: Path) -> None:
    """Build in a process that is alone: megatron-core's BlendedDataset asks torch.distributed for the
    rank even then, so a one-process gloo group lives for the duration of the build if none is up."""
    if torch.distributed.is_initialized():
        _megatron_build(spec, str(path_to_cache))
        return
    store = path_to_cache / ".process_group"
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        _megatron_build(spec, str(path_to_cache))
    finally:
        torch.distributed.destroy_process_group()
        store.unlink(missing_ok=True)


def _build_cache(spec: dict, final: Path, in_process: bool) -> None:
    """Build the indices into a private directory, then rename it to `final` (atomic; on a shared
    filesystem another node may win the rename with identical files, which is fine)."""
    tmp = final.parent / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if in_process:
            _build_alone(spec, tmp)
        else:  # megatron-core builds only on global rank 0 when torch.distributed is up: build outside it
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                                os.environ.get("PYTHONPATH", "")])}
            for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(var, None)
            proc = subprocess.run([sys.executable, "-m", "nemo_neo.data.indexed", str(tmp)], input=json.dumps(spec),
                                  text=True, capture_output=True, env=env)
            if proc.returncode:
                raise RuntimeError(f"building the dataset indices in {tmp} failed:\n{proc.stderr[-3000:]}")
        (tmp / ".ready").write_text(json.dumps(spec) + "\n")
        with open(final.parent / "builds.jsonl", "a") as log:  # which process built which cache (and how often)
            log.write(json.dumps({"cache": final.name, "host": socket.gethostname(), "pid": os.getpid(),
                                  "node": os.environ.get("GROUP_RANK", "0"),
                                  "local_rank": os.environ.get("LOCAL_RANK", "0")}) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:  # another node published the same cache first
            if not (final / ".ready").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_cache_dir() -> Path:
    return Path(os.environ.get("NEMO_NEO_DATA_CACHE", Path.home() / ".cache" / "nemo_neo" / "gpt_indices"))


def build_gpt_datasets(blend=None, blend_per_split=None, split: str | None = "969,30,1", *, seq_length: int,
                       train_samples: int, valid_samples: int | None = 0, test_samples: int = 0, seed: int = 1234,
                       tokenizer=None, cache_dir=None, mmap_bin_files: bool = False) -> list[TokenSamples | None]:
    """[train, valid, test] TokenSamples from megatron-core GPT datasets (None for splits not asked for).

    blend: `[w, prefix, w, prefix, ...]` or `[prefix]` with `split` ("969,30,1": each dataset's documents
        are cut into train / valid / test ranges, so validation documents are never trained on);
        or blend_per_split: {"train": blend, "valid": blend, "test": blend}.
    train_samples: how many samples training consumes (steps x global batch size); megatron-core
        repeats the data in epochs as needed. valid_samples: None = one epoch of the valid split.
    tokenizer: the model's tokenizer; datasets with a sidecar must have been made with it.
    cache_dir: where the index caches go (default $NEMO_NEO_DATA_CACHE or ~/.cache/nemo_neo/gpt_indices);
        node-local or shared. Call on every rank of the job (collective when torch.distributed is up).
    mmap_bin_files: map the `.bin` files (megatron-core's default) instead of reading each sample with
        pread (ours: per-rank memory stays flat as the corpus grows; see `_megatron_build`).
    """
    spec = _spec(blend, blend_per_split, split, seq_length, seed, [train_samples, valid_samples, test_samples],
                 tokenizer)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    rank, world = _world()
    if int(os.environ.get("LOCAL_RANK", rank)) == 0 and not (final / ".ready").is_file():
        root.mkdir(parents=True, exist_ok=True)
        _build_cache(spec, final, in_process=world == 1)
    if world > 1:
        torch.distributed.barrier()
    if not (final / ".ready").is_file():
        raise DataError(f"the dataset index cache {final} was not built on this node (local rank 0 builds it); "
                        "check that LOCAL_RANK is set per node, or pass a cache_dir every rank can read.")
    datasets = _megatron_build(spec, str(final), mmap_bin_files)  # every rank: cache hits (mmap'd indices)
    return [TokenSamples(d, seq_length) if d is not None else None for d in datasets]


class TokenSamples:
    """Rows `[seq_length + 1]` of a megatron-core GPTDataset / BlendedDataset, gathered on demand
    (inputs row[:-1], labels row[1:], like a packed row tensor)."""

    pre_shuffled = True  # megatron-core's shuffle index already shuffles: the sampler must not reshuffle

    def __init__(self, dataset, seq_length: int):
        self.dataset, self.seq_length = dataset, seq_length

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.seq_length + 1)

    def sample(self, index: int) -> tuple[torch.Tensor, int]:
        """(row, id of the blended dataset it came from; 0 without a blend)."""
        item = self.dataset[int(index)]
        return torch.cat([item["tokens"], item["labels"][-1:]]), int(item.get("dataset_id", 0))

    def __getitem__(self, index):
        if isinstance(index, slice):
            index = range(*index.indices(len(self)))
        elif isinstance(index, int) or (torch.is_tensor(index) and index.dim() == 0):
            return self.sample(int(index))[0]
        indices = [int(i) for i in index]
        if not indices:
            return torch.empty(0, self.seq_length + 1, dtype=torch.long)
        return torch.stack([self.sample(i)[0] for i in indices])

    def rows(self, n: int | None = None) -> torch.Tensor:
        """The first n samples (all when None) as an int64 tensor, e.g. calibration or validation rows."""
        return self[: len(self) if n is None else min(n, len(self))]


if __name__ == "__main__":  # the index build of `_build_cache`, in a process without torch.distributed
    _build_alone(json.loads(sys.stdin.read()), Path(sys.argv[1]))
