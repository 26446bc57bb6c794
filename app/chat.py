"""Chat with a GGUF through llama-cpp-python, using the chat template stored in the file.

In a terminal: a streaming conversation with tokens/s after each reply. With stdin not a terminal: one
prompt per line, each reply printed as one block ended by a blank line, so it can be scripted. Both keep
the conversation and take the commands /reset, /system TEXT and /quit. The system prompt is --system, else
the run's `export.system`. The conversation is kept within the context: when the rendered history plus
max_tokens would not fit, the oldest user/assistant turns go first (the system prompt stays), with a
one-line notice on stderr.
"""
import sys
import time
from pathlib import Path

from app import AppError
from app.generate import CONTEXT, GGUFModel, Sampling, with_system
from app.recipe import run_recipe

HELP = "/reset clears the conversation, /system TEXT replaces the system prompt, /quit leaves"


def run_of(gguf: Path) -> Path | None:
    """The run folder a GGUF belongs to (<run>/gguf/<file>), or None for a file elsewhere."""
    run = gguf.resolve().parent.parent
    return run if gguf.resolve().parent.name == "gguf" and (run / "recipe.yaml").is_file() else None


def recipe_system(gguf: Path) -> str | None:
    """The system prompt of the GGUF's run (`export.system` in its recipe.yaml; may be null)."""
    run = run_of(gguf)
    if run is None:
        return None
    return run_recipe(run).export.system or None


def chat(gguf: Path, system: str | None = None, max_tokens: int = 256, temperature: float = 0.7,
         top_p: float = 0.95, seed: int = 0, n_ctx: int = CONTEXT):
    """The conversation loop. `system` None means the recipe's; "" means none."""
    if not 0 < max_tokens < n_ctx:
        raise AppError(f"--max-tokens {max_tokens} must be positive and leave room for the prompt in the "
                       f"context of {n_ctx} tokens (--ctx)")
    system = recipe_system(gguf) if system is None else system or None
    model = GGUFModel(gguf, n_ctx=n_ctx, seed=seed)
    count = model.prompt_tokens
    sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    interactive = sys.stdin.isatty()
    turns = []  # user and assistant messages, alternating; the system prompt is kept apart
    if interactive:
        print(f"chatting with {gguf.name} ({HELP})" + (f"\nsystem: {system}" if system else ""))
    for line in read_lines(interactive):
        if line in ("/quit", "/exit"):
            break
        if line.startswith("/"):
            system, turns = run_command(line, system, turns, interactive)
            continue
        try:
            turns = fit_history(count, system, [*turns, {"role": "user", "content": line}], max_tokens, n_ctx)
        except AppError as e:
            complain(str(e), interactive)
            continue
        reply = stream_reply(model, with_system(system, turns), sampling, interactive)
        turns.append({"role": "assistant", "content": reply})
    model.close()


def read_lines(interactive: bool):
    """Non-empty lines, stripped, until EOF."""
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            print()
            return
        if not interactive and not line:
            return
        if line.strip():
            yield line.strip()


def run_command(line: str, system: str | None, turns: list[dict], interactive: bool):
    """/reset or /system TEXT (no TEXT: no system prompt): the system prompt and turns after it."""
    command, _, text = line.partition(" ")
    if command == "/reset":
        turns, said = [], "conversation cleared"
    elif command == "/system":
        system, turns = text.strip() or None, []
        said = f"system prompt {'replaced' if system else 'removed'}, conversation cleared"
    else:
        complain(f"unknown command {command} ({HELP})", interactive)
        return system, turns
    if interactive:
        print(f"  [{said}]")
    return system, turns


def complain(message: str, interactive: bool):
    """In a terminal, say it and go on; in a script, stop: a silently skipped line would shift every
    reply block after it against its prompt."""
    if not interactive:
        raise AppError(message)
    print(f"error: {message}", file=sys.stderr)


def fit_history(count, system: str | None, turns: list[dict], max_tokens: int, n_ctx: int) -> list[dict]:
    """`turns` (ending with the new user message) without its oldest user/assistant pairs, as many as must
    go for the prompt plus max_tokens to fit n_ctx; when the new message alone is too long, its most recent
    part that fits (keep_the_end). The system prompt always stays."""
    dropped = 0
    while (used := count(with_system(system, turns))) + max_tokens > n_ctx:
        if len(turns) < 3:
            turns = [keep_the_end(count, system, turns[-1], max_tokens, n_ctx)]
            used = count(with_system(system, turns))
            break
        turns, dropped = turns[2:], dropped + 1
    if dropped:
        print(f"note: dropped the oldest {dropped} exchange{'s' * (dropped > 1)} to stay within the context of "
              f"{n_ctx} tokens (prompt {used} + --max-tokens {max_tokens})", file=sys.stderr)
    return turns


def keep_the_end(count, system: str | None, message: dict, max_tokens: int, n_ctx: int) -> dict:
    """`message` cut to its longest ending that fits, found by bisection on where it starts (a pasted
    text's last part is what the question is about); said on stderr."""
    text = message["content"]

    def fits(start: int) -> bool:
        return count(with_system(system, [{**message, "content": text[start:]}])) + max_tokens <= n_ctx

    if not fits(len(text)):
        empty = count(with_system(system, [{**message, "content": ""}]))
        raise AppError(f"the system prompt and chat template take {empty} tokens; with --max-tokens {max_tokens} "
                       f"not even an empty message fits the context of {n_ctx} (--ctx)")
    low, high = 0, len(text)  # fits(high); the answer is the smallest start that fits
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle + 1, high)
    print(f"note: the message is longer than the context of {n_ctx} tokens (with --max-tokens {max_tokens}): "
          f"kept its last {len(text) - low:,} of {len(text):,} characters", file=sys.stderr)
    return {**message, "content": text[low:]}


def stream_reply(model: GGUFModel, messages: list[dict], sampling: Sampling, interactive: bool) -> str:
    """Print the reply as it comes and return it. The chat handler stops at the model's EOS/end of turn.
    In a terminal Ctrl-C stops the reply (the part said so far stays in the conversation)."""
    pieces, t0, first = [], time.time(), None
    print("assistant> " if interactive else "", end="", flush=True)
    try:
        for piece in model.stream(messages, sampling):
            first = first or time.time()
            pieces.append(piece)
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        if not interactive:
            raise
        print(" [stopped]", end="")
    print()
    if interactive:
        print(speed(len(pieces), t0, first, time.time()))
    else:
        print()  # a blank line ends each reply block
    return "".join(pieces)


def speed(tokens: int, t0: float, first: float | None, end: float) -> str:
    """Generation speed apart from the wait for the first token (which is mostly reading the prompt)."""
    if tokens < 2:
        return f"  [{tokens} token{'s' * (tokens != 1)}, {end - t0:.1f}s]"
    rate = (tokens - 1) / max(end - first, 1e-9)
    return f"  [{tokens} tokens, {rate:.1f} tok/s, first token after {first - t0:.2f}s]"
