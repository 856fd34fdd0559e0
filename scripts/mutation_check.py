#!/usr/bin/env python
"""Curated mutation check: small wrong edits to core formulas must each make a test fail.

Each mutation is (name, file, exact original snippet, replacement, tests that must catch it). The
snippet must occur exactly once in the file, so the list survives code moving around and fails
loudly (as "stale") when the code it targets changes. One at a time, the file is edited in place,
the mapped tests run (`pytest -x -q`), and the original bytes and mtime are restored in a `finally`;
at the end `git diff` of every touched file must be empty. Bytecode is not written while a mutant
is in place (PYTHONDONTWRITEBYTECODE), so no stale .pyc of a mutant can outlive it.

    python scripts/mutation_check.py               # all; prints the kill rate, lists survivors
    python scripts/mutation_check.py --list        # names, files and mapped tests
    python scripts/mutation_check.py --only lora_scale_off_by_one --only importance_seq_max
    python scripts/mutation_check.py --baseline    # first check the mapped tests pass unmutated

Exit status: 0 when every mutant is killed, 1 when any survives, 2 on a stale or broken entry (a snippet
not found exactly once, or a mutant that fails to import: that is no kill).
Slow (each mutant starts pytest; some tests use torchrun): not part of CI's default run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]  # pytest arguments (node ids, or a file followed by "-k", "expr")
    why: str


# The fastest tests that catch each mutation (all are in the default suite).
LOSS = ("tests/distill/test_distill_losses.py::test_single_process_matches_functional_formula",)
LOSS_TP2 = ("tests/distill/test_distill_losses.py", "-k", "tp2_matches")
DP_MEAN = ("tests/distill/test_distill_losses.py", "-k", "global_token_mean")
IMP = ("tests/prune/test_reference_importance.py",)
IMP_TP = ("tests/prune/test_prune.py::test_scores_under_tp_pp_equal_tp1",)
WIDTH = ("tests/prune/test_reference_prune.py::test_width_pruning_equals_hand_surgery_on_hf_tensors",)
DEPTH = ("tests/prune/test_reference_prune.py::test_dropping_layers_equals_deleting_them_in_transformers",)
LORA = ("tests/peft/test_reference_lora.py",)
LORA_TP2 = ("tests/peft/test_peft.py::test_lora_tp2_equals_tp1",)
LORA_INIT = ("tests/train/test_reference_train_state.py::test_lora_init_matches_peft_and_starts_at_the_base_model",)
LR = ("tests/train/test_reference_train_state.py::test_lr_schedule_matches_closed_form",)
RESUME = ("tests/train/test_reference_train_state.py::test_resume_restores_every_piece_of_state",)
SAMPLER = ("tests/data/test_data.py", "-k", "sampler or ranks_are_disjoint or dp_layout or same_seed or resume_continues or epochs_wrap")
PARALLEL = ("tests/parallel/test_parallel.py::test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2",)
ATOMIC = ("tests/checkpoint/test_bad_input.py", "-k", "failure_during_write or existing_output or umask")

L, VP, IM = "nemo_neo/distill/losses.py", "nemo_neo/distill/vocab_parallel.py", "nemo_neo/prune/importance.py"

MUTATIONS = [
    # --- KD losses: values, gradients, temperature, T^2, top-k, masks -------------------------
    Mutation("fkl_grad_sign", L, "grad = log_q.exp_().sub_(p)", "grad = p.sub(log_q.exp_())", LOSS,
             "forward KL gradient q - p with the sign flipped"),
    Mutation("fkl_grad_no_temperature", L, "return per_token, (grad if temperature == 1.0 else grad.div_(temperature))",
             "return per_token, grad", LOSS, "d/ds of softmax(s/T) loses its 1/T"),
    Mutation("fkl_value_teacher_unsoftened", L, "            student.div_(temperature)\n            teacher.div_(temperature)\n",
             "            student.div_(temperature)\n", LOSS, "the teacher is not softened by T"),
    Mutation("t2_scaling_T_not_T2", L, "return self.temperature**2 if self.t2_scaling else 1.0",
             "return self.temperature if self.t2_scaling else 1.0", LOSS, "Hinton's T^2 factor becomes T"),
    Mutation("ce_kl_alpha_swapped", L, "scale *= 1.0 - config.alpha", "scale *= config.alpha", LOSS,
             "the KL term of alpha*CE + (1-alpha)*KL gets weight alpha"),
    Mutation("topk_teacher_unsoftened", L, "log_p_top = torch.log_softmax(_softened(top_values, temperature), dim=-1)",
             "log_p_top = torch.log_softmax(top_values, dim=-1)", LOSS, "top-k teacher renormalised at T=1"),
    Mutation("topk_grad_sign", L, "grad = vp.scatter_add_at_global_ids(log_q.exp_(), top_ids, -p_top, group)",
             "grad = vp.scatter_add_at_global_ids(log_q.exp_(), top_ids, p_top, group)", LOSS, "top-k gradient adds p"),
    Mutation("jsd_beta_swapped", L, "log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))",
             "log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))", LOSS,
             "JSD mixture weights swapped"),
    Mutation("softmax_backward_no_temperature", L, "return g.sub_(expected.unsqueeze(-1)).mul_(q).div_(temperature)",
             "return g.sub_(expected.unsqueeze(-1)).mul_(q)", LOSS, "reverse KL / JSD gradient loses 1/T"),
    Mutation("ce_ignore_index_not_masked", L,
             "token_weight = token_weight * (labels != config.ignore_index).to(dtype)",
             "token_weight = token_weight", LOSS, "labels -100 are counted"),
    Mutation("mask_not_applied_to_gradient", L, "torch.mul(grad, weight_1d[rows].unsqueeze(-1), out=grad_buffer[rows])",
             "grad_buffer[rows].copy_(grad)", LOSS, "masked tokens still send gradient"),
    Mutation("dp_token_mean_grad_unscaled", L, "local_scaled = loss_sum * world", "local_scaled = loss_sum", DP_MEAN,
             "global token mean's gradient not scaled for the DP average"),
    # --- vocab-parallel reductions -------------------------------------------------------------
    Mutation("vp_max_not_reduced", VP, "all_reduce_(row_max, group, op=dist.ReduceOp.MAX)", "pass", LOSS_TP2,
             "each shard shifts by its own max"),
    Mutation("vp_sum_exp_not_reduced", VP, "    all_reduce_(sum_exp, group)\n", "", LOSS_TP2,
             "softmax denominator over the local shard only"),
    Mutation("vp_gather_double_counts", VP, "picked = picked.masked_fill_(~owned, 0.0)", "picked = picked", LOSS_TP2,
             "ids owned by another rank are counted too"),
    Mutation("vp_topk_local_ids", VP, "    ids = ids + start\n", "", LOSS_TP2, "top-k ids left shard-local"),
    # --- importance and width / depth selection ---------------------------------------------------
    Mutation("importance_seq_max", IM, "        return x.mean(0)\n", "        return x.amax(0)\n", IMP,
             "issue 23: sequence aggregation mean replaced by max"),
    Mutation("importance_no_abs", IM, "                x = x.abs()\n", "                x = x\n", IMP, "signed activations averaged"),
    Mutation("importance_head_l1", IM, "x = x.view(*x.shape[:2], -1, self.head_dim).norm(dim=-1)",
             "x = x.view(*x.shape[:2], -1, self.head_dim).abs().sum(dim=-1)", IMP, "head norm L1 instead of L2"),
    Mutation("importance_batch_var_uncentred", IM, "return mean if how == \"mean\" else self.sumsq / self.count - mean.pow(2)",
             "return mean if how == \"mean\" else self.sumsq / self.count", IMP, "variance without the mean"),
    Mutation("importance_one_norm", IM, 'for name in ("input_layernorm", "pre_mlp_layernorm"):',
             'for name in ("input_layernorm",):', IMP, "channels scored at one norm per layer only"),
    Mutation("importance_tp_order", IM, "local[key] = torch.cat([p.cpu() for p in parts], dim=1)",
             "local[key] = torch.cat([p.cpu() for p in reversed(parts)], dim=1)", IMP_TP, "TP ranks gathered out of order"),
    Mutation("width_keeps_least_important", "nemo_neo/prune/width.py",
             "return torch.sort(torch.topk(scores.double(), k).indices).values",
             "return torch.sort(torch.topk(-scores.double(), k).indices).values", WIDTH, "keeps the k worst units"),
    Mutation("width_groups_by_max", "nemo_neo/prune/width.py", "groups = _top(head_scores.sum(1), new.num_query_groups)",
             "groups = _top(head_scores.amax(1), new.num_query_groups)", WIDTH, "query groups ranked by their best head"),
    Mutation("width_up_half_unpruned", "nemo_neo/prune/width.py", "torch.cat([gate[neurons], up[neurons]])",
             "torch.cat([gate[neurons], up[: len(neurons)]])", WIDTH, "SwiGLU up half sliced by position"),
    Mutation("depth_renumber", "nemo_neo/prune/depth.py", "new_index = {old: new for new, old in enumerate(keep)}",
             "new_index = {old: new for new, old in enumerate(sorted(keep, reverse=True))}", DEPTH, "kept layers reversed"),
    # --- LoRA -----------------------------------------------------------------------------------
    Mutation("lora_scale_off_by_one", "nemo_neo/peft/lora.py", "self.rank, self.alpha, self.scale = rank, alpha, alpha / rank",
             "self.rank, self.alpha, self.scale = rank, alpha, alpha / (rank + 1)", LORA, "issue 23: alpha / (r + 1)"),
    Mutation("lora_qkv_k_v_swapped", "nemo_neo/peft/lora.py",
             'spans = {"q": (0, hpg * d), "k": (hpg * d, (hpg + 1) * d), "v": ((hpg + 1) * d, (hpg + 2) * d)}',
             'spans = {"q": (0, hpg * d), "v": (hpg * d, (hpg + 1) * d), "k": ((hpg + 1) * d, (hpg + 2) * d)}', LORA,
             "a q/v adapter writes into k"),
    Mutation("moslora_mixer_transposed", "nemo_neo/peft/lora.py", "h = torch.nn.functional.linear(h, self.lora_M)",
             "h = torch.nn.functional.linear(h, self.lora_M.t())", LORA, "B M^T A instead of B M A"),
    Mutation("lora_B_not_zero_init", "nemo_neo/peft/lora.py", "            self.lora_B.zero_()\n",
             "            self.lora_B.uniform_(-bound, bound, generator=generator)\n", LORA_INIT, "adapters do not start at 0"),
    Mutation("lora_A_init_too_narrow", "nemo_neo/peft/apply.py", "bound = 1.0 / (shape[1] ** 0.5)", "bound = 1.0 / shape[1]",
             LORA_INIT, "A's init range not peft's kaiming-uniform"),
    Mutation("lora_row_parallel_not_reduced", "nemo_neo/peft/lora.py", "            h = reduce_from_tensor_model_parallel_region(h)\n",
             "            h = h\n", LORA_TP2, "row-parallel A x not summed over TP"),
    # --- TP / PP sharding and resharding ------------------------------------------------------------
    Mutation("shard_swiglu_plain", "nemo_neo/checkpoint/sharding.py",
             "return [(0, h * half + tp_rank * n, h * half + (tp_rank + 1) * n) for h in (0, 1)]",
             "return [(0, tp_rank * 2 * n, (tp_rank + 1) * 2 * n)]", PARALLEL, "fc1 split as one block, not per half"),
    Mutation("unshard_swiglu_plain", "nemo_neo/checkpoint/sharding.py",
             "return torch.cat(list(gates) + list(ups), dim=0)", "return torch.cat(shards, dim=0)", PARALLEL,
             "fc1 halves interleaved on save"),
    Mutation("pp_layer_offset_zero", "nemo_neo/parallel/chunks.py",
             "return ((vp_stage or 0) * ctx.pp_size + ctx.pp_rank) * per_chunk", "return 0",
             PARALLEL, "every stage loads the first layers"),
    # --- DP sampler, LR schedule, atomicity, resume ------------------------------------------------
    Mutation("sampler_same_shuffle_every_epoch", "nemo_neo/data/dataset.py",
             "generator = torch.Generator().manual_seed(self.seed + epoch)", "generator = torch.Generator().manual_seed(self.seed)",
             SAMPLER, "epochs do not reshuffle"),
    Mutation("sampler_ranks_overlap", "nemo_neo/data/dataset.py", "return [grid[m, self.dp_rank].clone() for m in range(self.num_microbatches)]",
             "return [grid[m, 0].clone() for m in range(self.num_microbatches)]", SAMPLER, "every DP rank reads rank 0's rows"),
    Mutation("sampler_resume_ignored", "nemo_neo/data/dataset.py", 'self.consumed_steps = int(state["consumed_steps"])',
             "self.consumed_steps = 0", SAMPLER, "resume restarts the data order"),
    Mutation("lr_warmup_from_zero", "nemo_neo/train/optim.py", "init_lr=cfg.lr / (warmup + 1),", "init_lr=0.0,", LR,
             "first step at LR 0"),
    Mutation("lr_linear_decay", "nemo_neo/train/optim.py", 'lr_decay_style: str = "cosine"', 'lr_decay_style: str = "linear"', LR,
             "linear instead of cosine decay by default"),
    Mutation("lr_warmup_not_capped", "nemo_neo/train/optim.py", "warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))",
             "warmup = cfg.warmup_steps", LR, "warm-up longer than the run"),
    Mutation("atomic_publish_on_error", "nemo_neo/checkpoint/atomic.py",
             "    except BaseException as e:\n        shutil.rmtree(tmp, ignore_errors=True)\n",
             "    except BaseException as e:\n        publish(tmp, out)\n", ATOMIC, "a failed write replaces the output"),
    Mutation("atomic_overwrite_ignored", "nemo_neo/checkpoint/atomic.py",
             "if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:",
             "if out.exists() and (not out.is_dir() or any(out.iterdir())) and False:", ATOMIC, "existing output clobbered"),
    Mutation("atomic_files_private", "nemo_neo/checkpoint/atomic.py", "mode = stat.S_IMODE(root.stat().st_mode) & 0o666",
             "mode = 0o600", ATOMIC, "published files ignore the umask"),
    Mutation("resume_optimizer_dropped", "nemo_neo/train/state.py", '    optimizer.load_state_dict(state["optimizer"])\n', "",
             RESUME, "Adam moments restart"),
    Mutation("resume_scheduler_dropped", "nemo_neo/train/state.py", '    scheduler.load_state_dict(state["scheduler"])\n', "",
             RESUME, "LR schedule restarts"),
    Mutation("resume_sampler_dropped", "nemo_neo/train/state.py", '    sampler.load_state_dict(state["sampler"])\n', "",
             RESUME, "data order restarts"),
    Mutation("resume_rng_dropped", "nemo_neo/train/state.py", '    set_rng_state(state["rng"])\n', "", RESUME,
             "RNG not restored"),
    Mutation("latest_pointer_before_save", "nemo_neo/train/state.py",
             "    out = save_distributed(ckpt_root / name, arch, model, ctx, tokenizer_src=tokenizer_src,\n"
             "                           metadata={\"step\": step, \"metrics\": metrics or {}}, overwrite=True, rank_state=state)\n"
             "    if ctx.is_main:  # move the pointer only now that the checkpoint is complete\n"
             "        tmp = ckpt_root / f\".{LATEST}.tmp\"\n"
             "        try:\n"
             "            tmp.write_text(json.dumps({\"name\": name, \"step\": step}) + \"\\n\")\n"
             "            os.replace(tmp, ckpt_root / LATEST)\n",
             "    if ctx.is_main:\n"
             "        ckpt_root.mkdir(parents=True, exist_ok=True)\n"
             "        tmp = ckpt_root / f\".{LATEST}.tmp\"\n"
             "        tmp.write_text(json.dumps({\"name\": name, \"step\": step}) + \"\\n\")\n"
             "        os.replace(tmp, ckpt_root / LATEST)\n"
             "    out = save_distributed(ckpt_root / name, arch, model, ctx, tokenizer_src=tokenizer_src,\n"
             "                           metadata={\"step\": step, \"metrics\": metrics or {}}, overwrite=True, rank_state=state)\n"
             "    if ctx.is_main:\n"
             "        try:\n"
             "            pass\n",
             RESUME, "the pointer moves before the checkpoint is whole"),
]


class Interrupted(Exception):
    pass


def _on_signal(signum, frame):
    raise Interrupted(f"signal {signum}")


def git_clean(paths) -> bool:
    return subprocess.run(["git", "diff", "--quiet", "--", *paths], cwd=REPO).returncode == 0


def check_entry(m: Mutation) -> str | None:
    path = REPO / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    text = path.read_text()
    count = text.count(m.original)
    if count != 1:
        return f"the original snippet occurs {count} times in {m.file} (must be exactly once: update the entry)"
    try:  # a mutant that is not even Python would "fail" every test without testing anything
        compile(text.replace(m.original, m.replacement, 1), m.file, "exec")
    except SyntaxError as e:
        return f"the mutant does not compile ({e.msg}, line {e.lineno}): fix the replacement"
    return None


def run_tests(tests, timeout: int) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, time.perf_counter() - start, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - start, "timeout"


def apply_and_test(m: Mutation, timeout: int) -> tuple[int, float, str]:
    path = REPO / m.file
    data, st = path.read_bytes(), path.stat()
    try:
        path.write_text(data.decode().replace(m.original, m.replacement, 1))
        return run_tests(m.tests, timeout)
    finally:
        path.write_bytes(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[], help="run only this mutation (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--baseline", action="store_true", help="first run each distinct test set unmutated (must pass)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant's test run (a timeout counts as a kill)")
    args = ap.parse_args(argv)
    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names), "duplicate mutation names"
    unknown = [n for n in args.only if n not in names]
    if unknown:
        print(f"error: unknown mutation(s) {unknown}; see --list", file=sys.stderr)
        return 2
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:36s} {m.file:36s} {' '.join(m.tests)}\n{'':36s} {m.why}")
        print(f"{len(chosen)} mutations")
        return 0
    stale = [(m.name, err) for m in chosen if (err := check_entry(m))]
    if stale:
        for name, err in stale:
            print(f"error: {name}: {err}", file=sys.stderr)
        return 2
    files = sorted({m.file for m in chosen})
    if not git_clean(files):
        print(f"error: uncommitted changes in {files}; commit or stash them first (the check restores files to "
              "their current bytes and verifies with git diff)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    if args.baseline:
        for tests in dict.fromkeys(m.tests for m in chosen):
            rc, secs, tail = run_tests(tests, args.timeout)
            print(f"baseline {'ok  ' if rc == 0 else 'FAIL'} {secs:6.1f}s  {' '.join(tests)}", flush=True)
            if rc != 0:
                print(tail, file=sys.stderr)
                return 2
    survivors, broken, total_start = [], [], time.perf_counter()
    try:
        for i, m in enumerate(chosen, 1):
            rc, secs, tail = apply_and_test(m, args.timeout)
            # 1 = a test failed (killed); -1 = the tests ran past --timeout (killed: e.g. an endless loop);
            # 0 = survived; anything else (2: a collection / syntax error) means the entry itself is broken.
            status = {0: "SURVIVED", 1: "killed", -1: "killed"}.get(rc, "BROKEN")
            print(f"[{i:2d}/{len(chosen)}] {status:8s} {secs:6.1f}s  {m.name}  ({m.why})", flush=True)
            if status == "BROKEN" or rc == -1:
                print(f"    pytest exit status {rc}: {tail.strip().splitlines()[-1] if tail.strip() else ''}")
            if rc == 0:
                survivors.append(m)
            elif status == "BROKEN":
                broken.append(m)
    except (KeyboardInterrupt, Interrupted) as e:  # apply_and_test has restored the file already
        print(f"interrupted ({e}); files restored", file=sys.stderr)
        return 2
    finally:  # runs on any exit from the loop, an unexpected exception included
        clean = git_clean(files)
    if not clean:
        print(f"error: {files} differ from git after restoring: inspect `git diff`", file=sys.stderr)
        return 2
    done = len(chosen) - len(broken)
    killed = done - len(survivors)
    print(f"\nkill rate: {killed}/{done} = {100.0 * killed / max(done, 1):.1f}% in {time.perf_counter() - total_start:.0f}s")
    for m in survivors:
        print(f"survivor: {m.name} ({m.file}): {m.why}; tests: {' '.join(m.tests)}")
    for m in broken:
        print(f"broken entry (the mutant does not even import; fix its replacement): {m.name} ({m.file})")
    return 2 if broken else 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
