"""The report: each verdict sentence where it is the right reading of the numbers, and the deviations list that the
README's table and the report both render from."""

import html
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2clip import data, deviations, evaluate, report, synthetic

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


# ----------------------------------------------------------------------------------------------- wording gap

EVAL_IMAGES = 12  # the tiny dataset's eval sets


def tiny_hits(image_hits: list[int]) -> dict[str, torch.Tensor]:
    h = torch.zeros(EVAL_IMAGES, dtype=torch.bool)
    h[image_hits] = True
    return {metric: h.clone() for metric in report.COLUMNS}


def gap_summary(dataset: str, hits: dict[str, dict[str, dict]], monkeypatch) -> tuple[dict, dict]:
    """Scores both wordings through the real evaluate.score_benchmark (only scoring a model is replaced: `hits`
    {benchmark: {model: hits}}) and the gap through evaluate.wording_gap; returns (summary, replicates)."""
    monkeypatch.setattr(
        evaluate,
        "score_model",
        lambda model_dir, dataset_dir, benchmark, *args: (hits[benchmark][model_dir], torch.arange(EVAL_IMAGES)),
    )
    retrieval, comparisons, replicates = {}, {}, {}
    for bench in (evaluate.SEEN, evaluate.UNSEEN):
        models = {m: m for m in hits[bench]}
        retrieval[bench], comparisons[bench], replicates[bench] = evaluate.score_benchmark(
            dataset, bench, models, {}, evaluate.EvaluateConfig()
        )
    summary = {
        "retrieval": retrieval,
        "comparisons": comparisons,
        "wording_gap": evaluate.wording_gap(dataset, retrieval, replicates),
        "llm": "tiny",
        "timings_s": {"evaluate": 1.0},
    }
    return summary, replicates


def test_the_wording_gap_is_paired_per_image_and_headlined(tiny_dataset, monkeypatch):
    """LLM2CLIP hits 10 of 12 images on seen wordings and 6 of those on unseen ones: a gap of 4/12 whose paired
    replicates are never negative. The CLIP baseline hits the same 3 images in both: a gap of exactly 0 with the
    interval [0, 0] (unpaired draws would give an interval as wide as its own). The raw LLM hits 3 images in each,
    different ones: a gap of 0 that the noise covers on both sides."""
    seen = {"llm2clip": tiny_hits(list(range(10))), "clip_baseline": tiny_hits([0, 1, 2])}
    unseen = {"llm2clip": tiny_hits(list(range(6))), "clip_baseline": tiny_hits([0, 1, 2])}
    seen["llm2clip_raw_llm"], unseen["llm2clip_raw_llm"] = tiny_hits([0, 1, 2]), tiny_hits([3, 4, 5])
    summary, replicates = gap_summary(tiny_dataset, {evaluate.SEEN: seen, evaluate.UNSEEN: unseen}, monkeypatch)
    gap = summary["wording_gap"]
    assert gap["seen"] == "synthetic_long" and gap["unseen"] == "synthetic_reworded" and gap["images"] == 12
    metric = "image_to_text_R@1"
    main, base, raw = (gap["models"][m][metric] for m in ("llm2clip", "clip_baseline", "llm2clip_raw_llm"))
    assert main["seen"] == pytest.approx(10 / 12) and main["unseen"] == pytest.approx(6 / 12)
    assert main["gap"] == pytest.approx(4 / 12) and main["gap_excludes_zero"] and main["gap_ci95"][0] > 0
    draws = evaluate.bootstrap_indices(EVAL_IMAGES, 1000, 0)  # what score_benchmark drew for both sets
    by_hand = seen["llm2clip"][metric].double().numpy()[draws] - unseen["llm2clip"][metric].double().numpy()[draws]
    assert main["gap_ci95"] == pytest.approx(evaluate.ci95(by_hand.mean(1)))
    np.testing.assert_allclose(
        replicates["synthetic_long"]["llm2clip"][metric] - replicates["synthetic_reworded"]["llm2clip"][metric],
        by_hand.mean(1),
    )
    assert base["gap"] == 0.0 and base["gap_ci95"] == [0.0, 0.0] and not base["gap_excludes_zero"]
    assert raw["gap"] == 0.0 and raw["gap_ci95"][0] < 0 < raw["gap_ci95"][1] and not raw["gap_excludes_zero"]

    headline = report.headline(summary)
    assert "seen vs unseen wordings, R@1 %: synthetic_long minus synthetic_reworded (the same 12 images)" in headline
    (main_row,) = [line for line in headline.splitlines() if line.startswith("llm2clip ")]
    lo, hi = main["gap_ci95"]
    assert main_row.split()[1:4] == ["83.3", "50.0", "+33.3"] and f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" in main_row
    (base_row,) = [line for line in headline.splitlines() if line.startswith("clip_baseline ")]
    assert "+0.0 [+0.0, +0.0]" in base_row
    # the LLM2CLIP vs CLIP-baseline difference on unseen wordings, with its interval, among the sentences
    (reworded,) = [
        s for s in report.comparison_sentences(summary) if s.startswith("synthetic_reworded, LLM2CLIP vs CLIP")
    ]
    assert "I→T R@1 +25.0 points (paired 95% CI" in reworded and reworded in headline
    md, page = report.markdown(summary, "plot.png"), report.html_page(summary, b"png")
    sentences = report.gap_sentences(summary)
    assert len(sentences) == 3 and "worse on unseen wordings, outside the noise" in sentences[0]
    assert sentences[1].startswith("LLM2CLIP, raw LLM") and "no gap outside the noise" in sentences[1]
    for sentence in [*sentences, reworded]:
        assert f"- {sentence}" in md and f"<li>{html.escape(sentence)}</li>" in page
    assert "| LLM2CLIP (tuned LLM) | 83.3 | 50.0 | +33.3 [" in md
    assert "<td>83.3</td><td>50.0</td><td>+33.3 [" in page


def test_a_wording_gap_needs_the_same_images_in_the_same_order(tiny_dataset, tmp_path, monkeypatch):
    """A dataset whose reworded set holds synthetic_long's images in another order gets a note, not a gap that
    would pair different images."""
    dataset = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, dataset)
    records = list(data.read_split(str(dataset / data.split_path(evaluate.UNSEEN))))
    shutil.rmtree(dataset / data.split_path(evaluate.UNSEEN))
    data.write_split(
        ({"__key__": r["key"], "png": synthetic.png_bytes(r["image"]), "json": r["meta"]} for r in reversed(records)),
        str(dataset / data.split_path(evaluate.UNSEEN)),
        shard_size=100,
    )
    hits = {b: {"llm2clip": tiny_hits([0])} for b in (evaluate.SEEN, evaluate.UNSEEN)}
    summary, _ = gap_summary(str(dataset), hits, monkeypatch)
    assert "do not hold the same keys in the same order" in summary["wording_gap"]["note"]
    assert "wording gap: no wording gap:" in report.headline(summary)
    assert report.gap_rows(summary) == [] and report.gap_note(summary) in report.markdown(summary, "plot.png")


def test_anisotropy_sits_beside_cra_in_every_format():
    summary = {
        "llm": "tiny",
        "retrieval": {},
        "timings_s": {"evaluate": 1.0},
        "cra": {"before": 0.1, "before_ci95": [0.05, 0.15], "after": 0.3, "after_ci95": [0.2, 0.4]},
        "anisotropy": {
            "before": 0.99312,
            "before_ci95": [0.9921, 0.9941],
            "after": 0.98044,
            "after_ci95": [0.9781, 0.9828],
            "difference": -0.01268,
            "difference_ci95": [-0.0149, -0.0104],
            "pool_size": 200,
            "source": "synthetic_short",
        },
    }
    expected = ["0.993 [0.992, 0.994]", "0.980 [0.978, 0.983]", "-0.013 [-0.015, -0.010]"]
    assert [value for _, value in report.anisotropy_rows(summary)] == expected
    (line,) = [line for line in report.headline(summary).splitlines() if "anisotropy" in line]
    assert all(v in line for v in expected)
    md, page = report.markdown(summary, "plot.png"), report.html_page(summary, b"png")
    assert md.index("CRA [95% CI]") < md.index("| tuned LLM (LoRA, caption-contrastive) | 0.980 [0.978, 0.983] |")
    assert md.index("## Caption retrieval") < md.index("mean cosine") < md.index("## Zero-shot retrieval")
    assert "<td>0.993 [0.992, 0.994]</td>" in page
    # a summary of an older run, without it: no anisotropy anywhere
    del summary["anisotropy"]
    assert "anisotropy" not in report.headline(summary)
    assert "captions of different images" not in report.markdown(summary, "p.png")


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
