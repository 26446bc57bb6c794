"""Did alignment work? Alarms for the ways a preference run fails without an error.

Pure functions of what a run measured: its logged metrics, its training pairs as text, the token counts of
its probe replies. Each alarm is a dict: `name`, `message` (what tripped, with the figure) and `fix` (what to
do). train.py records them in train.json; the pipeline prints them; report.md opens with them.

    loss stuck        DPO's loss within STUCK_WITHIN of ln 2 at every logged step after STUCK_AFTER of the
                      steps: the policy is not moving away from the reference
    leak signature    DPO's reward accuracy 1.0 at every one of the first logged steps (the first EARLY share
                      of the steps, at least two logs): told apart before anything could be learnt
    wrong reference   DPO's loss at step 0 far from ln 2 (policy = reference gives exactly ln 2): the
                      reference is not the model being trained, e.g. an SFT adapter stacked under DPO's
    same pairs        chosen and rejected equal or nearly so in more than SAME_SHARE of the pairs
    prompt in reply   the prompt repeated at the start of chosen or rejected in more than SAME_SHARE
    reward flat       grpo, rloo: the mean reward of the last REWARD_WINDOW of the logged steps is not above
                      the first's: the policy did not learn to score higher
    length drift      greedy probe replies more than LENGTH_DRIFT times longer after training than before,
                      and longer than the replies the data asks for (its chosen or desirable ones, by more
                      than TARGET_SLACK): longer towards the data's replies is the training working, past
                      them it is DPO's known drift to length
"""
import difflib
import math
import re

LN2 = math.log(2)
STUCK_AFTER, STUCK_WITHIN = 0.2, 0.005
EARLY = 0.1
START_OFF = 0.1      # a step-0 DPO loss further than this from ln 2
SAME_SHARE = 0.05
NEARLY_SAME = 0.98   # difflib's ratio of the normalized texts
LENGTH_DRIFT = 2.0
TARGET_SLACK = 1.25
MAX_PAIRS = 5000     # the data checks read the first this many pairs
REWARD_WINDOW = 0.25  # the share of an online run's logged steps averaged at its start and at its end


def alarm(name: str, message: str, fix: str) -> dict:
    return {"name": name, "message": message, "fix": fix}


def training_alarms(method: str, records: list[dict], max_steps: int, sigmoid_loss: bool = True) -> list[dict]:
    """From metrics.jsonl's records (training logs have "loss", evaluations "eval_loss"). The loss checks
    need DPO's sigmoid loss, the only one that starts at ln 2."""
    train = [r for r in records if r.get("loss") is not None and "eval_loss" not in r]
    alarms = []
    late = [r for r in train if r["step"] >= STUCK_AFTER * max_steps]
    if method == "dpo" and sigmoid_loss and late and all(abs(r["loss"] - LN2) < STUCK_WITHIN for r in late):
        alarms.append(alarm(
            "loss stuck", f"the DPO loss stayed within {STUCK_WITHIN} of ln 2 = {LN2:.4f} at every logged step "
            f"after {STUCK_AFTER:.0%} of the training (last {late[-1]['loss']:.4f} at step {late[-1]['step']}): "
            f"the model is not moving away from the reference",
            f"raise {method}.learning_rate (x5), check that lora.target_modules names the model's layers, and that "
            f"chosen and rejected differ"))
    # DPO's rewards are against the reference, so they start at 0: a step-1 log (made before the first
    # update) has accuracy 0. ORPO's are log-odds of the model alone, high from the start on easy data.
    scored = [r for r in train if r.get("rewards/accuracies") is not None and r["step"] > 1]
    early = [r for r in scored if r["step"] <= EARLY * max_steps]
    early = early if len(early) >= 2 else scored[:2]
    if method == "dpo" and len(early) >= 2 and all(r["rewards/accuracies"] >= 1.0 for r in early):
        alarms.append(alarm(
            "leak signature", f"reward accuracy was 100% from the first logged steps "
            f"({', '.join(str(r['step']) for r in early)}): the chosen replies were told apart before anything "
            f"could be learnt, the signature of a data leak (the prompt or a marker inside chosen only)",
            "read some pairs with `python -m app data inspect SOURCE`; the chosen and rejected replies should "
            "differ in quality, not in a give-away"))
    start = next((r["eval_loss"] for r in records if r.get("step") == 0 and r.get("eval_loss") is not None), None)
    if start is None and train and train[0]["step"] == 1:
        start = train[0]["loss"]
    if method == "dpo" and sigmoid_loss and start is not None and abs(start - LN2) > START_OFF:
        alarms.append(alarm(
            "wrong reference", f"the DPO loss at the start was {start:.4f}, not ln 2 = {LN2:.4f} (which it is "
            f"when the reference is the model being trained, before its first step): the reference is another "
            f"model, e.g. after SFT a DPO adapter stacked on the SFT adapter",
            "run SFT then DPO as one recipe's `stages: [sft, dpo]`: each stage starts from the previous "
            "stage's merged weights, with a fresh adapter and that model as the reference"))
    return alarms


def reward_trend(records: list[dict]) -> dict | None:
    """An online run's mean reward over the first and the last REWARD_WINDOW of its logged steps (each log
    is already a mean over that step's sampled replies); None with fewer than 4 logs or none with a reward."""
    logged = [r for r in records if r.get("reward") is not None and "eval_loss" not in r]
    if len(logged) < 4:
        return None
    n = max(1, round(len(logged) * REWARD_WINDOW))
    first, last = logged[:n], logged[-n:]
    return {"first": sum(r["reward"] for r in first) / n, "last": sum(r["reward"] for r in last) / n,
            "first_steps": [first[0]["step"], first[-1]["step"]], "last_steps": [last[0]["step"], last[-1]["step"]]}


def reward_alarms(records: list[dict]) -> list[dict]:
    trend = reward_trend(records)
    if trend is None or trend["last"] > trend["first"]:
        return []
    return [alarm("reward flat", f"the mean reward over steps {trend['last_steps'][0]}-{trend['last_steps'][1]} "
                  f"({trend['last']:+.3f}) is not above steps {trend['first_steps'][0]}-{trend['first_steps'][1]} "
                  f"({trend['first']:+.3f}): the policy did not learn to score higher",
                  "raise the method's learning_rate (x3) or max_steps; check that the reward model ranks the data's "
                  "chosen replies first (its run's report), and that num_generations gives replies that differ")]


def normalized(text: str) -> str:
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def data_alarms(pairs: list[tuple[str, str, str]]) -> list[dict]:
    """`pairs`: (prompt, chosen, rejected) as text, the last user message and the two replies."""
    pairs = pairs[:MAX_PAIRS]
    if not pairs:
        return []
    same = prompted = 0
    for prompt, chosen, rejected in pairs:
        p, c, r = normalized(prompt), normalized(chosen), normalized(rejected)
        if c == r or (0.9 < len(c) / max(1, len(r)) < 1.1 and difflib.SequenceMatcher(None, c, r).ratio() >= NEARLY_SAME):
            same += 1
        if len(p) >= 8 and (c.startswith(p) or r.startswith(p)):
            prompted += 1
    alarms, n = [], len(pairs)
    if same > SAME_SHARE * n:
        alarms.append(alarm(
            "same pairs", f"chosen and rejected are the same or nearly (>= {NEARLY_SAME:.0%} alike) in {same} of "
            f"{n} pairs ({same / n:.0%}): those pairs teach nothing and blur the rest",
            "drop them from the data (or check the column mapping: data.columns may point both at one column)"))
    if prompted > SAME_SHARE * n:
        alarms.append(alarm(
            "prompt in reply", f"the prompt is repeated at the start of chosen or rejected in {prompted} of {n} "
            f"pairs ({prompted / n:.0%}): the trainer adds the prompt itself, so the model learns to echo it",
            "strip the prompt from the replies (data in the standard format: prompt, chosen, rejected)"))
    return alarms


def length_alarms(before: list[int], after: list[int], targets: list[int] = ()) -> list[dict]:
    """Token counts of the greedy probe replies, before and after training, and of the data's target replies
    (chosen, or desirable completions; none: only the growth is judged)."""
    if not before or not after:
        return []
    mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
    target = sum(targets) / len(targets) if targets else 0.0
    if mean_after > LENGTH_DRIFT * max(mean_before, 1) and mean_after > TARGET_SLACK * target:
        wanted = f", past the {target:.0f} of the data's chosen replies" if targets else ""
        return [alarm(
            "length drift", f"the greedy probe replies grew from {mean_before:.0f} to {mean_after:.0f} tokens on "
            f"average ({mean_after / max(mean_before, 1):.1f}x){wanted}: DPO is known to lengthen replies beyond "
            f"what the data shows", "check whether the chosen replies are longer than the rejected ones in the "
            "data and balance them, or lower the learning rate or raise dpo.beta (the model then stays nearer "
            "the reference)")]
    return []
