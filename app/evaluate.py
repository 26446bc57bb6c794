"""Did alignment work? Held-out preference accuracy for every form of the model, and probe replies.

One measure serves the base model, the trained one and every GGUF: for each held-out pair, the sum of the
token log-probabilities of the chosen reply and of the rejected reply given the prompt; the pair counts as
right when chosen scores higher. Summed log-probs favour short replies, so a model can improve a lot and
still prefer a short rejected reply outright; DPO's own reward accuracy measures the change instead
(reward = beta * (log p_model - log p_base)), and it is computed for the trained model and every GGUF
against the base's scores. Before training it is undefined (every reward is 0: policy = reference).
The pairs are tokenized once, as DPOTrainer tokenizes them, and every form sees the same token ids.
"""
import contextlib
import logging

logger = logging.getLogger(__name__)


def held_out_pairs(rows, tokenizer, max_pairs: int, max_length: int | None) -> tuple[list[dict], int]:
    """Up to `max_pairs` held-out pairs as token ids (prompt_ids, chosen_ids, rejected_ids), tokenized
    through the chat template as TRL's DPOTrainer does it (the reply starts where prompt and prompt+reply
    diverge), and how many were left out because prompt + reply is longer than max_length."""
    def ids(messages, **kw):
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

    def shared(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    pairs, too_long = [], 0
    for row in rows or []:
        if len(pairs) == max_pairs:
            break
        prompt = ids(row["prompt"], add_generation_prompt=True)
        chosen, rejected = ids(row["prompt"] + row["chosen"]), ids(row["prompt"] + row["rejected"])
        cut = min(shared(prompt, chosen), shared(prompt, rejected))
        if max_length and max(len(chosen), len(rejected)) > max_length:  # cut by training; a sum over a cut reply misleads
            too_long += 1
            continue
        pairs.append({"prompt_ids": prompt[:cut], "chosen_ids": chosen[cut:], "rejected_ids": rejected[cut:]})
    return pairs, too_long


LOGITS_BYTES = 2**27  # a scoring batch's float32 logits stay under this: 128 MiB (256 tokens at a 128k vocabulary)


def score_pairs_hf(model, pairs) -> list[list[float]]:
    """[log p(chosen | prompt), log p(rejected | prompt)] per pair, from a transformers model, in batches of
    right-padded sequences (padding after a sequence cannot change its causal logits) sized so that the
    logits fit LOGITS_BYTES."""
    import torch

    seqs = [(p["prompt_ids"], p[side]) for p in pairs for side in ("chosen_ids", "rejected_ids")]
    vocab = model.get_output_embeddings().weight.shape[0]
    width = max((len(a) + len(b) for a, b in seqs), default=1)
    per_batch = max(1, LOGITS_BYTES // (4 * vocab * width))
    logger.info(f"scoring {len(seqs)} sequences of up to {width} tokens, {per_batch} at a time")
    scores = []
    for start in range(0, len(seqs), per_batch):
        batch = seqs[start:start + per_batch]
        longest = max(len(a) + len(b) for a, b in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (prompt, reply) in enumerate(batch):
            ids[row, :len(prompt) + len(reply)] = torch.tensor(prompt + reply)
            mask[row, :len(prompt) + len(reply)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        for row, (prompt, reply) in enumerate(batch):
            step = logits[row, len(prompt) - 1:len(prompt) + len(reply) - 1].float().log_softmax(-1)
            scores.append(float(step.gather(-1, torch.tensor(reply, device=step.device)[:, None]).sum()))
    return [scores[i:i + 2] for i in range(0, len(scores), 2)]


def reward_of(model, ids: list[int]) -> float:
    """A sequence-classification model's one output for a token sequence: its reward."""
    import torch

    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids], device=model.device)).logits[0, 0])


def score_pairs_reward(model, pairs) -> list[list[float]]:
    """[reward(prompt + chosen), reward(prompt + rejected)] per pair, from a sequence-classification model."""
    return [[reward_of(model, p["prompt_ids"] + p["chosen_ids"]), reward_of(model, p["prompt_ids"] + p["rejected_ids"])]
            for p in pairs]


def score_replies(model, tokenizer, prompt: str | list[dict], replies: list[str]) -> list[float]:
    """A reward model's score of each reply to one prompt (a user's text, or the messages before the reply),
    rendered through the chat template."""
    before = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)

    def conversation(reply):
        messages = before + [{"role": "assistant", "content": reply}]
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    return [reward_of(model, conversation(r)) for r in replies]


def score_pairs_gguf(llm, pairs) -> list[list[float]]:
    """The same scores from a llama_cpp.Llama opened with logits_all=True."""
    import numpy as np

    def logp(prompt, reply):
        llm.reset()
        llm.eval(prompt + reply)
        logits = np.asarray(llm.scores[len(prompt) - 1: len(prompt) + len(reply) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return float(logprobs[np.arange(len(reply)), reply].sum())

    return [[logp(p["prompt_ids"], p["chosen_ids"]), logp(p["prompt_ids"], p["rejected_ids"])] for p in pairs]


def summarize_scores(scores, base_scores=None, beta: float | None = None) -> dict:
    """Accuracy (chosen log-prob above rejected), mean margin and log-probs; with the base model's scores
    also DPO's reward accuracy and margin: reward = beta * (log p_model - log p_base), as TRL computes it."""
    n = len(scores)
    if not n:
        return {"pairs": 0}
    out = {"pairs": n, "accuracy": round(sum(c > r for c, r in scores) / n, 4),
           "margin": round(sum(c - r for c, r in scores) / n, 4),
           "logp_chosen": round(sum(c for c, _ in scores) / n, 4),
           "logp_rejected": round(sum(r for _, r in scores) / n, 4)}
    if base_scores:
        margins = [beta * ((c - bc) - (r - br)) for (c, r), (bc, br) in zip(scores, base_scores)]
        out["reward_accuracy"] = round(sum(m > 0 for m in margins) / n, 4)
        out["reward_margin"] = round(sum(margins) / n, 4)
    return out


def preference_headline(before: dict, after: dict, method: str, beta: float | None = None) -> str | None:
    """The first line a user reads after training: what it changed on the held-out pairs. For a chat model,
    DPO's reward accuracy: the share of pairs whose chosen reply the model moved towards, against the
    rejected one, relative to where it started. It moves on every model and machine that trained, where
    the summed log-prob accuracy need not (a model may gain much on the chosen reply and still give a
    shorter rejected one more probability: tiny on Intel stays at 33% -> 33% with 97% reward accuracy).
    For a reward model, how often it scores the chosen reply higher, against its untrained head. None
    without held-out pairs."""
    n = after.get("pairs")
    if not n:
        return None
    if method == "reward":
        return (f"held-out pairs ({n}): the reward model scores the chosen reply higher in {after['accuracy']:.0%} "
                f"of them ({before['accuracy']:.0%} with its untrained head); mean score margin "
                f"{before['margin']:+.2f} -> {after['margin']:+.2f}")
    moved = round(after["reward_accuracy"] * n)
    return (f"held-out pairs ({n}): {method.upper()} moved the model towards the chosen reply in {moved} of {n} "
            f"(DPO reward accuracy {after['reward_accuracy']:.0%}, mean reward margin {after['reward_margin']:+.2f}"
            + (f" at beta {beta:g}" if beta else "") + ")")


def decision_agreement(scores, reference, tie: float = 0.0) -> float:
    """Share of pairs decided the same way as `reference`; pairs whose reference margin is within `tie`
    of zero count as agreeing (a rounding-sized difference may flip them either way)."""
    same = [(c > r) == (rc > rr) or abs(rc - rr) <= tie for (c, r), (rc, rr) in zip(scores, reference)]
    return round(sum(same) / len(same), 4) if same else 1.0


@contextlib.contextmanager
def unsloth_inference(model):
    """Unsloth's fast inference mode for the duration, then back to training mode."""
    from unsloth import FastLanguageModel

    FastLanguageModel.for_inference(model)
    try:
        yield model
    finally:
        FastLanguageModel.for_training(model)
