"""Staged prompt lengths in evolution (``--stages TASKS:GENERATIONS@LENGTHS``): parsing, exact resume across stages
and lengths, refusal of changed stages, and the command line end to end with the card it writes."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_decoder

from namm_transfer.checkpoint import load_namm
from namm_transfer.evolution.cli import _stage
from namm_transfer.evolution.fitness import EncodedPrompt, FitnessConfig
from namm_transfer.evolution.trainer import Evolution, EvolutionConfig, StageConfig, pool_key

TIMING = ("seconds", "finished")


def test_stage_syntax():
    assert _stage("passkey,multikey_needle:4@2048") == (["passkey", "multikey_needle"], 4, [2048])
    assert _stage("passkey,multikey_needle,prose_fact:4@4096,8192") == (
        ["passkey", "multikey_needle", "prose_fact"],
        4,
        [4096, 8192],
    )
    assert _stage("passkey:3") == (["passkey"], 3, None)
    assert _stage("passkey,prose_fact:0@2048") == (["passkey", "prose_fact"], 0, [2048])  # a fit-only run
    for bad in ("passkey:4@", "passkey:4@2k", "passkey:4@0", "passkey@2048", ":4@2048", "passkey:-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="stage"):
            _stage(bad)
    assert pool_key("passkey", None) == "passkey" and pool_key("passkey", [2048, 4096]) == "passkey@2048,4096"


def _pools():
    """Pools keyed as the command line keys them: stage 1 at 40 tokens, stage 2 at 56 and 72."""
    g = torch.Generator().manual_seed(0)
    pools = {}
    for key, length in (("alpha@40", 40), ("alpha@56,72", 56), ("beta@56,72", 72)):
        task = key.split("@")[0]
        pools[key] = [
            EncodedPrompt(
                f"{key}-{i}", task, tuple(torch.randint(0, VOCAB, (length + 16 * (i % 2),), generator=g).tolist()), 3
            )
            for i in range(4)
        ]
    return pools


def _config(stage2_lengths=(56, 72)):
    return EvolutionConfig(
        stages=[StageConfig(["alpha"], 2, [40]), StageConfig(["alpha", "beta"], 2, list(stage2_lengths))],
        population=4,
        prompts_per_task=2,
        seed=5,
        fitness=FitnessConfig(update_interval=16, chunk_size=16, member_batch=4),
        model="tiny-llama",
    )


@pytest.fixture(scope="module")
def model():
    return tiny_decoder("llama")


def _lines(run_dir):
    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_resume_inside_a_stage_and_at_the_boundary_is_exact(model, tmp_path):
    pools = _pools()
    full = Evolution(tmp_path / "full", _config(), model, pools)
    # each stage draws from its own lengths
    assert {len(p.ids) for p in full.prompts_for(0)} <= {40, 56}
    assert all(p.id.startswith(("alpha@56,72", "beta@56,72")) for p in full.prompts_for(2))
    full.run()
    assert [r["stage"] for r in full.history] == [0, 0, 1, 1]

    for i, stops in enumerate(((1, 1, None), (2, None))):  # stopped inside stage 1, at the boundary, then the end
        run = tmp_path / f"part{i}"
        for more in stops:
            Evolution(run, _config(), model, pools).run(generations=more)
        resumed = Evolution(run, _config(), model, pools)
        assert resumed.generation == 4
        assert _lines(run) == _lines(tmp_path / "full")  # fitness, hashes of the means, compute records: bit for bit
        np.testing.assert_array_equal(np.asarray(resumed.es.mean), np.asarray(full.es.mean))
        assert torch.equal(load_namm(run / "namm").get_flat(), load_namm(tmp_path / "full" / "namm").get_flat())
    rows = _lines(tmp_path / "full")
    # 4 members x 2 prompts of alpha, then 4 x (2 alpha + 2 beta)
    assert [r["member_prompts"] for r in rows] == [8, 8, 16, 16]
    assert rows[0]["device"].startswith("cpu (")


def test_resume_refuses_changed_stages(model, tmp_path):
    pools = _pools()
    pools["alpha@56"] = pools["alpha@56,72"]
    pools["beta@56"] = pools["beta@56,72"]
    Evolution(tmp_path / "run", _config(), model, pools).run(generations=1)
    with pytest.raises(
        ValueError, match=r"started with the stages alpha:2@40; alpha,beta:2@56,72; given now: .*@56\. "
    ):
        Evolution(tmp_path / "run", _config(stage2_lengths=(56,)), model, pools)
    # the refused attempt left the run as it was
    assert Evolution(tmp_path / "run", _config(), model, pools).generation == 1


def test_cli_stages_with_lengths_and_length_normalized_features_and_the_card(tmp_path, monkeypatch, capsys):
    from test_evolution import _cli_with_tiny_host

    main = _cli_with_tiny_host(monkeypatch, tmp_path)
    run = tmp_path / "run"
    argv = ["evolve", "--model", "tiny", "--run-dir", str(run), "--population", "4", "--prompts-per-task", "1"]
    argv += ["--stages", "passkey:1@300", "--stages", "passkey,kv_retrieval:1@400,500", "--lengths", "350"]
    argv += ["--pool-size", "2", "--update-interval", "64", "--chunk-size", "64", "--length-normalized-features"]
    argv += ["--sink-tokens", "2", "--ship", "tiny-staged"]
    assert main(argv) == 0
    cfg = json.loads((run / "run.json").read_text())["config"]
    assert [s["lengths"] for s in cfg["stages"]] == [[300], [400, 500]]
    assert cfg["length_normalized_features"] is True
    shipped = load_namm(tmp_path / "weights" / "tiny-staged")
    assert shipped.config.length_normalized_features is True and shipped.config.sink_tokens == 2
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["member_prompts"] for r in rows] == [4, 8]

    card = (tmp_path / "weights" / "tiny-staged" / "README.md").read_text()
    seconds = sum(r["seconds"] for r in rows)
    assert "- generations run: 2" in card
    assert "- fitness curve: `fitness.png`" in card and (tmp_path / "weights" / "tiny-staged" / "fitness.png").exists()
    assert f"- compute: {seconds:.1f} s of evaluation wall time for 12 member-prompts" in card
    assert f"{seconds / 12:.2f} s per member-prompt" in card
    assert f"{3600 * 2 / seconds:.1f} generations per hour" in card
    assert f"- where trained: `tiny` on {rows[0]['device']} (2 generations)" in card
    assert (
        "- prompt lengths per stage: stage 0 (passkey): 300 tokens; stage 1 (passkey, kv_retrieval): 400, 500" in card
    )
    assert "- options outside the spec (namm-spec.md): `sink_tokens` = 2" in card
    assert "`length_normalized_features` = True" in card
    assert "| 0 | 0 |" in card and "| 1 | 1 |" in card
