"""A fixed set of lm-eval requests (real WinoGrande text) shared by the eval tests and the torchrun worker."""

from __future__ import annotations

import json
import os
from pathlib import Path

SHARED_DATA = Path(os.environ.get("NEMO_NEO_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def winogrande_pairs(n: int = 6) -> list[tuple[str, str]]:
    """(context, continuation) pairs as lm-eval's winogrande builds them (both options per doc)."""
    pairs = []
    with open(SHARED_DATA / "winogrande_dev.jsonl", encoding="utf-8") as f:
        for line in list(f)[:n]:
            doc = json.loads(line)
            idx = doc["sentence"].index("_")
            for option in (doc["option1"], doc["option2"]):
                pairs.append((doc["sentence"][:idx] + option, " " + doc["sentence"][idx + 1 :].strip()))
    return pairs


def instances(kind: str, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def rolling_texts() -> list[tuple[str]]:
    lines = [x.strip() for x in (SHARED_DATA / "wikitext2_valid.txt").read_text(encoding="utf-8").split("\n") if len(x.strip()) > 200]
    return [(lines[0][:400],), (lines[1][:250],)]


def generation_requests(max_gen_toks: int = 6) -> list[tuple[str, dict]]:
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):"]
    return [(p, {"until": ["\n\n\n"], "max_gen_toks": max_gen_toks, "do_sample": False}) for p in prompts]


def answer_all(lm) -> dict:
    return {
        "loglikelihood": [list(x) for x in lm.loglikelihood(instances("loglikelihood", winogrande_pairs()), disable_tqdm=True)],
        "rolling": lm.loglikelihood_rolling(instances("loglikelihood_rolling", rolling_texts()), disable_tqdm=True),
        "generate": lm.generate_until(instances("generate_until", generation_requests()), disable_tqdm=True),
    }
