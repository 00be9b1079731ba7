"""The report: each verdict sentence where it is the right reading of the numbers, and the deviations list that the
README's table and the report both render from."""

import html
from pathlib import Path

import pytest
import torch

from llm2clip import deviations, evaluate, report

N = 200  # eval images, one caption each: both R@1 directions get the same hits, so the same verdict

# The verdicts `report._verdict` can give, by the test that builds a case for each.
OUTSIDE = "outside the noise"
PAIRED_ONLY = "by the paired test, but the two intervals overlap"
WITHIN = "within the noise"
VERDICTS = (OUTSIDE, PAIRED_ONLY, WITHIN)


def hits_of(image_hits: list[int]) -> dict[str, torch.Tensor]:
    """Hits [N] bool of every column the report shows (R@1, 5, 10 both ways): the given images hit, the rest miss."""
    h = torch.zeros(N, dtype=torch.bool)
    h[image_hits] = True
    return {metric: h.clone() for metric in report.COLUMNS}


def summary_of(models: dict[str, dict[str, torch.Tensor]], monkeypatch) -> dict:
    """The report's summary from per-model hits, through the real scoring: evaluate.score_benchmark's bootstrap
    (the same draws of the same images for every model) and evaluate.compare. Only scoring a model is replaced."""
    monkeypatch.setattr(evaluate, "score_model", lambda model_dir, *args: (models[model_dir], torch.arange(N)))
    scores, comparisons, _ = evaluate.score_benchmark(
        "unused", "synthetic_long", {m: m for m in models}, {}, evaluate.EvaluateConfig()
    )
    return {"retrieval": {"synthetic_long": scores}, "comparisons": {"synthetic_long": comparisons}}


def sentence_for(summary: dict, other: str) -> str:
    label = report.LABELS[other]
    (sentence,) = [s for s in report.comparison_sentences(summary) if f"LLM2CLIP vs {label}:" in s]
    return sentence


def verdicts_in(sentence: str) -> list[str]:
    """The verdict given for each of the two R@1 metrics, in order (I->T, T->I)."""
    parts = sentence.split("; ")
    assert len(parts) == 2 and ": I→T R@1 " in parts[0] and parts[1].startswith("T→I R@1 "), sentence
    return [[v for v in VERDICTS if v in part] for part in parts]


def test_a_lead_outside_the_noise(monkeypatch):
    """LLM2CLIP hits 160 of 200 images, the CLIP baseline 40: the two 95% intervals (each about +-6 points) are far
    apart, so the plain reading says "outside the noise", ahead for the lead and behind for the trail."""
    summary = summary_of(
        {
            "llm2clip": hits_of(list(range(160))),
            "clip_baseline": hits_of(list(range(40))),
            "llm2clip_raw_llm": hits_of(list(range(N))),
        },
        monkeypatch,
    )
    ahead, behind = sentence_for(summary, "clip_baseline"), sentence_for(summary, "llm2clip_raw_llm")
    assert verdicts_in(ahead) == [[OUTSIDE], [OUTSIDE]], ahead
    assert ahead.count("ahead, outside the noise") == 2 and "+60.0 points" in ahead
    assert verdicts_in(behind) == [[OUTSIDE], [OUTSIDE]], behind
    assert behind.count("behind, outside the noise") == 2 and "-20.0 points" in behind


def test_a_lead_only_the_paired_test_sees(monkeypatch):
    """LLM2CLIP hits every image the baseline hits (100 of 200) and 12 more. Each model's own interval is about
    +-7 points, so they overlap; but on the same draws the difference is never negative and is 0 only when none
    of the 12 images is drawn (probability about e**-12 per replicate), so the paired interval excludes 0."""
    summary = summary_of(
        {"llm2clip": hits_of(list(range(112))), "clip_baseline": hits_of(list(range(100)))}, monkeypatch
    )
    comparison = summary["comparisons"]["synthetic_long"]["llm2clip vs clip_baseline"]["image_to_text_R@1"]
    assert comparison["intervals_overlap"] and comparison["difference_ci95"][0] > 0  # the premise
    sentence = sentence_for(summary, "clip_baseline")
    assert verdicts_in(sentence) == [[PAIRED_ONLY], [PAIRED_ONLY]], sentence
    assert sentence.count("ahead by the paired test") == 2


def test_a_difference_within_the_noise(monkeypatch):
    """Both models hit 100 of 200 images, but different ones (LLM2CLIP the first 100, the baseline the last 100):
    the difference is 0 and its paired interval is wide on both sides (about +-14 points)."""
    summary = summary_of(
        {"llm2clip": hits_of(list(range(100))), "clip_baseline": hits_of(list(range(100, N)))}, monkeypatch
    )
    lo, hi = summary["comparisons"]["synthetic_long"]["llm2clip vs clip_baseline"]["text_to_image_R@1"][
        "difference_ci95"
    ]
    assert lo < -0.05 and hi > 0.05  # the premise
    sentence = sentence_for(summary, "clip_baseline")
    assert verdicts_in(sentence) == [[WITHIN], [WITHIN]], sentence
    assert "+0.0 points" in sentence


def test_each_comparison_gets_its_own_verdict_in_every_format(monkeypatch):
    """Three baselines with the three verdicts in one summary: each sentence carries its own, in the console, the
    Markdown and the HTML report."""
    summary = summary_of(
        {
            "llm2clip": hits_of(list(range(112))),
            "clip_baseline": hits_of(list(range(20))),  # outside the noise
            "llm2clip_raw_llm": hits_of(list(range(100))),  # only the paired test
            "llm2clip_no_centring": hits_of(list(range(88, N))),  # within the noise
        },
        monkeypatch,
    )
    expected = {"clip_baseline": OUTSIDE, "llm2clip_raw_llm": PAIRED_ONLY, "llm2clip_no_centring": WITHIN}
    for other, verdict in expected.items():
        assert verdicts_in(sentence_for(summary, other)) == [[verdict], [verdict]], other
    summary |= {"llm": "tiny", "timings_s": {"evaluate": 1.0}}
    md, page = report.markdown(summary, "plot.png"), report.html_page(summary, b"png")
    for sentence in report.comparison_sentences(summary):
        assert f"- {sentence}" in md
        assert f"<li>{report.html.escape(sentence)}</li>" in page


# ----------------------------------------------------------------------------------------------- deviations

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_deviations_table_is_the_render_of_the_one_list():
    """The README's "Deviations from the paper" table is exactly `deviations.markdown_table()`: edit the list in
    llm2clip/deviations.py and paste its render, or this fails (the two drifted apart once: 8 rows against 7)."""
    text = README.read_text()
    section = text.split("\n## Deviations from the paper\n", 1)[1].split("\n## ", 1)[0]
    table = "".join(line + "\n" for line in section.splitlines() if line.startswith("|"))
    assert table == deviations.markdown_table()
    assert len(table.splitlines()) == 2 + len(deviations.DEVIATIONS)


def test_both_reports_carry_every_deviation():
    summary = {"llm": "tiny", "retrieval": {}, "timings_s": {"evaluate": 1.0}}
    md, page = report.markdown(summary, "plot.png"), report.html_page(summary, b"png")
    assert deviations.markdown_table() in md
    for row in deviations.DEVIATIONS:
        for cell in row:
            assert f"<td>{html.escape(cell)}</td>" in page, (row.what, cell[:40])


def test_a_cell_that_would_break_the_table_is_named():
    bad = deviations.Deviation("pipes", "a | b", "here", "why")
    with pytest.raises(ValueError, match="deviation 'pipes': field 'paper'"):
        deviations.markdown_table((bad,))
