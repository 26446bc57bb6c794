"""Smoke's gates on a real model: what correct and broken GGUFs of one run measure against its float32 reference.

    .venv/bin/python bench/smoke_gates.py [RUN]     # default: the newest smollm2-135m dpo run in exports/

From the run's merged weights it writes, in a temporary folder: every GGUF type of the correct weights; the
weights with layers 10 and 11 swapped; the weights with layer 15's MLP 30% off (Gaussian noise, seeded). Each
file goes through app/smoke.py's check_ggufs with the run's probes and held-out pairs: the same reference
child and measures as the smoke stage. The table is what app/gguf.py's THRESHOLDS were calibrated on
(tests/data/smoke_measures.json keeps the measures themselves for tests/test_smoke_verdict.py).
"""
import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_section, context, format_table, load_average  # noqa: E402

TYPES = ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
BROKEN_TYPES = ["f16", "q8_0", "q4_k_m"]


def swap_layers(tensors: dict):
    for name in [n for n in tensors if ".layers.10." in n]:
        other = name.replace(".layers.10.", ".layers.11.")
        if other in tensors:
            tensors[name], tensors[other] = tensors[other].clone(), tensors[name].clone()


def noisy_mlp(tensors: dict):
    import torch
    g = torch.Generator().manual_seed(0)
    for name in [n for n in tensors if ".layers.15.mlp." in n]:
        w = tensors[name].float()
        tensors[name] = (w + torch.randn(w.shape, generator=g) * w.std() * 0.3).to(tensors[name].dtype)


def variant(merged: Path, work: Path, name: str, change, types) -> list[Path]:
    """GGUFs of `types` from a copy of `merged` changed by `change` (None: as it is)."""
    from safetensors.torch import load_file, save_file

    from app.export import convert_to_gguf

    folder = work / name
    shutil.copytree(merged, folder)
    if change:
        for shard in folder.glob("*.safetensors"):
            tensors = load_file(str(shard))
            change(tensors)
            save_file(tensors, str(shard), metadata={"format": "pt"})
    made = convert_to_gguf(folder, work / "gguf", name, types, log=lambda *a: None)
    return [made[t] for t in types]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", help="a run folder (default: the newest exports/smollm2-135m-dpo-*)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = p.parse_args()
    run = Path(args.run) if args.run else max((ROOT / "exports").glob("smollm2-135m-dpo-*"), default=None)
    if run is None or not (run / "merged").is_dir():
        sys.exit("no run with merged weights: run `make dpo MODEL=smollm2-135m` first, or name one")
    from app.recipe import run_recipe
    from app.smoke import check_ggufs, logit_limits

    load_at_start = load_average()
    recipe = run_recipe(run)
    evaluation = json.loads((run / "preference_eval.json").read_text())
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as tmp:
        work = Path(tmp)
        files = (variant(run / "merged", work, "correct", None, TYPES)
                 + variant(run / "merged", work, "layers-10-11-swapped", swap_layers, BROKEN_TYPES)
                 + variant(run / "merged", work, "layer-15-mlp-30pct-off", noisy_mlp, BROKEN_TYPES))
        results = check_ggufs(run / "merged", files, recipe.export.probes, evaluation["pairs"],
                              log=lambda *a: None, beta=evaluation["beta"])
    rows = []
    for r in results:
        measure, limit, top1 = logit_limits(r["type"], r["logit_scale"], r["reference_dtype"])
        scale = r["logit_scale"]
        rows.append([r["file"].removesuffix(".gguf"), f"{r['max_abs_logit_diff'] / scale:.4f}",
                     f"{r['mean_abs_logit_diff'] / scale:.4f}", f"{measure} <= {limit / scale:.3f}",
                     f"{r['top1_agreement']:.1%}", f"{top1:.0%}", f"{r['greedy_lead_share']:.0%}",
                     "PASS" if r["passed"] else "FAIL: " + r["reason"][:60]])
    text = format_table(["file", "max|Δ|/scale", "mean|Δ|/scale", "judged", "top-1", "needs", "greedy", "verdict"], rows)
    print(text)
    if args.no_record:
        return
    notes = [f"run: {run.name} ({recipe.model.name}); reference: the merged model in "
             f"{results[0]['reference_dtype']}, logit scale {results[0]['logit_scale']:.1f} (its largest |logit|); "
             f"probes {recipe.export.probes}, {len(evaluation['pairs'])} held-out pairs.",
             "Shares of the logit scale. Exact types are judged on their largest error, quantized ones on their mean "
             "error and raw top-1 (app/gguf.py THRESHOLDS); `greedy` is the share of the reference's greedy reply "
             "tokens a file reproduces before it parts from it."]
    append_section("smoke gates on a real model (bench/smoke_gates.py)", context(load_at_start), text, notes)


if __name__ == "__main__":
    main()
