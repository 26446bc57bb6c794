"""Chat with a GGUF through llama-cpp-python, using the chat template stored in the file.

In a terminal: a streaming conversation (/reset, /quit). With stdin not a terminal: one prompt per line,
each reply printed as one block, the conversation kept across lines, so it can be scripted.
"""
import sys
import time
from pathlib import Path

from app import AppError
from app.export import CHAT_PREFERENCE
from app.runs import check_gguf_file, resolve_run



def find_gguf(arg: str | None, quant: str | None = None) -> Path:
    """A .gguf path as given, or the GGUF of a run folder: `quant` if named, else the smallest good one."""
    if arg and arg.endswith(".gguf"):
        if not Path(arg).is_file():
            raise AppError(f"GGUF file {arg} does not exist")
        return Path(arg)
    run = resolve_run(arg)
    files = {p.stem.rsplit("-", 1)[-1]: p for p in (run / "gguf").glob("*.gguf")}
    if not files:
        raise AppError(f"{run.name} has no GGUF files; run `python -m app export {run.name}`")
    if quant:
        if quant not in files:
            raise AppError(f"{run.name} has no {quant} GGUF; it has {', '.join(sorted(files))}")
        return files[quant]
    return next(files[t] for t in (*CHAT_PREFERENCE, *files) if t in files)


def chat(gguf: Path, system: str | None = None, max_tokens: int = 256, temperature: float = 0.7, seed: int = 0):
    from llama_cpp import Llama

    check_gguf_file(gguf)
    llm = Llama(model_path=str(gguf), n_ctx=2048, verbose=False, seed=seed)
    interactive = sys.stdin.isatty()
    history = [{"role": "system", "content": system}] if system else []
    if interactive:
        print(f"chatting with {gguf.name} (/reset clears the conversation, /quit leaves)")
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and not line:
            break
        line = line.strip()
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = history[:1] if system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply, tokens, t0 = [], 0, time.time()
        print("assistant> " if interactive else "", end="", flush=True)
        for chunk in llm.create_chat_completion(messages=history, stream=True, max_tokens=max_tokens,
                                                temperature=temperature, seed=seed):
            piece = chunk["choices"][0]["delta"].get("content", "")
            if piece:
                tokens += 1
                reply.append(piece)
                print(piece, end="", flush=True)
        history.append({"role": "assistant", "content": "".join(reply)})
        print()
        if interactive:
            print(f"  [{tokens} tokens, {tokens / max(time.time() - t0, 1e-9):.1f} tok/s]")
        else:
            print()  # a blank line ends each reply block
    llm.close()
