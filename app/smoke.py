"""The smoke stage: llama.cpp loads every GGUF and proves it behaves like the merged HF model.

The reference is the merged 16-bit weights computed in float32, so that its own rounding is not held
against a file (SmolLM2-135M in bfloat16 is 1.6 logits from itself in float32; the f16 GGUF 0.09). It is
computed in a child process (`python -m app.smoke SPEC`): Unsloth, imported by a training process, replaces
the Llama forwards process-wide and its fast paths skip accelerate's hooks for offloaded weights, and the
child's memory is all back before llama.cpp opens a file. Where it runs is `reference_placement`, a pure
function of the model's size and the free GPU and host memory: float32 on the GPU, else split between the
GPU and host memory, else on the CPU, else the 16-bit weights as they are (the verdict then allows for
their rounding). Each GGUF then runs where it fits (app/gguf.py gpu_layers). For each GGUF and each probe
(a one-turn chat):
- metadata: architecture, chat template and EOS id are in the file, and the EOS is the tokenizer's;
- prompt: the GGUF's own template, rendered by llama-cpp-python and tokenized by llama.cpp, gives the
  same token ids as transformers' apply_chat_template (a wrong template or tokenizer shows here);
- logits: HF and llama.cpp logits of the same ids (the prompt plus HF's greedy reply): max and mean
  |difference| and top-1 agreement;
- greedy: llama.cpp's greedy reply against HF's, token for token; where HF ends with EOS, llama.cpp's own
  chat completion must end there too ("stop"), so chat stops by itself;
- held-out pairs (app/evaluate.py): the GGUF's log-prob ranking of chosen vs rejected.
measure_gguf records these; smoke_verdict, a pure function, judges them: f32/f16/bf16 must agree wherever
the reference is decisive (a disagreement passes only at a near-tie: top-2 gap within twice the measured
error, which itself must stay within rounding of the logits' scale); quantized types have thresholds.
Every file is checked, and smoke.json written, even when one of them fails or cannot be loaded.
"""
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app import ROOT, AppError, child_env
from app.evaluate import decision_agreement, score_pairs_gguf, score_pairs_hf, summarize_scores
from app.gguf import EXACT, THRESHOLDS, GiB, check_gguf_file, gguf_type, open_gguf
from app.runs import discard_manifest, write_json

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = 48
PAIR_TIE = 0.05  # nats: a held-out pair whose log-prob margin is this close to zero may flip by rounding
NOISE_SIGMAS = 3  # a quantized file's top-2 swap is plausible within 3 standard deviations of its error, each side
# what the reference needs beyond its weights: activations, the logits of a scoring batch (app/evaluate.py
# LOGITS_BYTES) and the greedy replies' cache; and what a machine keeps for everything else
REFERENCE_HEADROOM = 1.0 * GiB
REFERENCE_TIMEOUT = 3600  # seconds for the child; an 8B model in float32 on a CPU takes minutes, not hours


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
    reference = compute_reference(run / "merged", probes, evaluation["pairs"])
    results = check_ggufs(run / "merged", ggufs, probes, evaluation["pairs"], log, beta=evaluation.get("beta"),
                          reference=reference)
    write_json(run / "smoke.json", {"passed": all(r["passed"] for r in results), "results": results,
                                    "reference": {**reference["placement"], "seconds": reference["seconds"],
                                                  "unsloth_imported": reference["unsloth_imported"]}})
    return results


def check_ggufs(merged: Path, ggufs, probes, pairs=(), log=print, beta=None, reference=None) -> list[dict]:
    """`pairs`: held-out preference pairs (token ids, and the base model's scores under "base"), scored by
    the merged model and by each GGUF; `reference`: compute_reference's, when it was computed already. A file
    that fails to load is a failed result, not the end."""
    reference = reference or compute_reference(merged, probes, pairs)
    log(f"  reference: the merged model in {reference['placement']['dtype']} on {reference['placement']['device']} "
        f"({reference['placement']['why']}), {reference['seconds']:.0f}s")
    results = []
    for path in ggufs:
        try:
            results.append(check_gguf(path, reference, pairs, beta))
        except AppError as e:  # llama.cpp could not load it, even on the CPU
            results.append({"file": path.name, "type": gguf_type(path), "bytes": path.stat().st_size,
                            "passed": False, "reason": str(e)})
    log(format_table(results))
    return results


def reference_placement(params: int, dtype_bytes: int, free_gpu: int | None, free_host: int) -> dict:
    """Pure: where smoke's reference runs and in which dtype, from the model's parameter count, its 16-bit
    weights' bytes per parameter, and the free GPU (None: none) and host memory. The first that fits: float32
    on the GPU; float32 split between the GPU and host memory (accelerate's device_map, in a process
    without Unsloth, so its offload hooks run); float32 on the CPU; then the same three for the 16-bit weights
    as they are. None of them: "none" (the merged model does not fit this machine)."""
    for dtype, size in (("float32", 4 * params), ("16-bit", dtype_bytes * params)):
        need = size + REFERENCE_HEADROOM
        if free_gpu and need <= free_gpu:
            return {"device": "cuda", "dtype": dtype, "why": f"{need / GiB:.1f} GiB fits the GPU's {free_gpu / GiB:.1f} GiB free"}
        if free_gpu and free_gpu > REFERENCE_HEADROOM and need <= free_gpu + free_host - REFERENCE_HEADROOM:
            return {"device": "cuda+cpu", "dtype": dtype, "max_memory": {"gpu": free_gpu - REFERENCE_HEADROOM,
                                                                           "cpu": free_host - REFERENCE_HEADROOM},
                    "why": f"{need / GiB:.1f} GiB, of which the GPU's {free_gpu / GiB:.1f} GiB free hold a part"}
        if need <= free_host:
            return {"device": "cpu", "dtype": dtype, "why": f"{need / GiB:.1f} GiB fits the host's {free_host / GiB:.1f} GiB "
                                                            f"free" + ("" if free_gpu else " (no GPU)")}
    return {"device": "none", "dtype": None, "why": f"the merged model ({dtype_bytes * params / GiB:.1f} GiB) does not fit "
                                                   f"the free GPU and host memory"}


def compute_reference(merged: Path, probes, pairs=()) -> dict:
    """The reference, computed by a child process (see the module docstring): per probe its prompt ids,
    greedy reply ids and logits; the merged model's scores of `pairs`; where it ran. AppError when the
    merged model fits nowhere, or the child failed."""
    import numpy as np

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="prefalign-smoke-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"merged": str(merged), "probes": list(probes), "pairs": list(pairs),
                                    "out": tmp}))
        env = child_env(TRANSFORMERS_VERBOSITY="error")
        try:
            proc = subprocess.run([sys.executable, "-m", "app.smoke", str(spec)], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=REFERENCE_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AppError(f"smoke's reference (the merged model) did not finish in {REFERENCE_TIMEOUT}s") from None
        out = Path(tmp) / "reference.json"
        if proc.returncode != 0 or not out.is_file():
            tail = [line for line in proc.stderr.splitlines() if line.strip()]
            raise AppError(f"smoke's reference (the merged model in transformers) failed: "
                           f"{tail[-1] if tail else f'exit code {proc.returncode}'}")
        reference = json.loads(out.read_text())
        if reference.get("error"):
            raise AppError(reference["error"])
        for i, probe in enumerate(reference["probes"]):
            probe["logits"] = np.load(Path(tmp) / f"logits-{i}.npy")
    reference["seconds"] = round(time.time() - t0, 1)
    return reference


def reference_child(spec: dict):
    """In the child: place the merged model (reference_placement on this machine's measures), then the
    probes' greedy replies and logits and the pairs' scores, written into spec["out"]."""
    import numpy as np
    import psutil
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged, out = Path(spec["merged"]), Path(spec["out"])
    params, dtype_bytes = 0, 2
    for f in merged.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                piece = st.get_slice(name)
                params += int(np.prod(piece.get_shape()))
                dtype_bytes = 4 if piece.get_dtype() in ("F32",) else 2
    free_gpu = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    placement = reference_placement(params, dtype_bytes, free_gpu, psutil.virtual_memory().available)
    if placement["device"] == "none":
        (out / "reference.json").write_text(json.dumps({"error": f"smoke cannot compute its reference: "
                                                                  f"{placement['why']}; free memory, or check "
                                                                  f"the GGUF files on a larger machine"}))
        return
    dtype = torch.float32 if placement["dtype"] == "float32" else "auto"
    device_map = {"cuda": "cuda", "cpu": "cpu", "cuda+cpu": "auto"}[placement["device"]]
    max_memory = placement.get("max_memory")
    model = AutoModelForCausalLM.from_pretrained(
        str(merged), dtype=dtype, device_map=device_map,
        max_memory={0: max_memory["gpu"], "cpu": max_memory["cpu"]} if max_memory else None).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    probes = [hf_reference(model, tokenizer, p) for p in spec["probes"]]
    for i, probe in enumerate(probes):
        np.save(out / f"logits-{i}.npy", probe.pop("logits"))
    result = {"placement": placement, "eos_token_id": tokenizer.eos_token_id, "probes": probes,
              "pair_scores": score_pairs_hf(model, spec["pairs"]),
              "unsloth_imported": "unsloth" in sys.modules}  # never: its patched forwards skip offload hooks
    (out / "reference.json").write_text(json.dumps(result))


def hf_reference(model, tokenizer, prompt) -> dict:
    """HF's prompt ids, greedy reply ids (stops at EOS) and the logits of prompt + reply."""
    import torch

    from app.export import eos_ids

    messages = [{"role": "user", "content": prompt}]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
    eos = set(eos_ids(model, tokenizer))
    reply = []
    with torch.no_grad():
        # a plain greedy loop over the KV cache: the exact argmax, no generation-config surprises, one token's
        # forward a step; the logits compared with llama.cpp's come from one forward of the whole sequence
        out = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True)
        for _ in range(MAX_NEW_TOKENS):
            reply.append(int(out.logits[0, -1].argmax()))
            if reply[-1] in eos:
                break
            out = model(input_ids=torch.tensor([reply[-1:]], device=model.device), past_key_values=out.past_key_values,
                        use_cache=True)
        logits = model(input_ids=torch.tensor([ids + reply], device=model.device)).logits[0].float().cpu().numpy()
    return {"messages": messages, "prompt_ids": ids, "reply_ids": reply, "logits": logits,
            "ends_with_eos": bool(reply) and reply[-1] in eos}


def check_gguf(path: Path, reference: dict, pairs=(), beta=None) -> dict:
    """Measure one GGUF against the merged model's reference (measure_gguf), then judge (smoke_verdict)."""
    kind, probes = gguf_type(path), reference["probes"]
    longest = max([len(r["prompt_ids"]) + len(r["reply_ids"]) + MAX_NEW_TOKENS + 8 for r in probes] +
                  [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs])
    t0 = time.time()
    llm = open_gguf(path, n_ctx=max(256, longest), logits_all=True, verbose=False, seed=0)
    try:
        measured = measure_gguf(llm, reference, pairs, beta)
    finally:
        llm.close()
    problems = smoke_verdict(kind, measured)
    logger.info(f"smoke {path.name}: " + ", ".join(f"{k} {v}" for k, v in measured.items()
                                                   if isinstance(v, (int, float)) and not isinstance(v, bool)))
    measured.pop("positions")  # per-token detail, not kept in smoke.json
    measure, limit, top1_limit = logit_limits(kind, measured["logit_scale"], measured["reference_dtype"])
    return {"file": path.name, "type": kind, "bytes": path.stat().st_size, **measured,
            "seconds": round(time.time() - t0, 1), "passed": not problems, "reason": "; ".join(problems),
            "thresholds": {f"{measure}_abs_logit_diff": round(limit, 4), "top1_agreement": top1_limit}}


def measure_gguf(llm, reference: dict, pairs=(), beta=None) -> dict:
    """What llama.cpp does with the file, next to the reference: metadata; per probe the prompt ids of its
    own template, the logits of the same ids, and its greedy reply; the held-out pairs' scores."""
    import numpy as np
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    meta = llm.metadata
    template = meta.get("tokenizer.chat_template")
    eos_id = int(meta.get("tokenizer.ggml.eos_token_id", -1))
    out = {"metadata": {"architecture": meta.get("general.architecture"), "eos_token_id": eos_id,
                        "has_chat_template": bool(template)},
           "tokenizer_eos_id": reference["eos_token_id"], "reference_dtype": reference["placement"]["dtype"],
           "prompt_mismatch": None, "probes": [], "positions": []}
    max_abs, scale, abs_sum, count = 0.0, 0.0, 0.0, 0
    for ref in reference["probes"] if template else []:
        formatter = Jinja2ChatFormatter(template=template, eos_token=llm._model.token_get_text(eos_id),
                                        bos_token=llm._model.token_get_text(llm.token_bos()),
                                        add_generation_prompt=True)
        gguf_prompt = llm.tokenize(formatter(messages=ref["messages"]).prompt.encode(), add_bos=False, special=True)
        if gguf_prompt != ref["prompt_ids"]:
            out["prompt_mismatch"] = (len(gguf_prompt), len(ref["prompt_ids"]))
            break
        ids = ref["prompt_ids"] + ref["reply_ids"]
        llm.reset()
        llm.eval(ids)
        ours, theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float32), ref["logits"]
        max_abs = max(max_abs, float(np.abs(ours - theirs).max()))
        abs_sum, count = abs_sum + float(np.abs(ours - theirs).sum()), count + ours.size
        scale = max(scale, float(np.abs(theirs).max()))
        top2 = np.sort(theirs, axis=-1)[:, -2:]
        # what a position's error can swap: two logits each off by a sample of its spread (NOISE_SIGMAS of them)
        noise = NOISE_SIGMAS * np.sqrt(2) * (ours - theirs).std(axis=-1)
        out["positions"] += [(bool(a), float(g), float(n)) for a, g, n in
                             zip(ours.argmax(-1) == theirs.argmax(-1), top2[:, 1] - top2[:, 0], noise)]
        greedy = gguf_greedy(llm, ref["prompt_ids"], len(ref["reply_ids"]))
        lead = next((i for i, (a, b) in enumerate(zip(greedy, ref["reply_ids"])) if a != b),
                    min(len(greedy), len(ref["reply_ids"])))
        probe = {"prompt_tokens": len(gguf_prompt), "hf_reply_tokens": len(ref["reply_ids"]), "matching_lead": lead}
        if lead < len(ref["reply_ids"]):  # diverged: how close were HF's two candidates there?
            step = theirs[len(ref["prompt_ids"]) + lead - 1]
            probe["gap_at_divergence"] = float(step[ref["reply_ids"][lead]] - step[greedy[lead]]) if lead < len(greedy) else None
            probe["noise_at_divergence"] = float(noise[len(ref["prompt_ids"]) + lead - 1])
            probe["error_at_divergence"] = float(np.abs(ours - theirs)[len(ref["prompt_ids"]) + lead - 1].max())
        if ref["ends_with_eos"]:
            chat = llm.create_chat_completion(messages=ref["messages"], temperature=0.0, top_k=1,
                                              max_tokens=MAX_NEW_TOKENS + 8, seed=0)
            probe["chat_finish_reason"] = chat["choices"][0]["finish_reason"]
        out["probes"].append(probe)
    positions, probes = out["positions"], out["probes"]
    out.update(max_abs_logit_diff=round(max_abs, 5), mean_abs_logit_diff=round(abs_sum / max(count, 1), 5),
               logit_scale=round(scale, 4),
               top1_agreement=round(sum(a for a, _, _ in positions) / len(positions), 4) if positions else 0.0,
               greedy_lead_share=round(sum(p["matching_lead"] for p in probes)
                                       / max(1, sum(p["hf_reply_tokens"] for p in probes)), 3))
    # top-1 where the reference's choice is decisive: its top-2 gap exceeds what the largest measured error
    # can swap (judged for the exact types, whose largest error is bounded by rounding)
    decisive = [a for a, gap, _ in positions if gap > 2 * max_abs]
    out["decisive_top1"] = round(sum(decisive) / len(decisive), 4) if decisive else 1.0
    if pairs and out["prompt_mismatch"] is None and template:
        scores, merged_scores = score_pairs_gguf(llm, pairs), reference["pair_scores"]
        out["preference"] = {**summarize_scores(scores, [p["base"] for p in pairs], beta),
                             "merged_accuracy": summarize_scores(merged_scores)["accuracy"],
                             "agreement": decision_agreement(scores, merged_scores),
                             "agreement_beyond_ties": decision_agreement(scores, merged_scores, tie=PAIR_TIE)}
    return out


# a reference computed in the 16-bit weights' own dtype (when float32 does not fit the machine) is itself
# this share of the logits' scale away from the exact one (measured on SmolLM2-135M in bfloat16: 1.6 of 38,
# 0.043 at most, 0.005 on average); the error allowed grows by that much
SIXTEEN_BIT_REFERENCE_SHARE = {"max": 0.1, "mean": 0.01}


def logit_limits(kind: str, logit_scale: float, reference_dtype: str = "float32") -> tuple[str, float, float]:
    """(which logit error is judged, "max" or "mean"; its limit; the least top-1 agreement) for a GGUF type
    against a reference in `reference_dtype` (app/gguf.py THRESHOLDS)."""
    measure, share, top1 = THRESHOLDS.get(kind, THRESHOLDS["q4_0"])
    if reference_dtype != "float32":
        share += SIXTEEN_BIT_REFERENCE_SHARE[measure]
    return measure, share * logit_scale, top1


def smoke_verdict(kind: str, m: dict) -> list[str]:
    """Pure: the problems with one GGUF's measures (none: it passes). Exact types (f32/f16/bf16): their
    largest logit error within rounding of the logits' scale, and agreement wherever the reference is
    decisive: a top-1 or greedy disagreement passes only where the reference's top-2 gap is within twice
    that error (a near-tie either side of rounding may swap); held-out pairs ranked as the merged model
    ranks them, ties aside; a chat that stops by itself where the reference's reply ends. Quantized types: their mean logit error and raw top-1 agreement within their
    type's limits, and greedy replies that part from the reference only where the file's own error at that
    position can swap the reference's choice (their replies may then run on: whether they stop is judged
    for the exact types). Every type: the file's metadata, prompt ids and EOS id."""
    measure, limit, top1_limit = logit_limits(kind, m["logit_scale"], m.get("reference_dtype", "float32"))
    exact = kind in EXACT
    meta, problems = m["metadata"], []
    if not meta["architecture"]:
        problems.append("no general.architecture in the GGUF")
    if not meta["has_chat_template"]:
        problems.append("no chat template in the GGUF")
    if meta["eos_token_id"] != m["tokenizer_eos_id"]:
        problems.append(f"GGUF EOS id {meta['eos_token_id']} is not the tokenizer's {m['tokenizer_eos_id']}")
    if m["prompt_mismatch"]:
        ours, theirs = m["prompt_mismatch"]
        problems.append(f"the GGUF's template + tokenizer give other prompt ids than transformers "
                        f"({ours} vs {theirs} tokens)")
    if m["probes"]:
        error = m[f"{measure}_abs_logit_diff"]
        if error > limit:
            problems.append(f"{measure} logit difference {error:.4f} > {limit:.4f}")
        if exact and m["decisive_top1"] < 1:
            problems.append(f"top-1 disagrees with the reference where it is decisive "
                            f"({m['decisive_top1']:.1%} agreement beyond ties)")
        if not exact and m["top1_agreement"] < top1_limit:
            problems.append(f"top-1 agreement {m['top1_agreement']:.1%} < {top1_limit:.0%}")
        for p in m["probes"]:
            if p["matching_lead"] < p["hf_reply_tokens"]:
                # a tie: two logits each off by the error measured (exact: anywhere; quantized: at that
                # position, its largest or its spread); measured: q8_0 swapped a 0.0625 gap with 0.053 there
                gap = p.get("gap_at_divergence")
                tie = (2 * m["max_abs_logit_diff"] if exact else
                       max(p.get("noise_at_divergence") or 0.0, 2 * p.get("error_at_divergence", 0.0)))
                if gap is None or gap > tie:
                    problems.append(f"greedy reply diverges from HF at token {p['matching_lead']} "
                                    f"without a tie (logit gap {gap})")
            if exact and p.get("chat_finish_reason") not in (None, "stop"):
                problems.append(f"chat did not stop at EOS (finish_reason {p['chat_finish_reason']})")
    pref = m.get("preference")
    if exact and pref and pref["agreement_beyond_ties"] < 1:
        problems.append(f"ranks {1 - pref['agreement']:.0%} of held-out pairs unlike the merged model")
    return list(dict.fromkeys(problems))


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


if __name__ == "__main__":  # the reference's child process: python -m app.smoke SPEC.json (compute_reference)
    reference_child(json.loads(Path(sys.argv[1]).read_text()))
