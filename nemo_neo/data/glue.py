"""GLUE SST-2 / RTE / MRPC / CoLA in the original GLUE TSV layout, prompt templates, and metrics.

Files: <root>/<TASK>/{train,dev}.tsv as produced by `download_glue_data.py` (read the way the GLUE
processors do: tab-separated, no quoting; MRPC starts with a UTF-8 BOM; CoLA has no header).
Labels are the HF `glue` integers: SST-2 0=negative 1=positive; CoLA 0=unacceptable 1=acceptable;
MRPC 0=not paraphrase 1=paraphrase; RTE 0=entailment 1=not_entailment.

Metrics are those of the GLUE / KD-LoRA papers: accuracy (SST-2, RTE), F1 of the positive class
(MRPC, with accuracy beside it) and Matthews correlation (CoLA). Written out directly (no sklearn).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from nemo_neo.errors import ConfigError

csv.field_size_limit(1 << 24)


@dataclass(frozen=True)
class GlueExample:
    text_a: str
    text_b: str | None
    label: int


@dataclass(frozen=True)
class GlueTask:
    name: str
    header: bool
    text_a_col: int
    text_b_col: int | None
    label_col: int
    label_map: dict  # raw TSV label string -> int
    metric: str  # the paper's headline metric
    # Prompt for the decoder classifier: pieces joined in order, "{a}" / "{b}" are the texts.
    template: tuple
    label_words: tuple  # label word (with its leading space) for class 0, 1, ...

    @property
    def num_labels(self) -> int:
        return len(self.label_words)


TASKS = {
    "SST-2": GlueTask("SST-2", True, 0, None, 1, {"0": 0, "1": 1}, "accuracy",
                      ("Review:", "{a}", "\nSentiment:"), (" negative", " positive")),
    "CoLA": GlueTask("CoLA", False, 3, None, 1, {"0": 0, "1": 1}, "matthews",
                     ("Sentence:", "{a}", "\nIs this sentence grammatically acceptable? Answer:"), (" no", " yes")),
    "MRPC": GlueTask("MRPC", True, 3, 4, 0, {"0": 0, "1": 1}, "f1",
                     ("Sentence 1:", "{a}", "\nSentence 2:", "{b}", "\nDo they mean the same thing? Answer:"),
                     (" no", " yes")),
    "RTE": GlueTask("RTE", True, 1, 2, 3, {"entailment": 0, "not_entailment": 1}, "accuracy",
                    ("Premise:", "{a}", "\nHypothesis:", "{b}", "\nDoes the premise entail the hypothesis? Answer:"),
                    (" yes", " no")),
}
_ALIASES = {k.lower().replace("-", ""): k for k in TASKS}


def get_task(name: str) -> GlueTask:
    key = _ALIASES.get(str(name).lower().replace("-", "").replace("_", ""))
    if key is None:
        raise ConfigError(f"unknown GLUE task {name!r}; choose one of {list(TASKS)}")
    return TASKS[key]


def read_glue(root, task: str, split: str, limit: int | None = None) -> list[GlueExample]:
    """Examples of `split` ("train" or "dev") of `task` from <root>/<TASK>/<split>.tsv, file order."""
    spec = get_task(task)
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev' (GLUE test sets have no labels), got {split!r}")
    path = Path(root) / spec.name / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected the original GLUE TSV layout under {root})")
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for i, row in enumerate(rows):
            if (i == 0 and spec.header) or not row:
                continue
            need = max(c for c in (spec.text_a_col, spec.text_b_col, spec.label_col) if c is not None) + 1
            if len(row) < need:
                raise ValueError(f"{path}:{i + 1}: {len(row)} columns, expected at least {need}")
            raw = row[spec.label_col].strip()
            if raw not in spec.label_map:
                raise ValueError(f"{path}:{i + 1}: label {raw!r} not in {sorted(spec.label_map)}")
            out.append(GlueExample(row[spec.text_a_col].strip(),
                                   row[spec.text_b_col].strip() if spec.text_b_col is not None else None,
                                   spec.label_map[raw]))
            if limit is not None and len(out) >= limit:
                break
    return out


# ---------------------------------------------------------------------------------------------
# Metrics (binary tasks; positive class = 1)


def _confusion(preds, labels):
    preds, labels = [int(p) for p in preds], [int(y) for y in labels]
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
    tn = sum(p == 0 and y == 0 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels))
    return tp, tn, fp, fn


def accuracy(preds, labels) -> float:
    preds, labels = list(preds), list(labels)
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    return sum(int(p) == int(y) for p, y in zip(preds, labels)) / max(len(labels), 1)


def f1_binary(preds, labels) -> float:
    """F1 of class 1 (0.0 when there are no true or predicted positives, as sklearn's zero_division=0)."""
    tp, _, fp, fn = _confusion(preds, labels)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corrcoef(preds, labels) -> float:
    """(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); 0.0 when a marginal is empty (as sklearn)."""
    tp, tn, fp, fn = _confusion(preds, labels)
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / math.sqrt(denom) if denom else 0.0


def compute_metrics(task: str, preds, labels) -> dict:
    """All three metrics plus `score`, the task's headline metric (the one the paper reports)."""
    spec = get_task(task)
    m = {"accuracy": accuracy(preds, labels), "f1": f1_binary(preds, labels),
         "matthews": matthews_corrcoef(preds, labels)}
    m["metric"] = spec.metric
    m["score"] = m[spec.metric]
    return m
