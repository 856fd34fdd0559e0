"""Generation throughput study (the Minitron paper's throughput figure), trtllm-bench or PyTorch.

For each model x ISL/OSL pair x batch size: synthetic requests of exactly ISL random tokens
(no special tokens, as trtllm-bench's `prepare_dataset token-norm-dist` makes them) are written in
trtllm-bench's dataset format (JSON lines {"task_id", "input_ids", "output_tokens"}), then run by

- `trtllm` backend: `trtllm-bench --model_path <hf dir> throughput --dataset ... --eos_id -1`
  (TensorRT-LLM's PyTorch backend; FP8 checkpoints from tools/export_fp8.py run here), or
- `torch` backend (anywhere, CPU included): transformers `generate` with a static KV cache,
  greedy, EOS disabled (min_new_tokens = max_new_tokens = OSL, and every request's new-token
  count is checked), `torch.compile` of the forward on CUDA (CUDA graphs via reduce-overhead).

Reported per row: requests/s, output tokens/s (OSL tokens / wall time, trtllm-bench's "Total
Output Throughput") and total tokens/s (ISL + OSL), like trtllm-bench's report.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nemo_neo.errors import ConfigError
from nemo_neo.export.hf import as_hf_dir, tokenizer_source
from nemo_neo.models.dtype import parse_dtype
from nemo_neo.optional import require


class ThroughputError(ConfigError):
    pass


@dataclass
class Row:
    model: str
    backend: str
    precision: str
    isl: int
    osl: int
    batch_size: int
    num_requests: int
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    new_tokens_min: int | None = None
    new_tokens_max: int | None = None


def parse_pairs(items) -> list[tuple[int, int]]:
    pairs = []
    for item in items:
        for part in str(item).replace(":", ",").split():
            try:
                isl, osl = (int(x) for x in part.split(","))
            except ValueError:
                raise ThroughputError(f"ISL/OSL pair {part!r} is not two integers like 128,32.") from None
            if isl < 1 or osl < 1:
                raise ThroughputError(f"ISL/OSL pair {part!r} must be positive.")
            pairs.append((isl, osl))
    return pairs


def make_requests(tokenizer, isl: int, num_requests: int, seed: int = 0) -> list[list[int]]:
    """Random token ids of exactly `isl` tokens from the base vocabulary (as trtllm-bench's
    prepare_dataset draws them) that avoid every special token (EOS included)."""
    gen = torch.Generator().manual_seed(seed)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    vocab = tokenizer.vocab_size
    rows = torch.randint(0, vocab, (num_requests, isl), generator=gen)
    if special.numel():
        bad = torch.isin(rows, special)
        while bad.any():
            rows[bad] = torch.randint(0, vocab, (int(bad.sum()),), generator=gen)
            bad = torch.isin(rows, special)
    return rows.tolist()


def write_trtllm_dataset(path, requests: list[list[int]], osl: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, ids in enumerate(requests):
            f.write(json.dumps({"task_id": i, "input_ids": ids, "output_tokens": osl}, separators=(",", ":")) + "\n")
    return path


def read_trtllm_dataset(path) -> tuple[list[list[int]], list[int]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r["input_ids"] for r in rows], [r["output_tokens"] for r in rows]


# ---------------------------------------------------------------------------------------- torch
class TorchBackend:
    """transformers generate: static cache, greedy, exactly OSL new tokens per request."""

    name = "torch"

    def __init__(self, hf_dir=None, precision: str = "bf16", device=None, compile: bool | None = None, model=None):
        """hf_dir: a Hugging Face directory to load; or `model`, a transformers model already built
        (the architecture search times random-weight models of candidate shapes)."""
        from transformers import AutoModelForCausalLM

        if hf_dir is not None and (Path(hf_dir) / "hf_quant_config.json").is_file():
            raise ThroughputError(f"{hf_dir} is an FP8 (modelopt) checkpoint; run it with --backend trtllm (the torch backend runs bf16/fp32).")
        if precision not in ("bf16", "fp16", "fp32"):
            raise ThroughputError(f"the torch backend runs precision bf16, fp16 or fp32, not {precision!r}.")
        self.precision = precision
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=parse_dtype(precision))
        self.model = model.to(self.device, parse_dtype(precision)).eval()
        if compile if compile is not None else self.device.type == "cuda":
            self.model.forward = torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=False)

    def _generation_config(self, osl: int):
        from transformers import GenerationConfig

        # disable_compile: transformers otherwise torch.compiles the forward by itself whenever a static
        # cache is used on CUDA, so --no-compile was not honoured on GPU (and with compile on, the
        # already compiled forward was compiled again); compilation is this backend's choice alone.
        return GenerationConfig(do_sample=False, max_new_tokens=osl, min_new_tokens=osl, eos_token_id=None,
                                pad_token_id=0, cache_implementation="static", num_beams=1, disable_compile=True)

    @torch.no_grad()
    def generate(self, batch: list[list[int]], osl: int) -> torch.Tensor:
        """New tokens [b, OSL] for equal-length prompts (no padding needed)."""
        ids = torch.tensor(batch, dtype=torch.long, device=self.device)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=self._generation_config(osl))
        return out[:, ids.shape[1]:]

    def run(self, requests: list[list[int]], osl: int, batch_size: int, warmup: bool = True, desc: str = "") -> tuple[float, list[int]]:
        if warmup:  # first call compiles / allocates the static cache; not timed
            self.generate(requests[: min(batch_size, len(requests))], min(osl, 4))
        counts = []
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in tqdm(range(0, len(requests), batch_size), desc=desc or "generate", unit="batch", dynamic_ncols=True):
            new = self.generate(requests[i : i + batch_size], osl)
            counts += [int(new.shape[1])] * new.shape[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if any(c != osl for c in counts):
            raise ThroughputError(f"the torch backend produced {sorted(set(counts))} new tokens per request instead of exactly {osl}.")
        return seconds, counts


# ---------------------------------------------------------------------------------------- trtllm
TRTLLM_MISSING = ("--backend trtllm needs `trtllm-bench` on PATH (TensorRT-LLM, e.g. NVIDIA's TensorRT-LLM container); "
                  "use --backend torch otherwise.")


def trtllm_available() -> bool:
    return shutil.which("trtllm-bench") is not None


def trtllm_command(model_name: str, hf_dir, dataset, batch_size: int, num_requests: int, report_json, tp: int = 1) -> list[str]:
    return ["trtllm-bench", "--model", model_name, "--model_path", str(hf_dir), "throughput", "--dataset", str(dataset),
            "--backend", "pytorch", "--max_batch_size", str(batch_size), "--concurrency", str(batch_size),
            "--num_requests", str(num_requests), "--eos_id", "-1", "--tp", str(tp), "--report_json", str(report_json)]


def parse_trtllm_report(report: dict) -> dict:
    perf = report["performance"]
    return {"requests_per_s": perf["request_throughput_req_s"], "output_tokens_per_s": perf["system_output_throughput_tok_s"],
            "total_tokens_per_s": perf["system_total_throughput_tok_s"], "seconds": perf["total_latency_ms"] / 1000.0}


def run_trtllm(model_name, hf_dir, dataset, batch_size, num_requests, workdir, tp=1) -> dict:
    if not trtllm_available():
        raise ThroughputError(TRTLLM_MISSING)
    report = Path(workdir) / f"report_{Path(dataset).stem}_bs{batch_size}.json"
    proc = subprocess.run(trtllm_command(model_name, hf_dir, dataset, batch_size, num_requests, report, tp), capture_output=True, text=True)
    if proc.returncode != 0:
        raise ThroughputError(f"trtllm-bench failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:] or proc.stdout[-300:]}")
    return parse_trtllm_report(json.loads(report.read_text()))


# ---------------------------------------------------------------------------------------- study
def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": _cpu_name(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if hasattr(os, "getloadavg"):  # other work on the machine skews CPU timings: record it
        info["load_average_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_study(models: dict[str, str], pairs, batch_sizes, num_requests: int, out_dir, backend: str = "auto",
              precision: str = "bf16", device=None, seed: int = 0, compile: bool | None = None) -> dict:
    """Benchmark every model (name -> nemo_neo checkpoint or HF dir) and write results.json,
    throughput.png and the request datasets (requests_isl{I}_osl{O}.jsonl) into out_dir."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = ("trtllm" if trtllm_available() else "torch") if backend == "auto" else backend
    if backend not in ("torch", "trtllm"):
        raise ThroughputError(f"backend must be auto, torch or trtllm, not {backend!r}.")
    if backend == "trtllm" and not trtllm_available():
        raise ThroughputError(TRTLLM_MISSING)
    first = next(iter(models.values()))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source(first)))
    datasets = {}
    for isl, osl in pairs:
        requests = make_requests(tokenizer, isl, num_requests, seed)
        datasets[(isl, osl)] = (requests, write_trtllm_dataset(out_dir / f"requests_isl{isl}_osl{osl}.jsonl", requests, osl))
    rows = []
    for name, path in models.items():
        with as_hf_dir(path, dtype="bfloat16" if precision != "fp32" else "float32") as hf_dir:
            runner = TorchBackend(hf_dir, precision, device, compile) if backend == "torch" else None
            for (isl, osl), (requests, dataset) in datasets.items():
                for bs in batch_sizes:
                    if runner is not None:
                        stats = timed_row(runner, requests, isl, osl, bs, desc=f"{name} {isl}/{osl} bs{bs}")
                        extra = {k: stats.pop(k) for k in ("new_tokens_min", "new_tokens_max")}
                    else:
                        stats, extra = run_trtllm(name, hf_dir, dataset, bs, len(requests), out_dir), {}
                    rows.append(Row(name, backend, precision, isl, osl, bs, len(requests), **stats, **extra))
            del runner
    result = {"machine": machine(), "backend": backend, "precision": precision, "rows": [asdict(r) for r in rows],
              "speedup_vs_first": speedups(rows, next(iter(models)))}
    (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out_dir / "throughput.png", title=f"{backend} backend, {precision}, {result['machine'].get('gpu') or result['machine']['cpu']}")
    return result


def timed_row(runner: TorchBackend, requests: list[list[int]], isl: int, osl: int, batch_size: int, desc: str = "") -> dict:
    """One timed run of the torch backend: seconds, requests/s, output and total tokens/s."""
    seconds, counts = runner.run(requests, osl, batch_size, desc=desc)
    return {"seconds": seconds, "requests_per_s": len(requests) / seconds, "output_tokens_per_s": sum(counts) / seconds,
            "total_tokens_per_s": (sum(counts) + isl * len(requests)) / seconds, "new_tokens_min": min(counts),
            "new_tokens_max": max(counts)}


def speedups(rows: list[Row], baseline: str) -> dict:
    """output tokens/s of each model over the baseline's, per ISL/OSL and batch size."""
    base = {(r.isl, r.osl, r.batch_size): r.output_tokens_per_s for r in rows if r.model == baseline}
    return {f"{r.model}|{r.isl}/{r.osl}|bs{r.batch_size}": round(r.output_tokens_per_s / base[(r.isl, r.osl, r.batch_size)], 3)
            for r in rows if (r.isl, r.osl, r.batch_size) in base}


def plot(rows: list[Row], png, title: str = "") -> Path:
    """Grouped bars: one group per ISL/OSL (and batch size), one bar per model; speedup labels."""

    mpl = require("matplotlib", "the throughput chart")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.isl, r.osl, r.batch_size) for r in rows})
    models = list(dict.fromkeys(r.model for r in rows))
    value = {(r.model, r.isl, r.osl, r.batch_size): r.output_tokens_per_s for r in rows}
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(groups) * max(1, len(models)) / 2), 4.2))
    for j, model in enumerate(models):
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(groups))]
        ys = [value.get((model, *g), 0.0) for g in groups]
        bars = ax.bar(xs, ys, width, label=model)
        for bar, g, y in zip(bars, groups, ys):
            base = value.get((models[0], *g))
            if base and y:
                ax.annotate(f"{y / base:.2f}x", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)), [f"{i}/{o}\nbs{b}" for i, o, b in groups])
    ax.set_xlabel("ISL/OSL, batch size")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)
