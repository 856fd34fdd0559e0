"""The teacher cache on disk: per sample and position, the teacher's top-K ids, their log-probs and
the log of the tail mass (`sparse_kl.TopKTargets`), keyed by the sample's index in the dataset.

Layout of a cache directory::

    manifest.json            format, K, temperature, seq_length, vocab size, dtypes, chunk size and the
                             fingerprints of the teacher checkpoint, its tokenizer and the dataset
    chunk_000000.safetensors samples [0, chunk_samples): ids [n, seq, K] (uint16 when the vocab fits,
    chunk_000001.safetensors else int32), log_probs [n, seq, K] (float16 or bfloat16), log_tail
    ...                      [n, seq] (float32: the tail mass is what 1 - sum would lose) and
                             row_hash [n] (int64 hash of each sample's tokens)
    valid_chunk_000000.safetensors   the validation split, the same layout keyed by the held-out
    ...                      sample's index (manifest["valid"]: its fingerprint and counts)

The training split's fields are the manifest's top level (so caches without a validation split,
written before it existed, read as they did); the validation split is optional: a cache without one
serves training, and its distillation reports the student's LM loss alone (`distill_from_cache`).

Sample i lives in chunk i // chunk_samples, whoever wrote it: the cache does not depend on the TP /
PP / DP layout that wrote it or reads it, and any reader gets the same targets for a sample. Each
chunk is written to a temporary file and renamed into place (a chunk file is complete or absent), so
a killed writer resumes with the missing chunks (`cache_writer`).

Every read is checked: the manifest against the student's vocab and tokenizer, the teacher (when
its checkpoint is named), the dataset and sequence length; every sample's tokens against the hash
stored with its targets. A mismatch or a missing chunk is one `TeacherCacheError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from nemo_neo import chaos
from nemo_neo.checkpoint.hf_io import tokenizer_digest
from nemo_neo.checkpoint.native import INDEX, read_index
from nemo_neo.data.dataset import collate
from nemo_neo.distill.sparse_kl import TopKTargets
from nemo_neo.errors import DataError

FORMAT = 1
MANIFEST = "manifest.json"
VALUE_DTYPES = {"float16": (np.float16, torch.float16), "bfloat16": (None, torch.bfloat16)}
# the manifest fields a cache must share with the run that reads or resumes it, and what each is
IDENTITY = {"teacher": "teacher checkpoint", "tokenizer": "tokenizer", "dataset": "dataset",
            "seq_length": "sequence length", "top_k": "K", "temperature": "temperature",
            "vocab_size": "vocab size", "values_dtype": "value dtype", "chunk_samples": "chunk size"}
_PROBES = 16  # samples hashed into the dataset fingerprint
_OPEN_CHUNKS = 64  # chunk files kept open (mmap'd) by a reader
SPLITS = {"train": "chunk", "valid": "valid_chunk"}  # split -> its chunk files' prefix


class TeacherCacheError(DataError):
    """A teacher cache that does not fit the run (another teacher, tokenizer, dataset, sequence
    length), is incomplete, or cannot be made as asked (K larger than the vocab)."""


# --- fingerprints --------------------------------------------------------------------------------


def row_hashes(rows: torch.Tensor) -> torch.Tensor:
    """An int64 hash of each token row [n, seq + 1] (blake2b of its int64 tokens)."""
    data = rows.to(torch.int64).contiguous().numpy()
    return torch.tensor([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little", signed=True)
                         for r in data], dtype=torch.int64)


def dataset_fingerprint(samples) -> str:
    """Number of samples, their length and the tokens of a few samples spread over the dataset."""
    n = len(samples)
    probes = torch.linspace(0, n - 1, min(n, _PROBES)).round().long().unique()
    hashes = row_hashes(samples[probes]).tolist() if n else []
    return hashlib.sha256(json.dumps([n, list(samples.shape), hashes]).encode()).hexdigest()[:20]


def teacher_fingerprint(ckpt) -> str:
    """The checkpoint's index (architecture, tensor names / shapes) and each weight file's name, size
    and first and last MiB: changed weights change it without reading gigabytes at every start."""
    ckpt = Path(ckpt)
    digest = hashlib.sha256((ckpt / INDEX).read_bytes())
    for path in sorted(ckpt.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read())
    return digest.hexdigest()[:20]


def tokenizer_fingerprint(ckpt) -> str | None:
    """sha256 of the checkpoint's tokenizer.json, shortened (None when it has none)."""
    digest = tokenizer_digest(ckpt)
    return digest[:20] if digest else None


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def bytes_per_token(top_k: int, vocab_size: int, values_dtype: str = "float16") -> int:
    """Disk bytes per cached position: K ids, K values and the float32 log tail."""
    return top_k * (ids_dtype(vocab_size).itemsize + torch.empty(0, dtype=VALUE_DTYPES[values_dtype][1]).element_size()) + 4


def split_fields(samples, chunk_samples: int) -> dict:
    """What identifies one split's samples and how many chunks hold them."""
    n = len(samples)
    return {"dataset": dataset_fingerprint(samples), "num_samples": n, "num_chunks": -(-n // chunk_samples)}


def make_manifest(teacher_ckpt, samples, top_k: int, temperature: float, values_dtype: str = "float16",
                  chunk_samples: int = 64, valid_samples=None) -> dict:
    """The manifest of a cache of `samples` (rows [n, seq + 1]; with `valid_samples`, the held-out
    rows, a validation split) from `teacher_ckpt`; checks K."""
    arch, _ = read_index(teacher_ckpt)
    if not 1 <= top_k <= arch.vocab_size:
        raise TeacherCacheError(f"cache top_k={top_k} must be between 1 and the teacher's vocab size {arch.vocab_size}.")
    if values_dtype not in VALUE_DTYPES:
        raise TeacherCacheError(f"cache values_dtype={values_dtype!r}: use one of {sorted(VALUE_DTYPES)}.")
    if chunk_samples < 1 or not temperature > 0:
        raise TeacherCacheError(f"cache chunk_samples={chunk_samples} must be >= 1 and temperature={temperature} > 0.")
    manifest = {"format": FORMAT, "teacher": teacher_fingerprint(teacher_ckpt), "teacher_path": str(teacher_ckpt),
                "tokenizer": tokenizer_fingerprint(teacher_ckpt), **split_fields(samples, chunk_samples),
                "seq_length": int(samples.shape[1]) - 1, "top_k": int(top_k), "temperature": float(temperature),
                "vocab_size": arch.vocab_size, "ids_dtype": ids_dtype(arch.vocab_size).name,
                "values_dtype": values_dtype, "chunk_samples": int(chunk_samples)}
    if valid_samples is not None and len(valid_samples):
        if valid_samples.shape[1] != samples.shape[1]:
            raise TeacherCacheError(f"validation rows of {valid_samples.shape[1] - 1} tokens, training rows of "
                                    f"{samples.shape[1] - 1}: a cache has one sequence length; pass rows of the same length.")
        manifest["valid"] = split_fields(valid_samples, chunk_samples)
    return manifest


def split_of(manifest: dict, split: str) -> dict | None:
    """One split's fields (dataset, num_samples, num_chunks); None when the cache has no such split."""
    return {k: manifest[k] for k in ("dataset", "num_samples", "num_chunks")} if split == "train" else manifest.get(split)


def mismatches(have: dict, want: dict, keys=IDENTITY) -> list[str]:
    return [f"{IDENTITY[k]} ({k}: cache {have.get(k)!r}, this run {want[k]!r})"
            for k in keys if k in want and have.get(k) != want[k]]


# --- chunk files ---------------------------------------------------------------------------------


def chunk_path(root, chunk: int, split: str = "train") -> Path:
    return Path(root) / f"{SPLITS[split]}_{chunk:06d}.safetensors"


def finished_chunks(root, split: str = "train") -> set[int]:
    return {int(p.stem.rsplit("_", 1)[1]) for p in Path(root).glob(f"{SPLITS[split]}_*.safetensors")}


def _values_to_numpy(values: torch.Tensor, values_dtype: str) -> np.ndarray:
    np_dtype, torch_dtype = VALUE_DTYPES[values_dtype]
    values = values.to(torch_dtype)
    # numpy has no bfloat16: its bits travel as int16 and are reinterpreted on read
    return values.numpy() if np_dtype is not None else values.view(torch.int16).numpy()


def write_chunk(root, chunk: int, targets: TopKTargets, rows: torch.Tensor, manifest: dict, split: str = "train") -> int:
    """Write one chunk atomically (temporary file, fsync, rename); returns its size in bytes."""
    final = chunk_path(root, chunk, split)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    save_file({"ids": targets.ids.numpy().astype(manifest["ids_dtype"]),
               "log_probs": _values_to_numpy(targets.log_probs, manifest["values_dtype"]),
               "log_tail": targets.log_tail.to(torch.float32).numpy(),
               "row_hash": row_hashes(rows).numpy()}, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    chaos.point("cache_chunk")  # a test hook (SIGKILL with a finished but unpublished chunk)
    os.replace(tmp, final)
    return final.stat().st_size


def remove_partial_chunks(root) -> None:
    """Temporary files of a writer that was killed (their chunks are absent and get recomputed)."""
    for path in Path(root).glob(".*chunk_*.tmp-*"):
        path.unlink(missing_ok=True)


# --- reading -------------------------------------------------------------------------------------


class TeacherCache:
    """Read side of a cache directory: the manifest and the targets of any samples."""

    def __init__(self, root):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise TeacherCacheError(f"{self.root} is not a teacher cache (no {MANIFEST}): write one with "
                                    "nemo-neo-cache-teacher or the recipe's cache_teacher stage.")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise TeacherCacheError(f"teacher cache {self.root} has format {self.manifest.get('format')}, this "
                                    f"version reads {FORMAT}: rewrite it.")
        self._open: OrderedDict[int, object] = OrderedDict()

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    @property
    def temperature(self) -> float:
        return self.manifest["temperature"]

    def check(self, samples, student_vocab: int | None = None, student_ckpt=None, teacher_ckpt=None) -> None:
        """One TeacherCacheError if the cache was not made for this dataset (its samples), sequence
        length, student tokenizer / vocab or teacher (when named); also lists the missing chunks."""
        want = {"dataset": dataset_fingerprint(samples), "seq_length": int(samples.shape[1]) - 1}
        if student_vocab is not None:
            want["vocab_size"] = student_vocab
        tokenizer = tokenizer_fingerprint(student_ckpt) if student_ckpt is not None else None
        if tokenizer is not None and self.manifest.get("tokenizer") is not None:
            want["tokenizer"] = tokenizer
        if teacher_ckpt is not None:
            want["teacher"] = teacher_fingerprint(teacher_ckpt)
        self._refuse(mismatches(self.manifest, want))
        self._check_complete("train")

    def check_valid(self, valid_samples) -> bool:
        """Whether the cache holds the targets of these validation rows: False when it has no
        validation split (a cache written before there was one); one TeacherCacheError when its
        split was made for other rows or is incomplete."""
        split = split_of(self.manifest, "valid")
        if split is None:
            return False
        want = {"dataset": dataset_fingerprint(valid_samples), "seq_length": int(valid_samples.shape[1]) - 1}
        have = {"dataset": split["dataset"], "seq_length": self.manifest["seq_length"]}
        self._refuse([w.replace("dataset", "validation set", 1) for w in mismatches(have, want)])
        self._check_complete("valid")
        return True

    def _refuse(self, wrong: list[str]) -> None:
        if wrong:
            raise TeacherCacheError(f"teacher cache {self.root} was made for another {'; another '.join(wrong)}: "
                                    "write a cache for this run (nemo-neo-cache-teacher / the cache_teacher stage) "
                                    "or point distill.teacher_cache at the right one.")

    def _check_complete(self, split: str) -> None:
        total = split_of(self.manifest, split)["num_chunks"]
        missing = sorted(set(range(total)) - finished_chunks(self.root, split))
        if missing:
            raise TeacherCacheError(
                f"teacher cache {self.root} is incomplete: {len(missing)} of {total} {split} chunks are missing, "
                f"first {chunk_path(self.root, missing[0], split).name}; rerun the caching command (it resumes).")

    def _chunk(self, chunk: int, split: str):
        handle = self._open.get((split, chunk))
        if handle is None:
            path = chunk_path(self.root, chunk, split)
            if not path.is_file():
                raise TeacherCacheError(f"teacher cache chunk {path} is missing (sample indices "
                                        f"{chunk * self.manifest['chunk_samples']}...); rerun the caching command "
                                        "(it resumes and writes the missing chunks).")
            handle = self._open[(split, chunk)] = safe_open(str(path), framework="np")
            if len(self._open) > _OPEN_CHUNKS:
                self._open.popitem(last=False)
        self._open.move_to_end((split, chunk))
        return handle

    def targets(self, indices, rows: torch.Tensor | None = None, split: str = "train") -> TopKTargets:
        """Targets [b, seq, K] / [b, seq] of the samples at `indices` of the split; with `rows` (their
        tokens [b, seq + 1]) each sample's tokens are checked against the hash stored with its targets."""
        per = self.manifest["chunk_samples"]
        parts = {"ids": [], "log_probs": [], "log_tail": [], "row_hash": []}
        for index in (int(i) for i in indices):
            chunk = self._chunk(index // per, split)
            offset = index % per
            for name, values in parts.items():
                values.append(chunk.get_slice(name)[offset : offset + 1])
        ids, log_probs, log_tail, stored = (np.concatenate(v) for v in parts.values())
        if rows is not None and not np.array_equal(stored, row_hashes(rows).numpy()):
            raise TeacherCacheError(f"teacher cache {self.root} holds targets for other tokens at some of the sample "
                                    "indices read: it was made for another dataset (or data order); rewrite it.")
        log_probs = torch.from_numpy(log_probs)
        if self.manifest["values_dtype"] == "bfloat16":
            log_probs = log_probs.view(torch.bfloat16)
        return TopKTargets(torch.from_numpy(ids.astype(np.int64)), log_probs, torch.from_numpy(log_tail))


TARGET_KEYS = ("teacher_ids", "teacher_log_probs", "teacher_log_tail")


class CachedTargetSamples:
    """Samples of a split with their cached teacher targets: `samples[index_tensor]` is the micro-batch
    dict (`collate` of the rows plus TARGET_KEYS), for the Trainer with collate_fn=None.
    with_targets=False leaves them out (pipeline stages before the last, which compute no loss)."""

    def __init__(self, samples, cache: TeacherCache, with_targets: bool = True, split: str = "train"):
        self.samples, self.cache, self.with_targets, self.split = samples, cache, with_targets, split
        self.pre_shuffled = getattr(samples, "pre_shuffled", False)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def shape(self):
        return self.samples.shape

    def __getitem__(self, indices) -> dict:
        rows = self.samples[indices]
        batch = collate(rows)
        if self.with_targets:
            batch.update(zip(TARGET_KEYS, self.cache.targets(indices, rows, self.split)))
        return batch


def batch_targets(batch: dict) -> TopKTargets:
    """The cached targets of a micro-batch made by CachedTargetSamples."""
    return TopKTargets(*(batch[k] for k in TARGET_KEYS))
