"""The evaluation report: a Markdown and a self-contained HTML page (table + plot) from summary.json."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llm2clip import storage  # noqa: E402

LABELS = {
    "llm2clip": "LLM2CLIP (tuned LLM)",
    "llm2clip_raw_llm": "LLM2CLIP, raw LLM",
    "clip_baseline": "CLIP baseline (77-token text tower)",
}
COLUMNS = [
    "image_to_text_R@1",
    "text_to_image_R@1",
    "image_to_text_R@5",
    "text_to_image_R@5",
    "image_to_text_R@10",
    "text_to_image_R@10",
]


def setup(summary: dict) -> str:
    """One sentence on what was trained, so the table reads without the JSON."""
    m = summary.get("models", {}).get("llm2clip")
    if not m:
        return ""
    init = f"pretrained {m['pretrained']}" if m["pretrained"] else "random init"
    return (
        f"All three models: vision tower {m['vision']} ({init}), {m['epochs']} epochs at batch {m['batch_size']}, "
        "same images and captions. synthetic_long: one long caption per image, images in groups of four that "
        "share the same objects and differ only in size, fill and position (hard negatives)."
    )


def cache_line(summary: dict) -> str:
    c = summary.get("cache")
    return f"Embedding cache this run: {c['hits']} distinct captions found, {c['misses']} embedded." if c else ""


def _rows(summary: dict) -> list[tuple[str, str, dict]]:
    return [(b, m, v) for b, models in summary["retrieval"].items() for m, v in models.items()]


def plot_png(summary: dict) -> bytes:
    """Grouped bars: R@1 in both directions, per benchmark and model."""
    benchmarks = list(summary["retrieval"])
    models = list(next(iter(summary["retrieval"].values())))
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(5.5 * len(benchmarks), 3.8), squeeze=False)
    width = 0.8 / len(models)
    for ax, b in zip(axes[0], benchmarks, strict=True):
        for j, m in enumerate(models):
            vals = [100 * summary["retrieval"][b][m][k] for k in ("image_to_text_R@1", "text_to_image_R@1")]
            bars = ax.bar([x + j * width for x in range(2)], vals, width, label=LABELS.get(m, m))
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(2)], ["image → text R@1", "text → image R@1"])
        ax.set_ylim(0, 105)
        ax.set_ylabel("recall@1 (%)")
        ax.set_title(b)
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def markdown(summary: dict, plot_name: str) -> str:
    lines = [
        "# LLM2CLIP evaluation",
        "",
        f"LLM: `{summary['llm']}`. {setup(summary)}",
        "",
        "## Caption retrieval accuracy (CRA, held-out short captions)",
        "",
        "| before tuning | after tuning |",
        "|---:|---:|",
        f"| {100 * summary['cra']['before']:.1f}% | {100 * summary['cra']['after']:.1f}% |",
        "",
        "## Zero-shot retrieval (%)",
        "",
        "| benchmark | model | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for b, m, v in _rows(summary):
        lines.append(f"| {b} | {LABELS.get(m, m)} | " + " | ".join(f"{100 * v[c]:.1f}" for c in COLUMNS) + " |")
    lines += [
        "",
        f"![R@1 per benchmark]({plot_name})",
        "",
        "## Wall time per stage (s)",
        "",
        "| stage | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["timings_s"].items()]
    lines += ["", cache_line(summary)]
    return "\n".join(lines) + "\n"


def html_page(summary: dict, png: bytes) -> str:
    """One self-contained page (the plot is inlined), readable in the Kubeflow UI's HTML viewer."""
    best: dict[tuple[str, str], float] = {}
    for b, _, v in _rows(summary):
        for c in COLUMNS:
            best[(b, c)] = max(best.get((b, c), 0.0), v[c])
    body = []
    for b, m, v in _rows(summary):
        cells = "".join(f"<td class='{'best' if v[c] == best[(b, c)] else ''}'>{100 * v[c]:.1f}</td>" for c in COLUMNS)
        body.append(f"<tr><td>{html.escape(b)}</td><td>{html.escape(LABELS.get(m, m))}</td>{cells}</tr>")
    head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in COLUMNS)
    timings = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f}</td></tr>" for k, v in summary["timings_s"].items())
    img = base64.b64encode(png).decode()
    cra = summary["cra"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>LLM2CLIP evaluation</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:nth-child(-n+2) {{ text-align: left; }}
th {{ background: #f0f0f0; }}
th:nth-child(-n+2) {{ text-align: left; }}
td.best {{ font-weight: bold; background: #e6f4ea; }}
.note {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>LLM2CLIP evaluation</h1>
<p>LLM: <code>{html.escape(summary["llm"])}</code>. {html.escape(setup(summary))}</p>
<h2>Caption retrieval accuracy</h2>
<p>Held-out short captions: caption 1 of each image retrieves caption 2 of the same image among all images.</p>
<table><tr><th>before tuning</th><th>after tuning</th></tr>
<tr><td>{100 * cra["before"]:.1f}%</td><td>{100 * cra["after"]:.1f}%</td></tr></table>
<h2>Zero-shot retrieval (%)</h2>
<p class="note">Best value per benchmark and column in bold. Image→text is a hit when any caption of the image ranks
within k; text→image is scored per caption.</p>
<table><tr><th>benchmark</th><th>model</th>{head}</tr>{"".join(body)}</table>
<img alt="R@1 per benchmark and model" src="data:image/png;base64,{img}" style="max-width:100%">
<h2>Wall time per stage (s)</h2>
<p class="note">{html.escape(cache_line(summary))}</p>
<table><tr><th>stage</th><th>seconds</th></tr>{timings}</table>
</body></html>
"""


def write_reports(summary: dict, out_dir: str) -> None:
    png = plot_png(summary)
    with storage.open_write(storage.join(out_dir, "retrieval_r1.png")) as f:
        f.write(png)
    with storage.open_write(storage.join(out_dir, "report.md")) as f:
        f.write(markdown(summary, "retrieval_r1.png").encode())
    with storage.open_write(storage.join(out_dir, "report.html")) as f:
        f.write(html_page(summary, png).encode())
