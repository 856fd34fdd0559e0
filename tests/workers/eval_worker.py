"""torchrun worker: the nemo_neo lm-eval model under TP/PP/DP answers the same requests as at TP=1.

    torchrun --nproc_per_node N tests/workers/eval_worker.py CKPT OUT.json TP PP

Builds NeoLM(checkpoint=CKPT, tensor_parallel=TP, pipeline_parallel=PP) (N / (TP*PP) data-
parallel replicas), answers the fixed request set of tests/eval/test_eval_lm.py (loglikelihood on
real WinoGrande sentences, loglikelihood_rolling with short windows, greedy generate_until) and
rank 0 writes the answers as JSON. Every rank must return the same answers: ranks compare theirs
with rank 0's and the worker fails if any differ.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

from eval_requests import answer_all  # noqa: E402

from nemo_neo.eval.lm_eval_model import NeoLM  # noqa: E402


def main():
    ckpt, out, tp, pp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    lm = NeoLM(checkpoint=ckpt, tensor_parallel=tp, pipeline_parallel=pp, dtype="float32", batch_size=3, max_length=24)
    answers = answer_all(lm)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, answers)
    if any(a != every[0] for a in every):
        raise SystemExit(f"ranks returned different answers: {every}")
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"answers": answers, "ctx": {"tp": lm.ctx.tp_size, "pp": lm.ctx.pp_size, "dp": lm.ctx.dp_size}}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
