"""The figures and report of `eval infilling`: infilling.json, infilling.md and infilling.png.

`summarize` pools scored samples by (model, task set, mode): pass@1 by the unbiased
estimator (`polycoder.eval.passk`, the mean pass rate of each task's samples) for the
HumanEval sets, and for every set the mean exact match and edit similarity of the answers
against the removed middle; line infilling also per language. `write_report` puts the modes
side by side: one table for the HumanEval sets (rows: model and task set), one for line
infilling (rows: model and language, then all languages pooled), one for what the suffix
adds to line infilling (`suffix_gain`: paired differences with bootstrap intervals), one for
each later model against the first on the same lines (`model_gain`, likewise), the notes of the run (a
model asked prefix-only for want of FIM tokens), how answers were read, and what each model
is; the plot shows the same two views as bars.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

from polycoder.eval.infilling_tasks import MODES, TASK_SETS
from polycoder.eval.passk import pass_at_k
from polycoder.files import write_text


def _figures(rows: list[dict]) -> dict:
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        if "passed" in r:
            per_task[r["task_id"]].append(bool(r["passed"]))
    fig = {"tasks": len({r["task_id"] for r in rows}), "samples": len(rows),
           "exact_match": sum(r["exact_match"] for r in rows) / len(rows),
           "edit_similarity": sum(r["edit_similarity"] for r in rows) / len(rows),
           "refused": sum(bool(r.get("refused")) for r in rows)}
    scored = [r["middle_loss"] for r in rows if "middle_loss" in r]
    if scored:
        fig["middle_loss"] = sum(scored) / len(scored)
    if per_task:
        fig.update(pass_at_k([(len(v), sum(v)) for v in per_task.values()], [1]),
                   verdicts=dict(Counter(r["verdict"] for r in rows if "verdict" in r)),
                   error_types=dict(Counter(r["error_type"] for r in rows if r.get("error_type")).most_common(10)))
    return fig


BOOTSTRAP_RESAMPLES = 2000


def paired_interval(diffs: list[float], rng: random.Random) -> tuple[float, float]:
    """The 95 % percentile interval of the mean of `diffs` over paired bootstrap resamples."""
    n = len(diffs)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(BOOTSTRAP_RESAMPLES))
    return means[int(0.025 * BOOTSTRAP_RESAMPLES)], means[int(0.975 * BOOTSTRAP_RESAMPLES) - 1]


def suffix_gain(rows: list[dict]) -> list[dict]:
    """What the suffix adds to line infilling, per (model, language) and for all languages: the
    mean of FIM's score minus prefix-only's on the same lines (each line's samples averaged
    in each mode), with a 95 % paired bootstrap interval (seeded: the same every run) and the
    lines on which each mode did better. An interval above zero says the suffix helped by more than
    which lines happened to be drawn. Where the lines were scored by likelihood (a local
    model), `middle_loss` is the loss of the removed line without the suffix minus with it
    (nats a token; above zero: the suffix made the right line likelier)."""
    scores = _lines_by(rows, ("model", "language", "task_id"), "mode")
    pairs: dict[tuple, list[dict[str, float]]] = defaultdict(list)
    for (model, language, _), by_mode in scores.items():
        if "fim" in by_mode and "prefix-only" in by_mode:
            d = _line_difference(by_mode["fim"], by_mode["prefix-only"])
            pairs[(model, language)].append(d)
            pairs[(model, "all")].append(d)
    return [{"model": model, "language": language, "lines": len(ds),
             **_gains(ds, f"{model}/{language}", ("fim_better", "prefix_better"))}
            for (model, language), ds in sorted(pairs.items(), key=lambda kv: (kv[0][0], kv[0][1] == "all", kv[0][1]))]


def _lines_by(rows: list[dict], key: tuple[str, ...], side: str) -> dict[tuple, dict[str, list[dict]]]:
    """The line-infilling rows grouped by the fields `key`, then by the field `side` (what
    is compared: the mode, or the model)."""
    grouped: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["task_set"] == "lines":
            grouped[tuple(r[k] for k in key)][r[side]].append(r)
    return grouped


def _mean(rs: list[dict], f: str) -> float:
    return sum(r[f] for r in rs) / len(rs)


def _line_difference(these: list[dict], base: list[dict]) -> dict[str, float]:
    """One line's scores (each side's samples averaged) in `these` minus in `base`, and where
    every sample has a loss of the removed line, `base`'s loss minus these' (a gain: lower)."""
    d = {f: _mean(these, f) - _mean(base, f) for f in ("exact_match", "edit_similarity")}
    if all("middle_loss" in r for r in these + base):
        d["middle_loss"] = _mean(base, "middle_loss") - _mean(these, "middle_loss")
    return d


def _gains(diffs: list[dict[str, float]], seed: str, counts: tuple[str, str]) -> dict[str, dict]:
    """Per figure that every line has: the mean difference, its 95 % paired bootstrap interval
    (seeded by `seed` and the figure, so the same every run) and the lines above and below zero
    (named by `counts`)."""
    out = {}
    for f in ("exact_match", "edit_similarity", "middle_loss"):
        if all(f in d for d in diffs):
            xs = [d[f] for d in diffs]
            low, high = paired_interval(xs, random.Random(f"{seed}/{f}"))
            out[f] = {"gain": sum(xs) / len(xs), "low": low, "high": high,
                      counts[0]: sum(x > 0 for x in xs), counts[1]: sum(x < 0 for x in xs)}
    return out


def model_gain(rows: list[dict]) -> list[dict]:
    """Each later model against the first one on line infilling, in each mode, per language
    and for all languages: the mean of its score minus the first model's on the same lines
    (each line's samples averaged), with a 95 % paired bootstrap interval and the lines on
    which each did better. Pairing by line is what lets two runs of a few hundred lines a
    language tell two close models apart. `middle_loss` is the first model's loss of the
    removed line minus this one's (above zero: this model finds the right line likelier)."""
    models = list(dict.fromkeys(r["model"] for r in rows if r["task_set"] == "lines"))
    scores = _lines_by(rows, ("mode", "language", "task_id"), "model")
    pairs: dict[tuple, list[dict[str, float]]] = defaultdict(list)
    for (mode, language, _), by_model in scores.items():
        if models[0] not in by_model:
            continue
        for model in (m for m in models[1:] if m in by_model):
            d = _line_difference(by_model[model], by_model[models[0]])
            pairs[(model, mode, language)].append(d)
            pairs[(model, mode, "all")].append(d)
    modes = _modes(rows)
    order = sorted(pairs, key=lambda k: (models.index(k[0]), modes.index(k[1]), k[2] == "all", k[2]))
    return [{"model": model, "against": models[0], "mode": mode, "language": language,
             "lines": len(pairs[(model, mode, language)]),
             **_gains(pairs[(model, mode, language)], f"{model}/{mode}/{language}", ("better", "worse"))}
            for model, mode, language in order]


def _modes(rows: list[dict]) -> list[str]:
    seen = list(dict.fromkeys(r["mode"] for r in rows))
    return [m for m in MODES if m in seen] + [m for m in seen if m not in MODES]


def summarize(rows: list[dict]) -> dict:
    """Figures per (model, task set, mode), and per (model, mode, language) for line infilling."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    modes = _modes(rows)
    runs: dict[tuple, list[dict]] = defaultdict(list)
    languages: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        runs[(r["model"], r["task_set"], r["mode"])].append(r)
        if r["task_set"] == "lines":
            languages[(r["model"], r["mode"], r["language"])].append(r)
            languages[(r["model"], r["mode"], "all")].append(r)
    return {
        "runs": [{"model": m, "task_set": s, "mode": mode, **_figures(runs[(m, s, mode)])}
                 for m in models for s in TASK_SETS for mode in modes if (m, s, mode) in runs],
        "languages": [{"model": m, "mode": mode, "language": lang, **_figures(rs)}
                      for (m, mode, lang), rs in sorted(languages.items(), key=lambda kv: (
                          models.index(kv[0][0]), kv[0][2] == "all", kv[0][2], modes.index(kv[0][1])))],
        "suffix_gain": suffix_gain(rows), "model_gain": model_gain(rows), "modes": modes, "samples": len(rows),
    }


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _table(items: list[dict], keys: list[str], modes: list[str], figures: list[tuple[str, str]]) -> list[str]:
    """One row a distinct value of `keys`, one column a (figure, mode)."""
    cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for it in items:
        cells[tuple(it[k] for k in keys)][it["mode"]] = it
    head = [k.replace("_", " ") for k in keys] + ["tasks"] + [f"{name} {m}" for _, name in figures for m in modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(keys) + "---:|" * (1 + len(figures) * len(modes))]
    for row_key, by_mode in cells.items():
        tasks = max(it["tasks"] for it in by_mode.values())
        values = [_pct(by_mode[m].get(f)) if m in by_mode else "-" for f, _ in figures for m in modes]
        lines.append("| " + " | ".join([*map(str, row_key), str(tasks), *values]) + " |")
    return lines


def write_report(summary: dict, out: Path) -> None:
    """infilling.json, infilling.md and infilling.png in OUT."""
    write_text(out / "infilling.json", json.dumps(summary, indent=2) + "\n")
    modes = summary["modes"]
    humaneval = [r for r in summary["runs"] if r["task_set"] != "lines"]
    lines = [f"# Fill-in-the-middle: {', '.join(summary['models'])}", ""]
    if humaneval:
        lines += ["## HumanEval infilling", "",
                  "pass@1, exact match and edit similarity of the answer to the removed middle, in %:", ""]
        lines += _table(humaneval, ["model", "task_set"], modes,
                        [("pass@1", "pass@1"), ("exact_match", "exact"), ("edit_similarity", "edit sim")])
        lines.append("")
    if summary["languages"]:
        lines += ["## Line infilling of held-out files", "",
                  "Exact match and edit similarity of the removed line, in % (all: every line of every language):", ""]
        lines += _table(summary["languages"], ["model", "language"], modes,
                        [("exact_match", "exact"), ("edit_similarity", "edit sim")])
        lines.append("")
    if summary.get("suffix_gain"):
        lines += ["What the suffix adds: FIM's score minus prefix-only's on the same lines, in points, with a 95 % "
                  "paired bootstrap interval, and the lines on which each mode did better:", "",
                  "| model | language | lines | exact match gain | interval | edit sim gain | interval | "
                  "lines fim better / prefix-only better (edit sim) |", "|---|---|---:|---:|---|---:|---|---|"]
        for g in summary["suffix_gain"]:
            em, es = g["exact_match"], g["edit_similarity"]
            lines.append(f"| {g['model']} | {g['language']} | {g['lines']} | {100 * em['gain']:+.2f} | "
                         f"[{100 * em['low']:+.2f}, {100 * em['high']:+.2f}] | {100 * es['gain']:+.2f} | "
                         f"[{100 * es['low']:+.2f}, {100 * es['high']:+.2f}] | "
                         f"{es['fim_better']} / {es['prefix_better']} |")
        lines.append("")
        scored = [g for g in summary["suffix_gain"] if "middle_loss" in g]
        if scored:
            lines += ["The same lines scored by likelihood: the loss of the removed line (nats a token) after the "
                      "prefix alone minus after the FIM prompt, with its 95 % interval, and the lines the suffix made "
                      "likelier:", "", "| model | language | lines | loss fim | loss prefix-only | suffix gain | "
                      "interval | lines likelier with the suffix |", "|---|---|---:|---:|---:|---:|---|---:|"]
            loss = {(r["model"], r["language"], r["mode"]): r.get("middle_loss") for r in summary["languages"]}
            for g in scored:
                ml = g["middle_loss"]
                fim, plain = loss.get((g["model"], g["language"], "fim")), loss.get((g["model"], g["language"], "prefix-only"))
                lines.append(f"| {g['model']} | {g['language']} | {g['lines']} | "
                             f"{'-' if fim is None else f'{fim:.3f}'} | {'-' if plain is None else f'{plain:.3f}'} | "
                             f"{ml['gain']:+.3f} | [{ml['low']:+.3f}, {ml['high']:+.3f}] | {ml['fim_better']} |")
            lines.append("")
    if summary.get("model_gain"):
        first = summary["model_gain"][0]["against"]
        lines += [f"Each model against {first} on the same lines: its score minus {first}'s, in points (loss: "
                  f"{first}'s minus its own, nats a token), with a 95 % paired bootstrap interval, and the lines on "
                  "which it did better / worse (edit sim):", "",
                  "| model | mode | language | lines | exact match gain | interval | edit sim gain | interval | "
                  "better / worse | loss gain | interval |", "|---|---|---|---:|---:|---|---:|---|---|---:|---|"]
        for g in summary["model_gain"]:
            em, es, ml = g["exact_match"], g["edit_similarity"], g.get("middle_loss")
            loss = (f"{ml['gain']:+.3f} | [{ml['low']:+.3f}, {ml['high']:+.3f}]" if ml else "- | -")
            lines.append(f"| {g['model']} | {g['mode']} | {g['language']} | {g['lines']} | {100 * em['gain']:+.2f} | "
                         f"[{100 * em['low']:+.2f}, {100 * em['high']:+.2f}] | {100 * es['gain']:+.2f} | "
                         f"[{100 * es['low']:+.2f}, {100 * es['high']:+.2f}] | {es['better']} / {es['worse']} | "
                         f"{loss} |")
        lines.append("")
    refused = sum(r["refused"] for r in summary["runs"])
    notes = list(summary.get("notes") or []) + (
        [f"{refused} samples were refused by the server and count as failed."] if refused else [])
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    order = summary.get("order")
    if order:
        endpoint = "; an endpoint's laid out by its server" if summary.get("endpoint") else ""
        layout = f"FIM prompts in {order.upper()} order (each part tokenized on its own{endpoint})"
    elif summary.get("endpoint_template"):
        layout = "FIM prompts spelt out in the template --endpoint-template gives"
    else:
        layout = "FIM prompts laid out by the server (or given with --samples)"
    lines += ["How it was asked and read: " + layout
              + "; single-line and "
              "line tasks answer with the first line written; FIM multi-line and random-span answers end at the "
              "end of document or a FIM sentinel"
              + (", or where our server's at-cursor stop rules end them (--stop-at-suffix)"
                 if (summary.get("settings") or {}).get("stop_at_suffix") else "")
              + "; prefix-only ones are cut to the removed span's number of lines. "
              "Exact match and edit similarity compare texts without trailing whitespace.", "",
              "Models:", ""] + [f"- {m}: {what}" for m, what in summary["models"].items()]
    write_text(out / "infilling.md", "\n".join(lines) + "\n")
    _plot(summary, out / "infilling.png")


def _bars(ax, groups: list[str], series: dict[str, list[float | None]], ylabel: str, title: str) -> None:
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [100 * v if v is not None else 0 for v in values], width, label=name)
    top = max((100 * v for values in series.values() for v in values if v is not None), default=0)
    ax.set_ylim(0, max(5.0, 1.15 * top))  # a run of zeros still shows an axis from 0
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


def _plot(summary: dict, path: Path) -> None:
    # Deferred: heavy (and an optional extra), and only the report's plot needs it
    import matplotlib

    matplotlib.use("Agg")  # no display: before pyplot picks a backend
    import matplotlib.pyplot as plt

    humaneval = [r for r in summary["runs"] if r["task_set"] != "lines" and "pass@1" in r]
    languages = summary["languages"]
    panels = [p for p in (humaneval, languages) if p]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4), squeeze=False)
    several = len(summary["models"]) > 1
    for ax, items in zip(axes[0], panels):
        field, key = ("pass@1", "task_set") if items is humaneval else ("edit_similarity", "language")
        groups = list(dict.fromkeys(f"{r['model']}: {r[key]}" if several else r[key] for r in items))
        series: dict[str, list] = {m: [None] * len(groups) for m in summary["modes"]}
        for r in items:
            series[r["mode"]][groups.index(f"{r['model']}: {r[key]}" if several else r[key])] = r.get(field)
        _bars(ax, groups, series, f"{field.replace('_', ' ')} (%)",
              "HumanEval infilling" if items is humaneval else "line infilling, held-out files")
    if not panels:
        axes[0][0].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
