"""torchrun worker: one NeMo distillation step per recipe at TP x PP (gloo on CPU).

    torchrun --nproc_per_node N tests/nemo/nemo_pp_worker.py --tp T --pp P --out DIR \\
        --teacher NEMO --student NEMO --teacher-neo NEO --student-neo NEO --recipes a,b

Writes DIR/<recipe>/student (the stepped student, megatron-core dist checkpoint) and
DIR/<recipe>/loss_rank<r>.txt (NeMo's reduced_train_loss on each rank).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # nemo_steps

from nemo_neo import _compat  # noqa: E402

_compat.enable_nemo()  # before NeMo's first import

import nemo_steps  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("--out", "--teacher", "--student", "--teacher-neo", "--student-neo", "--recipes"):
        p.add_argument(name, required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--gbs", type=int, default=2)
    args = p.parse_args()
    nemo_ckpts = {nemo_steps.TEACHER: Path(args.teacher), nemo_steps.STUDENT: Path(args.student)}
    neo_ckpts = {nemo_steps.TEACHER: Path(args.teacher_neo), nemo_steps.STUDENT: Path(args.student_neo)}
    rank = int(os.environ["RANK"])
    for name in args.recipes.split(","):
        out = Path(args.out) / name
        kd, lora = nemo_steps.recipe(name)
        loss, model = nemo_steps.nemo_step(nemo_ckpts, neo_ckpts, kd, lora, out / "run", tp=args.tp, pp=args.pp,
                                           mbs=args.mbs, gbs=args.gbs)
        nemo_steps.save_student(model, out / "student")
        (out / f"loss_rank{rank}.txt").write_text(repr(loss))


if __name__ == "__main__":
    main()
