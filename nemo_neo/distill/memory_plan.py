"""Per-rank memory of logit distillation (teacher + student) for one parallel layout, by arithmetic.

No model is built: the bytes follow from the two `GPTArch`s and the layout, term by term, as
megatron-core (0.16) and nemo_neo allocate them. `Layout` is one TP x PP (x VPP) x DP choice with
sequence parallelism, the distributed optimizer and activation recompute; `rank_memory` gives the
worst pipeline stage's bytes, each term with the formula that produced it (`Memory.arithmetic`).

Static state (per parameter held by the rank; P_t = TP/PP shard of the parameters):
  weights    P x dtype bytes (teacher and student; the teacher is frozen: nothing else)
  grads      megatron DDP's contiguous grad buffer, fp32 (grad_reduce_in_fp32): 4 B per
             trainable parameter, never sharded (the distributed optimizer reduce-scatters into it)
  optimizer  Adam moments (2 x fp32) + fp32 main params when the weights are bf16/fp16 (an fp32
             model is its own main copy: megatron's FP32Optimizer / a view in the distributed
             optimizer): 12 (or 8) B per trainable parameter, divided by DP with the distributed
             optimizer -- Megatron-LM's theoretical_memory_usage: 18 B/param, or 6 + 12/DP.
  LLM-Neo / LoRA: only adapter parameters are trainable (the base is frozen: no grads, no state).

Activations (Korthikanti et al., 2022, "Reducing Activation Recomputation in Large Transformer
Models", redone for this model: RMSNorm, GQA, RoPE, SwiGLU, no dropout, fused SDPA/flash attention,
so no s^2 score matrix), elements saved per token per layer, TP = t, h hidden, f FFN, a heads,
g KV groups, d head dim:
  norm inputs/outputs   4h            (/t with sequence parallelism: the saved copies are the
                                        scattered ones; megatron re-gathers in backward)
  attention             (a+2g)d/t  qkv output (kept alive by the v view)
                        + (a+g)d/t  rotated q, k   + ad/t  SDPA output (recomputed with selective)
                        + ad/t  output-projection input
  MLP                   4f/t        fc1 output [gate; up] 2f, silu(gate) f, product f
  full recompute        only the layer input, h (/t with SP), plus one layer rebuilt in backward.
Pipeline: 1F1B keeps min(PP - stage, M) micro-batches' activations on a stage (stage 0: PP);
interleaving with V chunks keeps (PP - stage - 1) * 2 + (V - 1) * PP + 1 chunks of L/(PP V) layers
(stage 0: L (1 + (PP-1)/(PP V)) layer-micro-batches, as Megatron-LM's estimate). A stage after the
first also keeps each in-flight received p2p tensor, [s, b, h_s + h_t] (the pair sends both hidden
states); its student half is the first layer's saved input, the teacher half is extra.
The frozen teacher runs under no_grad: it saves nothing, and its working set is one layer's.

Logits and the KD loss (last stage, one micro-batch at a time; nemo_neo.distill.losses): student
and teacher logits [s b, V/t], the chunked loss's gradient buffer (student dtype, the only thing it
keeps) and its fp32 workspace, 3 (forward KL) or 4 (CE + KL) x [chunk, V/t] with chunk =
AUTO_CHUNK_ELEMENTS[device] / (V/t). With SP the head returns [s, b, V] and GPTModel copies it to
batch-major: one more logits-sized transient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from nemo_neo.distill.losses import AUTO_CHUNK_ELEMENTS
from nemo_neo.errors import ConfigError
from nemo_neo.models.arch import GPTArch

DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}
RECOMPUTE = ("none", "selective", "full")
METHODS = ("kd", "llm_neo")
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


class PlanError(ConfigError):
    """A planner input that cannot be planned (bad layout, dtype, method or sizes)."""


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: str = "none"

    def __str__(self) -> str:
        extras = [n for n, on in (("SP", self.sequence_parallel), ("distopt", self.distributed_optimizer)) if on]
        if self.recompute != "none":
            extras.append(f"recompute={self.recompute}")
        vpp = f" x VPP={self.vpp}" if self.vpp > 1 else ""
        return f"TP={self.tp} x PP={self.pp}{vpp} x DP={self.dp}" + (f" ({', '.join(extras)})" if extras else "")


@dataclass(frozen=True)
class Workload:
    """What one training step runs: sizes, dtype, method and the device the loss chunks for."""

    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    dtype: str = "bf16"
    method: str = "kd"
    lora_rank: int = 128
    device: str = "cuda"  # "cpu": torch's unfused AdamW temporaries, the CPU loss chunk size

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise PlanError(f"dtype {self.dtype!r}: use one of {sorted(DTYPE_BYTES)}")
        if self.method not in METHODS:
            raise PlanError(f"method {self.method!r}: use one of {list(METHODS)}")
        for name in ("seq_length", "micro_batch_size", "global_batch_size"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name}={getattr(self, name)} must be >= 1")

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass
class Memory:
    """Bytes of the planned rank (the worst pipeline stage) and the arithmetic behind each term."""

    stage: int
    teacher_weights: int
    student_weights: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    p2p: int
    optimizer_step: int  # transient of the optimizer step (activations are gone by then)
    arithmetic: dict = field(default_factory=dict)

    @property
    def static(self) -> int:
        return self.teacher_weights + self.student_weights + self.grads + self.optimizer

    @property
    def total(self) -> int:
        """The step's peak: the state plus the larger of the fwd/bwd peak and the optimizer step's."""
        return self.static + max(self.activations + self.logits + self.p2p, self.optimizer_step)

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("arithmetic", "stage")}
        return {**out, "total": self.total}


def check_layout(arch: GPTArch, layout: Layout, what: str) -> str | None:
    """Why `arch` does not split over `layout` (None when it does): megatron's divisibility rules."""
    t, p, v = layout.tp, layout.pp, layout.vpp
    for name, value in (("num_attention_heads", arch.num_attention_heads), ("num_key_value_heads", arch.num_query_groups),
                        ("intermediate_size", arch.ffn_hidden_size), ("vocab_size", arch.vocab_size)):
        if value % t:
            return f"{what} {name}={value} is not divisible by TP={t}"
    if arch.num_layers % (p * v):
        return f"{what} num_hidden_layers={arch.num_layers} is not divisible by PP x VPP = {p * v}"
    return None


def _layer_params(arch: GPTArch, tp: int) -> int:
    """One transformer layer's parameters on a TP rank (norm weights are replicated)."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    qkv = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    sharded = h * qkv + arch.num_attention_heads * d * h + 3 * h * f + (qkv if arch.qkv_bias else 0)
    return sharded // tp + 2 * h


def stage_params(arch: GPTArch, layout: Layout, stage: int) -> int:
    """Parameters of `arch` held by a rank of pipeline stage `stage` (all its virtual chunks)."""
    h, vocab = arch.hidden_size, arch.vocab_size // layout.tp
    n = arch.num_layers // layout.pp * _layer_params(arch, layout.tp)
    first, last = stage == 0, stage == layout.pp - 1
    if first:
        n += vocab * h
    if last:
        n += h  # final norm
        if not arch.tie_embeddings or layout.pp > 1:  # a tied head keeps its own copy off stage 0
            n += vocab * h
    return n


def lora_params(arch: GPTArch, layout: Layout, rank: int) -> int:
    """LoRA adapter parameters of one stage (nemo_neo.peft.lora's TP split, every target linear):
    column-parallel base: A [r, in] + B [out/t, r]; row-parallel base: A [r, in/t] + B [out, r]."""
    t, h, f, d = layout.tp, arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    qkv = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    attn = arch.num_attention_heads * d
    per_layer = rank * ((h + qkv // t) + (attn // t + h) + (h + 2 * f // t) + (f // t + h))
    return arch.num_layers // layout.pp * per_layer


def layer_activation_elems(arch: GPTArch, layout: Layout, recompute: str | None = None) -> float:
    """Elements per token one layer saves for backward (see the module docstring)."""
    t, h, f, d = layout.tp, arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    a, g = arch.num_attention_heads, arch.num_query_groups
    hidden = h / t if layout.sequence_parallel else h
    recompute = layout.recompute if recompute is None else recompute
    if recompute == "full":
        return hidden
    attention = ((a + 2 * g) * d + (a + g) * d + 2 * a * d) / t
    if recompute == "selective":
        attention -= a * d / t
    return 4 * hidden + attention + 4 * f / t


def inflight_chunks(layout: Layout, stage: int, num_microbatches: int) -> int:
    """Micro-batch x model-chunk activations a stage holds at its peak under megatron's schedules."""
    p, v = layout.pp, layout.vpp
    if p == 1:
        return 1
    if v == 1:
        return min(p - stage, num_microbatches)
    return min((p - stage - 1) * 2 + (v - 1) * p + 1, num_microbatches * v)


def _teacher_working_elems(arch: GPTArch, layout: Layout) -> float:
    """Per token, the largest set of tensors alive inside one no_grad teacher layer."""
    t, h, f, d = layout.tp, arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    a, g = arch.num_attention_heads, arch.num_query_groups
    hidden = h / t if layout.sequence_parallel else h
    return 2 * hidden + max(4 * f / t, ((a + 2 * g) + (a + g) + 2 * a) * d / t)


def num_microbatches(layout: Layout, work: Workload) -> int:
    per_step = work.micro_batch_size * layout.dp
    if work.global_batch_size % per_step:
        raise PlanError(f"global batch {work.global_batch_size} is not divisible by micro batch x DP = "
                        f"{work.micro_batch_size} x {layout.dp}")
    return work.global_batch_size // per_step


def rank_memory(teacher: GPTArch, student: GPTArch, layout: Layout, work: Workload) -> Memory:
    """The bytes of the pipeline stage with the largest peak (each stage is computed)."""
    for arch, what in ((teacher, "teacher"), (student, "student")):
        problem = check_layout(arch, layout, what)
        if problem:
            raise PlanError(problem)
    if layout.recompute not in RECOMPUTE:
        raise PlanError(f"recompute {layout.recompute!r}: use one of {list(RECOMPUTE)}")
    m = num_microbatches(layout, work)
    stages = [_stage_memory(teacher, student, layout, work, s, m) for s in range(layout.pp)]
    return max(stages, key=lambda mem: mem.total)


def _stage_memory(teacher: GPTArch, student: GPTArch, layout: Layout, work: Workload, stage: int, m: int) -> Memory:
    B, t, dp = work.bytes, layout.tp, layout.dp
    tokens = work.seq_length * work.micro_batch_size
    sp_tokens = tokens / t if layout.sequence_parallel else tokens
    last, first = stage == layout.pp - 1, stage == 0
    p_teacher, p_student = stage_params(teacher, layout, stage), stage_params(student, layout, stage)
    lora = work.method == "llm_neo"
    trainable = lora_params(student, layout, work.lora_rank) if lora else p_student
    state_bytes = 8 + (4 if B < 4 else 0)
    opt_div = dp if layout.distributed_optimizer else 1
    why = {
        "teacher_weights": f"{p_teacher:,} params x {B} B",
        "student_weights": f"{p_student:,} params x {B} B",
        "grads": f"{trainable:,} trainable x 4 B (fp32 grad buffer)",
        "optimizer": f"{trainable:,} trainable x {state_bytes} B"
                     + (" (fp32 main + 2 moments)" if state_bytes == 12 else " (2 fp32 moments)")
                     + (f" / DP={dp} (distributed optimizer)" if opt_div > 1 else ""),
    }

    chunks = inflight_chunks(layout, stage, m)
    layers_per_chunk = student.num_layers // (layout.pp * layout.vpp)
    per_layer = layer_activation_elems(student, layout)
    saved = chunks * layers_per_chunk * per_layer * tokens * B
    extra_layer = layer_activation_elems(student, layout, "none") * tokens * B if layout.recompute == "full" else 0
    hidden_s = student.hidden_size * sp_tokens
    head = 2 * hidden_s * B if last else 0  # final norm input + head input
    teacher_work = _teacher_working_elems(teacher, layout) * tokens * B
    activations = int(saved + extra_layer + head + teacher_work)
    why["activations"] = (f"{chunks} in-flight chunk(s) x {layers_per_chunk} layers x {per_layer:,.0f} elems/token x "
                          f"{tokens} tokens x {B} B" + (" + 1 recomputed layer" if extra_layer else "")
                          + (" + final norm/head inputs" if head else "") + " + one no_grad teacher layer")

    # every in-flight chunk that does not start at the embedding received [s, b, h_s + h_t]; the
    # student half is counted above as the first layer's input
    received = chunks - (1 if first else 0) if layout.pp > 1 else 0
    p2p = int(received * teacher.hidden_size * sp_tokens * B)
    why["p2p"] = f"{received} received x teacher half [{sp_tokens:g} x {teacher.hidden_size}] x {B} B"

    logits = 0
    if last:
        vocab = student.vocab_size // t
        per_logits = tokens * vocab * B
        chunk = max(1, min(AUTO_CHUNK_ELEMENTS.get(work.device, AUTO_CHUNK_ELEMENTS["cuda"]) // vocab, tokens))
        buffers = 4 if lora else 3  # llm_neo's CE + KL takes one more workspace buffer
        workspace = buffers * chunk * vocab * 4
        sp_copy = per_logits if layout.sequence_parallel else 0
        logits = 3 * per_logits + workspace + sp_copy
        why["logits"] = (f"student + teacher logits + KD grad buffer: 3 x {tokens} x {vocab} x {B} B + workspace "
                         f"{buffers} x {chunk} x {vocab} x 4 B" + (" + SP batch-major copy" if sp_copy else ""))

    # torch's unfused AdamW (CPU) makes two temporaries the size of the largest trainable tensor
    largest = (student.vocab_size // t) * student.hidden_size if not lora else 0
    largest = max(largest, 2 * student.ffn_hidden_size // t * student.hidden_size if not lora else
                  work.lora_rank * max(student.hidden_size, 2 * student.ffn_hidden_size // t))
    optimizer_step = 2 * largest * 4 if work.device == "cpu" else 0
    return Memory(stage=stage, teacher_weights=p_teacher * B, student_weights=p_student * B, grads=trainable * 4,
                  optimizer=int(trainable * state_bytes / opt_div), activations=activations, logits=int(logits), p2p=p2p,
                  optimizer_step=optimizer_step, arithmetic=why)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def min_microbatches_for(layout: Layout) -> int:
    """megatron's interleaved schedule needs the micro-batch count to be a multiple of PP."""
    return layout.pp if layout.vpp > 1 else 1


def layout_problem(teacher: GPTArch, student: GPTArch, layout: Layout, work: Workload) -> str | None:
    """Why a layout cannot run at all (not memory): shapes, batch divisibility, VPP rules."""
    for arch, what in ((teacher, "teacher"), (student, "student")):
        problem = check_layout(arch, layout, what)
        if problem:
            return problem
    per_step = work.micro_batch_size * layout.dp
    if work.global_batch_size % per_step:
        return f"global batch {work.global_batch_size} is not divisible by micro batch x DP = {per_step}"
    m = work.global_batch_size // per_step
    if m % min_microbatches_for(layout):
        return f"{m} micro-batches is not a multiple of PP={layout.pp} (interleaved schedule)"
    return None
