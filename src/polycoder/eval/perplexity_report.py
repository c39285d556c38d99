"""The report of `eval perplexity`: perplexity.json, perplexity.md and perplexity.png.

perplexity.md has one table a figure (rows: languages; columns: models under short names,
their full names and identities listed below): the paper's perplexity per Pygments token,
bits per byte (comparable across tokenizers, and not inflated by how Pygments cuts a
file), the loss in nats per model token, then every count. perplexity.png shows the first
two side by side, the Pygments perplexity on a log axis so that one huge value (a language
of a few header files) cannot flatten the others.

Languages whose counts make a figure unreliable are marked (†) with the reason in a
footnote, by thresholds chosen here (`unreliable`):
- fewer than MIN_FILES files: a pooled figure of a few files is mostly one file's (the
  paper scored about 100 a language);
- fewer than MIN_PYGMENTS_TOKENS Pygments tokens: too few tokens to divide by;
- more than MAX_BYTES_PER_PYGMENTS_TOKEN bytes a Pygments token: a licence comment or a
  long string is one Pygments token and hundreds of model tokens, so the per-Pygments-token
  perplexity grows exponentially with them (3 C++ headers of 10 KB and 578 Pygments tokens
  gave 4.6e24); ordinary code has 3.5 to 6 (this package's Python: 4.1, its C: 3.4).
"""

from __future__ import annotations

import json
from pathlib import Path

from polycoder.files import write_text

MIN_FILES = 10
MIN_PYGMENTS_TOKENS = 5000
MAX_BYTES_PER_PYGMENTS_TOKEN = 12.0
MARK = "†"


def unreliable(agg: dict) -> list[str]:
    """Why a language's pooled figures should not be trusted (empty: no reason found)."""
    why = []
    if agg["files"] < MIN_FILES:
        why.append(f"{agg['files']} files (< {MIN_FILES})")
    if agg["pygments_tokens"] < MIN_PYGMENTS_TOKENS:
        why.append(f"{agg['pygments_tokens']} Pygments tokens (< {MIN_PYGMENTS_TOKENS})")
    if agg["pygments_tokens"] and agg["bytes"] / agg["pygments_tokens"] > MAX_BYTES_PER_PYGMENTS_TOKEN:
        why.append(f"{agg['bytes'] / agg['pygments_tokens']:.1f} bytes a Pygments token "
                   f"(> {MAX_BYTES_PER_PYGMENTS_TOKEN:g}: long comments or strings inflate the per-token figure)")
    return why


def _flags(results: dict[str, dict[str, dict]], langs: list[str]) -> dict[str, list[str]]:
    """language -> reasons; the files are the same for every model, so the first model that has it speaks."""
    flags = {}
    for lang in langs:
        agg = next(r[lang] for r in results.values() if lang in r)
        if agg.get("unreliable"):
            flags[lang] = agg["unreliable"]
    return flags


def _table(results: dict[str, dict[str, dict]], labels: dict[str, str], field: str, langs: list[str],
           flags: dict[str, list[str]], digits: int = 3) -> list[str]:
    """One row a language, one column a model, of one figure."""
    models = list(results)
    lines = ["| language | " + " | ".join(labels[m] for m in models) + " |", "|---|" + "---:|" * len(models)]
    for lang in langs:
        values = [(results[m].get(lang) or {}).get(field) for m in models]
        name = f"{lang} {MARK}" if lang in flags else lang
        lines.append(f"| {name} | " + " | ".join(_number(v, digits) for v in values) + " |")
    return lines


def _number(v: float | None, digits: int) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}e}" if abs(v) >= 1e6 else f"{v:.{digits}f}"


def write_report(results: dict[str, dict[str, dict]], out: Path, labels: dict[str, str],
                 described: dict[str, str], windowing: str) -> None:
    """perplexity.json, perplexity.md and perplexity.png in OUT.

    `results`: model -> language -> figures; `labels`: model -> short column header;
    `described`: model -> what it is (full path or URL, and its identity digest).
    """
    write_text(out / "perplexity.json", json.dumps(results, indent=2) + "\n")
    models = list(results)
    langs = sorted({lang for r in results.values() for lang in r})
    flags = _flags(results, langs)
    lines = ["# Perplexity per language", "",
             "Pooled log-likelihood of all files of a language divided by Pygments tokens "
             "(the paper's measure; lower is better), each file on its own with `<|endoftext|>` "
             f"prepended; windows: {windowing}.", ""]
    lines += _table(results, labels, "pygments_perplexity", langs, flags)
    lines += ["", "## Bits per byte", "",
              "The same log-likelihood in bits, divided by the files' UTF-8 bytes: comparable across "
              "tokenizers, and not inflated by long comments as the Pygments figure is.", ""]
    lines += _table(results, labels, "bits_per_byte", langs, flags, digits=4)
    lines += ["", "## Loss in nats per model token", "",
              "The same log-likelihood divided by the model's own tokens (token perplexity = "
              "exp(loss); compares only models that share a tokenizer).", ""]
    lines += _table(results, labels, "loss", langs, flags)
    lines += ["", "Models:", ""] + [f"- {labels[m]}: {described[m]}" for m in models]
    if flags:
        lines += ["", f"{MARK} Unreliable figures (a language is marked with fewer than {MIN_FILES} files, fewer "
                      f"than {MIN_PYGMENTS_TOKENS} Pygments tokens, or more than {MAX_BYTES_PER_PYGMENTS_TOKEN:g} "
                      "bytes a Pygments token):", ""]
        lines += [f"- {lang}: " + "; ".join(why) for lang, why in flags.items()]
    lines += ["", "## Details", "", "| model | language | files | bytes | model tokens | Pygments tokens | "
              "loss (nats/token) | Pygments ppl | token ppl | bits/byte |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        for lang, r in results[m].items():
            lines.append(f"| {labels[m]} | {lang} | {r['files']} | {r['bytes']} | {r['model_tokens']} | "
                         f"{r['pygments_tokens']} | {_number(r['loss'], 4)} | {_number(r['pygments_perplexity'], 4)} | "
                         f"{_number(r['token_perplexity'], 4)} | {_number(r['bits_per_byte'], 4)} |")
    write_text(out / "perplexity.md", "\n".join(lines) + "\n")
    fig = figure(results, labels, flags)
    fig.savefig(out / "perplexity.png", dpi=120)
    _close(fig)


def figure(results: dict[str, dict[str, dict]], labels: dict[str, str], flags: dict[str, list[str]]):
    """Grouped bars like the paper's Figure 6: Pygments perplexity (log axis) and bits per byte;
    bars of unreliable languages hatched."""
    # Deferred: heavy (and an optional extra), and only the report's plot needs it
    import matplotlib

    matplotlib.use("Agg")  # no display: before pyplot picks a backend
    import matplotlib.pyplot as plt

    models = list(results)
    langs = sorted({lang for r in results.values() for lang in r})
    fig, axes = plt.subplots(1, 2, figsize=(max(8, len(langs) * 1.6), 4.2))
    width = 0.8 / max(1, len(models))
    for ax, field, ylabel in ((axes[0], "pygments_perplexity", "perplexity per Pygments token (log)"),
                              (axes[1], "bits_per_byte", "bits per byte")):
        for i, m in enumerate(models):
            xs, ys, hatches = [], [], []
            for j, lang in enumerate(langs):
                v = (results[m].get(lang) or {}).get(field)
                if v is not None and v > 0:  # a missing figure is left out, not drawn as 0
                    xs.append(j + i * width)
                    ys.append(v)
                    hatches.append("//" if lang in flags else "")
            bars = ax.bar(xs, ys, width, label=labels[m], color=f"C{i}")
            for bar, hatch in zip(bars, hatches):
                bar.set_hatch(hatch)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(langs))],
                      [f"{lang} {MARK}" if lang in flags else lang for lang in langs], rotation=30)
        ax.set_ylabel(ylabel)
        if field == "pygments_perplexity":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    title = "Perplexity per language"
    if flags:
        title += f" ({MARK}, hatched: unreliable, see perplexity.md)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _close(fig) -> None:
    import matplotlib.pyplot as plt  # deferred: matplotlib is already imported by figure()

    plt.close(fig)
