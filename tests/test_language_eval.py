"""End to end: ``namm-transfer eval --target language`` on tiny random models and a random NAMM.

Covers: every (protocol, policy)'s records and summary rows, the ratio protocols (every policy, NAMM
included, keeps the same share, also at the end of the prompt) and the threshold protocol (every baseline
replays NAMM's per-layer, per-update cache lengths), the full cache run once per prompt and its noise-floor
rerun, loglik_rel and the paired intervals, the summary schema, resuming a killed run without repeating
records, refusing a results file written by another command, Gemma 3's managed (global) layers, the
calibration of (task, length) cells and its refusal, the power rule, and a torch-free ``--help``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from test_results import COMMON_SUMMARY_KEYS  # noqa: E402

from namm_transfer.cli import main as cli_main

torch.set_num_threads(1)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "The pass key is 12345. Remember it.",
    "What is the value of the key? The variables are:",
    "Mara was born in Ostwick, a small village near the river.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
POLICIES = ["full", "namm", "h2o", "tova", "l2", "streaming", "random"]
BASELINES = ["h2o", "tova", "l2", "streaming", "random"]
TASKS = ["passkey", "kv_retrieval", "multikey_needle", "variable_tracking", "prose_fact", "phonebook"]
PROTOCOLS = ["ratio-50", "ratio-25", "threshold"]
SETTINGS = ["--n", "1", "--lengths", "96", "--update-interval", "32", "--chunk-size", "32", "--max-new-tokens", "4"]
COMMON = [*SETTINGS, "--keep-uncalibrated"]  # the tiny random models answer nothing: no cell passes calibration


def _tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def _model_folder(root: Path, family: str) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(chat=family == "llama")
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, num_hidden_layers=2))
    else:
        cfg = Gemma3TextConfig(
            **common,
            num_hidden_layers=3,
            head_dim=8,
            sliding_window=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )
        model = Gemma3ForCausalLM(cfg)
    folder = root / family
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    from namm_transfer.checkpoint import save_namm
    from namm_transfer.namm import NAMM

    root = tmp_path_factory.mktemp("lang-eval")
    torch.manual_seed(2)
    namm = NAMM()
    namm.set_flat(torch.randn(namm.n_params) * 0.2)  # random weights that keep about half of the tokens
    namm.set_normalization(torch.zeros(namm.config.n_bins), torch.ones(namm.config.n_bins))
    save_namm(namm, root / "namm", name="test-namm")
    return {
        "llama": _model_folder(root, "llama"),
        "gemma3": _model_folder(root, "gemma3"),
        "namm": root / "namm",
    }


def _eval(assets: dict[str, Path], family: str, out: Path, *extra: str, common: Sequence[str] = COMMON) -> int:
    argv = [
        "eval",
        "--target",
        "language",
        "--model",
        str(assets[family]),
        "--namm",
        str(assets["namm"]),
        "--device",
        "cpu",
        "--output",
        str(out),
        *common,
        *extra,
    ]
    return cli_main(argv)


def _jsonl(out: Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines() if x.strip()]
    return lines[0]["_header"], lines[1:]


def _check_replay(records: list[dict], baselines: list[str]) -> None:
    by_sample: dict[str, dict[str, dict]] = {}
    for r in records:
        if r["protocol"] == "threshold":
            by_sample.setdefault(r["sample_id"], {})[r["policy"]] = r
    for sample_id, recs in by_sample.items():
        namm = recs["namm"]
        assert namm["kept_counts"] and namm["updates"] >= 1, sample_id
        for b in baselines:
            assert recs[b]["kept_counts_hash"] == namm["kept_counts_hash"], (sample_id, b)
            assert recs[b]["updates"] == namm["updates"]
            assert recs[b]["retained_cache"] == pytest.approx(namm["retained_cache"], abs=1e-12), (sample_id, b)
            assert recs[b]["peak_cache_mb"] == pytest.approx(namm["peak_cache_mb"], abs=1e-12), (sample_id, b)


def _check_ratio(records: list[dict], label: str) -> None:
    """Under a ratio protocol every policy keeps the same share of every head at every update (and at the end of the
    prompt, an update more than the threshold protocol makes): equal kept counts and retained cache."""
    by_sample: dict[str, list[dict]] = {}
    for r in records:
        if r["protocol"] == label:
            by_sample.setdefault(r["sample_id"], []).append(r)
    assert by_sample
    for sample_id, recs in by_sample.items():
        assert len({r["kept_counts_hash"] for r in recs}) == 1, sample_id
        assert len({r["retained_cache"] for r in recs}) == 1, sample_id
        assert all(r["budget"] == "ratio:" + str(int(label.split("-")[1]) / 100) for r in recs)


def test_language_eval_end_to_end_resume_and_refusal(assets, tmp_path, capsys):
    import math

    out = tmp_path / "results" / "lang.json"
    per_sample = 2 + len(PROTOCOLS) * (len(POLICIES) - 1)  # full and full-alt once, the others per protocol

    # a run "killed" after two samples (--limit), then the same command without the limit
    assert _eval(assets, "llama", out, "--limit", "2") == 0
    _, first = _jsonl(out)
    assert len(first) == 2 * per_sample
    assert {r["task"] for r in first} == set(TASKS[:2])  # samples are interleaved over tasks
    assert _eval(assets, "llama", out) == 0
    header, records = _jsonl(out)
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == len(TASKS) * per_sample
    expected = {("full", None): len(TASKS), ("full-alt", None): len(TASKS)}
    expected |= {(p, label): len(TASKS) for p in POLICIES[1:] for label in PROTOCOLS}
    assert Counter((r["policy"], r["protocol"]) for r in records) == expected
    again = {r["key"]: r for r in records}
    for r in first:  # resumed, not recomputed
        assert again[r["key"]] == r

    # header: the run's identity
    s = header["settings"]
    assert s["tasks"] == TASKS and s["lengths"] == [96] and s["n"] == 1
    assert s["update_interval"] == 32 and s["chunk_size"] == 32
    assert s["protocols"] == ["ratio:0.5", "ratio:0.25", "threshold"] and s["protocol_labels"] == PROTOCOLS
    assert s["final_update"] == {"ratio-50": True, "ratio-25": True, "threshold": False}
    assert s["noise_floor"]["policy"] == "full-alt" and s["noise_floor"]["setting"] == "chunk_size"
    assert s["noise_floor"]["value"] == 16 and s["noise_floor"]["instead_of"] == 32
    assert s["metric"].startswith("loglik_rel = 100 * exp(loglik - loglik of the full cache")
    assert s["eval_only_tasks"] == ["phonebook"]
    assert s["calibration"]["kept_uncalibrated"] == [f"{t}/96" for t in TASKS]
    assert s["max_new_tokens"] == 4 and s["dtype"] == "float32" and s["prompt"].startswith("chat")
    assert header["namm_checkpoint"]["name"] == "test-namm" and len(header["namm_checkpoint"]["sha256"]) == 64

    # the samples are the held-out split's (never the split evolution trains on)
    from namm_transfer.evals.language.run import DATA_SEED_BASE
    from namm_transfer.evals.language.tasks import make_split

    from namm_transfer.models import load_model

    _, tok = load_model(str(assets["llama"]), device="cpu", dtype="float32")
    split = {t: [x.id for x in make_split(t, "heldout", n=1, lengths=[96], tokenizer=tok, seed_base=DATA_SEED_BASE)]
             for t in TASKS}  # fmt: skip
    train = {t: [x.id for x in make_split(t, "train", n=1, lengths=[96], tokenizer=tok, seed_base=DATA_SEED_BASE)]
             for t in TASKS}  # fmt: skip
    assert {r["sample_id"] for r in records} == {i for ids in split.values() for i in ids}
    assert not {r["sample_id"] for r in records} & {i for ids in train.values() for i in ids}

    # records
    full_loglik = {r["sample_id"]: r["loglik"] for r in records if r["policy"] == "full"}
    for r in records:
        label = r["protocol"]
        assert r["key"] == (f"{r['policy']}/{r['sample_id']}" if label is None else
                            f"{r['policy']}@{label}/{r['sample_id']}")  # fmt: skip
        assert 0.0 <= r["exact_match"] <= 100.0 and 0.0 < r["loglik_score"] <= 100.0 and r["loglik"] <= 0.0
        assert r["loglik_rel"] == r["score"] == pytest.approx(100 * math.exp(r["loglik"] - full_loglik[r["sample_id"]]))
        assert r["family_seen_in_training"] is (r["task"] != "phonebook")
        assert r["calibrated"] is False and r["difficulty"] == {}
        assert 0.0 < r["retained_cache"] <= 1.0 and r["peak_cache_mb"] > 0 and r["throughput"] > 0
        assert r["peak_memory_source"] == "kv_cache" and r["peak_memory_mb"] == r["peak_cache_mb"]
        assert r["managed_layers"] == [0, 1] and r["n_layers"] == 2
        assert r["generated_tokens"] <= 4 and isinstance(r["generation"], str)
        assert r["prompt_tokens"] > 32
    full = [r for r in records if r["policy"] == "full"]
    namm = [r for r in records if r["policy"] == "namm" and r["protocol"] == "threshold"]
    assert all(r["retained_cache"] == 1.0 and r["loglik_rel"] == 100.0 and r["budget"] is None for r in full)
    assert all(r["retained_cache"] == 1.0 for r in records if r["policy"] == "full-alt")
    assert 0.05 < sum(r["retained_cache"] for r in namm) / len(namm) < 0.95  # the random NAMM evicts some tokens
    for f, n in zip(
        sorted(full, key=lambda r: r["sample_id"]), sorted(namm, key=lambda r: r["sample_id"]), strict=True
    ):
        assert n["peak_cache_mb"] <= f["peak_cache_mb"] + 1e-9
    _check_replay(records, BASELINES)
    _check_ratio(records, "ratio-50")
    _check_ratio(records, "ratio-25")
    by_key = {(r["policy"], r["protocol"], r["sample_id"]): r for r in records}
    for r in namm:  # the ratio protocols make one update more: the final one at the end of the prompt
        assert r["prompt_tokens"] % 32 != 0
        assert by_key["namm", "ratio-50", r["sample_id"]]["updates"] == r["updates"] + 1
        assert by_key["namm", "ratio-25", r["sample_id"]]["retained_cache"] < 0.3

    # summary
    summary = json.loads(out.read_text())
    for key in (*COMMON_SUMMARY_KEYS, "by_length", "managed_layers", "by_family_seen_in_training", "power"):
        assert key in summary, key
    assert summary["target"] == "language" and summary["command"].startswith("namm-transfer eval --target language")
    assert summary["managed_layers"] == [0, 1] and summary["breakdown_by"] == "task"
    assert summary["metric"] == s["metric"] and summary["noise_floor"] == s["noise_floor"]
    order = [("full", None), ("full-alt", None)]
    order += [(p, label) for label in PROTOCOLS for p in ["namm", *BASELINES]]
    assert [(row["policy"], row["protocol"]) for row in summary["rows"]] == order
    for row in summary["rows"]:
        for key in ("policy", "protocol", "score", "score_std", "n", "exact_match", "retained_cache",
                    "peak_memory_mb", "throughput", "loglik_score", "peak_cache_mb"):  # fmt: skip
            assert key in row, key
        assert row["n"] == len(TASKS)
        has_full = row["policy"] != "full"
        has_namm = row["protocol"] is not None and row["policy"] != "namm"
        for key, present in (("vs_full", has_full), ("vs_namm", has_namm)):
            assert (key in row) is present and (f"exact_match_{key}" in row) is present, (row["policy"], key)
            if present:
                assert set(row[key]) == {"mean", "lo", "hi", "n", "level", "resamples", "excludes_zero", "stratified"}
                assert row[key]["n"] == len(TASKS) and row[key]["lo"] <= row[key]["mean"] <= row[key]["hi"]
                assert row[key]["mean"] == pytest.approx(row["score"] - 100.0 if key == "vs_full" else
                    row["score"] - next(x["score"] for x in summary["rows"]
                                        if x["policy"] == "namm" and x["protocol"] == row["protocol"]))  # fmt: skip
    assert summary["rows"][0]["score"] == 100.0
    assert sorted(summary["breakdown"]) == sorted(TASKS)
    namm_row = next(r for r in summary["rows"] if r["policy"] == "namm" and r["protocol"] == "threshold")
    task_scores = [
        next(r["score"] for r in rows if r["policy"] == "namm" and r["protocol"] == "threshold")
        for rows in summary["breakdown"].values()
    ]
    assert namm_row["score"] == pytest.approx(sum(task_scores) / len(task_scores))
    assert list(summary["by_length"]) == ["96"] and "vs_full" in summary["by_length"]["96"][2]
    assert sorted(summary["by_family_seen_in_training"]) == ["false", "true"]
    assert summary["by_family_seen_in_training"]["false"][0]["n"] == 1  # phonebook's one prompt
    if importlib.util.find_spec("matplotlib") is not None:
        assert summary["plot"] == "lang.png" and out.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "namm@ratio-50" in printed and "streaming@threshold" in printed and "managed layers: [0, 1]" in printed

    # a results file written with other settings is refused, and left as it was
    before = out.with_suffix(".jsonl").read_text()
    assert _eval(assets, "llama", out, "--update-interval", "48") == 2
    assert "written by another command" in capsys.readouterr().err
    assert out.with_suffix(".jsonl").read_text() == before


def test_language_eval_gemma3_manages_global_layers(assets, tmp_path):
    out = tmp_path / "gemma.json"
    extra = ("--protocols", "threshold", "--no-noise-floor", "--limit", "2", "--no-plot")
    rc = _eval(assets, "gemma3", out, "--policies", "namm,full,streaming,h2o", *extra)
    assert rc == 0
    header, records = _jsonl(out)
    assert header["settings"]["prompt"].startswith("raw") and header["settings"]["noise_floor"] is None
    assert len(records) == 2 * 4
    assert all(r["managed_layers"] == [2] and r["n_layers"] == 3 for r in records)
    _check_replay(records, ["streaming", "h2o"])
    summary = json.loads(out.read_text())
    assert summary["managed_layers"] == [2] and summary["n_layers"] == 3
    assert "plot" not in summary


def test_language_eval_ratio_protocol_without_namm(assets, tmp_path):
    out = tmp_path / "ratio.json"
    extra = ("--policies", "full,streaming", "--protocols", "ratio:0.5", "--no-noise-floor", "--limit", "1")
    assert _eval(assets, "llama", out, *extra) == 0
    header, records = _jsonl(out)
    assert header["namm_checkpoint"] is None and header["settings"]["protocols"] == ["ratio:0.5"]
    assert [r["key"].split("/")[0] for r in records] == ["full", "streaming@ratio-50"]  # no full-alt: switched off
    stream = records[1]
    assert stream["budget"] == "ratio:0.5" and stream["retained_cache"] < 1.0 and stream["protocol"] == "ratio-50"
    assert "kept_counts" not in stream


def test_language_eval_ratio_protocol_namm_keeps_its_top_share(assets, tmp_path):
    """ratio:R: the same network keeps its top R of the tokens seen, as every baseline does (no replay)."""
    import argparse

    from namm_transfer.evals.language.run import _protocols

    out = tmp_path / "top.json"
    rc = _eval(assets, "llama", out, "--policies", "namm,h2o", "--protocols", "ratio:25%", "--limit", "2")
    assert rc == 0
    header, records = _jsonl(out)
    assert header["settings"]["protocols"] == ["ratio:0.25"] and header["settings"]["noise_floor"] is None  # no full
    assert {r["protocol"] for r in records} == {"ratio-25"} and len(records) == 4
    _check_ratio(records, "ratio-25")
    for r in records:  # the threshold keeps about half with these weights (the other tests); the ratio a quarter
        assert 0.2 <= r["retained_cache"] <= 0.3, r["retained_cache"]
        assert r["loglik_rel"] is None and r["score"] is None  # no full cache to compare with
    assert _protocols("threshold") == "threshold" and _protocols("ratio:50%, threshold") == "ratio:0.5,threshold"
    for bad, message in (("tokens:64", "unknown protocol"), ("ratio:1", "share in"), ("ratio:0.5,ratio:50%", "twice")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            _protocols(bad)


def test_final_update_holds_the_ratio_at_the_end_of_the_prompt():
    """run_session(final_update=True) under RatioBudget(0.25): after the prompt every head holds floor(0.25 * prompt
    length) tokens; without it the last update (at a multiple of the interval) left more."""
    from namm_transfer.evals.language.run import run_session
    from tiny_models import tiny_decoder

    from namm_transfer.policies.base import RatioBudget
    from namm_transfer.registry import create_policy

    model = tiny_decoder("llama")
    prompt, answer = list(range(3, 53)), [7, 8]  # 50 tokens: updates at 16, 32, 48, then the final one at 50
    res = {
        final: run_session(model, create_policy("h2o", budget=RatioBudget(0.25)), prompt, answer, 3,
                           update_interval=16, chunk_size=8, device="cpu", final_update=final)
        for final in (True, False)
    }  # fmt: skip
    assert res[True].fork_update == 4 and res[False].fork_update == 3
    # (rows of updates before the fork are repeated for its two sequences)
    for layer, counts in res[True].kept_counts[3].items():
        assert all(row == [12] * len(row) for row in counts), layer  # floor(0.25 * 50)
    for layer, counts in res[False].kept_counts[2].items():
        assert all(row == [12] * len(row) for row in counts), layer  # floor(0.25 * 48), 2 tokens before the end
    assert 3 not in res[False].kept_counts  # the next update would be at 64, in the decoding phase


def test_language_eval_namm_sinks_option(assets, tmp_path, capsys):
    """--namm-sinks N: the loaded NAMM keeps its first N positions (recorded in the settings); bad N is refused."""
    out = tmp_path / "sinks.json"
    extra = ("--protocols", "threshold", "--limit", "1", "--no-plot")
    rc = _eval(assets, "llama", out, "--policies", "namm", "--namm-sinks", "2", *extra)
    assert rc == 0
    header, records = _jsonl(out)
    assert header["settings"]["namm_sink_tokens"] == 2 and len(records) == 1
    assert _eval(assets, "llama", tmp_path / "bad.json", "--policies", "namm", "--namm-sinks", "-1") == 2
    assert "--namm-sinks must be >= 0" in capsys.readouterr().err


def test_language_eval_namm_recent_option(assets, tmp_path, capsys):
    """--namm-recent N: the loaded NAMM keeps its newest N positions (in the settings only when set); bad N is
    refused."""
    extra = ("--policies", "namm", "--protocols", "threshold", "--limit", "1", "--no-plot")
    assert _eval(assets, "llama", tmp_path / "recent.json", "--namm-recent", "8", *extra) == 0
    header, records = _jsonl(tmp_path / "recent.json")
    assert header["settings"]["namm_recent_tokens"] == 8 and len(records) == 1
    assert _eval(assets, "llama", tmp_path / "plain.json", *extra) == 0
    assert "namm_recent_tokens" not in _jsonl(tmp_path / "plain.json")[0]["settings"]
    assert _eval(assets, "llama", tmp_path / "bad.json", "--policies", "namm", "--namm-recent", "-1") == 2
    assert "--namm-recent must be >= 0" in capsys.readouterr().err


def test_language_eval_sharded_then_merged(assets, tmp_path, monkeypatch):
    from namm_transfer.results import merge_shards

    out = tmp_path / "shard.json"
    extra = ("--policies", "namm,streaming", "--protocols", "threshold,ratio:0.5", "--limit", "2", "--no-plot")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert _eval(assets, "llama", out, *extra) == 0
        _, recs = _jsonl(tmp_path / f"shard.rank{rank}-of2.json")
        assert [r["task"] for r in recs] == [TASKS[rank]] * 4  # select_shard: samples[rank::2]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    merge_shards(str(tmp_path / "shard.rank*-of2.jsonl"), out)
    assert _eval(assets, "llama", out, *extra) == 0  # everything is done: only the summary is written
    _, recs = _jsonl(out)
    assert len(recs) == 8
    assert json.loads(out.read_text())["n_records"] == 8


def test_unknown_policy_is_refused(assets, tmp_path, capsys):
    assert _eval(assets, "llama", tmp_path / "x.json", "--policies", "full,nope") == 2
    assert "unknown policy nope" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
    argv = ["eval", "--target", "language", "--model", str(assets["llama"]), "--namm", str(tmp_path / "none")]
    argv.append("--keep-uncalibrated")
    assert cli_main([*argv, "--output", str(tmp_path / "y.json")]) == 2
    assert "no NAMM checkpoint" in capsys.readouterr().err


def test_help_is_torch_free():
    code = (
        "import sys\n"
        "from namm_transfer.cli import main\n"
        "rc = main(['eval', '--target', 'language', '--help'])\n"
        "assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for option in ("--protocols", "--no-noise-floor", "--calibrate", "--keep-uncalibrated", "--power", "--lengths"):
        assert option in done.stdout, option


def test_session_teacher_forces_the_answer_and_decodes_greedily():
    """run_session on a tiny Llama with the full cache: the answer log-probabilities are the unmodified model's,
    teacher-forced on prompt + answer, and the generation is its greedy decoding (row 0), not the forced row."""
    from namm_transfer.evals.language.run import run_session
    from tiny_models import tiny_decoder

    model = tiny_decoder("llama")
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 96, (40,), generator=g).tolist()
    answer = torch.randint(0, 96, (5,), generator=g).tolist()
    res = run_session(model, "full", prompt, answer, 6, update_interval=16, chunk_size=8, device="cpu")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None)
    logp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + 4], -1)
    expected = logp.gather(-1, torch.tensor(answer)[:, None]).squeeze(-1)
    assert res.answer_logprobs == pytest.approx(expected.tolist(), abs=1e-4)
    assert res.generated == greedy[0, len(prompt) :].tolist()
    assert res.generated[: len(answer)] != answer  # the two rows differ: the test tells them apart


def test_record_scores_the_generation_and_rows_average_tasks():
    """A record's exact_match is the scorer applied to the decoded generation (cut at EOS) and its score the answer's
    loglik relative to the full cache's; a summary row's score and exact_match are means over tasks of the task
    means, not over samples."""
    import math
    from types import SimpleNamespace

    from namm_transfer.evals.language.run import SessionResult, _record, summary_rows, with_loglik_rel

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(65 + i) for i in ids)

    sample = SimpleNamespace(task="passkey", id="s0", target_length=96, seed=1, answer="BC")
    res = SessionResult(
        generated=[1, 2, 9, 3], answer_logprobs=[-0.5, -1.5], kept_counts={}, fork_update=0, retained_cache=1.0,
        retained_prefill=1.0, peak_cache_bytes=2**20, peak_memory_bytes=None, prefill_s=1.0, decode_s=1.0,
        managed_layers=(0, 1), n_layers=2, n_updates=0,
    )  # fmt: skip

    def rec(generated, policy="full", full=None):
        r = SessionResult(**{**res.__dict__, "generated": generated})
        return _record(f"{policy}/s0", policy, sample, r, Tok(), {9}, lambda s, text: text == s.answer, [0] * 10,
                       [1, 2], 4, "cpu", None, protocol=None if policy == "full" else "ratio-50",
                       loglik_full=full)  # fmt: skip

    hit, miss = rec([1, 2, 9, 3]), rec([2, 1, 9, 3])
    assert hit["generation"] == "BC" and hit["exact_match"] == 100.0 and hit["stopped_at_eos"]
    assert miss["generation"] == "CB" and miss["exact_match"] == 0.0
    assert hit["loglik"] == pytest.approx(-1.0) and hit["score"] == hit["loglik_rel"] == 100.0
    other = rec([1, 2, 9, 3], policy="h2o", full=-0.5)
    assert other["protocol"] == "ratio-50" and other["loglik_rel"] == pytest.approx(100 * math.exp(-0.5))
    assert rec([1, 2], policy="h2o")["score"] is None  # no full cache yet

    def r(policy, task, i, loglik, em):
        proto = None if policy == "full" else "p"
        return {"policy": policy, "protocol": proto, "task": task, "sample_id": f"{task}{i}", "loglik": loglik,
                "exact_match": em}  # fmt: skip

    # task a: 3 samples, task b: 2 (a task needs two units for its stratum to be resampled within)
    full = [r("full", "a", i, -1.0, 100.0) for i in range(3)] + [r("full", "b", i, -2.0, 100.0) for i in range(2)]
    x = [r("x", "a", i, -1.0 + math.log(0.9), 100.0) for i in range(3)]
    x += [r("x", "b", i, -2.0 + math.log(0.5), 0.0) for i in range(2)]
    rows = summary_rows(with_loglik_rel(full + x), ["full", "x"], ["p"])
    assert [(row["policy"], row["protocol"]) for row in rows] == [("full", None), ("x", "p")]
    assert rows[1]["score"] == pytest.approx(70.0) and rows[1]["tasks"] == 2  # over samples it would be 74
    assert rows[1]["exact_match"] == pytest.approx(50.0)  # over samples 60
    assert rows[1]["vs_full"]["mean"] == pytest.approx(-30.0) and rows[1]["exact_match_vs_full"]["mean"] == -50.0
    assert rows[0]["score"] == 100.0 and "vs_full" not in rows[0]


def test_power_rule_worked_example(tmp_path, capsys):
    """Differences from the full cache: task a [1, 3] (variance 2), task b [0, 4] (variance 8): sd = sqrt(5); a +-1
    interval needs ceil(1.96^2 * 5) = ceil(19.2) = 20 prompts, a +-3 one ceil(2.13) = 3."""
    from namm_transfer.evals.language.run import power_rule

    recs = []
    for task, diffs in (("a", [1.0, 3.0]), ("b", [0.0, 4.0])):
        for i, d in enumerate(diffs):
            recs.append(
                {"policy": "full", "protocol": None, "task": task, "sample_id": f"{task}{i}", "loglik_rel": 100.0}
            )
            recs.append(
                {"policy": "x", "protocol": "p", "task": task, "sample_id": f"{task}{i}", "loglik_rel": 100 + d}
            )
    (label, v), = power_rule(recs, half_width=1.0).items()  # fmt: skip
    assert label == "x@p" and v["sd"] == pytest.approx(5**0.5) and v["n"] == 4 and v["required_prompts"] == 20
    assert power_rule(recs)["x@p"]["required_prompts"] == 3


def test_walk_cell_walks_the_ladder_and_stops_early():
    """n = 10, threshold 70: after 4 misses the rest cannot lift the mean to 70 (60 at best), so the setting is
    abandoned; 3 misses (70%) still pass. The first setting that passes is kept."""
    from namm_transfer.evals.language.calibration import walk_cell

    calls: list[tuple[int, int]] = []

    def measure(level, options, i):
        calls.append((level, i))
        return 0.0 if level == 0 or (level == 1 and i < 4) or (level == 2 and i < 3) else 100.0

    ladder = [{}, {"hops": 2}, {"hops": 1}, {"hops": 0}]
    cell = walk_cell("t", 96, ladder, measure, 10, 70.0)
    assert cell["passed"] and cell["level"] == 2 and cell["options"] == {"hops": 1} and cell["exact_match"] == 70.0
    assert [(t["level"], t["n"], t["stopped_early"], t["exact_match"]) for t in cell["tried"]] == [
        (0, 4, True, 0.0),
        (1, 4, True, 0.0),
        (2, 10, False, 70.0),
    ]
    assert calls == [(0, i) for i in range(4)] + [(1, i) for i in range(4)] + [(2, i) for i in range(10)]
    failed = walk_cell("t", 96, [{}], lambda *a: 50.0, 2, 70.0)  # (50 + 100) / 2 = 75: both prompts are run
    assert not failed["passed"] and failed["level"] is None and failed["tried"][0]["n"] == 2


def test_calibration_refuses_cells_below_the_threshold_unless_asked(assets, tmp_path, capsys, monkeypatch):
    """--calibrate on the tiny model (which answers nothing: every cell fails at every difficulty) writes the
    calibration file; the eval then refuses those cells unless --keep-uncalibrated (or --drop-uncalibrated). With a
    scorer that makes cells pass, the eval runs them at the difficulty they passed at."""
    from namm_transfer.evals.language import scoring

    cal = tmp_path / "cal.json"
    tasks = ("--tasks", "passkey,prose_fact")
    calibrate = ("--calibrate", "--calibration", str(cal), "--calibration-n", "2", *tasks)
    assert _eval(assets, "llama", tmp_path / "unused.json", *calibrate, common=SETTINGS) == 0
    assert not (tmp_path / "unused.jsonl").exists()
    data = json.loads(cal.read_text())
    assert data["target"] == "language-calibration" and data["threshold"] == 70.0
    assert data["model"] == str(assets["llama"]) and data["settings"]["split"] == "calibration"
    assert sorted(data["cells"]) == ["passkey/96", "prose_fact/96"] and data["failed"] == sorted(data["cells"])
    prose = data["cells"]["prose_fact/96"]  # 0% on the first prompt: (0 + 100) / 2 < 70, next setting
    assert [(t["level"], t["options"], t["n"], t["stopped_early"]) for t in prose["tried"]] == [
        (0, {}, 1, True),
        (1, {"n_distractors": 1}, 1, True),
        (2, {"n_distractors": 0}, 1, True),
    ]
    _, cal_records = _jsonl(cal)
    assert [r["key"] for r in cal_records] == [
        "full/passkey-calibration-96-0000/level0",
        *(f"full/prose_fact-calibration-96-0000/level{i}" for i in range(3)),
    ]
    assert all(r["exact_match"] == 0.0 for r in cal_records)
    # a later call for another task resumes the file and adds its cell
    more = ("--calibrate", "--calibration", str(cal), "--calibration-n", "2", "--tasks", "phonebook")
    assert _eval(assets, "llama", tmp_path / "unused.json", *more, common=SETTINGS) == 0
    assert sorted(json.loads(cal.read_text())["cells"]) == ["passkey/96", "phonebook/96", "prose_fact/96"]
    assert len(_jsonl(cal)[1]) == len(cal_records) + 3  # one prompt at each of phonebook's three settings
    capsys.readouterr()

    out = tmp_path / "lang.json"
    base = ("--calibration", str(cal), *tasks, "--policies", "full,namm", "--protocols", "threshold", "--no-plot")
    assert _eval(assets, "llama", out, *base, common=SETTINGS) == 2
    err = capsys.readouterr().err
    assert "2 (task, length) cell(s) failed or lack the full-cache calibration" in err
    assert "prose_fact/96 (full-cache exact match 0%, 0%, 0% < 70%)" in err and "--keep-uncalibrated" in err
    assert not out.with_suffix(".jsonl").exists()
    assert _eval(assets, "llama", out, *base, "--keep-uncalibrated", common=SETTINGS) == 0
    header, records = _jsonl(out)
    assert header["settings"]["calibration"]["kept_uncalibrated"] == ["passkey/96", "prose_fact/96"]
    assert len(records) == 2 * 3 and not any(r["calibrated"] for r in records)

    # the calibration file of another model is refused
    assert _eval(assets, "gemma3", tmp_path / "g.json", *base, common=SETTINGS) == 2
    assert "calibrates model" in capsys.readouterr().err

    # a scorer under which passkey passes and prose_fact passes with one distractor only
    def score(sample, text):
        return float(sample.task == "passkey" or len(sample.metadata.get("distractors", [])) == 1)

    monkeypatch.setattr(scoring, "score_sample", score)
    cal2 = tmp_path / "cal2.json"
    calibrate2 = ("--calibrate", "--calibration", str(cal2), "--calibration-n", "2", *tasks)
    assert _eval(assets, "llama", tmp_path / "unused.json", *calibrate2, common=SETTINGS) == 0
    data = json.loads(cal2.read_text())
    assert data["failed"] == [] and data["tuned"] == {"prose_fact/96": {"n_distractors": 1}}
    assert data["cells"]["passkey/96"]["exact_match"] == 100.0 and data["cells"]["passkey/96"]["level"] == 0
    assert [(t["level"], t["n"]) for t in data["cells"]["prose_fact/96"]["tried"]] == [(0, 1), (1, 2)]
    out2 = tmp_path / "lang2.json"
    base2 = ("--calibration", str(cal2), *tasks, "--policies", "full", "--no-noise-floor", "--no-plot")
    assert _eval(assets, "llama", out2, *base2, common=SETTINGS) == 0
    header, records = _jsonl(out2)
    assert header["settings"]["calibration"]["cells"] == {"passkey/96": {}, "prose_fact/96": {"n_distractors": 1}}
    prose_rec = next(r for r in records if r["task"] == "prose_fact")
    assert prose_rec["difficulty"] == {"n_distractors": 1} and prose_rec["calibrated"] is True

    # --drop-uncalibrated leaves out the failed cells (here: every prose_fact cell of the first calibration)
    monkeypatch.setattr(scoring, "score_sample", lambda sample, text: float(sample.task == "passkey"))
    cal3 = tmp_path / "cal3.json"
    assert _eval(assets, "llama", tmp_path / "u.json", "--calibrate", "--calibration", str(cal3),
                 "--calibration-n", "2", *tasks, common=SETTINGS) == 0  # fmt: skip
    out3 = tmp_path / "lang3.json"
    base3 = ("--calibration", str(cal3), *tasks, "--policies", "full", "--no-noise-floor", "--no-plot")
    assert _eval(assets, "llama", out3, *base3, common=SETTINGS) == 2
    assert _eval(assets, "llama", out3, *base3, "--drop-uncalibrated", common=SETTINGS) == 0
    header, records = _jsonl(out3)
    assert header["settings"]["calibration"]["dropped_uncalibrated"] == ["prose_fact/96"]
    assert {r["task"] for r in records} == {"passkey"}


def test_power_command_reads_a_finished_run(tmp_path, capsys):
    from namm_transfer.results import ResultsWriter

    w = ResultsWriter(tmp_path / "pilot.json", "pilot", target="language", settings={}, model="m",
                      namm_checkpoint=None, rank=0, world_size=1)  # fmt: skip
    for task, diffs in (("a", [1.0, 3.0]), ("b", [0.0, 4.0])):
        for i, d in enumerate(diffs):  # a run written before loglik_rel: loglik only
            w.add({"key": f"full/{task}{i}", "policy": "full", "task": task, "sample_id": f"{task}{i}", "loglik": -1.0})
            w.add({"key": f"x/{task}{i}", "policy": "x", "task": task, "sample_id": f"{task}{i}",
                   "loglik": -1.0 + math.log1p(d / 100)})  # fmt: skip
    argv = ["eval", "--target", "language", "--power", str(tmp_path / "pilot.jsonl")]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "+-3 point" in printed and "x " in printed and printed.rstrip().endswith("3")


def test_per_length_splits_prompts_over_the_tasks_run_at_each_length(assets, tmp_path):
    """--per-length 3 with prose_fact calibrated at 96 tokens only: at 96, ceil(3 / 2) = 2 prompts of each task; at
    128, passkey alone, 3 prompts. The prompts are the first of each task's cycle over both lengths."""
    from namm_transfer.evals.language.tasks import make_split

    from namm_transfer.models import load_model

    cal = tmp_path / "cal.json"
    cells = {
        "passkey/96": {"passed": True, "options": {}},
        "passkey/128": {"passed": True, "options": {}},
        "prose_fact/96": {"passed": True, "options": {"n_distractors": 1}},
        "prose_fact/128": {"passed": False, "options": None, "tried": [{"exact_match": 10.0}]},
    }
    cal.write_text(json.dumps({"model": str(assets["llama"]), "threshold": 70.0, "cells": cells}))
    out = tmp_path / "pl.json"
    argv = ["--lengths", "96,128", "--tasks", "passkey,prose_fact", "--per-length", "3", "--calibration", str(cal),
            "--drop-uncalibrated", "--policies", "full", "--no-noise-floor", "--no-plot"]  # fmt: skip
    assert _eval(assets, "llama", out, *argv, common=SETTINGS[2:]) == 0
    header, records = _jsonl(out)
    assert header["settings"]["per_length"] == 3 and header["settings"]["n"] is None
    assert header["settings"]["calibration"]["dropped_uncalibrated"] == ["prose_fact/128"]
    assert Counter((r["task"], r["length"]) for r in records) == {
        ("passkey", 96): 2,
        ("prose_fact", 96): 2,
        ("passkey", 128): 3,
    }
    _, tok = load_model(str(assets["llama"]), device="cpu", dtype="float32")
    cycle = [s.id for s in make_split("passkey", "heldout", n=6, lengths=[96, 128], tokenizer=tok)]
    assert sorted(r["sample_id"] for r in records if r["task"] == "passkey") == sorted(cycle[:4] + cycle[5:6])
    prose = [r for r in records if r["task"] == "prose_fact"]
    assert all(r["difficulty"] == {"n_distractors": 1} for r in prose)
    # more prompts later (--per-length 5): the file grows, the records already there are kept byte for byte
    before = out.with_suffix(".jsonl").read_text().splitlines()[1:]
    argv[argv.index("--per-length") + 1] = "5"
    assert _eval(assets, "llama", out, *argv, common=SETTINGS[2:]) == 0
    header, grown = _jsonl(out)
    assert header["settings"]["per_length"] == 5
    assert out.with_suffix(".jsonl").read_text().splitlines()[1 : 1 + len(before)] == before
    assert Counter((r["task"], r["length"]) for r in grown) == {
        ("passkey", 96): 3,
        ("prose_fact", 96): 3,
        ("passkey", 128): 5,
    }


def test_default_tasks_leave_out_failed_cells_named_tasks_are_refused(assets, tmp_path, capsys):
    """Without --tasks the eval runs the calibrated cells of the default task list and says which it left out;
    naming a failed task is refused (exit 2) unless --keep-uncalibrated or --drop-uncalibrated."""
    cal = tmp_path / "cal.json"
    cells = {f"{t}/96": {"passed": False, "options": None, "tried": [{"exact_match": 0.0}]} for t in TASKS}
    cells["passkey/96"] = {"passed": True, "options": {}}
    cal.write_text(json.dumps({"model": str(assets["llama"]), "threshold": 70.0, "cells": cells}))
    base = ("--calibration", str(cal), "--policies", "full", "--no-noise-floor", "--no-plot")
    out = tmp_path / "default.json"
    assert _eval(assets, "llama", out, *base, common=SETTINGS) == 0
    err = capsys.readouterr().err
    assert "left out (task, length) cells that failed the calibration: " in err and "prose_fact/96" in err
    header, records = _jsonl(out)
    assert {r["task"] for r in records} == {"passkey"}
    assert sorted(header["settings"]["calibration"]["dropped_uncalibrated"]) == sorted(
        f"{t}/96" for t in TASKS if t != "passkey"
    )
    named = tmp_path / "named.json"
    assert _eval(assets, "llama", named, *base, "--tasks", "passkey,prose_fact", common=SETTINGS) == 2
    assert "prose_fact/96" in capsys.readouterr().err and not named.exists()
