"""torchrun worker: distil a tiny student on text read through the indexed (megatron-core) loader;
every rank logs the rows it is given (<run_dir>/batches-rank<R>.jsonl: step, sample indices, row
checksum) and the main rank writes <run_dir>/result.json.

    torchrun ... tests/workers/indexed_train_worker.py --student S --teacher T --run-dir R --data F --cache-dir C
"""

import argparse
import hashlib
import json
from pathlib import Path

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

from nemo_neo.data.from_text import indexed_from_text  # noqa: E402
from nemo_neo.data.indexed import TokenSamples  # noqa: E402
from nemo_neo.distill.losses import KDLossConfig  # noqa: E402
from nemo_neo.parallel import ParallelConfig, destroy, initialize  # noqa: E402
from nemo_neo.recipes.distill import distill  # noqa: E402
from nemo_neo.train.loop import TrainConfig  # noqa: E402
from nemo_neo.train.optim import OptimConfig  # noqa: E402


class Recorded(TokenSamples):
    """The same samples; each gather (one micro-batch) is appended to this rank's log."""

    def __init__(self, inner: TokenSamples, log: Path, micro_per_step: int):
        super().__init__(inner.dataset, inner.seq_length)
        self.log, self.micro_per_step = log, micro_per_step
        with open(self.log, "a") as f:  # a launch starts here: what follows are steps resumed_from + 1, ...
            f.write(json.dumps({"launch": True}) + "\n")

    def __getitem__(self, index):
        rows = super().__getitem__(index)
        if not isinstance(index, (int, slice)) and rows.dim() == 2:
            record = {"indices": [int(i) for i in index],
                      "sha": hashlib.sha1(rows.numpy().tobytes()).hexdigest()}
            with open(self.log, "a") as f:
                f.write(json.dumps(record) + "\n")
        return rows


def main():
    p = argparse.ArgumentParser()
    for name in ("--student", "--teacher", "--run-dir", "--data", "--cache-dir"):
        p.add_argument(name, required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--gbs", type=int, default=4)
    p.add_argument("--mbs", type=int, default=1)
    args = p.parse_args()
    from transformers import AutoTokenizer

    ctx = initialize(ParallelConfig())
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    train, valid = indexed_from_text([args.data], tokenizer, args.seq, train_samples=args.steps * args.gbs,
                                     max_valid=4, cache_dir=args.cache_dir, progress=False)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    micro = args.gbs // (args.mbs * ctx.dp_size)
    train = Recorded(train, run_dir / f"batches-rank{ctx.rank}.jsonl", micro)
    cfg = TrainConfig(steps=args.steps, global_batch_size=args.gbs, micro_batch_size=args.mbs,
                      save_every=args.save_every, eval_every=args.steps,
                      optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2))
    result = distill(ctx, args.student, args.teacher, train, valid, cfg, args.run_dir, KDLossConfig())
    if ctx.is_main:
        (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    destroy()


if __name__ == "__main__":
    main()
