"""CMA-ES trainer: fitness definition, prefix sharing, exact resumption after a kill."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_decoder

from namm_transfer.checkpoint import load_namm, save_namm
from namm_transfer.evolution.fitness import EncodedPrompt, FitnessConfig, FitnessEvaluator
from namm_transfer.evolution.trainer import Evolution, EvolutionConfig, StageConfig
from namm_transfer.namm import NAMM


def _pools(n=4, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    pools = {}
    for task in ("alpha", "beta"):
        pools[task] = [
            EncodedPrompt(f"{task}-{i}", task, tuple(torch.randint(0, VOCAB, (length,), generator=g).tolist()), 3)
            for i in range(n)
        ]
    return pools


def _config(gens=(2, 1)):
    return EvolutionConfig(
        stages=[StageConfig(["alpha"], gens[0]), StageConfig(["alpha", "beta"], gens[1])],
        population=4,
        prompts_per_task=2,
        seed=3,
        fitness=FitnessConfig(update_interval=16, chunk_size=8, member_batch=4),
        model="tiny-llama",
    )


@pytest.fixture(scope="module")
def model():
    return tiny_decoder("llama")


def test_zero_vector_fitness_is_one_and_members_match_single_runs(model):
    namm = NAMM()
    namm.set_normalization(torch.zeros(17), torch.ones(17))
    ev = FitnessEvaluator(model, namm, FitnessConfig(update_interval=16, chunk_size=8, member_batch=2))
    prompts = _pools()["alpha"][:2]
    thetas = torch.cat([torch.zeros(1, 4172), torch.randn(2, 4172) * 0.5])
    res = ev.evaluate(thetas, prompts)
    assert res.fitness[0] == pytest.approx(1.0, abs=1e-5)  # all-zero NAMM keeps everything
    assert res.retained[0] == 1.0
    # member scores from the batched, prefix-shared path equal a member evaluated alone
    for i in (1, 2):
        alone = ev.evaluate(thetas[i : i + 1], prompts)
        assert alone.fitness[0] == pytest.approx(res.fitness[i], abs=1e-5)


def test_members_scores_and_retained_cache_equal_a_direct_run(model):
    """Each member's answer score and retained cache from the batched, prefix-sharing fitness path equal a direct
    attach + prefill of that member alone (its first eviction, made after the shared prefix was forked, counts)."""
    from namm_transfer.evolution.fitness import answer_score
    from namm_transfer.policies.namm_policy import NAMMPolicy
    from namm_transfer.session import attach

    namm = NAMM()
    namm.set_normalization(torch.zeros(17), torch.ones(17))
    cfg = FitnessConfig(update_interval=16, chunk_size=8, member_batch=2)
    ev = FitnessEvaluator(model, namm, cfg)
    prompt = _pools(length=64)["alpha"][0]
    thetas = torch.randn(3, 4172, generator=torch.Generator().manual_seed(5)) * 0.5
    thetas[:, -1] = torch.tensor([-0.5, -1.0, -3.0])  # readout biases that make members evict
    scores, retained = ev.member_scores(thetas, prompt)
    ids = torch.tensor([prompt.ids])
    a = prompt.answer_len
    direct = []
    for i in range(3):
        policy = NAMMPolicy(namm)
        policy.set_population(thetas[i : i + 1])
        with torch.no_grad(), attach(model, policy, update_interval=16, chunk_size=8) as mem:
            logits = mem.prefill(ids, logits_to_keep=a + 1)[:, :a]
            direct.append(mem.stats.retained_per_call().mean(0)[0])
        assert scores[i] == pytest.approx(float(answer_score(logits, ids[:, -a:])[0]), abs=1e-5)
    np.testing.assert_allclose(retained, direct, rtol=0, atol=1e-9)
    assert sum(d < 0.9 for d in direct) >= 2  # members that evict, from the first update on


def test_full_cache_scores_are_per_prompt_content_not_per_id(model):
    """Draws of one split with other seeds reuse ids (the calibration's prompts and the evolution's pool): each
    prompt is scored on its own tokens."""
    namm = NAMM()
    ev = FitnessEvaluator(model, namm, FitnessConfig(update_interval=16, chunk_size=8))
    a, b = _pools(seed=0)["alpha"][0], _pools(seed=1)["alpha"][0]
    assert a.id == b.id and a.ids != b.ids
    sa, sb = ev.full_score(a), ev.full_score(b)
    assert sa != sb and ev.full_score(a) == sa
    assert FitnessEvaluator(model, namm, FitnessConfig(update_interval=16, chunk_size=8)).full_score(b) == sb


def test_cache_term_penalizes_large_caches(model):
    namm = NAMM()
    namm.set_normalization(torch.zeros(17), torch.ones(17))
    ev = FitnessEvaluator(
        model, namm, FitnessConfig(update_interval=16, chunk_size=8, cache_weight=2.0, cache_target=0.5)
    )
    res = ev.evaluate(torch.zeros(1, 4172), _pools()["alpha"][:1])
    assert res.fitness[0] == pytest.approx(1.0 - 2.0 * 0.5, abs=1e-5)


def test_resume_after_kill_equals_uninterrupted_run(model, tmp_path):
    pools = _pools()
    full = Evolution(tmp_path / "a", _config(), model, pools)
    full.run()
    assert full.generation == 3
    assert [r["stage"] for r in full.history] == [0, 0, 1]

    part = Evolution(tmp_path / "b", _config(), model, pools)
    part.run(generations=2)
    # simulate a kill while the third line was being written
    with open(tmp_path / "b" / "log.jsonl", "a") as fh:
        fh.write('{"generation": 2, "fitn')
    resumed = Evolution(tmp_path / "b", _config(), model, pools)
    assert resumed.generation == 2
    resumed.run()
    np.testing.assert_array_equal(np.asarray(resumed.es.mean), np.asarray(full.es.mean))
    np.testing.assert_allclose([r["fitness"] for r in resumed.history], [r["fitness"] for r in full.history])
    # the deployed model is the mean, saved as a loadable checkpoint with provenance
    net = load_namm(tmp_path / "b" / "namm")
    np.testing.assert_allclose(net.get_flat().numpy(), np.asarray(full.es.mean, dtype=np.float32))
    assert net.checkpoint_info["provenance"]["generations"] == 3
    assert bool(net.normalization_ready)


def _rewrite_log(path, edit):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(edit(r)) + "\n" for r in rows))


def test_resume_of_a_run_made_on_another_machine(model, tmp_path, caplog):
    """Another machine's BLAS rounds differently: the mean hashes of its log do not match bit for bit. The run
    resumes when the step sizes and the saved mean agree up to rounding, and is refused when they do not."""
    pools = _pools()
    run = Evolution(tmp_path / "r", _config(), model, pools)
    run.run(generations=2)
    mean = np.asarray(run.es.mean).copy()
    log = tmp_path / "r" / "log.jsonl"
    _rewrite_log(log, lambda r: {**r, "mean_hash": "0" * 16})  # what a last-bit difference looks like
    with caplog.at_level("WARNING"):
        resumed = Evolution(tmp_path / "r", _config(), model, pools)
    assert resumed.generation == 2 and "up to rounding" in caplog.text
    np.testing.assert_array_equal(np.asarray(resumed.es.mean), mean)
    _rewrite_log(log, lambda r: {**r, "sigma": r["sigma"] * 1.01})  # another algorithm: a different step size
    with pytest.raises(RuntimeError, match="step size"):
        Evolution(tmp_path / "r", _config(), model, pools)
    _rewrite_log(log, lambda r: {**r, "sigma": r["sigma"] / 1.01})
    bad = run.mean_namm()
    bad.set_flat(bad.get_flat() + 1e-3)
    save_namm(bad, tmp_path / "r" / "namm", provenance={"generations": 2})  # a saved mean the replay does not reach
    with pytest.raises(RuntimeError, match="away from the saved one"):
        Evolution(tmp_path / "r", _config(), model, pools)


def test_other_settings_in_same_run_dir_are_refused(model, tmp_path, caplog):
    pools = _pools()
    Evolution(tmp_path / "r", _config(), model, pools, identity={"lengths": [40], "pool_size": 4})
    with pytest.raises(ValueError, match="other settings"):
        Evolution(tmp_path / "r", _config(gens=(5, 1)), model, pools)
    with pytest.raises(ValueError, match=r"differs in \['lengths'\]"):  # the prompts are built from these
        Evolution(tmp_path / "r", _config(), model, pools, identity={"lengths": [80], "pool_size": 4})
    Evolution(tmp_path / "r", _config(), model, pools, identity={"lengths": [40], "pool_size": 4})
    # a folder made before they were recorded adopts them, saying so
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "run.json").write_text(json.dumps({"config": _config().to_dict()}))
    with caplog.at_level("WARNING"):
        Evolution(tmp_path / "old", _config(), model, pools, identity={"lengths": [40], "pool_size": 4})
    assert "did not record" in caplog.text
    assert json.loads((tmp_path / "old" / "run.json").read_text())["identity"] == {"lengths": [40], "pool_size": 4}


def test_initial_mean_must_match_and_is_checked_before_anything_is_written(model, tmp_path):
    pools = _pools()
    start = NAMM()
    start.set_flat(torch.full((4172,), 0.01))
    Evolution(tmp_path / "a", _config(), model, pools, init=start).run(generations=1)
    other = NAMM()
    other.set_flat(torch.full((4172,), 0.02))
    with pytest.raises(ValueError, match="another initial mean"):
        Evolution(tmp_path / "a", _config(), model, pools, init=other)
    Evolution(tmp_path / "a", _config(), model, pools, init=start)  # the same one resumes
    Evolution(tmp_path / "b", _config(), model, pools).run(generations=1)  # a run without one
    with pytest.raises(ValueError, match="started without an initial mean"):
        Evolution(tmp_path / "b", _config(), model, pools, init=start)
    assert not (tmp_path / "b" / "init.safetensors").exists()
    assert Evolution(tmp_path / "b", _config(), model, pools).generation == 1  # still resumable


def test_a_checkpoint_behind_the_log_is_brought_up_to_date(model, tmp_path, caplog):
    """Killed between a generation's log line and its checkpoint: the resumed run saves the replayed mean."""
    pools = _pools()
    run = Evolution(tmp_path / "r", _config(), model, pools)
    run.run(generations=1)
    behind = load_namm(tmp_path / "r" / "namm")
    run.run(generations=1)
    save_namm(behind, tmp_path / "r" / "namm", provenance=behind.checkpoint_info["provenance"])  # one behind
    with caplog.at_level("WARNING"):
        resumed = Evolution(tmp_path / "r", _config(), model, pools)
    assert "saving the replayed mean" in caplog.text
    net = load_namm(tmp_path / "r" / "namm")
    assert net.checkpoint_info["provenance"]["generations"] == 2
    np.testing.assert_array_equal(net.get_flat().numpy(), np.asarray(resumed.es.mean, dtype=np.float32))


def test_paper_defaults():
    cfg = EvolutionConfig()
    assert (cfg.population, cfg.elite_ratio, cfg.sigma0) == (32, 0.5, 0.065)
    assert json.loads(json.dumps(cfg.to_dict()))["population"] == 32


def test_warm_start_collects_balanced_rows_and_fits_a_learnable_rule(model):
    from namm_transfer.evolution.warmstart import WarmStartConfig, collect_warmstart_data, fit_scorer
    from namm_transfer.namm import recency_embedding

    namm = NAMM()
    namm.set_normalization(torch.zeros(17), torch.ones(17))
    cfg = WarmStartConfig(update_interval=16, chunk_size=8, min_future=16, steps=150, lr=2e-2)
    rows = collect_warmstart_data(model, namm, _pools(n=2, length=64)["alpha"], cfg)
    assert rows and all(x.shape[-1] == 25 and y.shape == x.shape[:1] for x, y in rows)
    assert 0.4 < float(torch.cat([y for _, y in rows]).mean()) < 0.6  # balanced labels
    # a random tiny model's attention has no structure to learn; check the fit on a known rule instead:
    # keep the newer half of every row (recency features only)
    g = torch.Generator().manual_seed(0)
    synthetic = []
    for _ in range(24):
        s = int(torch.randint(8, 40, (1,), generator=g))
        age = torch.arange(s - 1, -1, -1)
        x = torch.cat([recency_embedding(age * 50), torch.randn(s, 17, generator=g)], dim=-1)
        synthetic.append((x, (age < s // 2).float()))
    metrics = fit_scorer(namm, synthetic, cfg)
    assert metrics["accuracy"] > 0.75  # chance is 0.5
    assert torch.isfinite(namm.get_flat()).all()

    # a higher keep share labels more of every row "keep"
    keep = WarmStartConfig(update_interval=16, chunk_size=8, min_future=16, keep_fraction=0.8)
    rows80 = collect_warmstart_data(model, namm, _pools(n=2, length=64)["alpha"], keep)
    assert 0.7 < float(torch.cat([y for _, y in rows80]).mean()) < 0.9
    with pytest.raises(ValueError, match="keep_fraction"):
        WarmStartConfig(keep_fraction=0.0)
    # calibration: the readout bias is shifted so that score >= 0 keeps the requested share
    cal = WarmStartConfig(steps=20, lr=2e-2, keep_fraction=0.8, calibrate=True)
    assert fit_scorer(namm, synthetic, cal)["kept_fraction"] == pytest.approx(0.8, abs=0.03)


def _dist_worker(rank, world, init_file, run_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        evo = Evolution(run_dir, _config(), tiny_decoder("llama"), _pools())
        evo.run()
    finally:
        dist.destroy_process_group()


def test_two_local_workers_equal_a_single_process(model, tmp_path):
    """Fitness evaluations spread over 2 torch.distributed (gloo) workers give the same run."""
    import torch.multiprocessing as mp

    single = Evolution(tmp_path / "single", _config(), model, _pools())
    single.run()
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "dist")), nprocs=2, join=True)
    lines = (tmp_path / "dist" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3  # only rank 0 wrote
    dist_rows = [json.loads(x) for x in lines]
    np.testing.assert_allclose([r["fitness"] for r in dist_rows], [r["fitness"] for r in single.history], atol=1e-6)
    # (means are not compared: near-tied fitness values may rank differently at 1e-7 noise)
    assert load_namm(tmp_path / "dist" / "namm").checkpoint_info["provenance"]["generations"] == 3


def _cli_with_tiny_host(monkeypatch, tmp_path):
    """The CLI's ``main`` with a tiny random Llama (byte-level tokenizer) as every model and tmp_path/weights as
    the package's weights folder."""
    from namm_transfer.evals.video_qa.run import byte_level_tokenizer, tiny_text_config
    from transformers import LlamaConfig, LlamaForCausalLM

    import namm_transfer.checkpoint as ckpt
    import namm_transfer.models as models_mod
    from namm_transfer.cli import main

    tok = byte_level_tokenizer()
    torch.manual_seed(0)
    host = LlamaForCausalLM(LlamaConfig(**tiny_text_config(tok), attn_implementation="sdpa")).eval()
    monkeypatch.setattr(models_mod, "load_model", lambda *a, **k: (host, tok))
    monkeypatch.setattr(ckpt, "WEIGHTS_DIR", tmp_path / "weights")
    return main


def test_cli_warm_start_evolve_and_ship(tmp_path, monkeypatch, capsys):
    """`namm-transfer evolve --warm-start --warm-start-keep 0.8 --warm-start-calibrate ... --ship NAME` end to end on a
    tiny host: the warm start records its settings, one generation is logged, the shipped mean loads, the card
    tells the run's story."""
    main = _cli_with_tiny_host(monkeypatch, tmp_path)
    run = tmp_path / "run"
    argv = ["evolve", "--model", "tiny", "--run-dir", str(run), "--stages", "passkey:1", "--population", "4"]
    argv += ["--lengths", "400", "--pool-size", "2", "--update-interval", "64", "--chunk-size", "64"]
    argv += ["--warm-start", "--warm-start-prompts", "1", "--warm-start-steps", "3", "--warm-start-keep", "0.8"]
    argv += ["--warm-start-calibrate", "--cache-weight", "1.0", "--ship", "tiny-test"]
    assert main(argv) == 0
    prov = json.loads((run / "warmstart" / "config.json").read_text())["provenance"]
    assert prov["keep_label_share"] == 0.8 and prov["calibrated"] is True and prov["steps"] == 3
    assert abs(prov["kept_fraction"] - 0.8) < 0.05, "calibration keeps the asked share of the training tokens"
    assert len((run / "log.jsonl").read_text().splitlines()) == 1
    shipped = load_namm(tmp_path / "weights" / "tiny-test")
    assert torch.equal(shipped.get_flat(), load_namm(run / "namm").get_flat())
    card = (tmp_path / "weights" / "tiny-test" / "README.md").read_text()
    assert "generations run: 1" in card and "| 0 | 0 |" in card
    assert "top 80% of each row by future attention are 'keep', readout bias calibrated" in card
    assert "shipped as tiny-test" in capsys.readouterr().out
    # a log of the older retained measure (before the first eviction was counted) gets a note in the card
    assert "first eviction" not in card
    from namm_transfer.evolution.card import write_card

    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert rows[0]["retained_measure"] == 2
    (run / "log.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "retained_measure"}) + "\n" for r in rows)
    )
    card = write_card(run, tmp_path / "weights" / "tiny-test", "tiny-test").read_text()
    assert "The retained cache of these generations was measured before the fitness counted" in card


def _zero_namm():
    namm = NAMM()
    namm.set_normalization(torch.zeros(17), torch.ones(17))
    return namm


def test_bias_calibration_scores_each_offset_like_the_fitness_and_resumes(model, tmp_path):
    """Offsets on the readout bias are scored exactly as a population would be; ties go to the smaller offset;
    the per-prompt log resumes without re-evaluating and refuses other settings."""
    from namm_transfer.evolution.calibrate import calibrate_bias, parse_offsets

    namm = _zero_namm()
    cfg = FitnessConfig(update_interval=16, chunk_size=8, member_batch=4, cache_weight=2.0, cache_target=0.5)
    ev = FitnessEvaluator(model, namm, cfg)
    prompts = _pools()["alpha"][:2] + _pools()["beta"][:1]
    offsets = parse_offsets("-1,0,1")
    log = tmp_path / "calibration.jsonl"
    res = calibrate_bias(ev, namm, offsets, prompts, log)
    thetas = torch.zeros(3, 4172)
    thetas[:, -1] = torch.tensor(offsets)
    ref = ev.evaluate(thetas, prompts)
    np.testing.assert_allclose(res.fitness, ref.fitness, atol=1e-9)
    np.testing.assert_allclose(res.retained, ref.retained, atol=1e-12)
    # all-zero weights: the score is the bias itself, so 0 and +1 keep everything and -1 keeps only the newest
    assert res.retained[1] == res.retained[2] == 1.0 and res.retained[0] < 0.75
    assert res.fitness[1] == pytest.approx(0.0, abs=1e-5)  # ratio 1 minus 2 x (1.0 - 0.5)
    expect = 0 if res.fitness[0] > res.fitness[1] else 1  # a tie between 0 and +1 goes to the smaller cache
    assert res.best == expect and res.best_offset == offsets[expect]

    # kill after the first prompt, in the middle of the second's line: the rerun evaluates only the two prompts
    # left, with the same result
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    calls = []
    orig = ev.member_scores
    ev.member_scores = lambda t, p: calls.append(p.id) or orig(t, p)
    again = calibrate_bias(ev, namm, offsets, prompts, log)
    assert calls == [p.id for p in prompts[1:]]
    np.testing.assert_allclose(again.fitness, res.fitness, atol=1e-9)
    with pytest.raises(ValueError, match="other settings"):
        calibrate_bias(ev, namm, [0.0, 2.0], prompts, log)
    for bad in ("", "a,b", "1:2", "nan"):
        with pytest.raises(ValueError, match="bias offsets"):
            parse_offsets(bad)
    assert parse_offsets("-1:1:3") == [-1.0, 0.0, 1.0]


def test_cli_calibrates_the_bias_and_ships_the_calibrated_mean(tmp_path, monkeypatch, capsys):
    """`namm-transfer evolve ... --calibrate-bias -2,0,2 --ship NAME`: the shipped vector is the run's mean with
    the chosen offset added to b_out, the card shows the calibration table, a rerun resumes from the log."""
    main = _cli_with_tiny_host(monkeypatch, tmp_path)
    run = tmp_path / "run"
    argv = ["evolve", "--model", "tiny", "--run-dir", str(run), "--stages", "passkey:1", "--population", "4"]
    argv += ["--lengths", "300", "--pool-size", "2", "--update-interval", "64", "--chunk-size", "64"]
    argv += ["--cache-weight", "1.0", "--calibrate-bias=-2,0,2", "--calibrate-prompts", "1", "--calibrate-sinks", "2"]
    argv += ["--ship", "tiny-cal"]
    assert main(argv) == 0
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["offsets"] == [-2.0, 0.0, 2.0] and cal["lengths"] == [300] and len(cal["prompts"]) == 1
    base = load_namm(run / "namm").get_flat()
    shipped = load_namm(tmp_path / "weights" / "tiny-cal").get_flat()
    assert torch.equal(shipped[:-1], base[:-1])
    assert shipped[-1].item() == pytest.approx(base[-1].item() + cal["best_offset"], abs=1e-6)
    assert torch.equal(shipped, load_namm(run / "namm-calibrated").get_flat())
    assert cal["sink_tokens"] == 2 and load_namm(tmp_path / "weights" / "tiny-cal").config.sink_tokens == 2
    assert load_namm(run / "namm").config.sink_tokens == 0  # the run's own mean is untouched
    card = (tmp_path / "weights" / "tiny-cal" / "README.md").read_text()
    assert "Readout-bias calibration" in card and "(shipped)" in card and "first 2 positions always kept" in card
    assert cal["retained_measure"] == 2 and "first eviction" not in card
    out = capsys.readouterr().out
    assert "<- kept" in out and "shipped as tiny-cal" in out
    # rerun: no new generation, the calibration log is complete, so nothing is evaluated again
    log_before = (run / "calibration.jsonl").read_text()
    assert main(argv) == 0
    assert (run / "calibration.jsonl").read_text() == log_before
    assert torch.equal(load_namm(tmp_path / "weights" / "tiny-cal").get_flat(), shipped)


def test_run_with_sink_tokens_saves_them_and_refuses_other_settings(model, tmp_path):
    from dataclasses import replace

    cfg = replace(_config(gens=(1, 0)), sink_tokens=2)
    evo = Evolution(tmp_path / "run", cfg, model, _pools())
    assert evo.namm.config.sink_tokens == 2
    evo.run()
    assert load_namm(tmp_path / "run" / "namm").config.sink_tokens == 2
    with pytest.raises(ValueError, match="sink_tokens"):
        Evolution(tmp_path / "run", _config(gens=(1, 0)), model, _pools())


def test_fitness_combines_prompts_exactly():
    """Per task the ratio of sums (member scores summed over the task's prompts / full-cache scores summed; the sum
    itself where the full cache scores 0), the mean over tasks, minus cache_weight x the retained cache above
    cache_target (retained averaged over prompts). Two members, three tasks, numbers worked out by hand."""
    from namm_transfer.evolution.fitness import combine_prompt_scores

    per_prompt = [
        ("a", np.array([0.2, 0.4]), 0.5, np.array([0.6, 0.9])),
        ("a", np.array([0.6, 0.0]), 0.3, np.array([0.4, 0.7])),
        ("b", np.array([0.1, 0.3]), 0.4, np.array([0.5, 0.5])),
        ("c", np.array([0.25, 0.5]), 0.0, np.array([0.5, 0.3])),  # the full cache fails this task
    ]
    out = combine_prompt_scores(per_prompt, FitnessConfig(cache_weight=2.0, cache_target=0.45))
    # a: (0.2 + 0.6) / 0.8 = 1.0 and (0.4 + 0.0) / 0.8 = 0.5 (a mean of per-prompt ratios would give 1.2 / 0.4)
    np.testing.assert_allclose(out.task_ratio["a"], [1.0, 0.5])
    np.testing.assert_allclose(out.task_ratio["b"], [0.25, 0.75])
    np.testing.assert_allclose(out.task_ratio["c"], [0.25, 0.5])
    assert out.full_scores == pytest.approx({"a": 0.8, "b": 0.4, "c": 0.0})
    np.testing.assert_allclose(out.retained, [0.5, 0.6])
    perf = np.array([(1.0 + 0.25 + 0.25) / 3, (0.5 + 0.75 + 0.5) / 3])
    np.testing.assert_allclose(out.fitness, perf - 2.0 * np.array([0.05, 0.15]))


def test_answer_score_is_the_geometric_mean_probability():
    from namm_transfer.evolution.fitness import answer_score

    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))  # two answer tokens, vocab 3
    got = answer_score(logits, torch.tensor([[0, 2]]))
    assert got.tolist() == pytest.approx([(0.5 * 0.8) ** 0.5])  # not the arithmetic mean 0.65


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_evolution_pools_are_training_prompts_with_the_answer_after_the_cue(chat):
    """``evolve`` trains on the train split (never the held-out one the eval uses); each pool item is the prompt
    (for a chat model: its turn, then the answer cue) followed by exactly the answer's tokens."""
    from namm_transfer.evals.language import make_split
    from namm_transfer.evals.video_qa.run import byte_level_tokenizer

    from namm_transfer.evolution.cli import build_pools

    tok = byte_level_tokenizer()
    if chat:
        tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    pools = build_pools(tok, ["passkey", "kv_retrieval"], 2, [300])
    for task, items in pools.items():
        samples = make_split(task, "train", n=2, lengths=[300], tokenizer=tok)
        held = {s.id for s in make_split(task, "heldout", n=2, lengths=[300], tokenizer=tok)}
        assert [p.id for p in items] == [s.id for s in samples] and not held & {p.id for p in items}
        for p, s in zip(items, samples, strict=True):
            prompt = tok.decode(list(p.ids[: -p.answer_len]))
            assert tok.decode(list(p.ids[-p.answer_len :])).strip() == s.answer
            if chat:
                assert s.chat_prompt is not None and prompt == s.chat_prompt + s.answer_cue
            else:
                assert prompt == s.prompt


def test_cma_settings_follow_the_config_and_prompts_change_per_generation(model, tmp_path):
    """The elite share is elite_ratio x population (the spec: 0.5 of 32 -> 16 parents), separable CMA-ES is the
    configured diagonal mode, and each generation draws its own prompts (seeded, reproducible)."""
    from dataclasses import replace

    pools = _pools(n=8)
    cfg = replace(_config(gens=(6, 1)), population=12, elite_ratio=0.5, prompts_per_task=1)
    evo = Evolution(tmp_path / "a", cfg, model, pools)
    assert evo.es.sp.weights.mu == 6 and evo.es.popsize == 12
    assert bool(evo.es.opts["CMA_diagonal"]) is evo.config.separable
    draws = [tuple(p.id for p in evo.prompts_for(g)) for g in range(6)]  # all in the first stage (task alpha)
    assert len(set(draws)) > 1  # not the same prompts every generation
    again = Evolution(tmp_path / "b", cfg, model, pools)
    assert [tuple(p.id for p in again.prompts_for(g)) for g in range(6)] == draws
