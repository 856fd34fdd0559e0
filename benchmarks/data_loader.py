"""Indexed data (issue 14): loader peak RSS on a 20M- vs a 200M-token corpus (megatron-core's pread
reader, our default, and its mmap reader), and preprocessing throughput with 1 and 2 workers vs a
plain single-process `tokenizer(batch)` loop.

    python benchmarks/data_loader.py [--small 20e6 --large 200e6 --steps 200 --text-mb 16]

Every figure comes from its own fresh process (RSS and tokenizer thread pools do not leak between
measurements). The synthetic corpora are random token ids written straight to `.bin`/`.idx` with
megatron-core's builder (no tokenizer) and deleted afterwards; the text for the throughput part is
tiny Shakespeare (../shared/data) repeated, one paragraph per .jsonl line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def write_corpus(prefix: Path, tokens: int, seed: int = 0) -> None:
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = numpy.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
    written = 0
    while written < tokens:
        lengths = rng.integers(200, 1800, size=1000)  # documents of ~1000 tokens
        ids = rng.integers(0, 49152, size=int(lengths.sum()), dtype=numpy.uint16)
        for doc in numpy.split(ids, numpy.cumsum(lengths)[:-1]):
            builder.add_document(doc, [len(doc)])
        written += int(lengths.sum())
    builder.finalize(f"{prefix}.idx")


def child_loader(prefix: str, cache: str, steps: int, gbs: int, seq: int, mmap: int) -> dict:
    """Peak RSS growth of building the datasets (index caches from scratch) and reading `steps`
    global batches through the Trainer's sampler, over the RSS after imports."""
    import megatron.core.datasets.blended_megatron_dataset_builder  # noqa: F401  (imports are not the loader)
    import megatron.core.datasets.helpers  # noqa: F401
    import torch

    from nemo_neo.data.dataset import DistributedBatchSampler, collate
    from nemo_neo.data.indexed import build_gpt_datasets

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    base, anon_base = _rss("VmRSS"), _rss("RssAnon")
    anon_peak = anon_base
    start = time.perf_counter()
    train, _, _ = build_gpt_datasets([prefix], split="1,0,0", seq_length=seq, train_samples=steps * gbs, cache_dir=cache,
                                     mmap_bin_files=bool(mmap))
    built = time.perf_counter() - start
    sampler = DistributedBatchSampler(len(train), gbs, gbs, shuffle=not train.pre_shuffled)
    checksum = 0
    start = time.perf_counter()
    for step, micro in zip(range(steps), iter(sampler)):
        for idx in micro:
            checksum += int(collate(train[idx])["input_ids"].sum())
        if step % 10 == 0:  # private memory is sampled (no peak counter for it alone)
            anon_peak = max(anon_peak, _rss("RssAnon"))
    anon_peak = max(anon_peak, _rss("RssAnon"))
    return {"samples": len(train), "build_s": round(built, 2), "read_s": round(time.perf_counter() - start, 2),
            "peak_growth_mb": round((_rss("VmHWM") - base) / 2**20, 1),
            "anon_peak_growth_mb": round((anon_peak - anon_base) / 2**20, 1),
            "file_rss_end_mb": round(_rss("RssFile") / 2**20, 1), "checksum": checksum, "torch": torch.__version__}


def child_tokenize(mode: str, text: str, tokenizer_dir: str, out: str) -> dict:
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (imports are not throughput: ~4 s here)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start = time.perf_counter()
    if mode == "plain":  # the baseline: one process, tokenizer(batch) over the same documents
        docs = [json.loads(line)["text"] for line in open(text)]
        tokens = 0
        for i in range(0, len(docs), 64):
            tokens += sum(len(ids) + 1 for ids in tokenizer(docs[i : i + 64], verbose=False)["input_ids"])
    else:
        from nemo_neo.data.preprocess import preprocess

        tokens = preprocess([text], out, tokenizer, workers=int(mode), progress=False, overwrite=True)["tokens"]
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds)}


def run_child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", nargs="+")
    p.add_argument("--small", type=float, default=20e6)
    p.add_argument("--large", type=float, default=200e6)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--gbs", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--text-mb", type=float, default=16.0)
    p.add_argument("--tokenizer", default=None, help="default: the converted SmolLM2 teacher in ~/.cache/nemo_neo")
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_loader(rest[0], rest[1], *map(int, rest[2:])) if kind == "loader" else child_tokenize(*rest)
        print(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="nemo_neo_data_bench_"))
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_average_at_start": os.getloadavg()[0], "loader": {}, "tokenize": {}}
    try:
        for name, tokens in (("small", args.small), ("large", args.large)):
            prefix = work / name
            start = time.perf_counter()
            write_corpus(prefix, int(tokens))
            size = os.path.getsize(f"{prefix}.bin")
            for reader, mmap in (("pread", 0), ("mmap", 1)):  # each builds its own index cache from scratch
                result = run_child("loader", str(prefix), str(work / f"cache_{name}_{reader}"), str(args.steps), str(args.gbs),
                                   str(args.seq), str(mmap))
                report["loader"][f"{name}_{reader}"] = {"tokens": int(tokens), "bin_mb": round(size / 2**20), **result,
                                                        "write_s": round(time.perf_counter() - start, 1),
                                                        "int64_tensor_mb": round(int(tokens) * 8 / 2**20)}
                print(json.dumps({f"{name}_{reader}": report["loader"][f"{name}_{reader}"]}), flush=True)
            os.remove(f"{prefix}.bin")  # big files go at once
        for reader in ("pread", "mmap"):
            for key in ("peak_growth_mb", "anon_peak_growth_mb"):
                report["loader"][f"large_minus_small_{reader}_{key}"] = round(
                    report["loader"][f"large_{reader}"][key] - report["loader"][f"small_{reader}"][key], 1)

        from nemo_neo.recipes.default_teacher import default_teacher_checkpoint

        tokenizer_dir = args.tokenizer or str(default_teacher_checkpoint())
        paragraphs = [x for x in (REPO.parent / "shared" / "data" / "tinyshakespeare.txt").read_text().split("\n\n")
                      if x.strip()]
        text = work / "text.jsonl"
        with open(text, "w") as f:
            while f.tell() < args.text_mb * 2**20:
                for x in paragraphs:
                    f.write(json.dumps({"text": x}) + "\n")
        for mode in ("plain", "1", "2"):
            report["tokenize"][mode] = run_child("tokenize", mode, str(text), tokenizer_dir, str(work / "tok"))
            print(json.dumps({mode: report["tokenize"][mode]}), flush=True)
        plain = report["tokenize"]["plain"]["tokens_per_s"]
        report["tokenize"]["ratios_vs_plain"] = {m: round(report["tokenize"][m]["tokens_per_s"] / plain, 2)
                                                 for m in ("1", "2")}
        report["load_average_at_end"] = os.getloadavg()[0]
        print(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
