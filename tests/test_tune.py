"""Stage 1: pair and hard-negative sampling at scale, query instructions, gradient clipping, CRA (pool, intervals,
causal and bidirectional before; off by default), the manifest."""

import dataclasses
import math
import random
import tracemalloc
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F

from llm2clip import artifacts, cache_caption_embeddings, data, metrics, text_encoder, tune_caption_encoder

KINDS = ("raw", "short", "long")


class LazyGroups(Sequence):
    """`n` images whose captions are made on demand and name their image and kind ("short 17 b"). Image j has two
    short captions, a long one when j % 3 == 0 and a raw one when j % 5 == 0. Counts item accesses and refuses
    iteration, so a sampler that walks every image fails loudly."""

    def __init__(self, n: int) -> None:
        self.n, self.accessed = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> list[tuple[str, str]]:
        if not 0 <= j < self.n:
            raise IndexError(j)
        self.accessed += 1
        out = [("short", f"short {j} a"), ("short", f"short {j} b")]
        out += [("long", f"long {j} a")] if j % 3 == 0 else []
        return out + ([("raw", f"raw {j} a")] if j % 5 == 0 else [])

    def __iter__(self):
        raise AssertionError("the sampler iterated over every image")


def owner(caption: str) -> tuple[str, int]:
    kind, j, _ = caption.split()
    return kind, int(j)


def test_hard_negatives_are_outside_the_batch_and_of_the_positives_kind():
    groups, rng = LazyGroups(50), random.Random(0)
    kinds_seen = set()
    for _ in range(200):
        b = tune_caption_encoder.sample_batch(groups, 16, True, rng)
        batch = {owner(a)[1] for a in b.anchors}
        assert len(batch) == 16 and len(b.negatives) == 16
        for a, p, n, direction in zip(b.anchors, b.positives, b.negatives, b.directions, strict=True):
            assert owner(a)[1] == owner(p)[1] and a != p  # two distinct captions of one image
            assert owner(n)[1] not in batch
            assert owner(n)[0] == owner(p)[0]
            assert direction == (owner(a)[0], owner(p)[0])
            kinds_seen.add(owner(p)[0])
    assert kinds_seen == set(KINDS)  # every kind was exercised, including the rarer ones


def test_sampling_a_million_images_costs_the_batch_not_the_dataset():
    """Memory and item accesses stay O(batch): a list over 10^6 images per row would take tens of MB."""
    groups, rng = LazyGroups(1_000_000), random.Random(0)
    tracemalloc.start()
    try:
        for _ in range(5):
            tune_caption_encoder.sample_batch(groups, 32, True, rng)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"peak {peak} bytes"
    # per row: one access for the pair, then ~1 draw for a short negative, ~3 for long, ~5 for raw
    assert groups.accessed < 5 * 32 * 10


class PairableGroups(LazyGroups):
    """LazyGroups with a long caption on every image (and a second one on every fourth), so all can pair short
    with long."""

    def __getitem__(self, j: int) -> list[tuple[str, str]]:
        out = super().__getitem__(j)
        longs = [("long", f"long {j} a")] + ([("long", f"long {j} b")] if j % 4 == 0 else [])
        return [c for c in out if c[0] != "long"] + longs


def test_short_long_pairs_a_short_with_a_long_of_the_same_image_the_query_side_50_50():
    groups, rng = PairableGroups(1000), random.Random(0)
    directions = []
    for _ in range(100):
        b = tune_caption_encoder.sample_batch(groups, 16, True, rng, pairs="short_long")
        batch = {owner(a)[1] for a in b.anchors}
        assert len(batch) == 16 and len(b.negatives) == 16
        for a, p, n, direction in zip(b.anchors, b.positives, b.negatives, b.directions, strict=True):
            assert owner(a)[1] == owner(p)[1]  # the same image
            assert {owner(a)[0], owner(p)[0]} == {"short", "long"}  # a short with a long, never raw
            assert direction == (owner(a)[0], owner(p)[0])
            assert owner(n)[1] not in batch and owner(n)[0] == owner(p)[0]  # the negative: of the positive's kind
            directions.append(direction)
    short_queries = directions.count(("short", "long")) / len(directions)
    assert 0.45 < short_queries < 0.55  # 1600 rows: a fair coin lands here with probability > 0.99
    assert groups.accessed < 2 * 1600 * 3  # O(B) per step, as for "any"


def test_short_long_leaves_out_images_without_both_kinds():
    groups = LazyGroups(30)  # a long caption only when j % 3 == 0
    usable = [g for g in (groups[j] for j in range(30)) if tune_caption_encoder.pairable(g, "short_long")]
    assert len(usable) == 10 and all({k for k, _ in g} >= {"short", "long"} for g in usable)
    assert all(tune_caption_encoder.pairable(groups[j], "any") for j in range(30))
    b = tune_caption_encoder.sample_batch(usable, 10, False, random.Random(0), pairs="short_long")
    assert sorted(owner(a)[1] for a in b.anchors) == list(range(0, 30, 3)) and b.negatives == []


def test_too_few_images_with_both_kinds_is_an_error_naming_pairs(tiny_dataset, tmp_path, monkeypatch):
    """Checked before the LLM is loaded: the error says how many images could pair and names pairs and batch_size."""
    real = data.read_captions

    def short_only(split):  # the same train split with every long caption dropped except on 3 images
        for n, (shard, key, meta) in enumerate(real(split)):
            caps = dict(meta["captions"])
            if n >= 3:
                caps.pop("long", None)
            yield shard, key, {**meta, "captions": caps}

    monkeypatch.setattr(tune_caption_encoder.data, "read_captions", short_only)
    monkeypatch.setattr(text_encoder, "load_caption_encoder", lambda *a, **k: pytest.fail("loaded the LLM"))
    cfg = tune_caption_encoder.TuneConfig(llm=text_encoder.TINY_LLAMA, batch_size=4, pairs="short_long")
    with pytest.raises(
        ValueError,
        match=r"^pairs='short_long': only 3 of 48 train images have both a short and a "
        r"long caption, fewer than batch_size=4$",
    ):
        tune_caption_encoder.tune_caption_encoder(cfg, tiny_dataset, str(tmp_path / "lora"))


def test_query_instructions_go_before_anchors_only_by_direction():
    cfg = tune_caption_encoder.TuneConfig(pairs="short_long", query_instructions=True)
    groups = PairableGroups(100)
    b = tune_caption_encoder.sample_batch(groups, 8, True, random.Random(1), pairs="short_long")
    got = tune_caption_encoder.batch_instructions(b, cfg)
    assert len(got) == 3 * 8 and got[8:] == [""] * 16  # positives and negatives: none
    want = {
        ("short", "long"): tune_caption_encoder.SHORT_TO_LONG,
        ("long", "short"): tune_caption_encoder.LONG_TO_SHORT,
    }
    assert got[:8] == [want[d] for d in b.directions] and len(set(got[:8])) == 2
    assert tune_caption_encoder.batch_instructions(b, dataclasses.replace(cfg, query_instructions=False)) is None


def test_query_instructions_change_the_queries_and_leave_documents_as_they_were(tiny_encoder):
    """One batch embedded as loss_step embeds it, with and without query instructions: the positives and negatives
    (documents) are the same vectors, the anchors differ (the instruction is attended to), and no anchor is pooled
    over its instruction (as many pooled tokens as without)."""
    cfg = tune_caption_encoder.TuneConfig(pairs="short_long", query_instructions=True)
    groups = [
        [("short", f"a red circle number {j}"), ("long", f"a long view of a red circle {j} on grey")] for j in range(20)
    ]
    b = tune_caption_encoder.sample_batch(groups, 6, True, random.Random(0), pairs="short_long")
    texts, instructions = b.anchors + b.positives + b.negatives, tune_caption_encoder.batch_instructions(b, cfg)
    with torch.no_grad():
        on, _ = text_encoder.embed_by_length(tiny_encoder, texts, 256, instructions=instructions)
        off, _ = text_encoder.embed_by_length(tiny_encoder, texts, 256)
    torch.testing.assert_close(on[6:], off[6:], atol=1e-5, rtol=1e-5)
    assert all(not torch.allclose(on[i], off[i], atol=1e-4) for i in range(6))
    pooled = text_encoder.tokenize(tiny_encoder, texts, instructions)["embed_mask"].sum(1)
    assert torch.equal(pooled, text_encoder.tokenize(tiny_encoder, texts)["embed_mask"].sum(1))


def test_clipping_bounds_the_gradient_norm_and_returns_the_norm_before():
    params = [
        torch.nn.Parameter(torch.zeros(3)),
        torch.nn.Parameter(torch.zeros(2)),
        torch.nn.Parameter(torch.zeros(1)),
    ]
    for p, g in zip(params, ([3.0, 0.0, 0.0], [0.0, 4.0], None), strict=True):
        p.grad = None if g is None else torch.tensor(g)
    assert tune_caption_encoder.clip_gradients(params, 0.0) == pytest.approx(5.0)  # off: measured, not touched
    assert params[1].grad.tolist() == [0.0, 4.0]
    assert tune_caption_encoder.clip_gradients(params, 1.0) == pytest.approx(5.0)
    after = torch.linalg.vector_norm(torch.cat([params[0].grad, params[1].grad]))
    assert after == pytest.approx(1.0, rel=1e-5) and params[1].grad.tolist() == pytest.approx([0.0, 0.8], rel=1e-5)
    assert tune_caption_encoder.clip_gradients(params, 10.0) == pytest.approx(1.0, rel=1e-5)  # under: unchanged
    assert params[1].grad.tolist() == pytest.approx([0.0, 0.8], rel=1e-5)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"pairs": "short_short"}, "pairs"),
        ({"query_instructions": True}, "query_instructions"),  # needs pairs short_long
        ({"short_to_long_instruction": "Find the long caption"}, "short_to_long_instruction"),
        ({"long_to_short_instruction": " "}, "long_to_short_instruction"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm"),
    ],
)
def test_bad_stage1_options_are_refused_naming_the_field(fields, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        tune_caption_encoder.TuneConfig(**fields)


def test_stage1_runs_with_short_long_pairs_query_instructions_and_clipping(tiny_dataset, tmp_path):
    """End to end with all three on: each optimizer step sees LoRA gradients of norm <= max_grad_norm (read in an
    optimizer pre-hook, after the stage clipped), the norms before clipping are in the manifest and the metrics,
    the manifest records the query instructions, and the cache of the tuned LLM embeds every caption without them
    (as a document) while its encoder identity records them."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.nn.utils.get_total_norm(grads)))

    max_norm = 1e-3  # far below the tiny model's gradient norms, so every step is clipped
    cfg = tune_caption_encoder.TuneConfig(
        llm=text_encoder.TINY_LLAMA,
        steps=3,
        batch_size=4,
        lora_r=4,
        lora_alpha=8,
        device="cpu",
        dtype="float32",
        pairs="short_long",
        query_instructions=True,
        max_grad_norm=max_norm,
    )
    out = str(tmp_path / "lora")
    handle = register_optimizer_step_pre_hook(record)
    try:
        result = tune_caption_encoder.tune_caption_encoder(cfg, tiny_dataset, out)
    finally:
        handle.remove()
    assert len(seen) == 3 and all(n <= max_norm * (1 + 1e-4) for n in seen), seen
    manifest = artifacts.read_manifest(out, "tune_caption_encoder")
    assert len(manifest["grad_norms"]) == 3 and min(manifest["grad_norms"]) > max_norm  # recorded before clipping
    assert result["grad_norm_max"] == max(manifest["grad_norms"]) and math.isfinite(result["loss_last"])
    assert manifest["query_instructions"] == {
        "short_to_long": tune_caption_encoder.SHORT_TO_LONG,
        "long_to_short": tune_caption_encoder.LONG_TO_SHORT,
    }
    assert manifest["config"]["pairs"] == "short_long" and manifest["instruction"] == ""
    identity = cache_caption_embeddings.encoder_identity(out, use_adapter=True)
    assert identity["query_instructions"] == manifest["query_instructions"] and identity["instruction"] == ""
    assert "query_instructions" not in cache_caption_embeddings.encoder_identity(out, use_adapter=False)
    encoder = cache_caption_embeddings.base_encoder(identity, torch.device("cpu"), "float32")
    assert encoder.instruction == ""  # what the cache and inference embed with: no query instruction


def test_negative_draws_give_up_when_no_image_qualifies():
    groups = LazyGroups(4)
    assert tune_caption_encoder.draw_negative(groups, "short", {0, 1, 2, 3}, random.Random(0)) is None
    assert (
        tune_caption_encoder.draw_negative(groups, "raw", {0}, random.Random(0)) is None
    )  # only image 0 has a raw caption
    assert tune_caption_encoder.draw_negative(groups, "long", {0}, random.Random(0)) == "long 3 a"


def test_cra_pairs_come_from_short_captions_up_to_the_limit(tiny_dataset):
    pairs = tune_caption_encoder.cra_pairs(tiny_dataset, 5)
    assert pairs.source == "synthetic_short" and len(pairs.queries) == len(pairs.pool) == 5
    assert all(q != p for q, p in zip(pairs.queries, pairs.pool, strict=True))
    assert (
        len(tune_caption_encoder.cra_pairs(tiny_dataset, 5000).pool) == 12
    )  # every eval image, when fewer than the cap


def test_cra_pairs_name_their_rows_in_the_cache_order(tiny_dataset):
    """Each pair's rows index its two captions in data.caption_list order, the order of the cached embeddings."""
    pairs = tune_caption_encoder.cra_pairs(tiny_dataset, 5000)
    metas = {k: m for _, k, m in data.read_captions(f"{tiny_dataset}/{data.split_path(pairs.source)}")}
    assert len(pairs.rows) == len(pairs.queries)
    for (key, q, p), query, pooled in zip(pairs.rows, pairs.queries, pairs.pool, strict=True):
        caps = data.caption_list(metas[key])
        assert caps[q] == ("short", query) and caps[p] == ("short", pooled)
        assert metas[key]["captions"]["short"][:2] == [query, pooled]


def test_cra_is_skipped_with_a_note_without_short_pairs(tmp_path):
    splits = {"synthetic_long": {"path": "eval/synthetic_long", "caption_kind": "long"}}
    artifacts.write_manifest(str(tmp_path), "prepare_data", {}, {}, splits=splits)
    assert tune_caption_encoder.cra_pairs(str(tmp_path), 5000) is None
    m = tune_caption_encoder.cra_metrics(None, None, None)
    assert m["cra_note"] and m["cra_before"] is None and m["cra_after_ci95"] is None and m["cra_pool_size"] == 0


def test_cra_matches_brute_force_and_restores_attention(tiny_encoder):
    pairs = tune_caption_encoder.CraPairs(
        ["a red circle", "a picture of a blue square", "a dark image with a green cross", "an orange triangle"],
        ["a red circle and nothing else", "a blue square", "a green cross on dark", "a yellow triangle"],
        "test",
    )
    draws = metrics.bootstrap_indices(4, 200, 0)
    got = tune_caption_encoder.cra_untuned(tiny_encoder, pairs, draws, "float32")
    assert tiny_encoder.bidirectional  # back in the mode it was loaded in
    for name, bidirectional in (("causal", False), ("bidirectional", True)):
        text_encoder.set_attention(tiny_encoder, bidirectional)
        with torch.no_grad():
            q = torch.stack([text_encoder.embed(tiny_encoder, [c])[0] for c in pairs.queries])
            p = torch.stack([text_encoder.embed(tiny_encoder, [c])[0] for c in pairs.pool])
        sim = F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T
        hits = [int((sim[i] >= sim[i, i]).sum()) == 1 for i in range(4)]  # strictly best: ties count against
        assert got[name]["value"] == pytest.approx(sum(hits) / 4)
        lo, hi = got[name]["ci95"]
        assert lo <= got[name]["value"] <= hi


def test_tune_reports_cra_before_both_ways_and_after_with_intervals(tiny_dataset, tmp_path):
    cfg = tune_caption_encoder.TuneConfig(
        llm=text_encoder.TINY_LLAMA,
        steps=2,
        batch_size=4,
        lora_r=4,
        lora_alpha=8,
        device="cpu",
        dtype="float32",
        cra=True,
    )
    result = tune_caption_encoder.tune_caption_encoder(cfg, tiny_dataset, str(tmp_path / "lora"))
    for name in ("cra_before", "cra_before_bidirectional", "cra_after"):
        lo, hi = result[f"{name}_ci95"]
        assert 0.0 <= lo <= result[name] <= hi <= 1.0, name
    assert result["cra_pool_size"] == 12 and result["cra_source"] == "synthetic_short"
    manifest = artifacts.read_manifest(str(tmp_path / "lora"), "tune_caption_encoder")
    assert manifest["metrics"]["cra_before_bidirectional"] == result["cra_before_bidirectional"]
    assert manifest["pooling"] == text_encoder.POOLING and manifest["instruction"] == ""
    assert "cra_note" not in result


def test_tune_spends_no_llm_pass_on_cra_by_default(tiny_dataset, tmp_path, monkeypatch):
    """CRA off (the default, the pipeline's case): no pairs read, no CRA pass; the manifest says where CRA is
    measured, and the loss is still reported."""

    def refuse(*args, **kwargs):
        raise AssertionError("stage 1 measured CRA with cra=False")

    for name in ("cra_pairs", "cra", "cra_untuned"):
        monkeypatch.setattr(tune_caption_encoder, name, refuse)
    cfg = tune_caption_encoder.TuneConfig(
        llm=text_encoder.TINY_LLAMA, steps=2, batch_size=4, lora_r=4, device="cpu", dtype="float32"
    )
    assert cfg.cra is False
    result = tune_caption_encoder.tune_caption_encoder(cfg, tiny_dataset, str(tmp_path / "lora"))
    assert result["cra_note"] == tune_caption_encoder.CRA_IN_EVALUATE and "evaluate" in result["cra_note"]
    assert result["cra_before"] is None and result["cra_after"] is None and result["cra_pool_size"] == 0
    assert math.isfinite(result["loss_first"]) and math.isfinite(result["loss_last"])
    manifest = artifacts.read_manifest(str(tmp_path / "lora"), "tune_caption_encoder")
    assert (
        manifest["metrics"]["cra_note"] == tune_caption_encoder.CRA_IN_EVALUATE and manifest["config"]["cra"] is False
    )
    assert len(manifest["losses"]) == 2


def test_the_instruction_is_part_of_the_cache_key(tmp_path):
    keys = []
    for i, instruction in enumerate(["", "Describe the image: "]):
        cfg = tune_caption_encoder.TuneConfig(llm=text_encoder.TINY_LLAMA, instruction=instruction)
        d = str(tmp_path / str(i))
        artifacts.write_manifest(
            d,
            "tune_caption_encoder",
            cfg,
            {},
            base_model=cfg.llm,
            base_fingerprint="f",
            adapter_fingerprint="a",
            pooling=text_encoder.POOLING,
        )
        identity = cache_caption_embeddings.encoder_identity(d, use_adapter=True)
        assert identity["instruction"] == instruction and identity["pooling"] == text_encoder.POOLING
        keys.append(cache_caption_embeddings.EmbeddingStore(str(tmp_path / "store"), identity).key)
    assert keys[0] != keys[1]


def test_an_instruction_ending_in_a_word_is_refused():
    with pytest.raises(ValueError, match="instruction"):
        tune_caption_encoder.TuneConfig(instruction="Describe the image")


def _library_lrs(make, steps: int, **kw) -> list[float]:
    """A transformers schedule's lr at steps 0..steps-1 (base lr 1), stepped as a training loop steps it."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler, out = make(optimizer, num_training_steps=steps, **kw), []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize(("warmup", "steps"), [(5, 40), (2, 16), (1, 4), (0, 30)])
def test_lr_schedule_is_transformers_cosine_to_10_percent_but_warms_up_from_the_first_step(warmup, steps):
    """Step by step against transformers.get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=0.1): equal
    within 1e-12 after the warm-up; during it ours is the library's next step ((s+1)/warmup where the library has
    s/warmup), so step 0 trains at 1/warmup of the lr instead of 0. The floor is 10%, reached at `steps`."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    ours = [tune_caption_encoder.lr_scale(s, warmup, steps) for s in range(steps)]
    library = _library_lrs(get_cosine_with_min_lr_schedule_with_warmup, steps, num_warmup_steps=warmup, min_lr_rate=0.1)
    for s in range(steps):
        expected = (s + 1) / warmup if s < warmup else library[s]
        assert ours[s] == pytest.approx(expected, abs=1e-12), s
    if warmup:
        assert library[0] == 0 and ours[0] == 1 / warmup
    # the last step is one step short of the floor: 0.1 + 0.45 * (1 - cos(pi / decay_steps))
    assert min(ours) > 0.1 and ours[-1] - 0.1 == pytest.approx(0.45 * (1 - math.cos(math.pi / (steps - warmup))))


def test_tuning_steps_at_the_scheduled_lr(tiny_dataset, tmp_path, monkeypatch):
    """The stage trains each step at lr * lr_scale(step): the schedule is wired in, not only defined."""
    from llm2clip import monitoring

    seen, step = [], monitoring.StageMetrics.step

    def record(self, *args, **kw):
        seen.append(kw["lr"])
        return step(self, *args, **kw)

    monkeypatch.setattr(monitoring.StageMetrics, "step", record)
    cfg = tune_caption_encoder.TuneConfig(
        llm=text_encoder.TINY_LLAMA,
        steps=4,
        warmup_steps=2,
        lr=1e-3,
        batch_size=4,
        lora_r=4,
        lora_alpha=8,
        device="cpu",
        dtype="float32",
    )
    tune_caption_encoder.tune_caption_encoder(cfg, tiny_dataset, str(tmp_path / "lora"))
    assert seen == pytest.approx([1e-3 * tune_caption_encoder.lr_scale(s, 2, 4) for s in range(4)], rel=1e-12)
    assert seen[0] == pytest.approx(5e-4)
