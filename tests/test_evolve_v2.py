"""Evolution v2: answer keep-labels (computed once, stored in the run folder), the keep-label first stage, and the
ratio-mode fitness (every member its own top share, as the eval's ratio protocol)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_decoder

from namm_transfer.evolution import warmstart
from namm_transfer.evolution.fitness import EncodedPrompt, FitnessConfig, FitnessEvaluator
from namm_transfer.evolution.trainer import Evolution, EvolutionConfig, StageConfig
from namm_transfer.evolution.warmstart import (
    LABELS_FILE,
    WarmStartConfig,
    answer_query_span,
    collect_warmstart_data,
    fit_scorer,
    prepare_rows,
)
from namm_transfer.namm import NAMM


@pytest.fixture(scope="module")
def model():
    return tiny_decoder("llama")


def _prompts(n=2, length=40, answer=3, question_start=30, task="alpha", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        EncodedPrompt(
            f"{task}-{i}",
            task,
            tuple(torch.randint(0, VOCAB, (length,), generator=g).tolist()),
            answer,
            question_start=question_start,
        )
        for i in range(n)
    ]


def _zero_namm():
    namm = NAMM()
    namm.set_normalization(torch.zeros(17), torch.ones(17))
    return namm


def _mean_bce(namm, rows):
    with torch.no_grad():
        return float(
            np.mean(
                [
                    torch.nn.functional.binary_cross_entropy_with_logits(namm.score(x.unsqueeze(0))[0], y).item()
                    for x, y in rows
                ]
            )
        )


# ----- answer labels ---------------------------------------------------------------------------------------------


def test_answer_query_span_uses_the_question_marker_or_the_last_q_tokens():
    p = _prompts(n=1, length=40, answer=3, question_start=30)[0]
    assert answer_query_span(p) == (30, 39)  # question .. the query predicting the last answer token
    unmarked = EncodedPrompt("u", "alpha", p.ids, 3)
    assert answer_query_span(unmarked, question_tokens=5) == (32, 39)  # the last 5 of the 37 prompt tokens
    assert answer_query_span(unmarked, question_tokens=100) == (0, 39)
    with pytest.raises(ValueError, match="question start"):
        EncodedPrompt("bad", "alpha", p.ids, 3, question_start=37)
    with pytest.raises(ValueError, match="labels"):
        WarmStartConfig(labels="question")


def test_answer_labels_are_the_top_share_of_attention_from_question_and_answer(model):
    """Hand check on a tiny model: at each update step (16, 32) and at the prompt's end (37), each (layer, KV head)
    row's labels are the top half of the cached tokens by the attention the queries 30..38 pay them (eager attention
    of the unmodified model, averaged over the two query heads of the KV head and over those queries)."""
    prompt = _prompts(n=1, length=40, answer=3, question_start=30)[0]
    cfg = WarmStartConfig(update_interval=16, chunk_size=8, labels="answer", keep_fraction=0.5)
    rows = collect_warmstart_data(model, _zero_namm(), [prompt], cfg)

    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(torch.tensor([prompt.ids]), output_attentions=True).attentions  # L x (1, Hq, T, T)
    finally:
        model.set_attn_implementation("sdpa")
    n_layers, hq, h = len(att), att[0].shape[1], model.config.num_key_value_heads
    target = [att[i][0].view(h, hq // h, 40, 40).mean(1)[:, 30:39].mean(1) for i in range(n_layers)]  # (H, T)
    expected = []
    for clock in (16, 32, 37):
        k = int(round(0.5 * clock))
        for layer in range(n_layers):
            for head in range(h):
                t = target[layer][head, :clock]
                order = torch.sort(t, descending=True).values
                assert order[k - 1] - order[k] > 1e-5, "a near tie at the cut would make this check fragile"
                label = torch.zeros(clock)
                label[torch.topk(t, k).indices] = 1.0
                expected.append(label)
    assert len(rows) == len(expected) == 3 * n_layers * h
    for (x, y), want in zip(rows, expected, strict=True):
        assert x.shape == (want.numel(), 25)
        assert torch.equal(y, want)


def test_answer_labels_differ_from_future_labels(model):
    """The same full-cache runs labelled by future attention (every later query) and by answer attention (the
    question and answer only) disagree on many tokens: the question span is a small part of the later queries."""
    prompts = _prompts(n=2, length=64, answer=3, question_start=54)
    namm = _zero_namm()
    fut = collect_warmstart_data(model, namm, prompts, WarmStartConfig(update_interval=16, chunk_size=8, min_future=1))
    ans = collect_warmstart_data(
        model, namm, prompts, WarmStartConfig(update_interval=16, chunk_size=8, labels="answer")
    )
    # the future labels skip the prompt's end (no final update) but share the update steps 16, 32, 48
    n_rows = len(fut)
    assert len(ans) > n_rows
    shared = [(a, f) for a, f in zip(ans, fut, strict=False) if a[1].shape == f[1].shape]
    assert shared and all(torch.equal(a[0], f[0]) for a, f in shared)  # same tokens, same features
    flipped = sum(int((a[1] != f[1]).sum()) for a, f in shared)
    total = sum(a[1].numel() for a, _ in shared)
    assert flipped > 0.1 * total


# ----- the keep-label first stage ---------------------------------------------------------------------------------


def test_keep_label_stage_labels_once_fits_and_seeds_cma_es(model, tmp_path, monkeypatch):
    """Labels are computed once and stored in the run folder (a second call reads them: no full-cache run), the
    network is fitted (its loss falls), and CMA-ES starts from the fitted vector."""
    calls = []
    real = warmstart.collect_warmstart_data

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(warmstart, "collect_warmstart_data", counting)
    prompts = _prompts(n=2, length=64, answer=3, question_start=54)
    cfg = WarmStartConfig(update_interval=16, chunk_size=8, labels="answer", steps=40, lr=2e-2, rows_per_batch=8)
    path = tmp_path / "run" / LABELS_FILE
    first_namm = NAMM()
    rows = prepare_rows(model, first_namm, prompts, cfg, path)
    assert len(calls) == 1 and path.exists() and bool(first_namm.normalization_ready)
    again_namm = NAMM()
    again = prepare_rows(model, again_namm, prompts, cfg, path)
    assert len(calls) == 1, "the stored labels were computed again"
    assert len(again) == len(rows)
    assert all(torch.equal(a[0], r[0]) and torch.equal(a[1], r[1]) for a, r in zip(again, rows, strict=True))
    assert torch.equal(again_namm.feature_mean, first_namm.feature_mean)
    assert torch.equal(again_namm.feature_std, first_namm.feature_std)
    # other settings are refused, not silently mixed
    with pytest.raises(ValueError, match="other settings"):
        prepare_rows(model, NAMM(), prompts, WarmStartConfig(update_interval=16, chunk_size=8), path)

    before = _mean_bce(again_namm, again)
    assert before == pytest.approx(math.log(2), abs=1e-6)  # the zero vector scores every token 0
    metrics = fit_scorer(again_namm, again, cfg)
    assert _mean_bce(again_namm, again) < before - 0.01
    assert 0.0 <= metrics["top_share_precision"] <= 1.0

    evo_cfg = EvolutionConfig(
        stages=[StageConfig(["alpha"], 1)],
        population=4,
        prompts_per_task=1,
        seed=3,
        fitness=FitnessConfig(update_interval=16, chunk_size=8, member_batch=4, ratio=0.5),
    )
    evo = Evolution(tmp_path / "run", evo_cfg, model, {"alpha": prompts}, init=again_namm)
    np.testing.assert_array_equal(np.asarray(evo.es.mean), again_namm.get_flat().double().numpy())
    assert torch.equal(evo.namm.feature_mean, again_namm.feature_mean)


def test_top_share_precision_counts_the_networks_own_top_k():
    namm = _zero_namm()
    theta = torch.zeros(namm.n_params)
    namm.set_flat(theta)
    x = torch.zeros(4, 25)
    # the zero vector ties every token; topk then takes some k of them: precision is the labelled share of those
    p = warmstart.top_share_precision(namm, [(x, torch.tensor([1.0, 1.0, 0.0, 0.0]))])
    assert p in (0.0, 0.5, 1.0)
    assert warmstart.top_share_precision(namm, [(x, torch.ones(4))]) == 1.0


# ----- ratio mode -------------------------------------------------------------------------------------------------


def test_ratio_mode_members_hold_their_own_top_share(model):
    """Every member keeps floor(R * seen) tokens in every managed layer and KV head at every update, the prompt's
    end included, and its score equals the eval's ratio protocol run of that member alone."""
    from namm_transfer.evolution.fitness import answer_score
    from namm_transfer.policies.base import RatioBudget
    from namm_transfer.policies.namm_policy import NAMMPolicy
    from namm_transfer.session import attach

    namm = _zero_namm()
    cfg = FitnessConfig(update_interval=16, chunk_size=8, member_batch=2, ratio=0.5)
    ev = FitnessEvaluator(model, namm, cfg)
    prompt = _prompts(n=1, length=60, answer=3)[0]  # prompt 57 tokens: updates at 16, 32, 48 and the end (57)
    thetas = torch.randn(3, namm.n_params, generator=torch.Generator().manual_seed(5)) * 0.5
    scores, retained = ev.member_scores(thetas, prompt)
    # all three members in one batch: every row of every prompt update holds floor(R * seen)
    one_batch = FitnessEvaluator(
        model, namm, FitnessConfig(update_interval=16, chunk_size=8, member_batch=3, ratio=0.5)
    )
    np.testing.assert_allclose(one_batch.member_scores(thetas, prompt)[0], scores, atol=1e-6)
    stats = one_batch.last_stats
    prompt_updates = [i for i, c in enumerate(stats.update_clock) if c <= 57]
    assert [stats.update_clock[i] for i in prompt_updates] == [16, 32, 48, 57]
    for i in prompt_updates:
        seen = stats.update_n_seen[i]
        assert seen == [seen[0]] * 3
        for counts in stats.kept_counts[i].values():
            assert np.asarray(counts).shape == (3, model.config.num_key_value_heads)
            assert np.all(np.asarray(counts) == math.floor(0.5 * seen[0]))
    ids = torch.tensor([prompt.ids])
    for m in range(3):
        policy = NAMMPolicy(namm, budget=RatioBudget(0.5))
        policy.set_population(thetas[m : m + 1])
        with attach(model, policy, update_interval=16, chunk_size=8) as mem:  # final_update: on for a budget
            first = mem.prefill(ids[:, :57])[:, -1:]
            rest = mem.prefill(ids[:, 57:59], logits_to_keep=2, reset=False)
            for i, c in enumerate(mem.stats.update_clock):
                if c <= 57:
                    seen = mem.stats.update_n_seen[i][0]
                    assert all(
                        np.all(np.asarray(v) == math.floor(0.5 * seen)) for v in mem.stats.kept_counts[i].values()
                    )
        direct = float(answer_score(torch.cat([first, rest], 1), ids[:, -3:])[0])
        assert scores[m] == pytest.approx(direct, abs=1e-5)
    assert np.all(retained < 1.0)


def test_ratio_mode_refuses_a_cache_term_and_bad_shares():
    with pytest.raises(ValueError, match="cache weight"):
        FitnessConfig(ratio=0.5, cache_weight=1.0)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            FitnessConfig(ratio=bad)


def _ratio_config(ratio=0.25):
    return EvolutionConfig(
        stages=[StageConfig(["alpha"], 2)],
        population=4,
        prompts_per_task=2,
        seed=3,
        fitness=FitnessConfig(update_interval=16, chunk_size=8, member_batch=4, ratio=ratio),
        model="tiny-llama",
    )


def test_ratio_mode_resumes_exactly_and_refuses_another_ratio(model, tmp_path):
    pools = {"alpha": _prompts(n=4, length=40, answer=3)}
    full = Evolution(tmp_path / "a", _ratio_config(), model, pools)
    full.run()
    part = Evolution(tmp_path / "b", _ratio_config(), model, pools)
    part.run(generations=1)
    resumed = Evolution(tmp_path / "b", _ratio_config(), model, pools)
    assert resumed.generation == 1
    resumed.run()
    log_a = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    drop = ("seconds", "finished")
    assert [{k: v for k, v in r.items() if k not in drop} for r in log_a] == [
        {k: v for k, v in r.items() if k not in drop} for r in log_b
    ]
    np.testing.assert_array_equal(np.asarray(resumed.es.mean), np.asarray(full.es.mean))
    assert json.loads((tmp_path / "a" / "run.json").read_text())["config"]["fitness"]["ratio"] == 0.25
    with pytest.raises(ValueError, match="ratio 0.25"):
        Evolution(tmp_path / "b", _ratio_config(0.5), model, pools)


def test_cli_answer_labels_and_ratio_mode(tmp_path, monkeypatch):
    """`evolve --warm-start --warm-start-labels answer --ratio 0.5` on a tiny host: the labels are stored once (a
    rerun reuses them), the warm start records its labels, run.json records the ratio; --cache-weight with
    --ratio is refused."""
    from test_evolution import _cli_with_tiny_host

    main = _cli_with_tiny_host(monkeypatch, tmp_path)
    run = tmp_path / "run"
    argv = ["evolve", "--model", "tiny", "--run-dir", str(run), "--stages", "passkey:1", "--population", "4"]
    argv += ["--lengths", "400", "--pool-size", "2", "--update-interval", "64", "--chunk-size", "64"]
    argv += ["--warm-start", "--warm-start-labels", "answer", "--warm-start-prompts", "1", "--warm-start-steps", "3"]
    argv += ["--ratio", "0.5", "--ship", "tiny-answer"]
    with pytest.raises(SystemExit, match="cache-weight"):
        main([*argv, "--cache-weight", "1.0"])
    with pytest.raises(SystemExit, match="calibrate-bias"):
        main([*argv, "--calibrate-bias", "0,1"])
    assert not run.exists()  # refused before anything was written
    assert main(argv) == 0
    assert (run / LABELS_FILE).exists()
    prov = json.loads((run / "warmstart" / "config.json").read_text())["provenance"]
    assert prov["labels"] == "answer" and prov["trainer"] == "supervised warm start (answer attention)"
    assert json.loads((run / "run.json").read_text())["config"]["fitness"]["ratio"] == 0.5
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1
    card = (tmp_path / "weights" / "tiny-answer" / "README.md").read_text()
    assert "Warm start (supervised, attention from the final question and the teacher-forced answer in" in card
    assert "future attention" not in card
    assert "- fitness: answer probability ratio vs the full cache, every member at its own top 50% of the" in card
    # a rerun that must fit the scorer again reads the stored labels (no full-cache run) and refits the same vector
    import shutil

    shutil.rmtree(run / "warmstart")

    def no_collect(*a, **k):
        raise AssertionError("the stored labels were computed again")

    monkeypatch.setattr(warmstart, "collect_warmstart_data", no_collect)
    assert main(argv) == 0  # (Evolution would refuse another initial mean than init.safetensors)
    assert len((run / "log.jsonl").read_text().splitlines()) == 1
