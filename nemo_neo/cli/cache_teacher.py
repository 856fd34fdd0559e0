"""`nemo-neo-cache-teacher` (also `python tools/cache_teacher.py`): write the recipe's teacher cache --
the distill teacher's top-K ids, log-probs and tail mass for every training sample -- once, so that
`distill.teacher_cache` (kd / llm_neo) trains without running the teacher.

    nemo-neo-cache-teacher run_dir=runs/x cache_teacher.top_k=32 [recipe overrides ...]
    torchrun --nproc_per_node 4 tools/cache_teacher.py run_dir=runs/x parallel.tensor_parallel=2

It is the recipe (conf/prune_distill.yaml, the same overrides, hence the same samples) with
stages=[cache_teacher]: the cache goes to <run_dir>/cache_teacher/cache (or cache_teacher.dir), and a
later `stages=[..., cache_teacher, distill]` run in that run_dir finds it finished. A killed run
resumes with the missing chunks when rerun.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from nemo_neo import enable_compat
from nemo_neo.errors import ConfigError, exit_on_user_error
from nemo_neo.parallel import destroy
from nemo_neo.recipes import config as rc
from nemo_neo.recipes.driver import run

CONFIG_NAME = "prune_distill"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nemo-neo-cache-teacher", description="Write the recipe's teacher cache "
                                "(top-K log-probs + tail mass of the distill teacher on every training sample).")
    p.add_argument("--config-dir", default=None, help=f"hydra config directory (default: ${rc.CONF_DIR_ENV}, else "
                   "the checkout's conf/)")
    p.add_argument("overrides", nargs="*", help="recipe overrides (key=value), e.g. run_dir=runs/x cache_teacher.top_k=32")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    enable_compat()
    with exit_on_user_error():
        overrides = [o for o in args.overrides if not o.startswith("stages=")] + ["stages=[cache_teacher]"]
        try:
            with initialize_config_dir(config_dir=str(rc.conf_dir(args.config_dir)), version_base=None):
                cfg = compose(CONFIG_NAME, overrides=overrides)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(f"{CONFIG_NAME} config: {' '.join(str(e).split())}") from None
        run(cfg)
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
