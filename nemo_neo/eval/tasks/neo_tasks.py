"""Loaders and prompt functions for the nemo_neo task pack (lm-eval tasks that read local files).

lm-eval's built-in tasks download from the Hugging Face hub; these read the original public
release files from a local directory instead, so evaluation works offline. The YAMLs beside this
file name a loader as `custom_dataset`; lm-eval calls it with the task's metadata, so the data
directory comes from (first found):

1. `--metadata '{"data_dir": "/path"}'` on the lm-eval command line (or TaskManager(metadata=...)),
2. the environment variable NEMO_NEO_EVAL_DATA.

Expected files in that directory (the names of the public releases; see README.md here):
winogrande_dev.jsonl, arc_easy_test.jsonl, arc_challenge_test.jsonl, piqa_valid.jsonl +
piqa_valid_labels.lst, hellaswag_val_llamacpp.txt, wikitext2_test.txt.

Prompts match lm-eval's own winogrande / arc / piqa / wikitext tasks, so scores are comparable.
This module is loaded by lm-eval from its file path (`!function neo_tasks.x`): it must stay
self-contained (no relative imports).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from nemo_neo.errors import EvalError

DATA_ENV = "NEMO_NEO_EVAL_DATA"


class TaskDataError(EvalError, FileNotFoundError):
    """A task's local data file cannot be found or read."""


def data_file(name: str, data_dir: str | None = None) -> Path:
    root = data_dir or os.environ.get(DATA_ENV)
    if not root:
        raise TaskDataError(
            f"the nemo_neo task pack needs its data directory for {name}: set {DATA_ENV}=/path/to/data "
            "or pass --metadata '{\"data_dir\": \"/path/to/data\"}'."
        )
    path = Path(root).expanduser() / name
    if not path.is_file():
        raise TaskDataError(f"{path} does not exist; put {name} in {root} or point {DATA_ENV} / data_dir elsewhere.")
    return path


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset(split: str, rows: list[dict]):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


# --------------------------------------------------------------------------- WinoGrande (1.1 dev)
def load_winogrande(data_dir=None, file="winogrande_dev.jsonl", **_):
    rows = [{k: r[k] for k in ("qID", "sentence", "option1", "option2", "answer")} for r in _jsonl(data_file(file, data_dir))]
    return _dataset("validation", rows)


def winogrande_text(doc):
    """lm-eval's winogrande scores the continuation after the blank given each filled-in prefix."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


# --------------------------------------------------------------------------- ARC (AI2 layout -> HF layout)
def _arc(file, data_dir):
    rows = []
    for r in _jsonl(data_file(file, data_dir)):
        choices = r["question"]["choices"]
        rows.append({
            "id": r["id"],
            "question": r["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": r["answerKey"],
        })
    return _dataset("test", rows)


def load_arc_easy(data_dir=None, file="arc_easy_test.jsonl", **_):
    return _arc(file, data_dir)


def load_arc_challenge(data_dir=None, file="arc_challenge_test.jsonl", **_):
    return _arc(file, data_dir)


# --------------------------------------------------------------------------- PIQA (valid + labels file)
def load_piqa(data_dir=None, file="piqa_valid.jsonl", labels="piqa_valid_labels.lst", **_):
    rows = _jsonl(data_file(file, data_dir))
    gold = [int(x) for x in data_file(labels, data_dir).read_text().split()]
    if len(gold) != len(rows):
        raise TaskDataError(f"{file} has {len(rows)} rows but {labels} has {len(gold)} labels; they must align.")
    return _dataset("validation", [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": g} for r, g in zip(rows, gold)])


# --------------------------------------------------------------------------- HellaSwag (llama.cpp text layout)
def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(data_dir=None, file="hellaswag_val_llamacpp.txt", **_):
    """6 lines per task: "activity_label: context", gold label, 4 endings (llama.cpp's layout;
    ctx_b is not re-capitalised as lm-eval does, since the split point is not in the file)."""
    lines = data_file(file, data_dir).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise TaskDataError(f"{file} has {len(lines)} lines, not a multiple of 6 (context, label, 4 endings).")
    rows = []
    for i in range(0, len(lines), 6):
        rows.append({
            "query": _hellaswag_clean(lines[i]),
            "label": int(lines[i + 1]),
            "choices": [_hellaswag_clean(e) for e in lines[i + 2 : i + 6]],
        })
    return _dataset("validation", rows)


# --------------------------------------------------------------------------- WikiText-2 (token-level files)
_ARTICLE = re.compile(r"^ = [^=].* = $")


def load_wikitext(data_dir=None, file="wikitext2_test.txt", **_):
    """Split the line-per-paragraph WikiText-2 file into articles at top-level ` = Title = ` lines
    (the document level lm-eval's wikitext task scores)."""
    docs, current = [], []
    for line in data_file(file, data_dir).read_text(encoding="utf-8").split("\n"):
        if _ARTICLE.match(line) and any(x.strip() for x in current):
            docs.append("\n".join(current).strip("\n"))
            current = []
        current.append(line)
    if any(x.strip() for x in current):
        docs.append("\n".join(current).strip("\n"))
    return _dataset("test", [{"page": d} for d in docs])


def wikitext_detokenize(doc):
    """lm-eval's wikitext detokenizer (undoes the ` @-@ `, ` , ` tokenization of the release)."""
    s = doc["page"]
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176)).replace(" \n", "\n").replace("\n ", "\n")
    return s.replace(" N ", " 1 ").replace(" 's", "'s")


def wikitext_results(doc, results):
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    nbytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes), "bits_per_byte": (loglikelihood, nbytes)}
