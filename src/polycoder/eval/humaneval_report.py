"""The figures and report of `eval humaneval`: pass@k per model, temperature and prompt variant.

`summarize` pools verdicts by (model, temperature, prompt variant), computes pass@k by the
unbiased estimator (`polycoder.eval.passk`) and the best temperature per k and model (what
the paper reports); `write_report` writes summary.json, summary.md (one row a run, then the
best figures of the models side by side, then what each model is) and pass_at_k.png.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from polycoder.eval.passk import pass_at_k
from polycoder.files import write_text


def summarize(results: list[dict], problems: dict[str, dict], ks: list[int]) -> dict:
    """pass@k and verdict counts per (model, temperature, prompt variant); the best temperature
    per model, variant and k."""
    runs: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        runs[(r["model"], r["temperature"], r["prompt_variant"])].append(r)
    order = list(dict.fromkeys(r["model"] for r in results))  # models in the order they were given
    table = []
    for (model, temp, variant), rows in sorted(runs.items(), key=lambda kv: (order.index(kv[0][0]), str(kv[0][2]),
                                                                            kv[0][1] or 0)):
        per_task: dict[str, list[bool]] = defaultdict(list)
        for r in rows:
            per_task[r["task_id"]].append(bool(r["passed"]))
        counts = [(len(v), sum(v)) for v in per_task.values()]
        ns = sorted({n for n, _ in counts})
        table.append({
            "model": model, "temperature": temp, "prompt_variant": variant, "problems": len(per_task),
            "missing_problems": len(problems) - len(per_task),
            "samples_per_problem": ns[0] if len(ns) == 1 else ns,
            "samples": len(rows), **pass_at_k(counts, ks),
            "verdicts": dict(Counter(r["verdict"] for r in rows)),
            "error_types": dict(Counter(r["error_type"] for r in rows if r["error_type"]).most_common(10)),
        })
    best: dict[str, dict] = {}
    for run in table:
        for k in ks:
            name = f"pass@{k}"
            if name not in run:
                continue
            slot = best.setdefault(run["model"], {}).setdefault(run["prompt_variant"], {})
            if name not in slot or run[name] > slot[name]["value"]:
                slot[name] = {"temperature": run["temperature"], "value": run[name]}
    return {"runs": table, "best": best,
            "verdicts": dict(Counter(r["verdict"] for r in results)), "samples": len(results)}


def write_report(summary: dict, out: Path, ks: list[int], described: dict[str, str]) -> None:
    """summary.json, summary.md and pass_at_k.png in OUT; `described`: model label -> what it is."""
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    names = [f"pass@{k}" for k in ks]
    models = list(described)
    lines = [f"# HumanEval: {', '.join(models)}", "",
             "| model | prompt | temperature | problems | n | " + " | ".join(names)
             + " | passed | failed | timed out | error |",
             "|---|---|---|---|---|" + "---|" * (len(names) + 4)]
    for run in summary["runs"]:
        v = run["verdicts"]
        cells = [f"{100 * run[n]:.2f}" if n in run else "-" for n in names]
        lines.append(f"| {run['model']} | {run['prompt_variant']} | {run['temperature']} | {run['problems']} | "
                     f"{run['samples_per_problem']} | " + " | ".join(cells) + " | "
                     + " | ".join(str(v.get(x, 0)) for x in ("passed", "failed", "timed out", "error")) + " |")
    lines += ["", "pass@k in %, by the unbiased estimator. Best temperature per k (as the paper reports):", "",
              "| prompt | k | " + " | ".join(models) + " |", "|---|---|" + "---:|" * len(models)]
    variants = sorted({v for per_model in summary["best"].values() for v in per_model})
    for variant in variants:
        for name in names:
            cells = []
            for m in models:
                b = summary["best"].get(m, {}).get(variant, {}).get(name)
                cells.append(f"{100 * b['value']:.2f} (T={b['temperature']})" if b else "-")
            if any(c != "-" for c in cells):
                lines.append(f"| {variant} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "Models:", ""] + [f"- {m}: {what}" for m, what in described.items()]
    if summary.get("refused_samples"):
        lines += ["", f"{summary['refused_samples']} samples were refused by the server (finish_reason "
                      "\"error: ...\" in samples.jsonl) and count as failed."]
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    _plot(summary, out / "pass_at_k.png", names, ", ".join(models))


def _plot(summary: dict, path: Path, names: list[str], title: str) -> None:
    # Deferred: heavy (and an optional extra), and only the report's plot needs it
    import matplotlib

    matplotlib.use("Agg")  # no display: before pyplot picks a backend
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    several = len({r["model"] for r in summary["runs"]}) > 1
    for model, variant in dict.fromkeys((r["model"], r["prompt_variant"]) for r in summary["runs"]):
        runs = [r for r in summary["runs"] if r["model"] == model and r["prompt_variant"] == variant]
        for name in names:
            label = f"{model}: {name} ({variant})" if several else f"{name} ({variant})"
            pts = [(r["temperature"], 100 * r[name]) for r in runs if name in r]
            if not pts:
                continue
            if len(pts) == 1 or any(t is None for t, _ in pts):
                ax.bar(label, pts[0][1])
            else:
                pts.sort()
                ax.plot([t for t, _ in pts], [y for _, y in pts], marker="o", label=label)
    if ax.get_legend_handles_labels()[0]:
        ax.set_xlabel("temperature")
        ax.legend(fontsize=8)
    else:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.set_ylabel("pass@k (%)")
    ax.set_title(f"HumanEval: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
