"""Tokenize text into a Megatron indexed dataset (`<prefix>.bin` + `<prefix>.idx`) plus a sidecar
`<prefix>.json`, with megatron-core's own `IndexedDatasetBuilder` (so Megatron-LM / NeMo read it).

    nemo-neo-preprocess --input a.jsonl b.txt hf_dir/ --output-prefix data/corpus --tokenizer ckpt/ --workers 2

One document per .jsonl line (its `--json-key` field), per .txt file, per row of a Hugging Face
`save_to_disk` directory; the tokenizer's EOS is appended to every document (`--no-append-eod` to
skip, as Megatron-LM's preprocess_data.py does without `--append-eod`). Tokens are uint16 when the
vocabulary fits (megatron-core's `DType.optimal_dtype`), else int32.

Atomic: everything is written to hidden temporary files next to the prefix and renamed into place
only when complete, `.idx` last (megatron-core opens nothing without it); an interrupted run leaves no
readable prefix (its leftovers are removed by the next run). The sidecar records the tokenizer
fingerprint that `nemo_neo.data.indexed` checks against the model's tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy

from nemo_neo.checkpoint.atomic import OutputExistsError
from nemo_neo.data.dataset import _check_source, jsonl_documents, read_utf8
from nemo_neo.errors import DataError, DataFileNotFoundError

SIDECAR_FORMAT = "nemo_neo.indexed/1"
_DOCS_PER_TASK = 64  # documents per tokenizer call / worker task: large enough to amortize IPC


# --- tokenizer identity -------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> dict:
    """What decides the token ids: the vocabulary size, special ids and the full tokenizer definition
    (fast tokenizers) or the vocabulary (slow ones). The path is left out on purpose: the same
    tokenizer copied into a student checkpoint must match the teacher's."""
    info = {
        "vocab_size": len(tokenizer),
        "eos": getattr(tokenizer, "eos_token_id", None),
        "bos": getattr(tokenizer, "bos_token_id", None),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        for transient in ("truncation", "padding"):  # call-time settings, not the vocabulary
            definition.pop(transient, None)
        info["definition_sha1"] = hashlib.sha1(json.dumps(definition, sort_keys=True).encode()).hexdigest()
    else:
        info["vocab_sha1"] = hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    info["sha1"] = hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()
    return info


def token_dtype(vocab_size: int, force: str | None = None):
    from megatron.core.datasets.indexed_dataset import DType

    if force in (None, "auto"):
        return DType.optimal_dtype(vocab_size)
    dtype = {"uint16": numpy.uint16, "int32": numpy.int32}.get(force)
    if dtype is None:
        raise DataError(f"dtype must be auto, uint16 or int32, got {force!r}.")
    if dtype is numpy.uint16 and vocab_size > 65536:
        raise DataError(f"a vocabulary of {vocab_size} tokens does not fit uint16; use --dtype int32 (or auto).")
    return dtype


# --- reading documents (streamed: a corpus is never held in memory whole) -------------------------


def _check_input(path: Path) -> None:

    try:
        _check_source(path)
    except FileNotFoundError as e:
        raise DataFileNotFoundError(str(e)) from None


def _source_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def iter_documents(path: Path, json_key: str = "text") -> Iterator[tuple[str, int]]:
    """(document text, bytes it came from) of one source, in order; empty documents are skipped."""
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise DataError(f"{path} is a Hugging Face dataset directory; reading it needs the `datasets` package: "
                            "pip install datasets (or export the text to .jsonl).") from None
        dataset = datasets.load_from_disk(str(path))
        if json_key not in dataset.column_names:
            raise DataError(f'Hugging Face dataset {path} has no "{json_key}" column (columns: {dataset.column_names}); '
                            "pass --json-key <column>.")
        for text in dataset[json_key]:
            if text:
                yield text, len(text.encode("utf-8"))
    elif path.suffix == ".jsonl":
        yield from jsonl_documents(path, json_key, fix="pass --json-key <field> or fix the file.")
    else:
        text = read_utf8(path)
        if text:
            yield text, path.stat().st_size


# --- tokenization (in this process or in worker processes) ---------------------------------------

_worker_encode = None
_worker_eod: int | None = None
_worker_dtype = None


def batch_encoder(tokenizer):
    """docs -> token id lists, exactly as `tokenizer(docs)["input_ids"]` gives them.

    A fast tokenizer's Rust backend is called directly (a copy with truncation and padding off, as
    transformers sets them for a plain call): transformers' wrapper around it builds attention masks
    and a BatchEncoding per call, which cost as much as the tokenization itself on short documents."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        # verbose=False: documents are longer than the model's max length by design (they are packed)
        return lambda docs: tokenizer(docs, verbose=False)["input_ids"]
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(backend.to_str())
    backend.no_truncation()
    backend.no_padding()
    return lambda docs: [e.ids for e in backend.encode_batch(docs, add_special_tokens=True)]


def _init_worker(tokenizer, eod, dtype, forked: bool = True) -> None:
    global _worker_encode, _worker_eod, _worker_dtype
    if forked:  # one thread per worker process: the pool is the parallelism
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encode, _worker_eod, _worker_dtype = batch_encoder(tokenizer), eod, dtype


def _encode(task: tuple[int, list[str], int]) -> tuple[int, list[numpy.ndarray], int]:
    source, docs, nbytes = task
    out = []
    for ids in _worker_encode(docs):
        if _worker_eod is not None and not (ids and ids[-1] == _worker_eod):
            ids.append(_worker_eod)
        out.append(numpy.asarray(ids, dtype=_worker_dtype))
    return source, out, nbytes


def _tasks(paths: Sequence[Path], json_key: str) -> Iterator[tuple[int, list[str], int]]:
    for i, path in enumerate(paths):
        docs, nbytes = [], 0
        for text, size in iter_documents(path, json_key):
            docs.append(text)
            nbytes += size
            if len(docs) == _DOCS_PER_TASK:
                yield i, docs, nbytes
                docs, nbytes = [], 0
        if docs:
            yield i, docs, nbytes


# --- writing -----------------------------------------------------------------------------------


def prefix_files(prefix) -> dict[str, Path]:
    prefix = Path(prefix)
    return {ext: prefix.parent / f"{prefix.name}.{ext}" for ext in ("bin", "idx", "json")}


def _remove_stale_temporaries(prefix: Path) -> None:
    """Leftovers of a killed run (`.<name>.tmp-<pid>.*`) whose process is gone."""
    for path in prefix.parent.glob(f".{prefix.name}.tmp-*"):
        try:
            pid = int(path.name[len(prefix.name) + 6 :].split(".", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def preprocess(inputs: Sequence[str | os.PathLike], output_prefix: str | os.PathLike, tokenizer, json_key: str = "text",
               workers: int = 1, append_eod: bool = True, dtype: str | None = None, overwrite: bool = False,
               progress: bool = True) -> dict:
    """Tokenize `inputs` into `output_prefix`.bin/.idx/.json; returns the sidecar (also written).

    workers > 1 tokenizes in that many forked processes (call it from a process without other
    threads, e.g. the CLI); the documents keep their input order either way."""
    if not inputs:
        raise DataError("no --input given: pass .jsonl / .txt files or Hugging Face save_to_disk directories.")
    paths = [Path(p) for p in inputs]
    for path in paths:
        _check_input(path)
    sources = [{"path": str(p.resolve()), "bytes": _source_bytes(p)} for p in paths]
    return _write_prefix(output_prefix, tokenizer, _tasks(paths, json_key), sources, json_key, workers, append_eod,
                         dtype, overwrite, progress)


def preprocess_documents(docs: Sequence[str], output_prefix, tokenizer, source: str, append_eod: bool = True,
                         dtype: str | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """The same for documents already in memory (the library's text sources after their held-out split)."""
    docs = [d for d in docs if d]
    tasks = ((0, list(docs[i : i + _DOCS_PER_TASK]), sum(len(d.encode("utf-8")) for d in docs[i : i + _DOCS_PER_TASK]))
             for i in range(0, len(docs), _DOCS_PER_TASK))
    sources = [{"path": source, "bytes": sum(len(d.encode("utf-8")) for d in docs)}]
    return _write_prefix(output_prefix, tokenizer, tasks, sources, None, 1, append_eod, dtype, overwrite, progress)


def _write_prefix(output_prefix, tokenizer, tasks, sources: list[dict], json_key, workers: int, append_eod: bool,
                  dtype, overwrite: bool, progress: bool) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm.auto import tqdm


    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}.")
    prefix = Path(output_prefix)
    files = prefix_files(prefix)
    existing = [str(p) for p in files.values() if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{', '.join(existing)} already exist; choose another --output-prefix or pass --overwrite.")
    eod = getattr(tokenizer, "eos_token_id", None) if append_eod else None
    if append_eod and eod is None:
        raise DataError("the tokenizer has no EOS token to end documents with; pass --no-append-eod.")
    fingerprint = tokenizer_fingerprint(tokenizer)
    np_dtype = token_dtype(fingerprint["vocab_size"], dtype)

    prefix.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(prefix)
    tmp = {ext: prefix.parent / f".{prefix.name}.tmp-{os.getpid()}.{ext}" for ext in files}
    per_source = [{**s, "documents": 0, "tokens": 0} for s in sources]
    builder = IndexedDatasetBuilder(str(tmp["bin"]), dtype=np_dtype)
    pool = None
    start = time.perf_counter()
    bar = tqdm(total=sum(s["bytes"] for s in per_source), unit="B", unit_scale=True, desc="tokenize",
               disable=not progress, dynamic_ncols=True)
    try:
        if workers > 1:
            import multiprocessing

            pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer, eod, np_dtype))
            results = pool.imap(_encode, tasks, chunksize=1)
        else:
            _init_worker(tokenizer, eod, np_dtype, forked=False)
            results = map(_encode, tasks)
        docs = tokens = 0
        for source, encoded, nbytes in results:
            for ids in encoded:
                if len(ids):
                    builder.add_document(ids, [len(ids)])  # lengths: one sequence per document
                    per_source[source]["documents"] += 1
                    per_source[source]["tokens"] += len(ids)
                    docs += 1
                    tokens += len(ids)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(docs_s=f"{docs / elapsed:.0f}", tok_s=f"{tokens / elapsed:.0f}", refresh=False)
            bar.update(nbytes)
        if docs == 0:
            raise DataError(f"{', '.join(s['path'] for s in sources)} hold no non-empty documents; nothing to tokenize.")
        builder.finalize(str(tmp["idx"]))
        sidecar = {"format": SIDECAR_FORMAT, "tokenizer": fingerprint, "vocab_size": fingerprint["vocab_size"],
                   "dtype": numpy.dtype(np_dtype).name, "eod": eod, "append_eod": append_eod, "json_key": json_key,
                   "documents": docs, "tokens": tokens, "sources": per_source,
                   "seconds": round(time.perf_counter() - start, 3)}
        tmp["json"].write_text(json.dumps(sidecar, indent=1) + "\n")
        for path in tmp.values():
            _fsync(path)
        files["idx"].unlink(missing_ok=True)  # never pair an old .idx with the new .bin
        os.replace(tmp["bin"], files["bin"])
        os.replace(tmp["json"], files["json"])
        os.replace(tmp["idx"], files["idx"])  # the commit: the prefix is readable from here on
        return sidecar
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
        if not builder.data_file.closed:
            builder.data_file.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)
