"""Width pruning to a target architecture: rank units by importance, reorder-free slicing of every
affected weight of a full (unsharded) nemo_neo state dict.

Units and what slicing them touches:
  hidden channels   embedding / output columns, every norm, qkv and fc1 input columns, proj and fc2
                    output rows, final norm;
  MLP neurons       per layer: rows of both SwiGLU halves of fc1 (gate and up), columns of fc2;
  query groups      per layer: a group's q heads plus its k and v (rows of qkv), its heads' proj columns;
  attention heads   per layer, ranked *inside each query group* and the same count kept in every
                    group, so GQA stays valid (and plain MHA, where every head is its own group,
                    really loses its heads' weights).
Kept units stay in their original order, so the result is a normal checkpoint of a smaller model.
"""

from __future__ import annotations

import copy

import torch

from nemo_neo.errors import ConfigError
from nemo_neo.models.arch import GPTArch, UnsupportedConfigError
from nemo_neo.models.gpt import check_parallel_fit

TARGET_KEYS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "num_layers")


class PruneTargetError(ConfigError):
    pass


def parse_key_values(text: str, keys, cast, what: str = "target") -> dict:
    """'a=1,b=2' -> {a: cast('1'), ...}; a key outside `keys` or a value `cast` refuses is one
    PruneTargetError naming it (`what` says which option it came from)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        if key not in keys:
            raise PruneTargetError(f"unknown {what} key {key!r}; use {', '.join(keys)}")
        try:
            out[key] = cast(value)
        except ValueError:
            raise PruneTargetError(f"{what} {key}={value!r} is not {'an integer' if cast is int else 'a number'}") from None
    return out


def parse_target(text: str) -> dict:
    """'hidden_size=432,ffn_hidden_size=768' -> dict; unknown keys or non-integers are errors."""
    return parse_key_values(text, TARGET_KEYS, int)


def pruned_arch(arch: GPTArch, target: dict, tp: int = 1, pp: int = 1) -> GPTArch:
    """The architecture after pruning; validates the target before any work."""

    new = copy.deepcopy(arch)
    current = {"hidden_size": arch.hidden_size, "ffn_hidden_size": arch.ffn_hidden_size,
               "num_attention_heads": arch.num_attention_heads, "num_query_groups": arch.num_query_groups,
               "num_layers": arch.num_layers}
    for key, value in target.items():
        if not 1 <= value <= current[key]:
            raise PruneTargetError(f"target {key}={value} must be between 1 and the model's {current[key]}")
        setattr(new, key, value)
    if "num_query_groups" in target and "num_attention_heads" not in target:
        new.num_attention_heads = new.num_query_groups * arch.heads_per_group
    if new.num_attention_heads % new.num_query_groups:
        raise PruneTargetError(
            f"num_attention_heads={new.num_attention_heads} is not divisible by num_query_groups="
            f"{new.num_query_groups}: every query group must keep the same number of heads"
        )
    if new.num_attention_heads // new.num_query_groups > arch.heads_per_group:
        raise PruneTargetError(
            f"{new.num_attention_heads // new.num_query_groups} heads per group > the model's {arch.heads_per_group}: "
            "prune num_attention_heads together with num_query_groups"
        )
    if pp > new.num_layers:
        raise PruneTargetError(f"num_layers={new.num_layers} < pipeline_parallel={pp}: a pipeline stage would be empty")
    try:
        check_parallel_fit(new, tp, pp)
    except UnsupportedConfigError as e:
        raise PruneTargetError(f"pruned model does not fit TP={tp}/PP={pp}: {e}") from None
    return new


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending index order."""
    return torch.sort(torch.topk(scores.double(), k).indices).values


def _random_scores(arch: GPTArch, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"heads": torch.rand(arch.num_layers, arch.num_attention_heads, generator=g),
            "neurons": torch.rand(arch.num_layers, arch.ffn_hidden_size, generator=g),
            "channels": torch.rand(arch.hidden_size, generator=g)}


def prune_width(arch: GPTArch, state: dict[str, torch.Tensor], scores: dict, target: dict,
                tp: int = 1, pp: int = 1) -> tuple[GPTArch, dict[str, torch.Tensor]]:
    """Prune a full neo state dict to `target` keeping the most important units (per `scores`)."""
    target = {k: v for k, v in target.items() if k != "num_layers"}
    new = pruned_arch(arch, target, tp, pp)
    d, hpg = arch.head_dim, arch.heads_per_group
    new_hpg = new.num_attention_heads // new.num_query_groups
    channels = _top(scores["channels"], new.hidden_size)
    out = {}
    for name, t in state.items():
        out[name] = t
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in out:
            out[name] = out[name][:, channels]
    out["decoder.final_layernorm.weight"] = out["decoder.final_layernorm.weight"][channels]
    for i in range(arch.num_layers):
        p = f"decoder.layers.{i}."
        head_scores = scores["heads"][i].double().view(arch.num_query_groups, hpg)
        groups = _top(head_scores.sum(1), new.num_query_groups)
        kept_heads = [g * hpg + h for g in groups.tolist() for h in _top(head_scores[g], new_hpg).tolist()]
        # linear_qkv rows are [group][q heads..., k, v] x head_dim
        qkv_rows = []
        for g in groups.tolist():
            base = g * (hpg + 2) * d
            qkv_rows += [base + h * d + j for h in _top(head_scores[g], new_hpg).tolist() for j in range(d)]
            qkv_rows += [base + (hpg + k) * d + j for k in (0, 1) for j in range(d)]
        qkv_rows = torch.tensor(qkv_rows)
        proj_cols = torch.tensor([h * d + j for h in kept_heads for j in range(d)])
        out[p + "self_attention.linear_qkv.weight"] = out[p + "self_attention.linear_qkv.weight"][qkv_rows][:, channels]
        if p + "self_attention.linear_qkv.bias" in out:
            out[p + "self_attention.linear_qkv.bias"] = out[p + "self_attention.linear_qkv.bias"][qkv_rows]
        out[p + "self_attention.linear_proj.weight"] = out[p + "self_attention.linear_proj.weight"][channels][:, proj_cols]
        neurons = _top(scores["neurons"][i], new.ffn_hidden_size)
        fc1 = out[p + "mlp.linear_fc1.weight"]
        gate, up = fc1.chunk(2, dim=0)
        out[p + "mlp.linear_fc1.weight"] = torch.cat([gate[neurons], up[neurons]])[:, channels]
        out[p + "mlp.linear_fc2.weight"] = out[p + "mlp.linear_fc2.weight"][channels][:, neurons]
        for norm in ("input_layernorm.weight", "pre_mlp_layernorm.weight"):
            out[p + norm] = out[p + norm][channels]
    return new, {k: v.contiguous() for k, v in out.items()}


def prune_width_random(arch, state, target, seed: int = 0, tp: int = 1, pp: int = 1):
    """The same shapes with random unit choice (the baseline importance must beat)."""
    return prune_width(arch, state, _random_scores(arch, seed), target, tp, pp)
