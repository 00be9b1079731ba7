"""The evaluation report: a Markdown and a self-contained HTML page (tables with 95% intervals, plain-language
comparisons, the seen-vs-unseen wording gap, a plot with error bars, the deviations from the paper) from
summary.json."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llm2clip import storage  # noqa: E402
from llm2clip.deviations import DEVIATIONS, HEADER, markdown_table  # noqa: E402  (the README renders the same list)

LABELS = {
    "llm2clip": "LLM2CLIP (tuned LLM)",
    "llm2clip_raw_llm": "LLM2CLIP, raw LLM (causal, untuned)",
    "clip_baseline": "CLIP baseline (77-token text tower)",
    "llm2clip_no_centring": "LLM2CLIP without centring (as the paper)",
    "llm2clip_raw_llm_no_centring": "ablation: raw LLM without centring",
}
R1 = ("image_to_text_R@1", "text_to_image_R@1")
COLUMNS = [
    "image_to_text_R@1",
    "text_to_image_R@1",
    "image_to_text_R@5",
    "text_to_image_R@5",
    "image_to_text_R@10",
    "text_to_image_R@10",
]
SHORT = {"image_to_text_R@1": "I→T R@1", "text_to_image_R@1": "T→I R@1"}


def setup(summary: dict) -> str:
    """One sentence on what was trained, so the table reads without the JSON."""
    m = summary.get("models", {}).get("llm2clip")
    if not m:
        return ""
    init = f"pretrained {m['pretrained']}" if m["pretrained"] else "random init"
    return (
        f"All models: vision tower {m['vision']} ({init}), {m['epochs']} epochs at batch {m['batch_size']}, "
        "same images and captions. synthetic_long: one long caption per image, images in groups of four that "
        "share the same objects and differ only in size, fill and position (hard negatives). synthetic_reworded: "
        "the same images, keys and groups, each long caption written only in wordings no training caption uses "
        "(other sentence frames; other words for size, fill, position and background; the same colour and shape "
        "names), so the gap between the two is paired on identical images."
    )


def cache_line(summary: dict) -> str:
    c = summary.get("cache")
    return f"Embedding cache this run: {c['hits']} distinct captions found, {c['misses']} embedded." if c else ""


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def with_ci(values: dict, metric: str) -> str:
    """ "23.0 [18.5, 27.5]" (percent)."""
    ci = values.get(f"{metric}_ci95")
    return f"{pct(values[metric])} [{pct(ci[0])}, {pct(ci[1])}]" if ci else pct(values[metric])


def _rows(summary: dict) -> list[tuple[str, str, dict]]:
    """(benchmark, model, values), models in a fixed order: LLM2CLIP, its baselines, then the ablations."""
    return [(b, m, models[m]) for b, models in summary["retrieval"].items() for m in sorted(models, key=_order)]


def cra_rows(summary: dict) -> list[tuple[str, str]]:
    """(what, "value [lo, hi]") for every CRA measurement in summary["cra"], then the tuned LLM's paired lead."""
    cra = summary.get("cra", {})
    attention = cra.get("before_attention", "causal")
    names = {
        "before": f"raw LLM, {attention}" + (" (as the paper's raw-LLM row)" if attention == "causal" else ""),
        "before_bidirectional": "raw LLM, mask removed, untuned",
        "after": "tuned LLM (LoRA, caption-contrastive)",
    }
    out = []
    for key, label in names.items():
        if cra.get(key) is not None:
            out.append((label, with_ci(cra, key)))
    if cra.get("difference") is not None:
        lo, hi = cra["difference_ci95"]
        out.append(
            ("tuned minus raw, paired (points)", f"{100 * cra['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
        )
    return out


def anisotropy_rows(summary: dict) -> list[tuple[str, str]]:
    """(what, "value [lo, hi]") of the mean cosine between captions of different images, raw and tuned LLM, then
    the tuned minus raw difference; none for a summary without it (runs before it was measured) or with a note."""
    spread = summary.get("anisotropy") or {}
    if spread.get("after") is None:
        return []
    attention = summary.get("cra", {}).get("before_attention", "causal")
    out = []
    for key, label in (("before", f"raw LLM, {attention}"), ("after", "tuned LLM (LoRA, caption-contrastive)")):
        lo, hi = spread[f"{key}_ci95"]
        out.append((label, f"{spread[key]:.3f} [{lo:.3f}, {hi:.3f}]"))
    lo, hi = spread["difference_ci95"]
    out.append(("tuned minus raw, paired", f"{spread['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]"))
    return out


def anisotropy_note(summary: dict) -> str:
    spread = summary.get("anisotropy") or {}
    if spread.get("note"):
        return str(spread["note"])
    return (
        f"Anisotropy: the mean cosine similarity between captions of different images (1: every caption embedding "
        f"points the same way; 0: spread in all directions), over both captions of the {spread.get('pool_size')} "
        f"CRA images ({spread.get('source')}), from the same caches and bootstrap draws as CRA."
    )


def gap_rows(summary: dict) -> list[tuple[str, dict[str, tuple[str, str, str]]]]:
    """(model, {R@1 metric: (seen, unseen, "gap [lo, hi]")}) in percent and points, models in the report's order;
    none for a summary without the wording gap (runs before synthetic_reworded) or with a note."""
    models = (summary.get("wording_gap") or {}).get("models", {})
    out = []
    for model in sorted(models, key=_order):
        cells = {}
        for metric, g in models[model].items():
            lo, hi = g["gap_ci95"]
            cells[metric] = (
                pct(g["seen"]),
                pct(g["unseen"]),
                f"{100 * g['gap']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]",
            )
        out.append((model, cells))
    return out


def gap_note(summary: dict) -> str:
    gap = summary.get("wording_gap") or {}
    if gap.get("note"):
        return str(gap["note"])
    return (
        f"R@1 on {gap.get('seen')} (captions in the training wordings) minus on {gap.get('unseen')} (the same "
        f"{gap.get('images')} images captioned only in held-out wordings), per model; the gap's 95% interval is "
        "paired (the same bootstrap draws of the same images for both sets). A smaller gap: the model understands "
        "a caption worded as it was never trained on; a model near chance on both has no gap to lose."
    )


def gap_sentences(summary: dict) -> list[str]:
    """Per model, whether its R@1 on unseen wordings is below its R@1 on seen ones, outside the noise or not."""
    models = (summary.get("wording_gap") or {}).get("models", {})
    out = []
    for model in sorted(models, key=_order):
        parts = []
        for metric in R1:
            g = models[model].get(metric)
            if g is None:
                continue
            lo, hi = g["gap_ci95"]
            if not g["gap_excludes_zero"]:
                verdict = "no gap outside the noise"
            else:
                verdict = f"{'worse' if g['gap'] > 0 else 'better'} on unseen wordings, outside the noise"
            parts.append(
                f"{SHORT[metric]} {pct(g['seen'])} seen vs {pct(g['unseen'])} unseen, gap {100 * g['gap']:+.1f} points "
                f"(paired 95% CI {100 * lo:+.1f} to {100 * hi:+.1f}): {verdict}"
            )
        if parts:
            out.append(f"{LABELS.get(model, model)}, seen vs unseen wordings: " + "; ".join(parts) + ".")
    return out


def cra_note(summary: dict) -> str:
    cra = summary.get("cra", {})
    if cra.get("note"):
        return str(cra["note"])
    size, source = cra.get("pool_size"), cra.get("source")
    if size is None:
        return "Caption 1 of each held-out image retrieves caption 2 of the same image among all images."
    note = (
        f"Caption 1 of each of {size} held-out images ({source}) retrieves caption 2 of the same image among all "
        f"{size}; top-1 by cosine, ties count as misses; 95% bootstrap intervals"
    )
    if cra.get("measured_in", "").startswith("evaluate"):
        note += (
            f", the same draws for both LLMs (paired). Read from the stored {cra.get('store_dtype', 'float16')} "
            "caption-embedding caches of the raw and the tuned LLM (the caches stage 2 trains and is scored on)"
        )
        if cra.get("before_bidirectional") is not None:
            note += "; the mask-removed row was measured in stage 1"
    return note + "."


def _verdict(c: dict) -> str:
    if not c["intervals_overlap"]:
        return "ahead, outside the noise" if c["difference"] > 0 else "behind, outside the noise"
    if c["difference_excludes_zero"]:
        side = "ahead" if c["difference"] > 0 else "behind"
        return f"{side} by the paired test, but the two intervals overlap"
    return "within the noise: the intervals overlap"


def comparison_sentences(summary: dict) -> list[str]:
    """Plain statements, per benchmark and baseline, of LLM2CLIP's R@1 lead and whether it is outside the noise."""
    out = []
    for bench, pairs in summary.get("comparisons", {}).items():
        for pair, metrics in sorted(pairs.items(), key=lambda kv: _order(kv[0].split(" vs ", 1)[1])):
            other = pair.split(" vs ", 1)[1]
            parts = []
            for metric in R1:
                c = metrics.get(metric)
                if c is not None:
                    lo, hi = c["difference_ci95"]
                    parts.append(
                        f"{SHORT[metric]} {100 * c['difference']:+.1f} points (paired 95% CI {100 * lo:+.1f} to "
                        f"{100 * hi:+.1f}): {_verdict(c)}"
                    )
            if parts:
                out.append(f"{bench}, LLM2CLIP vs {LABELS.get(other, other)}: " + "; ".join(parts) + ".")
    return out


def _order(model: str) -> int:
    return list(LABELS).index(model) if model in LABELS else len(LABELS)


def plot_png(summary: dict) -> bytes:
    """Grouped bars with 95% error bars: R@1 in both directions, per benchmark and model."""
    benchmarks = list(summary["retrieval"])
    models = sorted(next(iter(summary["retrieval"].values())), key=_order)
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(5.8 * len(benchmarks), 4.2), squeeze=False)
    width = 0.8 / len(models)
    for ax, b in zip(axes[0], benchmarks, strict=True):
        for j, m in enumerate(models):
            v = summary["retrieval"][b][m]
            vals = [100 * v[k] for k in R1]
            errs = [[100 * (v[k] - v[f"{k}_ci95"][0]) for k in R1], [100 * (v[f"{k}_ci95"][1] - v[k]) for k in R1]]
            bars = ax.bar([x + j * width for x in range(2)], vals, width, yerr=errs, capsize=3, label=LABELS.get(m, m))
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(2)], ["image → text R@1", "text → image R@1"])
        ax.set_ylim(0, 105)
        ax.set_ylabel("recall@1 (%), 95% CI")
        ax.set_title(b)
    axes[0][0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def zero_shot_rows(summary: dict) -> list[tuple[str, str, dict]]:
    return [(d, m, v) for d, models in summary.get("zero_shot", {}).items() for m, v in models.items()]


def markdown(summary: dict, plot_name: str) -> str:
    lines = [
        "# LLM2CLIP evaluation",
        "",
        f"LLM: `{summary['llm']}`. {setup(summary)}",
        "",
        "## Caption retrieval accuracy (CRA, %)",
        "",
        cra_note(summary),
        "",
        "| LLM | CRA [95% CI] |",
        "|---|---:|",
    ]
    lines += [f"| {label} | {value} |" for label, value in cra_rows(summary)]
    if summary.get("anisotropy"):
        lines += ["", anisotropy_note(summary)]
    if anisotropy_rows(summary):
        lines += ["", "| LLM | mean cosine, captions of different images [95% CI] |", "|---|---:|"]
        lines += [f"| {label} | {value} |" for label, value in anisotropy_rows(summary)]
    lines += [
        "",
        "## Zero-shot retrieval (%, [95% CI])",
        "",
        "| benchmark | model | images | " + " | ".join(COLUMNS) + " |",
        "|---|---|---:|" + "---:|" * len(COLUMNS),
    ]
    for b, m, v in _rows(summary):
        cells = " | ".join(with_ci(v, c) if c in R1 else pct(v[c]) for c in COLUMNS)
        lines.append(f"| {b} | {LABELS.get(m, m)} | {v.get('images', '')} | {cells} |")
    lines += ["", "**Is the lead real?**", ""] + [f"- {s}" for s in comparison_sentences(summary)]
    if summary.get("wording_gap"):
        lines += ["", "## Seen vs unseen wordings (R@1, %)", "", gap_note(summary)]
    if gap_rows(summary):
        head = " | ".join(f"{SHORT[m]} seen | unseen | gap [95% CI]" for m in R1)
        lines += ["", f"| model | {head} |", "|---|" + "---:|" * 3 * len(R1)]
        for model, cells in gap_rows(summary):
            lines.append(f"| {LABELS.get(model, model)} | " + " | ".join(" | ".join(cells[m]) for m in R1) + " |")
        lines += [""] + [f"- {s}" for s in gap_sentences(summary)]
    if summary.get("retrieval_average"):
        lines += ["", "Average over the evaluated sets (%):", "", "| model | I→T R@1 | T→I R@1 |", "|---|---:|---:|"]
        for m, v in summary["retrieval_average"].items():
            lines.append(f"| {LABELS.get(m, m)} | {pct(v[R1[0]])} | {pct(v[R1[1]])} |")
    if summary.get("zero_shot"):
        lines += [
            "",
            "## Zero-shot classification (%)",
            "",
            "| dataset | model | top-1 [95% CI] | top-5 |",
            "|---|---|---:|---:|",
        ]
        for d, m, v in zero_shot_rows(summary):
            lines.append(f"| {d} | {LABELS.get(m, m)} | {with_ci(v, 'acc1')} | {pct(v['acc5'])} |")
    lines += ["", f"![R@1 per benchmark]({plot_name})", "", "## Deviations from the paper", ""]
    lines += markdown_table().splitlines()
    lines += ["", "## Wall time per stage (s)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["timings_s"].items()]
    lines += ["", cache_line(summary)]
    return "\n".join(lines) + "\n"


def html_page(summary: dict, png: bytes) -> str:
    """One self-contained page (the plot is inlined), readable in the Kubeflow UI's HTML viewer."""
    esc = html.escape
    head = "".join(f"<th>{esc(c.replace('_', ' '))}</th>" for c in COLUMNS)
    body = []
    for b, m, v in _rows(summary):
        cells = "".join(f"<td>{esc(with_ci(v, c) if c in R1 else pct(v[c]))}</td>" for c in COLUMNS)
        body.append(f"<tr><td>{esc(b)}</td><td>{esc(LABELS.get(m, m))}</td><td>{v.get('images', '')}</td>{cells}</tr>")
    cra = "".join(f"<tr><td>{esc(label)}</td><td>{esc(value)}</td></tr>" for label, value in cra_rows(summary))
    anisotropy = ""
    if summary.get("anisotropy"):
        rows = "".join(
            f"<tr><td>{esc(label)}</td><td>{esc(value)}</td></tr>" for label, value in anisotropy_rows(summary)
        )
        table = f"<table><tr><th>LLM</th><th>mean cosine, captions of different images [95% CI]</th></tr>{rows}</table>"
        anisotropy = f"<p class='note'>{esc(anisotropy_note(summary))}</p>" + (table if rows else "")
    gap = ""
    if summary.get("wording_gap"):
        head = "".join(f"<th>{esc(SHORT[m])} seen</th><th>unseen</th><th>gap [95% CI]</th>" for m in R1)
        rows = "".join(
            f"<tr><td>{esc(LABELS.get(model, model))}</td>"
            + "".join(f"<td>{esc(cell)}</td>" for m in R1 for cell in cells[m])
            + "</tr>"
            for model, cells in gap_rows(summary)
        )
        items = "".join(f"<li>{esc(s)}</li>" for s in gap_sentences(summary))
        gap = f"<h2>Seen vs unseen wordings (R@1, %)</h2><p class='note'>{esc(gap_note(summary))}</p>" + (
            f"<table><tr><th>model</th>{head}</tr>{rows}</table><ul>{items}</ul>" if rows else ""
        )
    sentences = "".join(f"<li>{esc(s)}</li>" for s in comparison_sentences(summary))
    average = ""
    if summary.get("retrieval_average"):
        rows = "".join(
            f"<tr><td>{esc(LABELS.get(m, m))}</td><td>{pct(v[R1[0]])}</td><td>{pct(v[R1[1]])}</td></tr>"
            for m, v in summary["retrieval_average"].items()
        )
        average = (
            "<p>Average over the evaluated sets (%):</p><table><tr><th>model</th><th>I→T R@1</th><th>T→I R@1</th>"
            f"</tr>{rows}</table>"
        )
    zero_shot = ""
    if summary.get("zero_shot"):
        rows = "".join(
            f"<tr><td>{esc(d)}</td><td>{esc(LABELS.get(m, m))}</td><td>{esc(with_ci(v, 'acc1'))}</td>"
            f"<td>{pct(v['acc5'])}</td></tr>"
            for d, m, v in zero_shot_rows(summary)
        )
        note = esc(
            "Class names x prompt templates through each model's own text side (LLM2CLIP: the LLM with its adapter "
            "and pooling, then the stage-2 adapter; CLIP: its text tower). single: 'a photo of a {c}.'; ensemble: "
            "open_clip's 7 ImageNet templates, averaged. Ties count as misses; 95% bootstrap intervals."
        )
        zero_shot = (
            f"<h2>Zero-shot classification (%)</h2><p class='note'>{note}</p><table><tr><th>dataset</th>"
            f"<th>model</th><th>top-1 [95% CI]</th><th>top-5</th></tr>{rows}</table>"
        )
    deviations = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in HEADER) + "</tr>"
    deviations += "".join("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in DEVIATIONS)
    timings = "".join(f"<tr><td>{esc(k)}</td><td>{v:.1f}</td></tr>" for k, v in summary["timings_s"].items())
    img = base64.b64encode(png).decode()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>LLM2CLIP evaluation</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:nth-child(-n+2) {{ text-align: left; }}
th {{ background: #f0f0f0; }}
th:nth-child(-n+2) {{ text-align: left; }}
.note {{ color: #555; font-size: 0.9em; }}
table.text td, table.text th {{ text-align: left; vertical-align: top; }}
li {{ margin: 0.3em 0; }}
</style></head><body>
<h1>LLM2CLIP evaluation</h1>
<p>LLM: <code>{esc(summary["llm"])}</code>. {esc(setup(summary))}</p>
<h2>Caption retrieval accuracy (%)</h2>
<p class="note">{esc(cra_note(summary))}</p>
<table><tr><th>LLM</th><th>CRA [95% CI]</th></tr>{cra}</table>
{anisotropy}
<h2>Zero-shot retrieval (%)</h2>
<p class="note">R@1 with its 95% bootstrap interval (1,000 resamples of the eval images). Image→text is a hit when
any caption of the image ranks within k; text→image is scored per caption; ties count against the query.</p>
<table><tr><th>benchmark</th><th>model</th><th>images</th>{head}</tr>{"".join(body)}</table>
<h3>Is the lead real?</h3>
<ul>{sentences}</ul>
{gap}
{average}
<img alt="R@1 per benchmark and model, with 95% intervals" src="data:image/png;base64,{img}" style="max-width:100%">
{zero_shot}
<h2>Deviations from the paper</h2>
<table class="text">{deviations}</table>
<h2>Wall time per stage (s)</h2>
<p class="note">{esc(cache_line(summary))}</p>
<table><tr><th>stage</th><th>seconds</th></tr>{timings}</table>
</body></html>
"""


def headline(summary: dict) -> str:
    """The console summary: CRA and anisotropy, R@1 with its interval per benchmark and model, the seen-vs-unseen
    wording gap per model, and the plain comparisons. A summary of an older run, without anisotropy or the gap,
    prints as it did (the README's sample is one)."""
    cra = summary.get("cra", {})
    lines = ["CRA (held-out captions, %): " + "; ".join(f"{label}: {value}" for label, value in cra_rows(summary))]
    if cra.get("note"):
        lines.append(f"CRA: {cra['note']}")
    if anisotropy_rows(summary):
        rows = "; ".join(f"{label}: {value}" for label, value in anisotropy_rows(summary))
        lines.append(f"mean cosine between captions of different images (anisotropy): {rows}")
    elif (summary.get("anisotropy") or {}).get("note"):
        lines.append(f"anisotropy: {summary['anisotropy']['note']}")
    cache = summary.get("cache")
    if cache:
        lines.append(f"embedding cache: {cache['hits']} captions found, {cache['misses']} embedded")
    width = max((len(m) for _, m, _ in _rows(summary)), default=len("model"))
    bench = max([17, *(len(b) for b, _, _ in _rows(summary))])  # 17: "synthetic_short" and a margin
    lines.append(f"{'benchmark':<{bench}} {'model':<{width}} {'I->T R@1 [95% CI]':>20} {'T->I R@1 [95% CI]':>20}")
    for b, m, v in _rows(summary):
        lines.append(f"{b:<{bench}} {m:<{width}} {with_ci(v, R1[0]):>20} {with_ci(v, R1[1]):>20}")
    lines += gap_headline(summary)
    for d, m, v in zero_shot_rows(summary):
        lines.append(f"zero-shot {d} {m}: top-1 {with_ci(v, 'acc1')}, top-5 {pct(v['acc5'])}")
    lines += comparison_sentences(summary)
    return "\n".join(lines)


def gap_headline(summary: dict) -> list[str]:
    """The console's wording-gap table: per model, R@1 on seen and unseen wordings and the gap with its interval;
    nothing for a summary without it (runs before synthetic_reworded)."""
    gap = summary.get("wording_gap")
    if not gap:
        return []
    if gap.get("note"):
        return [f"wording gap: {gap['note']}"]
    lines = [
        f"seen vs unseen wordings, R@1 %: {gap['seen']} minus {gap['unseen']} (the same {gap['images']} images), "
        "gap with its paired 95% CI"
    ]
    rows = gap_rows(summary)
    width = max(len("model"), *(len(m) for m, _ in rows))
    head = "".join(f" {d + ' seen':>10} {'unseen':>7} {'gap [95% CI]':>20}" for d in ("I->T", "T->I"))
    lines.append(f"{'model':<{width}}{head}")
    for model, cells in rows:
        lines.append(f"{model:<{width}}" + "".join(f" {a:>10} {b:>7} {c:>20}" for a, b, c in (cells[m] for m in R1)))
    return lines


def write_reports(summary: dict, out_dir: str) -> None:
    png = plot_png(summary)
    with storage.open_write(storage.join(out_dir, "retrieval_r1.png")) as f:
        f.write(png)
    with storage.open_write(storage.join(out_dir, "report.md")) as f:
        f.write(markdown(summary, "retrieval_r1.png").encode())
    with storage.open_write(storage.join(out_dir, "report.html")) as f:
        f.write(html_page(summary, png).encode())
