"""The smoke stage: llama.cpp loads every GGUF and proves it behaves like the merged HF model.

For each GGUF and each probe prompt (a one-turn chat):
- metadata: architecture, chat template and EOS id are in the file, and the EOS is the tokenizer's;
- prompt: the GGUF's own template, rendered by llama-cpp-python and tokenized by llama.cpp, gives the
  same token ids as transformers' apply_chat_template (a wrong template or tokenizer shows here);
- logits: HF and llama.cpp logits of the same ids (the prompt plus HF's greedy reply) agree: top-1
  agreement and max |difference| against a threshold per type;
- greedy: llama.cpp's greedy reply equals HF's token for token. For f32/f16/bf16 a divergence passes
  only at an exact tie (HF's top two logits closer than the measured logit error); where HF ends
  with EOS, llama.cpp's own chat completion must end there too ("stop"), so chat stops by itself.
  For quantized types the share of matching leading tokens is reported against a threshold.
- held-out pairs (app/evaluate.py): the GGUF's log-prob ranking of chosen vs rejected; f32/f16/bf16 must
  decide every pair as the merged model does; for quantized types the accuracy is reported.
"""
import json
import time
from pathlib import Path

from app import AppError
from app.evaluate import decision_agreement, score_pairs_gguf, score_pairs_hf, summarize_scores
from app.export import eos_ids, load_reference_model
from app.runs import check_gguf_file, discard_manifest, open_gguf, write_json

# per type: max |logit diff|, top-1 agreement, share of HF's greedy tokens reproduced before divergence.
# Top-1 and greedy agreement are the gates; max |diff| scales with the logit range, so for quantized types
# it is a loose sanity bound (measured on tiny: f16 0.007, q8_0 0.23, q4_k_m 1.26).
THRESHOLDS = {
    "f32": (0.01, 1.0, 1.0), "f16": (0.05, 1.0, 1.0), "bf16": (0.25, 1.0, 1.0),
    "q8_0": (0.6, 0.95, 0.5), "q6_k": (1.0, 0.9, 0.3), "q5_k_m": (1.5, 0.85, 0.25),
    "q4_k_m": (3.0, 0.75, 0.15), "q4_0": (4.0, 0.7, 0.1),
}
EXACT = ("f32", "f16", "bf16")
MAX_NEW_TOKENS = 48
PAIR_TIE = 0.05  # nats: a held-out pair whose log-prob margin is this close to zero may flip by rounding


def gguf_type(path: Path) -> str:
    return path.stem.rsplit("-", 1)[-1]


def smoke_run(run: Path, probes, log=print) -> list[dict]:
    """Check every GGUF of a run against its merged model; write smoke.json; return the results."""
    ggufs = sorted((run / "gguf").glob("*.gguf"))
    if not ggufs:
        raise AppError(f"{run.name} has no GGUF files; run `python -m app export {run.name}` first")
    for path in ggufs:  # a damaged file is said before the merged model loads
        check_gguf_file(path)
    discard_manifest(run)  # smoke.json and the report change: the manifest is written again after them
    evaluation = run / "preference_eval.json"
    evaluation = json.loads(evaluation.read_text()) if evaluation.is_file() else {"pairs": [], "beta": None}
    results = check_ggufs(run / "merged", ggufs, probes, evaluation["pairs"], log, beta=evaluation.get("beta", 0.1))
    write_json(run / "smoke.json", {"passed": all(r["passed"] for r in results), "results": results})
    return results


def check_ggufs(merged: Path, ggufs, probes, pairs=(), log=print, beta=None) -> list[dict]:
    """`pairs`: held-out preference pairs (token ids, and the base model's scores under "base"), scored by
    the merged model and by each GGUF."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    model = load_reference_model(merged)
    reference = [hf_reference(model, tokenizer, p) for p in probes]
    merged_scores = score_pairs_hf(model, pairs)
    results = [check_gguf(path, tokenizer, reference, pairs, merged_scores, beta) for path in ggufs]
    log(format_table(results))
    return results


def hf_reference(model, tokenizer, prompt) -> dict:
    """HF's prompt ids, greedy reply ids (stops at EOS) and the logits of prompt + reply."""
    import torch

    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    eos = set(eos_ids(model, tokenizer))
    reply = []
    with torch.no_grad():
        for _ in range(MAX_NEW_TOKENS):  # plain greedy loop: the exact argmax, no generation-config surprises
            logits = model(input_ids=torch.tensor([ids + reply], device=model.device)).logits[0, -1]
            reply.append(int(logits.argmax()))
            if reply[-1] in eos:
                break
        logits = model(input_ids=torch.tensor([ids + reply], device=model.device)).logits[0].float().cpu().numpy()
    return {"messages": messages, "prompt_ids": ids, "reply_ids": reply, "logits": logits,
            "ends_with_eos": bool(reply) and reply[-1] in eos}


def check_gguf(path: Path, tokenizer, reference, pairs=(), merged_scores=(), beta=None) -> dict:
    import numpy as np
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    kind = gguf_type(path)
    max_abs_limit, top1_limit, lead_limit = THRESHOLDS.get(kind, THRESHOLDS["q4_0"])
    result = {"file": path.name, "type": kind, "bytes": path.stat().st_size, "passed": False, "reason": ""}
    t0 = time.time()
    longest = max([len(r["prompt_ids"]) + len(r["reply_ids"]) + MAX_NEW_TOKENS + 8 for r in reference] +
                  [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs])
    llm = open_gguf(path, n_ctx=max(256, longest), logits_all=True, verbose=False, seed=0)

    # metadata
    meta = llm.metadata
    template = meta.get("tokenizer.chat_template")
    eos_id = int(meta.get("tokenizer.ggml.eos_token_id", -1))
    result["metadata"] = {"architecture": meta.get("general.architecture"), "eos_token_id": eos_id,
                          "has_chat_template": bool(template)}
    problems = []
    if not meta.get("general.architecture"):
        problems.append("no general.architecture in the GGUF")
    if not template:
        problems.append("no chat template in the GGUF")
    if eos_id != tokenizer.eos_token_id:
        problems.append(f"GGUF EOS id {eos_id} is not the tokenizer's {tokenizer.eos_token_id}")

    # per probe: prompt ids, logits, greedy
    max_abs, agree, total, probes = 0.0, 0, 0, []
    for ref in reference if template else []:
        formatter = Jinja2ChatFormatter(template=template, eos_token=llm._model.token_get_text(eos_id),
                                        bos_token=llm._model.token_get_text(llm.token_bos()),
                                        add_generation_prompt=True)
        rendered = formatter(messages=ref["messages"]).prompt
        gguf_prompt = llm.tokenize(rendered.encode(), add_bos=False, special=True)
        if gguf_prompt != ref["prompt_ids"]:
            problems.append(f"the GGUF's template + tokenizer give other prompt ids than transformers "
                            f"({len(gguf_prompt)} vs {len(ref['prompt_ids'])} tokens)")
            break

        ids = ref["prompt_ids"] + ref["reply_ids"]
        llm.reset()
        llm.eval(ids)
        ours = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        theirs = ref["logits"]
        max_abs = max(max_abs, float(np.abs(ours - theirs).max()))
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(ids)

        greedy = gguf_greedy(llm, ref["prompt_ids"], len(ref["reply_ids"]))
        lead = next((i for i, (a, b) in enumerate(zip(greedy, ref["reply_ids"])) if a != b),
                    min(len(greedy), len(ref["reply_ids"])))
        probe = {"prompt_tokens": len(gguf_prompt), "hf_reply_tokens": len(ref["reply_ids"]), "matching_lead": lead}
        if lead < len(ref["reply_ids"]):  # diverged: how close were HF's two candidates there?
            step = theirs[len(ref["prompt_ids"]) + lead - 1]
            probe["gap_at_divergence"] = float(step[ref["reply_ids"][lead]] - step[greedy[lead]]) if lead < len(greedy) else None
        if ref["ends_with_eos"]:
            chat = llm.create_chat_completion(messages=ref["messages"], temperature=0.0, top_k=1,
                                              max_tokens=MAX_NEW_TOKENS + 8, seed=0)
            probe["chat_finish_reason"] = chat["choices"][0]["finish_reason"]
        probes.append(probe)

    # held-out preference pairs: does the file rank chosen over rejected as the merged model does?
    if pairs and not problems:
        scores = score_pairs_gguf(llm, pairs)
        result["preference"] = {**summarize_scores(scores, [p["base"] for p in pairs], beta),
                                "merged_accuracy": summarize_scores(merged_scores)["accuracy"],
                                "agreement": decision_agreement(scores, merged_scores)}
        # exact types must decide every pair as the merged model does, ties of rounding size aside
        if kind in EXACT and decision_agreement(scores, merged_scores, tie=PAIR_TIE) < 1:
            problems.append(f"ranks {1 - result['preference']['agreement']:.0%} of held-out pairs unlike the "
                            f"merged model")

    top1 = agree / total if total else 0.0
    lead_share = (sum(p["matching_lead"] for p in probes) / max(1, sum(p["hf_reply_tokens"] for p in probes)))
    result.update(max_abs_logit_diff=round(max_abs, 5), top1_agreement=round(top1, 4),
                  greedy_lead_share=round(lead_share, 3), probes=probes, seconds=round(time.time() - t0, 1),
                  thresholds={"max_abs_logit_diff": max_abs_limit, "top1_agreement": top1_limit,
                              "greedy_lead_share": lead_limit})
    if probes:
        if max_abs > max_abs_limit:
            problems.append(f"max logit difference {max_abs:.4f} > {max_abs_limit}")
        if top1 < top1_limit:
            problems.append(f"top-1 agreement {top1:.1%} < {top1_limit:.0%}")
        for p in probes:
            if kind in EXACT and p["matching_lead"] < p["hf_reply_tokens"]:
                gap = p.get("gap_at_divergence")
                if gap is None or gap > 2 * max_abs:
                    problems.append(f"greedy reply diverges from HF at token {p['matching_lead']} "
                                    f"without a tie (logit gap {gap})")
            if kind in EXACT and p.get("chat_finish_reason") not in (None, "stop"):
                problems.append(f"chat did not stop at EOS (finish_reason {p['chat_finish_reason']})")
        if kind not in EXACT and lead_share < lead_limit:
            problems.append(f"greedy replies keep {lead_share:.0%} of HF's leading tokens < {lead_limit:.0%}")
    result["passed"] = not problems
    result["reason"] = "; ".join(dict.fromkeys(problems))
    llm.close()
    return result


def gguf_greedy(llm, prompt_ids, n) -> list[int]:
    """llama.cpp's greedy continuation (argmax of its own logits), stopping at an end-of-generation token."""
    import numpy as np
    import llama_cpp

    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        llm.eval([token])
    return out


def format_table(results) -> str:
    lines = [f"{'GGUF':<28} {'MiB':>7} {'top-1':>7} {'max|Δ|':>8} {'greedy':>7} {'stops':>6} {'logp acc':>9} {'reward acc':>10}  result"]
    for r in results:
        probes = r.get("probes", [])
        stops = all(p.get("chat_finish_reason", "stop") == "stop" for p in probes) if probes else False
        pref = r.get("preference", {})
        pref, reward = (f"{pref['accuracy']:.1%}", f"{pref['reward_accuracy']:.1%}") if pref.get("pairs") else ("-", "-")
        lines.append(f"{r['file']:<28} {r['bytes'] / 2**20:7.1f} {r.get('top1_agreement', 0):7.1%} "
                     f"{r.get('max_abs_logit_diff', float('nan')):8.4f} {r.get('greedy_lead_share', 0):7.0%} "
                     f"{'yes' if stops else 'no':>6} {pref:>9} {reward:>10}  {'PASS' if r['passed'] else 'FAIL: ' + r['reason']}")
    return "\n".join(lines)
