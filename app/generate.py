"""Replies from a model: one way through transformers, one through llama.cpp, for every use that writes text
(the probe replies before and after training, compare, chat, AI-feedback pairs). Both render the model's own
chat template. Smoke measures logits token by token against a reference and keeps its loops (app/smoke.py);
serve is llama-cpp-python's own server.
"""
import dataclasses
from pathlib import Path

from app import AppError

CONTEXT = 2048  # tokens of prompt and reply: chat's --ctx default, compare's and pairs' context


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy, the argmax at every step
    top_p: float = 1.0
    seed: int = 0


def one_turn(prompt: str, system: str | None = None) -> list[dict]:
    """The messages of a one-turn chat: the system prompt, if any, then the user's."""
    return with_system(system, [{"role": "user", "content": prompt}])


def with_system(system: str | None, turns: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + turns


class TransformersModel:
    """A transformers causal LM and its tokenizer (with its chat template), on whatever device it is on."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def load(cls, source: str, tokenizer) -> "TransformersModel":
        """A saved model at its own dtype, on the GPU when there is one (what does not fit: host memory)."""
        from transformers import AutoModelForCausalLM
        return cls(AutoModelForCausalLM.from_pretrained(source, dtype="auto", device_map="auto").eval(), tokenizer)

    def prompt_ids(self, messages: list[dict]):
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)["input_ids"].to(self.model.device)

    def fits(self, messages: list[dict], max_tokens: int) -> bool:
        return self.prompt_ids(messages).shape[1] + max_tokens <= self.model.config.max_position_embeddings

    def replies(self, messages: list[dict], sampling: Sampling, n: int = 1) -> list[str]:
        """`n` replies to one conversation (sampled with the seed, or greedy at temperature 0)."""
        import torch

        ids = self.prompt_ids(messages)
        if sampling.temperature:
            torch.manual_seed(sampling.seed)
        how = (dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p) if sampling.temperature
               else dict(do_sample=False))
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_return_sequences=n,
                                      max_new_tokens=sampling.max_tokens, **how,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return [self.tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in out]

    def replies_to(self, prompts, sampling: Sampling, system: str | None = None) -> list[str]:
        """One reply to each prompt, each a one-turn chat."""
        return [self.replies(one_turn(p, system), sampling)[0] for p in prompts]

    def close(self):
        pass


class GGUFModel:
    """A GGUF in llama.cpp (app/gguf.py open_gguf: on the GPU as far as it fits), with the file's own chat
    template as llama-cpp-python's chat completion renders it."""

    def __init__(self, path: Path, n_ctx: int = CONTEXT, threads: int | None = None, seed: int = 0):
        from app.gguf import open_gguf

        self.path, self.n_ctx = path, n_ctx
        self.llm = open_gguf(path, n_ctx=n_ctx, verbose=False, seed=seed,
                             **({"n_threads": threads, "n_threads_batch": threads} if threads else {}))
        self.prompt_tokens = prompt_counter(self.llm)

    def fits(self, messages: list[dict], max_tokens: int) -> bool:
        return self.prompt_tokens(messages) + max_tokens <= self.n_ctx

    def check_fits(self, messages: list[dict], max_tokens: int):
        if not self.fits(messages, max_tokens):
            raise AppError(f"the prompt '{messages[-1]['content'][:40]}' takes {self.prompt_tokens(messages)} tokens; "
                           f"with {max_tokens} for the reply it does not fit the context of {self.n_ctx}")

    def completion_args(self, sampling: Sampling, seed: int) -> dict:
        how = (dict(temperature=sampling.temperature, top_p=sampling.top_p) if sampling.temperature
               else dict(temperature=0.0, top_k=1))
        return dict(max_tokens=sampling.max_tokens, seed=seed, **how)

    def replies(self, messages: list[dict], sampling: Sampling, n: int = 1) -> list[str]:
        """`n` replies to one conversation, the i-th with seed + i."""
        return [self.llm.create_chat_completion(messages=messages, **self.completion_args(sampling, sampling.seed + i))
                ["choices"][0]["message"]["content"].strip() for i in range(n)]

    def replies_to(self, prompts, sampling: Sampling, system: str | None = None) -> list[str]:
        """One reply to each prompt, each a one-turn chat; AppError when a prompt does not fit the context."""
        out = []
        for prompt in prompts:
            messages = one_turn(prompt, system)
            self.check_fits(messages, sampling.max_tokens)
            out += self.replies(messages, sampling)
        return out

    def stream(self, messages: list[dict], sampling: Sampling):
        """The reply as it is generated, piece by piece (a piece per token; a split UTF-8 character waits for
        the next); it stops at the model's end of turn."""
        for chunk in self.llm.create_chat_completion(messages=messages, stream=True,
                                                     **self.completion_args(sampling, sampling.seed)):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece

    def close(self):
        self.llm.close()


def prompt_counter(llm):
    """A function: messages -> how many tokens the prompt create_chat_completion builds from them has. Like
    llama-cpp-python's chat handler: the GGUF's template rendered (with the generation prompt) and tokenized
    with special tokens parsed, BOS only where the template writes it; without a template, the llama-2
    format it falls back to."""
    from llama_cpp import llama_chat_format

    def text(token: int) -> str:
        return llm.detokenize([token], special=True).decode(errors="replace") if token >= 0 else ""

    template = llm.metadata.get("tokenizer.chat_template")
    if template:
        render = llama_chat_format.Jinja2ChatFormatter(template, text(llm.token_eos()), text(llm.token_bos()))
    else:
        render = llama_chat_format.format_llama2

    def count(messages: list[dict]) -> int:
        try:
            result = render(messages=messages)
        except Exception as e:  # raise_exception() in the template (e.g. no system role), or a Jinja error
            raise AppError(f"the chat template refused the conversation: {e}") from None
        return len(llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True))
    return count
