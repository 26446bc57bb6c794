"""Reward functions for the online methods (grpo, rloo): rewards.functions names this file.

    python -m app grpo tiny --set rewards.functions=recipes/rewards/courtesy.py

TRL calls every top-level function here with the prompts, the sampled completions (message lists in the
conversational format: the reply is the last message's content) and the dataset's other columns as
keyword arguments, and adds their scores to the reward run's (weighted by the method's reward_weights).
A function returns one float per completion, or None where it has no opinion.
"""
POLITE = ("good question", "thank", "hope this helps", "happy to help", "let me know", "glad")
DISMISSIVE = ("go away", "do not care", "don't care", "boring", "not my problem", "figure it out", "look it up")


def courtesy(completions, **kwargs) -> list[float]:
    """+1 for each polite phrase, -2 for each dismissive one."""
    replies = [_text(c).lower() for c in completions]
    return [float(sum(p in r for p in POLITE) - 2 * sum(d in r for d in DISMISSIVE)) for r in replies]


def brevity(completions, **kwargs) -> list[float]:
    """-0.05 for each word past 60: an answer, not an essay (online methods drift to length as DPO does)."""
    return [-0.05 * max(0, len(_text(c).split()) - 60) for c in completions]


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else str(completion)
