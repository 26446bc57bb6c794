"""A beta sweep with the reference log-prob cache against the same sweep without it (app/refcache.py).

    .venv/bin/python bench/ref_cache.py --shape tiny     # tiny recipe as it is: 60 steps, evaluation every 20
    .venv/bin/python bench/ref_cache.py --shape scale    # the 0.40B Llama-3-shaped model, one epoch of 58 pairs

Two arms sweep the same betas on the same data, one DPO training run per beta, each run in its own process:
  plain   dpo.precompute_ref_log_probs=false: TRL scores the reference inside every step (and evaluation)
  cached  the default, auto, on an empty cache: the first run scores the reference once and stores it, the
          next ones read it
Runs alternate plain, cached, plain, cached... so that drift (heat, other load) hits both arms alike. A run
is what `python -m app dpo` does up to the end of training: load data and model, build TRL's trainer, the
reference log-probs (cached arm), the evaluations at step 0 and at the end (as app/train.py) and the
recipe's own, and training; not the held-out scoring, export or smoke, which are the same in both arms. Seconds are each process's wall time.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_section, context, format_table, load_average, run_measured, tail  # noqa: E402

BETAS = [0.05, 0.1, 0.2, 0.5]
# the scale shape (bench/scale.py's): tiny's data cut to 64 rows, one epoch of batch 2 (29 steps), no evaluation
SCALE = ["data.max_rows=64", "dpo.max_steps=-1", "dpo.num_train_epochs=1", "dpo.per_device_train_batch_size=2",
         "dpo.max_length=256", "dpo.eval_strategy='no'", "dpo.learning_rate=1.0e-4", "model.dtype=bfloat16",
         "model.max_seq_length=512"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["tiny", "scale"], default="tiny")
    p.add_argument("--betas", type=float, nargs="+", default=BETAS)
    p.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    p.add_argument("--internal", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()


def overrides(shape: str) -> list[str]:
    if shape == "tiny":
        return []
    from app.shapes import build_random_model
    model = ROOT / ".cache" / "shape-scale"
    if not (model / "config.json").is_file():
        print(f"building the scale model in {model} (random weights, Llama-3 tokenizer)", flush=True)
        build_random_model(model, "scale", dtype="bfloat16")
    return [f"model.name={model}", *SCALE]


def one_run(args):
    """In its own process: the app's stages up to the end of training; its figures to --out as JSON."""
    t0 = time.perf_counter()
    from app.model import import_unsloth
    import_unsloth()
    from app.data import load_training_data
    from app.model import load_model, local_model_folder, resolve_model_source
    from app.recipe import load_recipe
    from app.refcache import attach_reference_log_probs
    from app.train import make_trainer

    recipe = load_recipe("tiny", args.set)
    data = load_training_data(recipe.data, "dpo")
    model, tokenizer = load_model(recipe, resolve_model_source(recipe))
    work = Path(args.out).parent
    trainer = make_trainer("dpo", model, tokenizer, data, recipe, work / "run", [])
    t1 = time.perf_counter()
    info = attach_reference_log_probs(trainer, recipe, local_model_folder(recipe.model.name),
                                      cache=Path(args.cache))
    t2 = time.perf_counter()
    if data.eval is not None:  # as app/train.py: an evaluation at step 0 and one at the end
        trainer.evaluate()
    result = trainer.train()
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    if data.eval is not None and not (evals and evals[-1]["step"] == result.global_step):
        trainer.evaluate()
    t3 = time.perf_counter()
    Path(args.out).write_text(json.dumps({
        "load_s": t1 - t0, "reference_s": t2 - t1, "train_s": t3 - t2, "steps": result.global_step,
        "loss": result.training_loss, "precomputed": info["precomputed"], "cached": info["cached"],
        "scored": info["scored"], "pairs": len(trainer.train_dataset)}))


def main():
    args = parse_args()
    if args.internal:
        return one_run(args)
    load_at_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="bench-refcache-"))
    base = overrides(args.shape) + ["dpo.save_strategy='no'"]
    arms = {"plain": ["dpo.precompute_ref_log_probs=false"], "cached": []}  # cached: auto, the default
    results = {arm: [] for arm in arms}
    for beta in args.betas:
        for arm, extra in arms.items():
            out = work / f"{arm}-{beta}.json"
            sets = [*base, *extra, f"dpo.beta={beta}"]
            argv = [sys.executable, __file__, "--internal", "--cache", str(work / f"cache-{arm}"), "--out", str(out),
                    *[a for s in sets for a in ("--set", s)]]
            print(f"{arm} beta {beta} ...", flush=True)
            measured = run_measured(argv, work / f"{arm}-{beta}.log", cwd=ROOT)
            if measured["rc"] != 0:
                print(tail(work / f"{arm}-{beta}.log"))
                return 1
            r = {**json.loads(out.read_text()), "wall_s": measured["wall_s"], "peak_rss_gib": measured["peak_rss_gib"]}
            results[arm].append(r)
            print(f"  {r['wall_s']:.1f}s (reference {r['reference_s']:.1f}s, training {r['train_s']:.1f}s, "
                  f"{r['steps']} steps), loss {r['loss']:.4f}, cached {r['cached']}, scored {r['scored']}", flush=True)

    rows = []
    for i, beta in enumerate(args.betas):
        p, c = results["plain"][i], results["cached"][i]
        source = "scored + stored" if c["scored"] else "from cache" if c["cached"] else "in every step"
        rows.append([beta, f"{p['wall_s']:.1f}", f"{p['train_s']:.1f}", f"{c['wall_s']:.1f}", f"{c['reference_s']:.1f}",
                     f"{c['train_s']:.1f}", source, f"{p['loss']:.4f}", f"{c['loss']:.4f}"])
    total = {arm: sum(r["wall_s"] for r in rs) for arm, rs in results.items()}
    train_total = {arm: sum(r["train_s"] + r["reference_s"] for r in rs) for arm, rs in results.items()}
    rows.append(["sweep", f"{total['plain']:.1f}", f"{train_total['plain']:.1f}", f"{total['cached']:.1f}", "",
                 f"{train_total['cached']:.1f}", "", "", ""])
    table = format_table(["beta", "plain s", "plain ref+train s", "cached s", "cached ref s", "cached train s",
                          "reference", "plain loss", "cached loss"], rows)
    first = results["cached"][0]
    notes = [f"shape {args.shape}: {first['steps']} steps per run over {first['pairs']} training pairs; overrides "
             f"{' '.join(base) or '(the tiny recipe as it is)'}",
             f"the whole sweep: {total['plain']:.1f} s plain against {total['cached']:.1f} s with the cache "
             f"({total['plain'] / total['cached']:.2f}x); reference + training alone: {train_total['plain']:.1f} s "
             f"against {train_total['cached']:.1f} s ({train_total['plain'] / train_total['cached']:.2f}x)",
             "'plain ref+train s' is training (the reference inside each step); 'cached ref s' is the cache's load "
             "or its one scoring pass; process wall time adds Unsloth's import and the model load to both"]
    print("\n" + table + "\n" + "\n".join(notes))
    if not args.no_record:
        append_section(f"Reference log-prob cache: a {len(args.betas)}-beta sweep ({args.shape}, CPU)",
                       context(load_at_start), table, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
