"""Reward functions for the smollm2-135m recipe's grpo and rloo sections: the preference its pairs teach
(one sentence, then stop), as a score.

    make grpo MODEL=smollm2-135m     # rewards.functions names this file

TRL calls every top-level function with the prompts and the sampled completions (message lists: the reply is
the last message's content); their scores are added. One float per completion.
"""
import re


def one_sentence(completions, **kwargs) -> list[float]:
    """+1 for a reply that is one complete sentence, less 0.5 for each sentence beyond it."""
    counts = [len(re.findall(r"[.!?](?=\s|$)", _text(c).strip())) for c in completions]
    return [1.0 - 0.5 * max(0, n - 1) if n else -1.0 for n in counts]


def brevity(completions, **kwargs) -> list[float]:
    """-0.02 for each word past 25."""
    return [-0.02 * max(0, len(_text(c).split()) - 25) for c in completions]


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else str(completion)
