"""Preflight's child process: the checks that need torch and transformers (several seconds to import, more
than all the others together), started first so that they run while the parent does the rest.

    tokenizer   llama.cpp's converter writes the vocabulary of the tokenizer saved as export saves it
                (--vocab-only, as the subprocess export runs): an unknown BPE pre-tokenizer fails here,
                not after training; llama.cpp loads it and tokenizes the chat prompt as transformers does
    template    the chat template renders a conversation and ends the reply with an end-of-turn token
    cuda        the GPU's free and total memory, for the memory check

`python -m app.preflight_child SPEC.json`: the spec holds the recipe (as a resolved recipe file), the
model's folder and where to write the answer. The child runs with HF_HUB_OFFLINE=1. Every check's answer
has a status, "passed" or "failed", and the sentence to show.
"""
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app import ROOT, AppError, child_env

logger = logging.getLogger(__name__)
PROBE_TIMEOUT = 300  # seconds; a named Unsloth chat template imports Unsloth in the child (~20 s)


def passed(text: str) -> dict:
    return {"status": "passed", "text": text}


def failed(text: str) -> dict:
    return {"status": "failed", "text": text}


def skipped(text: str) -> dict:
    return {"status": "skipped", "text": text}


class Probe:
    """The child process, started at once; `result()` waits for its answer."""

    def __init__(self, recipe, folder: Path | None, llamacpp_home: Path):
        import dataclasses

        from app.model import BUILT, local_folder
        from app.recipe import save_recipe
        self.tmp = Path(tempfile.mkdtemp(prefix="prefalign-preflight-"))
        name = recipe.model.name
        if name not in BUILT and local_folder(name):  # resolved here: the child runs in the repository root
            recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name=str(local_folder(name))))
        save_recipe(recipe, self.tmp / "recipe.yaml")
        self.recipe_model = recipe.model.name
        spec = {"recipe": str(self.tmp / "recipe.yaml"), "folder": str(folder) if folder else None,
                "llamacpp_home": str(llamacpp_home), "out": str(self.tmp / "result.json"),
                "step": str(self.tmp / "step.txt")}
        (self.tmp / "spec.json").write_text(json.dumps(spec))
        env = child_env(TRANSFORMERS_VERBOSITY="error")
        self.log = open(self.tmp / "child.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "app.preflight_child", str(self.tmp / "spec.json")],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def result(self) -> dict:
        """{"tokenizer": answer, "template": answer, "cuda": {free, total, name} | None | "unknown"}; only
        "cuda" when the spec had no folder. AppError when the child crashed."""
        try:
            self.proc.wait(timeout=PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            why = f"skipped, the tokenizer checks did not finish in {PROBE_TIMEOUT}s"
            return {"tokenizer": skipped(f"tokenizer: {why}"), "template": skipped(f"template: {why}"),
                    "cuda": "unknown"}
        out = self.tmp / "result.json"
        if not out.is_file():
            tail = [line for line in (self.tmp / "child.log").read_text(errors="replace").splitlines() if line.strip()]
            step = (self.tmp / "step.txt").read_text() if (self.tmp / "step.txt").is_file() else "start"
            raise AppError(crash_sentence(step, tail[-1] if tail else f"exit code {self.proc.returncode}",
                                          str(self.recipe_model)))
        return json.loads(out.read_text())

    def stop(self):
        logger.debug("preflight child's output:\n" + (self.tmp / "child.log").read_text(errors="replace"))
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# what the child was doing when it died (it writes the step before each), and whom that blames
STEPS = {"start": "starting (importing torch and transformers)", "tokenizer": "loading the tokenizer",
         "template": "rendering the chat template", "converter": "running llama.cpp's converter on the tokenizer",
         "vocabulary": "loading the vocabulary its converter wrote"}


def crash_sentence(step: str, last_line: str, name: str) -> str:
    """The one sentence for a child that died without an answer: where it was, and what is at fault. A
    process that dies inside llama.cpp while it reads a converted vocabulary (an abort such as
    `unordered_map::at`) is the tokenizer's layout, not the environment."""
    where = STEPS.get(step, step)
    if step == "vocabulary":
        return (f"llama.cpp crashed while {where} for {name} ({last_line}): the tokenizer's layout is one this "
                f"llama.cpp cannot read, so the GGUF export would crash too; fix: give the model its own "
                f"tokenizer.json (a tokenizer rebuilt from a GGUF by transformers is written SPM-style with byte "
                f"fallback, which llama.cpp's byte-level BPE path aborts on)")
    if step in ("tokenizer", "template", "converter"):
        return f"the tokenizer checks crashed while {where} for {name} ({last_line}); the model's tokenizer files are the suspects"
    return f"the tokenizer checks crashed while {where} ({last_line}); fix: `make setup` reinstalls the environment"


def probe(spec: dict) -> dict:
    """In the child: see Probe.result. A tokenizer that fails to load fails both checks."""
    import torch

    result = {"cuda": None}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        result["cuda"] = {"free": free, "total": total, "name": torch.cuda.get_device_name()}
    if spec["folder"] is None:  # only the GPU was asked for
        return result
    from app.model import load_tokenizer
    from app.recipe import load_recipe

    def step(name):
        Path(spec["step"]).write_text(name)

    recipe = load_recipe(spec["recipe"])
    folder, name = Path(spec["folder"]), recipe.model.name
    step("tokenizer")
    try:
        tokenizer = load_tokenizer(recipe)
    except AppError as e:
        return {**result, "tokenizer": failed(str(e)), "template": failed(str(e))}
    step("template")
    result["template"] = check_template(tokenizer, folder, name)
    result["tokenizer"] = check_tokenizer_converts(tokenizer, folder, name, Path(spec["llamacpp_home"]), step)
    return result


def end_of_turn_tokens(tokenizer, folder: Path) -> list[str]:
    """The tokenizer's EOS and every EOS id of generation_config.json (e.g. Llama 3's <|eot_id|>)."""
    ids = []
    for name in ("generation_config.json", "config.json"):
        if (folder / name).is_file():
            value = json.loads((folder / name).read_text()).get("eos_token_id")
            ids += value if isinstance(value, list) else [value] if value is not None else []
    tokens = [tokenizer.eos_token] + [tokenizer.convert_ids_to_tokens(i) for i in ids if i is not None]
    return [t for t in dict.fromkeys(tokens) if t]


def check_template(tokenizer, folder: Path, name: str) -> dict:
    reply = "Bees make honey."
    messages = [{"role": "user", "content": "Tell me about bees."}, {"role": "assistant", "content": reply}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja2 errors, raise_exception() in the template: many types
        return failed(f"the chat template of {name} cannot render a user/assistant conversation "
                      f"({type(e).__name__}: {e}); fix: set model.chat_template to one of Unsloth's templates")
    ends = end_of_turn_tokens(tokenizer, folder)
    after = text[text.rfind(reply) + len(reply):] if reply in text else text
    found = [t for t in ends if t in after]
    if not found:
        return failed(f"the chat template of {name} does not end the assistant's reply with an end-of-turn token "
                      f"({', '.join(ends) or 'the tokenizer has no EOS'}), so the trained model would never learn "
                      f"to stop; fix: set model.chat_template to an Unsloth template that does (e.g. chatml)")
    return passed(f"template: the chat template renders a conversation and ends the reply with {found[0]}")


def check_tokenizer_converts(tokenizer, folder: Path, name: str, home: Path, step=lambda name: None) -> dict:
    """Save the tokenizer as export will (transformers' files + app.llamacpp's fixes), run llama.cpp's converter
    on it with --vocab-only, then load the vocabulary in llama.cpp and tokenize a chat prompt with both.
    `step(name)` records where it is, for the parent to word a crash."""
    from app.llamacpp import ConverterFailed, prepare_tokenizer_for_converter, run_converter

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="prefalign-vocab-") as tmp:
        model_dir, out = Path(tmp) / "model", Path(tmp) / "vocab.gguf"
        tokenizer.save_pretrained(str(model_dir))
        for config in ("config.json", "generation_config.json"):
            if (folder / config).is_file():
                shutil.copy(folder / config, model_dir / config)
        prepare_tokenizer_for_converter(model_dir, str(folder))
        step("converter")
        try:
            run_converter(model_dir, out, vocab_only=True, home=home)
        except ConverterFailed as e:  # e.g. NotImplementedError: BPE pre-tokenizer was not recognized
            return failed(f"llama.cpp's converter cannot write the vocabulary of {name}'s tokenizer "
                          f"({e.tail[-1] if e.tail else 'no output'}), so export would fail after training; fix: a "
                          f"model whose tokenizer this llama.cpp release knows, or a newer llama-cpp-python and "
                          f"`make setup`")
        except AppError as e:  # the converter is missing or of another release
            return failed(str(e))
        step("vocabulary")
        return parity(tokenizer, out, name, time.monotonic() - t0)


def parity(tokenizer, vocab: Path, name: str, seconds: float) -> dict:
    """llama.cpp reads the vocabulary GGUF and tokenizes the chat prompt into transformers' ids."""
    import llama_cpp

    try:
        llm = llama_cpp.Llama(model_path=str(vocab), vocab_only=True, verbose=False)
    except Exception as e:
        return failed(f"llama.cpp cannot load the vocabulary the converter wrote for {name} ({e}); fix: "
                      f"`make setup` so that converter and runtime are of one release")
    messages = [{"role": "user", "content": "What is the sun? Tell me in 2 sentences."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    theirs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    ours = llm.tokenize(text.encode(), add_bos=False, special=True)
    eos = llm.token_eos()
    kind = llm.metadata.get("tokenizer.ggml.model", "?") + (
        f", pre-tokenizer {llm.metadata['tokenizer.ggml.pre']}" if llm.metadata.get("tokenizer.ggml.pre") else "")
    if list(ours) != list(theirs):
        return failed(f"llama.cpp tokenizes {name}'s chat prompt into other ids than transformers ({len(ours)} vs "
                      f"{len(theirs)} tokens), so the smoke test would fail after training; fix: check the "
                      f"tokenizer's special tokens (added_tokens_decoder) or set model.chat_template")
    if eos != tokenizer.eos_token_id:
        return failed(f"llama.cpp's vocabulary for {name} has EOS id {eos} but the tokenizer's is "
                      f"{tokenizer.eos_token_id}, so GGUF replies would not stop; fix: set the tokenizer's eos_token")
    return passed(f"tokenizer: llama.cpp's converter writes its vocabulary ({llm.n_vocab()} tokens, {kind}) and "
                  f"tokenizes the chat prompt as transformers does ({seconds:.1f}s)")


if __name__ == "__main__":  # the child: python -m app.preflight_child SPEC.json
    spec = json.loads(Path(sys.argv[1]).read_text())
    answer = probe(spec)
    Path(spec["out"]).write_text(json.dumps(answer))
