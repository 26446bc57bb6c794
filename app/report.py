"""The report stage: exports/<run>/report.md with plots, from the run folder alone; and the table of runs.

Reads recipe.yaml, train.json, metrics.jsonl, preference_eval.json, smoke.json and eval.json; writes report.md and
plots/*.png (matplotlib). `python -m app report RUN` rebuilds them; `python -m app runs` tabulates runs.
"""
import os
from pathlib import Path

from app.evaluate import preference_headline
from app.gguf import gguf_type
from app.recipe import run_recipe
from app.runs import EXPORTS, read_json, read_metrics, write_text

PLOTS = ("loss", "rewards", "logps", "heldout_accuracy")


def summarize_run(run: Path) -> dict | None:
    """One run's headline figures (None for a folder that is not a trained run)."""
    train, recipe = read_json(run / "train.json"), run / "recipe.yaml"
    if train is None or not recipe.is_file():
        return None
    recipe = run_recipe(run)
    smoke, bench = read_json(run / "smoke.json"), benchmark_summary(read_json(run / "eval.json"))
    pref = train.get("preference", {})
    before, after = pref.get("base", {}), pref.get("trained", {})
    ggufs = {}
    for r in (smoke or {}).get("results", []):
        ggufs[r["type"]] = {"mib": round(r["bytes"] / 2**20, 1), "passed": r["passed"],
                            "accuracy": r.get("preference", {}).get("accuracy"),
                            "reward_accuracy": r.get("preference", {}).get("reward_accuracy")}
    for path in sorted((run / "gguf").glob("*.gguf")):  # exported but not (yet) smoke-tested
        ggufs.setdefault(gguf_type(path), {"mib": round(path.stat().st_size / 2**20, 1),
                                                         "passed": None, "accuracy": None,
                                                         "reward_accuracy": None})
    return {
        "run": run.name, "recipe": recipe.name, "method": train.get("method", "dpo"),
        "model": recipe.model.name, "data": recipe.data.source,
        "steps": train["steps"], "train_seconds": train["train_seconds"], "peak_memory_gb": train["peak_memory_gb"],
        "pairs": after.get("pairs", 0), "accuracy_before": before.get("accuracy"),
        "accuracy_after": after.get("accuracy"), "reward_accuracy_after": after.get("reward_accuracy"),
        "margin_before": before.get("margin"),
        "margin_after": after.get("margin"),
        "eval_reward_accuracy": train.get("eval", {}).get("eval_rewards/accuracies"),
        "ggufs": ggufs, "smoke": None if smoke is None else ("pass" if smoke["passed"] else "fail"), **bench,
    }


def benchmark_summary(evals: dict | None) -> dict:
    """The runs table's benchmark columns from eval.json: how many tasks, and the mean of each task's main
    metric for the base and the trained model (None without eval.json)."""
    pairs = [(main_metric((evals.get("base_results") or {}).get(task, {})), main_metric(trained))
             for task, trained in (evals or {}).get("results", {}).items()]
    pairs = [(b, t) for b, t in pairs if b is not None and t is not None]
    if not pairs:
        return {"bench_tasks": None, "bench_base": None, "bench_trained": None}
    return {"bench_tasks": len(pairs), "bench_base": sum(b for b, _ in pairs) / len(pairs),
            "bench_trained": sum(t for _, t in pairs) / len(pairs)}


def write_report(run: Path) -> list[str]:
    """report.md and plots/ for a run; returns its summary lines (model, data, training, held-out pairs,
    GGUF), which the console shows."""
    s = summarize_run(run)
    if s is None:
        from app import AppError
        raise AppError(f"{run.name} has no train.json and recipe.yaml: not a finished training run")
    train = read_json(run / "train.json")
    logs = read_metrics(run)
    smoke = read_json(run / "smoke.json") or {"results": []}
    (run / "plots").mkdir(exist_ok=True)
    plot_curves(logs, run / "plots")
    plot_heldout_accuracy(s, run / "plots" / "heldout_accuracy.png")

    data, pref = train.get("data", {}), train.get("preference", {})
    lines = [f"# {run.name}", "",
             f"- model: {s['model']} (recipe {s['recipe']}, method {train.get('method', 'dpo')})",
             f"- data: {s['data']}" + (f" ({data['format']}): {data['train']} pairs trained, {data['eval']} held out"
                                       if data else ""),
             f"- training: {s['steps']} steps in {s['train_seconds']:.0f} s, peak memory {s['peak_memory_gb']:.2f} GB",
             "- " + (preference_headline(pref.get("base", {}), pref.get("trained", {}), s["method"], pref.get("beta"))
                     or "held-out pairs: none"),
             "- GGUF: " + (", ".join(f"{t} {g['mib']} MiB (reward acc {fmt_pct(g['reward_accuracy'])}, log-prob "
                                     f"{fmt_pct(g['accuracy'])})" for t, g in s["ggufs"].items()) or "none")
             + f"; smoke test: {(s['smoke'] or 'not run').upper()}",
             "", *alarm_lines(train.get("alarms")),
             "![loss](plots/loss.png)", "![rewards](plots/rewards.png)", "![log-probs](plots/logps.png)",
             "![held-out accuracy](plots/heldout_accuracy.png)", "",
             "## Held-out preference pairs",
             "",
             "Reward accuracy (the headline): DPO's implicit reward, beta * (log p_model - log p_base), is higher "
             "for the chosen reply, i.e. training moved the model towards it; it is measured against the base, so "
             "the base has none. Accuracy: the model gives the chosen reply a higher log-probability than the "
             "rejected one (sum over the reply's tokens, given the prompt). That sum favours short replies, so a "
             "model can move a long way towards long chosen replies and still rank a short rejected one first: "
             "it need not rise when training works. The same token ids go through every form of the model.",
             "", "| model | accuracy | mean margin | log p(chosen) | log p(rejected) | reward accuracy | "
             "reward margin | same decisions as merged |", "|---|---|---|---|---|---|---|---|"]
    pref = train.get("preference", {})
    for name, key in (("base (before)", "base"), ("trained (HF, LoRA)", "trained")):
        lines.append(pair_row(name, pref.get(key, {})))
    lines += [pair_row(r["file"], r["preference"]) for r in smoke["results"] if r.get("preference", {}).get("pairs")]
    lines += reward_lines(logs, train.get("reward_trend"))
    evals = [r for r in logs if "eval_loss" in r]
    if evals:
        lines += ["", "## TRL's eval metrics (DPO's implicit reward; 0 at step 0, where policy = reference)", "",
                  "| step | loss | reward accuracy | reward margin | log p(chosen) | log p(rejected) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['eval_loss']:.4f} | {fmt_pct(r.get('eval_rewards/accuracies'))} | "
                  f"{fmt_num(r.get('eval_rewards/margins'))} | {fmt_num(r.get('eval_logps/chosen'))} | "
                  f"{fmt_num(r.get('eval_logps/rejected'))} |" for r in evals]
    lines += ["", "## Probe replies (greedy), before and after", ""]
    for r in train.get("replies", []):
        lines += [f"**{r['prompt']}**", "", f"- before: {r['before']}", f"- after: {r['after']}", ""]
    lines += benchmark_lines(read_json(run / "eval.json"))
    if smoke["results"]:
        from app.smoke import format_table
        lines += ["## Smoke test: llama.cpp against the merged model", "", "```", format_table(smoke["results"]), "```"]
    write_text(run / "report.md", "\n".join(lines) + "\n")
    return [line[2:] for line in lines[2:7]]  # the five "- " lines under the title


def reward_lines(logs: list[dict], trend: dict | None) -> list[str]:
    """grpo, rloo: the mean reward of the sampled replies at every logged step, and its start and end."""
    logged = [r for r in logs if r.get("reward") is not None and "eval_loss" not in r]
    if not logged:
        return []
    lines = ["", "## Mean reward of the sampled replies", "", "![mean reward](plots/reward.png)", ""]
    if trend:
        lines += [f"Over steps {trend['first_steps'][0]}-{trend['first_steps'][1]}: {trend['first']:+.3f}; over "
                  f"steps {trend['last_steps'][0]}-{trend['last_steps'][1]}: {trend['last']:+.3f} "
                  f"({'rising' if trend['last'] > trend['first'] else 'NOT rising'}).", ""]
    lines += ["| step | mean reward | spread (std) | reply length (tokens) |", "|---|---|---|---|"]
    return lines + [f"| {r['step']} | {r['reward']:+.3f} | {r.get('reward_std', float('nan')):.2f} | "
                    f"{r.get('completions/mean_length', float('nan')):.1f} |" for r in logged]


def benchmark_lines(evals: dict | None) -> list[str]:
    """eval.json (`python -m app eval`) as a table: every metric of every task, base against trained (and the
    GGUF where it was measured), with lm-eval's standard error."""
    if not evals:
        return []
    base_all, gguf_all, items = evals.get("base_results", {}), evals.get("gguf_results"), evals.get("items", {})
    same = items.get("base") == items.get("trained") and all(
        items["trained"].get(task) == seen for task, seen in items.get("gguf", {}).items())
    lines = ["## Standard benchmarks (lm-evaluation-harness)", "",
             f"lm-eval {evals['lm_eval_version']}, base `{evals['base']}` against the trained merged model"
             + (f" and {evals['gguf']} (llama.cpp, generation tasks only)" if gguf_all else "") + "; "
             + (f"the first {evals['limit']} items" if evals.get("limit") else "every item") + " of each task: "
             + ", ".join(f"{task} {seen['count']}" for task, seen in items.get("trained", {}).items())
             + ("; the same items for every model (lm-eval's doc ids and prompt hashes)." if same else
                "; **the models were not evaluated on the same items** (see eval.json's `items`)."), "",
             "| task | metric | base | trained | trained - base |" + (f" {evals['gguf']} |" if gguf_all else ""),
             "|---|---|---|---|---|" + ("---|" if gguf_all else "")]
    for task, trained in evals["results"].items():
        base, gguf = base_all.get(task, {}), (gguf_all or {}).get(task, {})
        for metric, value in trained.items():
            if "_stderr" in metric:
                continue
            cells = [fmt_metric(m, metric) for m in (base, trained)]
            change = f"{value - base[metric]:+.4f}" if metric in base else "-"
            lines.append(f"| {task} | {metric} | {cells[0]} | {cells[1]} | {change} |"
                         + (f" {fmt_metric(gguf, metric)} |" if gguf_all else ""))
    return lines + [""]


def stderr_key(metric: str) -> str:
    """The name of a metric's standard error in `metrics`' output: acc -> acc_stderr, exact_match (strict) ->
    exact_match_stderr (strict)."""
    name, sep, where = metric.partition(" (")
    return f"{name}_stderr{sep}{where}"


def main_metric(task_metrics: dict) -> float | None:
    """A task's first metric (lm-eval lists its main one first: acc before acc_norm), for the runs table."""
    return next((v for k, v in task_metrics.items() if "_stderr" not in k), None)


def fmt_metric(task_metrics: dict, metric: str) -> str:
    if metric not in task_metrics:
        return "-"
    error = task_metrics.get(stderr_key(metric))
    return f"{task_metrics[metric]:.4f}" + (f" ± {error:.4f}" if error is not None else "")


def alarm_lines(alarms: list[dict] | None) -> list[str]:
    """The report's first section after the summary: what app/alarms.py found, each with its fix."""
    if alarms is None:  # a run from before the alarms
        return []
    if not alarms:
        return ["**Alarms: none** (checked: the loss moved, no 100% reward accuracy from the start, the reference "
                "was the starting model, the pairs differ and do not repeat the prompt, the replies kept their "
                "length; app/alarms.py).", ""]
    return ["## Alarms", ""] + [f"- **{a['name']}**: {a['message']}. *Fix:* {a['fix']}." for a in alarms] + [""]


def pair_row(name: str, p: dict) -> str:
    return (f"| {name} | {fmt_pct(p.get('accuracy'))} | {fmt_num(p.get('margin'))} | {fmt_num(p.get('logp_chosen'))} "
            f"| {fmt_num(p.get('logp_rejected'))} | {fmt_pct(p.get('reward_accuracy'))} | "
            f"{fmt_num(p.get('reward_margin'))} | {fmt_pct(p.get('agreement'))} |")


def save_png(fig, path: Path):
    """A plot under a temporary name, then renamed: a report cut short never leaves half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)


def plot_curves(logs, out: Path):
    """loss.png, rewards.png, logps.png: train (solid) and held-out eval (dots) against steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in logs if "loss" in r]
    evals = [r for r in logs if "eval_loss" in r]

    def curve(ax, key, label, color, eval_key=None):
        xs = [r["step"] for r in train if key in r]
        if xs:
            ax.plot(xs, [r[key] for r in train if key in r], color=color, label=f"{label} (train)")
        eval_key = eval_key or f"eval_{key}"
        xs = [r["step"] for r in evals if eval_key in r]
        if xs:
            ax.plot(xs, [r[eval_key] for r in evals if eval_key in r], "o--", color=color, label=f"{label} (held out)")

    panels = {
        "loss": [("DPO loss", [("loss", "loss", "C0", "eval_loss")], "loss (log 2 = 0.693 at the start)")],
        "rewards": [("reward margin (chosen - rejected)", [("rewards/margins", "margin", "C2", None)], "margin"),
                    ("reward accuracy (chosen ranked first)", [("rewards/accuracies", "accuracy", "C3", None)],
                     "share of pairs")],
        "logps": [("log-probability of the replies", [("logps/chosen", "chosen", "C2", None),
                                                       ("logps/rejected", "rejected", "C3", None)], "sum of token log-probs")],
    }
    if any("reward" in r for r in train):  # grpo, rloo
        panels["reward"] = [("mean reward of the sampled replies", [("reward", "mean reward", "C1", None)], "reward")]
    for name, axes_spec in panels.items():
        fig, axes = plt.subplots(1, len(axes_spec), figsize=(6 * len(axes_spec), 4), squeeze=False)
        for ax, (title, curves, ylabel) in zip(axes[0], axes_spec):
            for key, label, color, eval_key in curves:
                curve(ax, key, label, color, eval_key)
            ax.set(title=title, xlabel="step", ylabel=ylabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # SFT, KTO and reward runs log no DPO reward curves
                ax.legend()
            else:
                ax.text(0.5, 0.5, "not logged by this method", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        save_png(fig, out / f"{name}.png")
        plt.close(fig)


def plot_heldout_accuracy(s: dict, path: Path):
    """Grouped bars per form of the model: log-prob accuracy and DPO reward accuracy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forms = [("base", s["accuracy_before"], None), ("trained", s["accuracy_after"], s["reward_accuracy_after"])]
    forms += [(f"GGUF {t}", g["accuracy"], g["reward_accuracy"]) for t, g in s["ggufs"].items()]
    fig, ax = plt.subplots(figsize=(1.6 * len(forms) + 2, 4))
    for offset, index, label, color in ((-0.2, 1, "chosen more likely (log-prob)", "C0"),
                                         (0.2, 2, "DPO reward accuracy (vs base)", "C2")):
        xs = [i + offset for i, f in enumerate(forms) if f[index] is not None]
        values = [f[index] for f in forms if f[index] is not None]
        drawn = ax.bar(xs, values, width=0.4, color=color, label=label)
        ax.bar_label(drawn, labels=[f"{v:.0%}" for v in values])
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set_xticks(range(len(forms)), [f[0] for f in forms])
    ax.set(ylim=(0, 1.15), ylabel="share of held-out pairs", title=f"held-out preference pairs ({s['pairs']})")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def list_runs(sort: str = "run", descending: bool = False) -> list[dict]:
    """Every trained run in exports/, sorted by a column (blanks last)."""
    rows = [s for run in sorted(EXPORTS.iterdir()) if run.is_dir() and not run.is_symlink()
            if (s := summarize_run(run)) is not None]
    key = sort
    if rows and key not in rows[0]:
        from app import AppError
        raise AppError(f"cannot sort by '{key}'; columns: {', '.join(k for k in rows[0] if k != 'ggufs')}")
    blank = [r for r in rows if r[key] is None]
    return sorted((r for r in rows if r[key] is not None), key=lambda r: r[key], reverse=descending) + blank


def format_runs_table(rows) -> str:
    """Accuracies: log-prob before -> after, then DPO reward accuracy of the trained model and each GGUF."""
    lines = [f"{'run':<34} {'recipe':<12} {'method':<6} {'steps':>5} {'train s':>7} {'peak GB':>7} {'log-prob acc':>12} "
             f"{'reward acc':>10}  {'GGUF (MiB, reward acc)':<40} {'smoke':<5}  bench: tasks base > trained"]
    for r in rows:
        ggufs = " ".join(f"{t}:{g['mib']}:{fmt_pct(g['reward_accuracy'])}" for t, g in r["ggufs"].items())
        lines.append(f"{r['run']:<34} {r['recipe']:<12} {r['method']:<6} {r['steps']:>5} {r['train_seconds']:>7.0f} "
                     f"{r['peak_memory_gb']:>7.2f} {fmt_pct(r['accuracy_before']) + ' > ' + fmt_pct(r['accuracy_after']):>12} "
                     f"{fmt_pct(r['reward_accuracy_after']):>10}  {ggufs:<40} {r['smoke'] or '-':<5}  "
                     + (f"{r['bench_tasks']}: {r['bench_base']:.3f} > {r['bench_trained']:.3f}" if r["bench_tasks"]
                        else "-"))
    return "\n".join(lines)


def fmt_pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def fmt_num(x) -> str:
    return "-" if x is None else f"{x:+.2f}"
