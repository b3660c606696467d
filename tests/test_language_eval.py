"""End to end: ``namm-transfer eval --target language`` on tiny random models and a random NAMM.

Covers: every policy's records and summary rows, replayed budgets (every baseline keeps NAMM's
per-layer, per-update cache lengths), the summary schema, resuming a killed run without repeating
records, refusing a results file written by another command, Gemma 3's managed (global) layers,
fixed-ratio budgets without a NAMM, and a torch-free ``--help``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
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
POLICIES = ["full", "namm", "h2o", "l2", "streaming", "random"]
TASKS = ["passkey", "kv_retrieval", "multikey_needle", "variable_tracking", "prose_fact"]
COMMON = ["--n", "1", "--lengths", "96", "--update-interval", "32", "--chunk-size", "32", "--max-new-tokens", "4"]


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


def _eval(assets: dict[str, Path], family: str, out: Path, *extra: str) -> int:
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
        *COMMON,
        *extra,
    ]
    return cli_main(argv)


def _jsonl(out: Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines() if x.strip()]
    return lines[0]["_header"], lines[1:]


def _check_replay(records: list[dict], baselines: list[str]) -> None:
    by_sample: dict[str, dict[str, dict]] = {}
    for r in records:
        by_sample.setdefault(r["sample_id"], {})[r["policy"]] = r
    for sample_id, recs in by_sample.items():
        namm = recs["namm"]
        assert namm["kept_counts"] and namm["updates"] >= 1, sample_id
        for b in baselines:
            assert recs[b]["kept_counts_hash"] == namm["kept_counts_hash"], (sample_id, b)
            assert recs[b]["updates"] == namm["updates"]
            assert recs[b]["retained_cache"] == pytest.approx(namm["retained_cache"], abs=1e-12), (sample_id, b)
            assert recs[b]["peak_cache_mb"] == pytest.approx(namm["peak_cache_mb"], abs=1e-12), (sample_id, b)


def test_language_eval_end_to_end_resume_and_refusal(assets, tmp_path, capsys):
    out = tmp_path / "results" / "lang.json"

    # a run "killed" after two samples (--limit), then the same command without the limit
    assert _eval(assets, "llama", out, "--limit", "2") == 0
    _, first = _jsonl(out)
    assert len(first) == 2 * len(POLICIES)
    assert {r["task"] for r in first} == set(TASKS[:2])  # samples are interleaved over tasks
    assert _eval(assets, "llama", out) == 0
    header, records = _jsonl(out)
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == len(TASKS) * len(POLICIES)
    assert Counter(r["policy"] for r in records) == {p: len(TASKS) for p in POLICIES}
    again = {r["key"]: r for r in records}
    for r in first:  # resumed, not recomputed
        assert again[r["key"]] == r

    # header: the run's identity
    s = header["settings"]
    assert s["tasks"] == TASKS and s["lengths"] == [96] and s["n"] == 1
    assert s["update_interval"] == 32 and s["chunk_size"] == 32 and s["budget_mode"] == "replay"
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
    for r in records:
        assert r["key"] == f"{r['policy']}/{r['sample_id']}"
        assert 0.0 <= r["score"] <= 100.0 and 0.0 < r["loglik_score"] <= 100.0 and r["loglik"] <= 0.0
        assert 0.0 < r["retained_cache"] <= 1.0 and r["peak_cache_mb"] > 0 and r["throughput"] > 0
        assert r["peak_memory_source"] == "kv_cache" and r["peak_memory_mb"] == r["peak_cache_mb"]
        assert r["managed_layers"] == [0, 1] and r["n_layers"] == 2
        assert r["generated_tokens"] <= 4 and isinstance(r["generation"], str)
        assert r["prompt_tokens"] > 32
    full = [r for r in records if r["policy"] == "full"]
    namm = [r for r in records if r["policy"] == "namm"]
    assert all(r["retained_cache"] == 1.0 for r in full)
    assert 0.05 < sum(r["retained_cache"] for r in namm) / len(namm) < 0.95  # the random NAMM evicts some tokens
    for f, n in zip(
        sorted(full, key=lambda r: r["sample_id"]), sorted(namm, key=lambda r: r["sample_id"]), strict=True
    ):
        assert n["peak_cache_mb"] <= f["peak_cache_mb"] + 1e-9
    _check_replay(records, ["h2o", "l2", "streaming", "random"])

    # summary
    summary = json.loads(out.read_text())
    for key in (*COMMON_SUMMARY_KEYS, "by_length", "managed_layers"):
        assert key in summary, key
    assert summary["target"] == "language" and summary["command"].startswith("namm-transfer eval --target language")
    assert summary["managed_layers"] == [0, 1] and summary["breakdown_by"] == "task"
    assert [row["policy"] for row in summary["rows"]] == ["namm", "full", "h2o", "l2", "streaming", "random"]
    for row in summary["rows"]:
        for key in (
            "policy",
            "score",
            "score_std",
            "n",
            "retained_cache",
            "peak_memory_mb",
            "throughput",
            "loglik_score",
            "peak_cache_mb",
        ):
            assert key in row, key
        assert row["n"] == len(TASKS)
    assert sorted(summary["breakdown"]) == sorted(TASKS)
    namm_row = summary["rows"][0]
    task_scores = [next(r["score"] for r in rows if r["policy"] == "namm") for rows in summary["breakdown"].values()]
    assert namm_row["score"] == pytest.approx(sum(task_scores) / len(task_scores))
    assert list(summary["by_length"]) == ["96"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert summary["plot"] == "lang.png" and out.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "policy" in printed and "streaming" in printed and "managed layers: [0, 1]" in printed

    # a results file written with other settings is refused, and left as it was
    before = out.with_suffix(".jsonl").read_text()
    assert _eval(assets, "llama", out, "--update-interval", "48") == 2
    assert "written by another command" in capsys.readouterr().err
    assert out.with_suffix(".jsonl").read_text() == before


def test_language_eval_gemma3_manages_global_layers(assets, tmp_path):
    out = tmp_path / "gemma.json"
    rc = _eval(assets, "gemma3", out, "--policies", "namm,full,streaming,h2o", "--limit", "2", "--no-plot")
    assert rc == 0
    header, records = _jsonl(out)
    assert header["settings"]["prompt"].startswith("raw")
    assert len(records) == 2 * 4
    assert all(r["managed_layers"] == [2] and r["n_layers"] == 3 for r in records)
    _check_replay(records, ["streaming", "h2o"])
    summary = json.loads(out.read_text())
    assert summary["managed_layers"] == [2] and summary["n_layers"] == 3
    assert "plot" not in summary


def test_language_eval_ratio_budget_without_namm(assets, tmp_path):
    out = tmp_path / "ratio.json"
    rc = _eval(assets, "llama", out, "--policies", "full,streaming", "--budget-mode", "ratio:0.5", "--limit", "1")
    assert rc == 0
    header, records = _jsonl(out)
    assert header["namm_checkpoint"] is None and header["settings"]["budget_mode"] == "ratio:0.5"
    stream = next(r for r in records if r["policy"] == "streaming")
    assert stream["budget"] == "ratio:0.5" and stream["retained_cache"] < 1.0
    assert "kept_counts" not in stream


def test_language_eval_namm_top_ratio_selection(assets, tmp_path):
    """--namm-selection ratio:R: the same network keeps its top R of the tokens seen; baselines replay that."""
    import argparse

    from namm_transfer.evals.language.run import _namm_selection

    out = tmp_path / "top.json"
    rc = _eval(assets, "llama", out, "--policies", "namm,h2o", "--namm-selection", "ratio:0.25", "--limit", "2")
    assert rc == 0
    header, records = _jsonl(out)
    assert header["settings"]["namm_selection"] == "ratio:0.25"
    _check_replay(records, ["h2o"])
    for r in records:  # the threshold keeps about half with these weights (the other tests); the ratio a quarter
        assert 0.2 <= r["retained_cache"] <= 0.3, r["retained_cache"]
    assert _namm_selection("threshold") == "threshold" and _namm_selection("ratio:0.5") == "ratio:0.5"
    for bad in ("tokens:64", "ratio:2", "top"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"use threshold or ratio:R with 0 < R <= 1$"):
            _namm_selection(bad)


def test_language_eval_namm_sinks_option(assets, tmp_path, capsys):
    """--namm-sinks N: the loaded NAMM keeps its first N positions (recorded in the settings); bad N is refused."""
    out = tmp_path / "sinks.json"
    rc = _eval(assets, "llama", out, "--policies", "namm", "--namm-sinks", "2", "--limit", "1", "--no-plot")
    assert rc == 0
    header, records = _jsonl(out)
    assert header["settings"]["namm_sink_tokens"] == 2 and len(records) == 1
    assert _eval(assets, "llama", tmp_path / "bad.json", "--policies", "namm", "--namm-sinks", "-1") == 2
    assert "--namm-sinks must be >= 0" in capsys.readouterr().err


def test_language_eval_sharded_then_merged(assets, tmp_path, monkeypatch):
    from namm_transfer.results import merge_shards

    out = tmp_path / "shard.json"
    extra = ("--policies", "namm,streaming", "--limit", "2", "--no-plot")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert _eval(assets, "llama", out, *extra) == 0
        _, recs = _jsonl(tmp_path / f"shard.rank{rank}-of2.json")
        assert [r["task"] for r in recs] == [TASKS[rank]] * 2  # select_shard: samples[rank::2]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    merge_shards(str(tmp_path / "shard.rank*-of2.jsonl"), out)
    assert _eval(assets, "llama", out, *extra) == 0  # everything is done: only the summary is written
    _, recs = _jsonl(out)
    assert len(recs) == 4
    assert json.loads(out.read_text())["n_records"] == 4


def test_unknown_policy_is_refused(assets, tmp_path, capsys):
    assert _eval(assets, "llama", tmp_path / "x.json", "--policies", "full,nope") == 2
    assert "unknown policy nope" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
    argv = ["eval", "--target", "language", "--model", str(assets["llama"]), "--namm", str(tmp_path / "none")]
    assert cli_main([*argv, "--output", str(tmp_path / "y.json")]) == 2
    assert "no NAMM checkpoint" in capsys.readouterr().err


def test_budget_mode_parsing():
    import argparse

    from namm_transfer.evals.language.run import parse_budget_mode

    assert parse_budget_mode("replay") == ("replay", None)
    assert parse_budget_mode("ratio:0.25") == ("ratio", 0.25)
    assert parse_budget_mode("tokens:512") == ("tokens", 512)
    for bad in ("ratio:1.5", "ratio:x", "tokens:0", "half"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_budget_mode(bad)


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
    assert "--budget-mode" in done.stdout and "--max-new-tokens" in done.stdout and "--lengths" in done.stdout


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
    """A record's score is the scorer applied to the decoded generation (cut at EOS); a summary row's score is the
    mean over tasks of the task means, not over samples."""
    from types import SimpleNamespace

    from namm_transfer.evals.language.run import SessionResult, _record, summary_rows

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(65 + i) for i in ids)

    sample = SimpleNamespace(task="passkey", id="s0", target_length=96, seed=1, answer="BC")
    res = SessionResult(
        generated=[1, 2, 9, 3], answer_logprobs=[-0.5, -1.5], kept_counts={}, fork_update=0, retained_cache=1.0,
        retained_prefill=1.0, peak_cache_bytes=2**20, peak_memory_bytes=None, prefill_s=1.0, decode_s=1.0,
        managed_layers=(0, 1), n_layers=2, n_updates=0,
    )  # fmt: skip

    def rec(generated):
        r = SessionResult(**{**res.__dict__, "generated": generated})
        return _record("full/s0", "full", sample, r, Tok(), {9}, lambda s, text: text == s.answer, [0] * 10,
                       [1, 2], 4, "cpu", None)  # fmt: skip

    hit, miss = rec([1, 2, 9, 3]), rec([2, 1, 9, 3])
    assert hit["generation"] == "BC" and hit["score"] == 100.0 and hit["stopped_at_eos"]
    assert miss["generation"] == "CB" and miss["score"] == 0.0
    assert hit["loglik"] == pytest.approx(-1.0)

    records = [{"policy": "full", "task": "a", "score": 100.0}] * 3 + [{"policy": "full", "task": "b", "score": 0.0}]
    (row,) = summary_rows(records, ["full"])
    assert row["score"] == pytest.approx(50.0) and row["tasks"] == 2  # over samples it would be 75
