"""Megatron indexed datasets through megatron-core: the preprocessing tool, the blend/split loader,
its sampler semantics (seed, DP, resume), per-node index caches, and bad input."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest
import torch
from conftest import REPO, SHARED_DATA, free_port, kill_tree, torchrun

from nemo_neo.cli.preprocess import main as _preprocess_cli
from nemo_neo.data.dataset import DistributedBatchSampler
from nemo_neo.data.indexed import build_gpt_datasets, check_prefix, parse_blend
from nemo_neo.data.preprocess import prefix_files, preprocess
from nemo_neo.errors import DataError, DataFileNotFoundError

WORKER = "tests/workers/indexed_train_worker.py"


@pytest.fixture(scope="module")
def tokenizer(smollm2_ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_ckpt))


def shakespeare_docs(n: int, start: int = 0) -> list[str]:
    paragraphs = [p for p in (SHARED_DATA / "tinyshakespeare.txt").read_text().split("\n\n") if p.strip()]
    return paragraphs[start : start + n]


def write_synthetic(prefix: Path, docs: list[numpy.ndarray], dtype=numpy.uint16) -> Path:
    """An indexed dataset written with megatron-core's builder directly (no tokenizer, no sidecar)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def random_docs(n: int, low: int, high: int, seed: int) -> list[numpy.ndarray]:
    rng = numpy.random.default_rng(seed)
    return [rng.integers(low, high, size=int(rng.integers(20, 80)), dtype=numpy.int64) for _ in range(n)]


# --- tokens: the loader vs the Hugging Face tokenizer ----------------------------------------------


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_loader_tokens_rejoined_per_document_equal_hf_encoding(tokenizer, tmp_path, dtype):
    datasets = pytest.importorskip("datasets")
    docs = shakespeare_docs(60)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:45]))
    for i, d in enumerate(docs[45:55]):
        (tmp_path / f"b{i}.txt").write_text(d)
    datasets.Dataset.from_dict({"text": docs[55:], "n": list(range(5))}).save_to_disk(str(tmp_path / "hf"))
    datasets.Dataset.from_dict({"body": docs[55:]}).save_to_disk(str(tmp_path / "hf_body"))
    inputs = [tmp_path / "a.jsonl", *(tmp_path / f"b{i}.txt" for i in range(10))]
    sidecar = preprocess(inputs, tmp_path / "out" / "part", tokenizer, workers=2, dtype=dtype, progress=False)
    assert sidecar["documents"] == 55
    with pytest.raises(DataError, match='no "text" column .*--json-key'):  # an HF row's text is named by its column
        preprocess([*inputs, tmp_path / "hf_body"], tmp_path / "out" / "corpus", tokenizer, progress=False)
    assert not (tmp_path / "out" / "corpus.idx").exists()
    sidecar = preprocess([*inputs, tmp_path / "hf"], tmp_path / "out" / "corpus", tokenizer,
                         workers=1 if dtype == "uint16" else 2, dtype=dtype, progress=False)
    reference = [tokenizer(d)["input_ids"] + [tokenizer.eos_token_id] for d in docs]  # independent encoding
    assert sidecar["dtype"] == dtype and sidecar["documents"] == 60
    assert sidecar["tokens"] == sum(map(len, reference))

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    stored = IndexedDataset(str(tmp_path / "out" / "corpus"))  # megatron-core's own reader
    assert stored.index.dtype == numpy.dtype(dtype)
    assert [stored[i].tolist() for i in range(len(stored))] == reference
    del stored  # it maps the .bin (checked below)

    seq = 16
    train, valid, test = build_gpt_datasets([str(tmp_path / "out" / "corpus")], split="1,0,0", seq_length=seq,
                                            train_samples=1, tokenizer=tokenizer, cache_dir=tmp_path / "cache")
    assert valid is None and test is None
    mapped, _, _ = build_gpt_datasets([str(tmp_path / "out" / "corpus")], split="1,0,0", seq_length=seq,
                                      train_samples=1, tokenizer=tokenizer, cache_dir=tmp_path / "cache",
                                      mmap_bin_files=True)
    assert torch.equal(mapped[: len(mapped)], train[: len(train)])  # megatron-core's mmap reader, same samples
    bin_path = str((tmp_path / "out" / "corpus.bin").resolve())
    # the default reads samples with pread: the .bin is never mapped into this process (flat RSS), the mmap one is
    maps = Path("/proc/self/maps").read_text()
    assert maps.count(bin_path) >= 1
    del mapped
    import gc

    gc.collect()
    assert bin_path not in Path("/proc/self/maps").read_text()
    train[: len(train)]
    assert bin_path not in Path("/proc/self/maps").read_text()
    # undo megatron-core's sample shuffle: sample i sits at position shuffle_index[i] of the token stream
    # of the (shuffled) documents; consecutive samples share one boundary token
    shuffle, order = train.dataset.shuffle_index, train.dataset.document_index
    stream = torch.full((len(train) * seq + 1,), -1, dtype=torch.long)
    for i in range(len(train)):
        pos = int(shuffle[i])
        stream[pos * seq : pos * seq + seq + 1] = train[i]
    assert (stream >= 0).all()
    assert sorted(order.tolist()) == list(range(60))
    offset, complete = 0, 0
    for d in order.tolist():  # re-join per document
        got = stream[offset : offset + len(reference[d])].tolist()
        if offset + len(reference[d]) <= len(stream):
            assert got == reference[d], d
            complete += 1
        else:  # the tail that does not fill a sample is dropped (one partial document at most)
            assert got == reference[d][: len(got)]
        offset += len(reference[d])
    assert complete >= 59 and len(stream) > sum(map(len, reference)) - seq - 1


# --- blends, seeds, DP ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blend")
    a = write_synthetic(tmp / "a_text_document", random_docs(200, 0, 1000, seed=1))
    b = write_synthetic(tmp / "b_text_document", random_docs(200, 1000, 2000, seed=2))
    return str(a), str(b)


def blended(two_datasets, cache, seed=1, n=10_000):
    a, b = two_datasets
    train, _, _ = build_gpt_datasets([0.3, a, 0.7, b], split="1,0,0", seq_length=8, train_samples=n, seed=seed,
                                     cache_dir=cache)
    return train


def test_blend_proportions_within_two_percent_and_seed_determinism(two_datasets, tmp_path):
    train = blended(two_datasets, tmp_path / "c1")
    rows = train[torch.arange(10_000)]
    from_a = (rows < 1000).all(dim=1)  # dataset a holds ids < 1000, b ids >= 1000: the row says where it came from
    assert ((rows >= 1000).all(dim=1) | from_a).all()
    assert abs(from_a.float().mean().item() - 0.3) <= 0.02
    again = blended(two_datasets, tmp_path / "c2")  # rebuilt from scratch in another cache: same samples
    assert torch.equal(again[torch.arange(500)], rows[:500])
    other = blended(two_datasets, tmp_path / "c3", seed=2)
    assert not torch.equal(other[torch.arange(500)], rows[:500])


def test_dp2_ranks_get_disjoint_samples_whose_union_is_dp1(two_datasets, tmp_path):
    train = blended(two_datasets, tmp_path / "c", n=400)
    assert train.pre_shuffled
    one = DistributedBatchSampler(len(train), 16, 2, 0, 1, shuffle=False)
    ranks = [DistributedBatchSampler(len(train), 16, 2, r, 2, shuffle=False) for r in (0, 1)]
    for step in range(20):
        whole = torch.cat(one.step_micro_batches(step))
        parts = [torch.cat(s.step_micro_batches(step)) for s in ranks]
        assert not set(parts[0].tolist()) & set(parts[1].tolist())
        assert sorted(torch.cat(parts).tolist()) == sorted(whole.tolist()) == list(range(step * 16, step * 16 + 16))
        got = {tuple(r) for p in parts for r in train[p].tolist()}
        assert got == {tuple(r) for r in train[whole].tolist()}
    saved = ranks[1]
    for _ in zip(range(7), iter(saved)):
        pass
    resumed = DistributedBatchSampler(len(train), 16, 2, 1, 2, shuffle=False)
    resumed.load_state_dict(saved.state_dict())
    assert [b.tolist() for b in next(iter(resumed))] == [b.tolist() for b in saved.step_micro_batches(7)]


# --- bad input: one clear error, nothing written ----------------------------------------------------


@pytest.mark.parametrize("spec, words", [
    ([0.3, "/a", 0.7], "odd number"),
    ([0.5, "/a", -0.1, "/b"], "negative"),
    ([0, "/a", 0.0, "/b"], "all weights are zero"),
    (["/a", 0.5], "out of order"),
])
def test_bad_blends(spec, words):
    with pytest.raises(DataError, match=words):
        parse_blend(spec)


def test_bad_data_is_refused_before_anything_is_built(two_datasets, tokenizer, tmp_path):
    a, _ = two_datasets
    cache = tmp_path / "cache"
    with pytest.raises(DataFileNotFoundError, match=r"no \.bin / \.idx.*nemo-neo-preprocess"):
        build_gpt_datasets([str(tmp_path / "missing")], split="1,0,0", seq_length=8, train_samples=8, cache_dir=cache)
    small = write_synthetic(tmp_path / "small", random_docs(5, 0, 100, seed=3))
    with pytest.raises(DataError, match="valid split .* 0 documents and 0 tokens"):  # megatron-core would hang
        build_gpt_datasets([str(small)], split="99,1,0", seq_length=8, train_samples=8, valid_samples=None,
                           cache_dir=cache)
    with pytest.raises(DataError, match="fewer than one sample of seq_length \\+ 1 = 1001"):
        build_gpt_datasets([str(small)], split="1,0,0", seq_length=1000, train_samples=8, cache_dir=cache)
    with pytest.raises(DataError, match="needs data.split"):
        build_gpt_datasets([a], split=None, seq_length=8, train_samples=8, cache_dir=cache)
    assert not cache.exists()

    (tmp_path / "t.txt").write_text(shakespeare_docs(1)[0])
    prefix = tmp_path / "tok" / "t"
    preprocess([tmp_path / "t.txt"], prefix, tokenizer, progress=False)
    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<not_in_the_model>"])
    with pytest.raises(DataError, match="different tokenizer .* re-run nemo-neo-preprocess"):
        check_prefix(prefix, other)
    assert check_prefix(prefix, tokenizer)["documents"] == 1


def test_interrupted_preprocessing_leaves_no_readable_prefix(tokenizer, tmp_path, capsys):
    class Interrupted:  # the real tokenizer, interrupted (Ctrl-C) on its second batch of documents
        def __init__(self):
            self.calls = 0

        def __call__(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return tokenizer(*args, **kwargs)

        def __getattr__(self, name):
            if name == "backend_tokenizer":  # not a fast tokenizer: preprocessing calls it, as transformers' slow ones
                raise AttributeError(name)
            return getattr(tokenizer, name)

        def __len__(self):
            return len(tokenizer)

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in shakespeare_docs(200)))
    prefix = tmp_path / "out" / "a"
    with pytest.raises(KeyboardInterrupt):
        preprocess([tmp_path / "a.jsonl"], prefix, Interrupted(), progress=False)
    assert list((tmp_path / "out").iterdir()) == []  # neither the prefix nor temporaries
    with pytest.raises(DataFileNotFoundError, match="no .bin / .idx"):
        check_prefix(prefix)
    # a killed run's leftovers (dead pid) are removed by the next run, which publishes the prefix
    stale = prefix.parent / f".a.tmp-{2**22 + 12345}.bin"
    stale.write_bytes(b"partial")
    assert preprocess_main(["--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(prefix), "--tokenizer",
                            tokenizer.name_or_path, "--quiet"]) == 0
    assert not stale.exists() and all(p.is_file() for p in prefix_files(prefix).values())
    # bad input through the CLI: one `error:` line, exit 2, nothing written
    capsys.readouterr()
    assert preprocess_main(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "x"),
                            "--tokenizer", tokenizer.name_or_path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data source") and "does not exist" in err[0]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    assert preprocess_main(["--input", str(tmp_path / "bad.jsonl"), "--output-prefix", str(tmp_path / "y"),
                            "--tokenizer", tokenizer.name_or_path, "--quiet"]) == 2
    assert 'has no "text" field' in capsys.readouterr().err
    assert not any(tmp_path.glob("x*")) and not any(tmp_path.glob("y*")) and not any(tmp_path.glob(".y*"))



def preprocess_main(argv) -> int:
    """The console command's exit status (a UserError exits 2 through `exit_on_user_error`)."""
    try:
        return _preprocess_cli(argv)
    except SystemExit as e:
        return e.code


# --- the Trainer on indexed data: two agents on loopback, SIGKILL + resume --------------------------


def worker_args(tiny_pair, run_dir, cache):
    return ["--student", tiny_pair / "student", "--teacher", tiny_pair / "teacher", "--run-dir", run_dir,
            "--data", tiny_pair / "corpus.txt", "--cache-dir", cache, "--steps", 24, "--save-every", 3]


def launch_log(run_dir: Path, rank: int) -> list[list[dict]]:
    """The rows each launch gathered, per launch (a launch begins with a marker line)."""
    launches = []
    for line in (run_dir / f"batches-rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("launch"):
            launches.append([])
        else:
            launches[-1].append(record)
    return launches


def losses(run_dir: Path) -> dict:
    return {h["step"]: h["loss"] for h in json.loads((run_dir / "result.json").read_text())["history"]}


def builds(cache: Path) -> list[dict]:
    log = cache / "indices" / "builds.jsonl"
    return [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []


@pytest.fixture(scope="module")
def two_agent_run(tiny_pair, tmp_path_factory):
    """DP=2 over two torchrun agents on loopback, each 'node' with its own node-local cache."""
    tmp = tmp_path_factory.mktemp("two_agents")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={r}",
         "--master_addr=127.0.0.1", f"--master_port={port}", str(REPO / WORKER),
         *map(str, worker_args(tiny_pair, tmp / "run", tmp / f"node{r}"))],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [a.communicate(timeout=600)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-4000:] + outputs[1][-4000:]
    return tmp


def test_two_agents_on_loopback_build_index_caches_once_per_node_and_both_ranks_train(two_agent_run):
    for node in (0, 1):
        made = builds(two_agent_run / f"node{node}")
        assert [(b["node"], b["local_rank"]) for b in made] == [(str(node), "0")]
    logs = [launch_log(two_agent_run / "run", r) for r in (0, 1)]
    assert [len(log) for log in logs] == [1, 1] and [len(log[0]) for log in logs] == [48, 48]  # 24 steps x 2 micro
    for step in range(24):
        mine = [sum((b["indices"] for b in log[0][2 * step : 2 * step + 2]), []) for log in logs]
        assert not set(mine[0]) & set(mine[1])
        assert sorted(mine[0] + mine[1]) == list(range(4 * step, 4 * step + 4))  # the consumed-sample count
    assert len(losses(two_agent_run / "run")) == 24


def test_sigkill_then_resume_gives_the_identical_batch_sequence(tiny_pair, two_agent_run, tmp_path):
    """One agent, DP=2 (the layout of the two-agent run), one shared cache: killed after a checkpoint,
    rerun: the rows each rank gets after the resume and the losses equal the uninterrupted run's."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / WORKER), *map(str, worker_args(tiny_pair, run, cache))]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and not latest.is_file():
        time.sleep(0.05)
    kill_tree(proc)
    assert latest.is_file() and not (run / "result.json").exists()
    killed_at = json.loads(latest.read_text())["step"]
    torchrun(WORKER, 2, *worker_args(tiny_pair, run, cache))
    assert json.loads((run / "result.json").read_text())["resumed_from"] == killed_at < 24
    for rank in (0, 1):
        reference = launch_log(two_agent_run / "run", rank)[0]
        resumed = launch_log(run, rank)[-1]
        assert resumed == reference[2 * killed_at :]  # same sample indices and row checksums, in order
    ref = losses(two_agent_run / "run")
    # the whole curve: the steps up to the checkpoint come back from the killed run's log
    assert losses(run) == pytest.approx(ref, rel=1e-6, abs=1e-7)
    made = builds(cache)
    assert len(made) == 1 and made[0]["local_rank"] == "0"  # 2 ranks, 2 launches: built once
