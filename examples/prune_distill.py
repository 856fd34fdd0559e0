"""The nemo_neo recipe as a hydra app, launched with torchrun on one node or several.

    torchrun --standalone --nproc_per_node 1 examples/prune_distill.py                 # CPU default
    torchrun --standalone --nproc_per_node 8 examples/prune_distill.py preset=minitron_llama31_8b_width \\
        teacher.checkpoint=/ckpts/llama-3.1-8b parallel.tensor_parallel=8
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        examples/prune_distill.py preset=... run_dir=/shared/runs/x

Stages, in order (`stages=[...]` picks a subset): correct (teacher correction), prune (width by
activation importance and/or depth), distill (kd | llm_neo | lora | sft), evaluate (validation
loss of every model, optional lm-eval tasks, PNG plots), export (Hugging Face, optional FP8).
Each writes <run_dir>/<stage>/metrics.json; rerunning the same command skips finished stages and
resumes an interrupted one. Presets (conf/preset/*.yaml) set a paper's hyperparameters.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

from nemo_neo.errors import exit_on_user_error  # noqa: E402


@hydra.main(version_base=None, config_path="../conf", config_name="prune_distill")
def main(cfg: DictConfig) -> None:
    from nemo_neo.parallel import destroy
    from nemo_neo.recipes.driver import run

    with exit_on_user_error():
        run(cfg)
    destroy()


if __name__ == "__main__":
    main()
