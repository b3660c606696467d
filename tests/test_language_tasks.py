"""Generated long-context tasks, their scoring, and the LongBench loader and metrics (offline, CPU)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from namm_transfer.evals.language import longbench as LB
from namm_transfer.evals.language import scoring as S
from namm_transfer.evals.language import tasks as T
from namm_transfer.evals.language.prose import ProseGenerator

CORPUS = [
    "The hills are quiet and the river keeps moving. The pass key is 12345. Remember it well.",
    "One of the special numbers for amber-heron is 1234567. What is the special number?",
    "Felix went down to the harbour wall to return a borrowed ladder, carrying a clay jug.",
    'The JSON object below maps keys to values: {"0a1b2c3d-4e5f": "6a7b8c9d-0e1f"}.',
    "VAR ABCDE = 12345. VAR FGHIJ = VAR ABCDE. Which variables are assigned the value?",
]


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE tokenizer (any text encodes) with a toy chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    t.train_from_iterator(CORPUS * 8, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return fast


# ------------------------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("task", list(T.TASKS))
def test_deterministic(task):
    a = T.generate(task, 600, seed=11)
    b = T.generate(task, 600, seed=11)
    c = T.generate(task, 600, seed=12)
    assert a.to_dict() == b.to_dict()
    assert a.prompt != c.prompt
    assert a.prompt.endswith(a.answer_cue) and a.prompt.startswith(a.user_text)
    assert a.max_new_tokens == T.MAX_NEW_TOKENS[task]
    assert a.question in a.user_text and a.context in a.user_text


def test_prose_is_own_digit_free_text():
    gen, again = ProseGenerator(5), ProseGenerator(5)
    text = " ".join(gen.paragraph() for _ in range(50))
    assert not any(ch.isdigit() for ch in text)
    assert text == " ".join(again.paragraph() for _ in range(50))
    assert len(set(text.split(". "))) > 100  # varied, not one repeated sentence


@pytest.mark.parametrize("task", ["passkey", "multikey_needle", "kv_retrieval", "prose_fact"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_answer_occurs_exactly_once(task, seed):
    s = T.generate(task, 900, seed=seed)
    assert s.prompt.count(s.answer) == 1
    assert s.context.count(s.answer) == 1
    assert s.answer not in s.question
    if task in ("multikey_needle", "prose_fact"):
        distractors = s.metadata["distractors"]
        assert len(distractors) == 3
        field = "value" if task == "multikey_needle" else "village"
        values = [d[field] for d in distractors]
        assert s.answer not in values and len(set(values)) == len(values)
        for v in values:
            assert s.context.count(v) == 1
    if task == "multikey_needle":
        keys = [d["key"] for d in s.metadata["distractors"]]
        asked = s.metadata["key"]
        assert asked not in keys
        adj, noun = asked.split("-")
        assert keys[0] != asked and (keys[0].endswith("-" + noun) or keys[0].startswith(adj + "-"))  # near miss


def test_variable_tracking_chain():
    s = T.generate("variable_tracking", 900, seed=4)
    assert s.metric == "contains_all" and len(s.answers) == 5
    value = s.metadata["value"]
    assert s.context.count(f"= {value}.") == 1
    first, *rest = s.answers
    assert f"VAR {first} = {value}." in s.context
    positions = [s.context.index(f"VAR {name} =") for name in s.answers]
    assert positions == sorted(positions)  # assignments appear in chain order
    for prev, name in zip(s.answers, rest, strict=False):
        assert f"VAR {name} = VAR {prev}." in s.context
    other = s.metadata["distractor_chains"][0]
    assert other["value"] != value and not set(other["names"]) & set(s.answers)


@pytest.mark.parametrize("task", list(T.TASKS))
@pytest.mark.parametrize("target", [1024, 2048])
def test_length_within_ten_percent_with_tokenizer(task, target, tok):
    s = T.generate(task, target, seed=3, tokenizer=tok)
    n = len(tok.encode(s.prompt, add_special_tokens=False))
    assert n == s.length_tokens
    assert 0.9 * target <= n <= target
    assert s.chat_prompt is not None and s.user_text in s.chat_prompt
    assert s.length_tokens_chat == len(tok.encode(s.chat_prompt, add_special_tokens=False))


@pytest.mark.parametrize("task", list(T.TASKS))
def test_length_with_whitespace_counter_8k(task):
    s = T.generate(task, 8192, seed=5, count_tokens=T.whitespace_count)
    assert 0.9 * 8192 <= len(s.prompt.split()) == s.length_tokens <= 8192
    assert s.chat_prompt is None  # no tokenizer, no chat variant


def test_depth_places_the_needle():
    shallow = T.generate("passkey", 1500, seed=9, depth=0.1)
    deep = T.generate("passkey", 1500, seed=9, depth=0.9)
    rel = [s.context.index(s.answer) / len(s.context) for s in (shallow, deep)]
    assert rel[0] < 0.2 and rel[1] > 0.8
    assert shallow.metadata["depth"] == 0.1


def test_splits_differ_and_are_deterministic(tok):
    train = T.make_split("passkey", "train", n=8, tokenizer=tok, seed_base=1)
    again = T.make_split("passkey", "train", n=8, tokenizer=tok, seed_base=1)
    held = T.make_split("passkey", "heldout", n=8, tokenizer=tok, seed_base=1)
    assert [s.to_dict() for s in train] == [s.to_dict() for s in again]
    assert {s.target_length for s in train} == set(T.TRAIN_LENGTHS)
    assert {s.target_length for s in held} == set(T.HELDOUT_LENGTHS)
    assert not {s.seed for s in train} & {s.seed for s in held}
    assert not {s.prompt for s in train} & {s.prompt for s in held}
    assert all(s.split == "train" for s in train) and train[0].id.startswith("passkey-train-1024")
    assert [s.metadata["depth"] for s in train] == [0.1] * 4 + [0.3] * 4
    other_base = T.make_split("passkey", "train", n=8, tokenizer=tok, seed_base=2)
    assert {s.seed for s in other_base} != {s.seed for s in train}


def test_make_split_rejects_bad_input():
    with pytest.raises(ValueError):
        T.make_split("passkey", "test", n=1)
    with pytest.raises(KeyError):
        T.make_split("nope", "train", n=1)


def test_calibration_split_is_disjoint_from_train_and_heldout():
    """The calibration split (what the language eval measures the full cache on) shares no seed with the split
    evolution trains on (train, seed bases 0 and 1: the pools and the bias calibration) nor the held-out split."""
    for task in T.TASKS:
        seeds = {
            (split, base): {T.derive_seed(base, task, split, i) for i in range(200)}
            for split, base in (("calibration", 0), ("heldout", 0), ("train", 0), ("train", 1))
        }
        cal = seeds["calibration", 0]
        assert len(cal) == 200
        assert not cal & (seeds["heldout", 0] | seeds["train", 0] | seeds["train", 1]), task
    s = T.make_split("passkey", "calibration", n=5, count_tokens=T.whitespace_count)
    assert [x.target_length for x in s] == [*T.HELDOUT_LENGTHS, T.HELDOUT_LENGTHS[0]]
    assert s[0].id == "passkey-calibration-2048-0000" and s[0].split == "calibration"
    assert s[0].seed == T.derive_seed(0, "passkey", "calibration", 0)


def test_options_by_length_and_difficulty_ladders():
    s = T.make_split("prose_fact", "heldout", n=4, lengths=[300, 600], count_tokens=T.whitespace_count,
                     options_by_length={600: {"n_distractors": 0}})  # fmt: skip
    assert [len(x.metadata["distractors"]) for x in s] == [3, 0, 3, 0]
    assert set(T.DIFFICULTY) == set(T.TASKS) and all(ladder[0] == {} for ladder in T.DIFFICULTY.values())
    for task, ladder in T.DIFFICULTY.items():  # every setting is accepted by its task
        for options in ladder:
            T.generate(task, 200, 1, count_tokens=T.whitespace_count, **options)


def test_phonebook_is_an_eval_only_family():
    import argparse

    from namm_transfer.evolution.cli import _stage

    s = T.generate("phonebook", 400, 7, count_tokens=T.whitespace_count, depth=0.5)
    (number,) = s.answers
    assert re.fullmatch(r"\d{3}-\d{4}", number) and s.max_new_tokens == 16
    name = s.answer_cue.removeprefix("The phone number of ").removesuffix(" is")
    lines = s.context.splitlines()
    assert f"{name}: {number}" in lines and sum(line.startswith(f"{name}:") for line in lines) == 1
    assert s.metadata["entries"] == len(lines) and 300 < s.length_tokens <= 400
    easy = T.generate("phonebook", 400, 7, count_tokens=T.whitespace_count, depth=0.5, entries=3)
    listed = [line for line in easy.context.splitlines() if re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+: \d{3}-\d{4}", line)]
    assert len(listed) == 3 and listed.count(f"{name}: {number}") == 1 and easy.answers == [number]
    assert easy.metadata["entries"] == 3 and easy.metadata["filler_units"] > 20 and 300 < easy.length_tokens <= 400
    assert T.EVAL_ONLY_TASKS == {"phonebook"}
    assert _stage("passkey,kv_retrieval:3") == (["passkey", "kv_retrieval"], 3, None)
    with pytest.raises(argparse.ArgumentTypeError, match="phonebook is an evaluation-only task family"):
        _stage("passkey,phonebook:3")


# ----------------------------------------------------------------------------------------- scoring


def test_normalize_and_contains():
    assert S.normalize_text("  The Pass-Key is: 12,345!  ") == "the passkey is 12345"
    assert S.exact_match("The pass key is 12345.", "12345") == 1.0
    assert S.exact_match("12345", ["99999", "12345"]) == 1.0
    assert S.exact_match("123456", "12345") == 0.0  # whole words only
    assert S.exact_match("\n\n  Morwynkev.\nSomething else", "morwynkev") == 1.0
    assert S.exact_match("I think\nthe answer is 12345", "12345") == 0.0  # first line only
    assert S.exact_match("The pass key is:\n\n12345\n", "12345") == 1.0  # a line ending in ':' continues
    assert S.exact_match("The pass key is:\n\nunknown\n12345", "12345") == 0.0
    assert S.exact_match("", "12345") == 0.0
    assert S.exact_match("94b2b8fd-a02f-34a6", "94b2b8fd-a02f-34a6") == 1.0
    assert S.match_all("VAR ABCDE, FGHIJ and KLMNO", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"]) == 0.75


def test_score_samples_in_percent():
    a = T.generate("passkey", 300, seed=1)
    b = T.generate("variable_tracking", 300, seed=1)
    assert S.score_sample(a, a.answer) == 1.0
    assert S.score_sample(b.to_dict(), " ".join(b.answers[:2])) == pytest.approx(0.4)
    out = S.score_generations([a, a, b], [a.answer, "no idea", " ".join(b.answers)])
    assert out["passkey"] == pytest.approx(50.0) and out["variable_tracking"] == pytest.approx(100.0)
    assert out["average"] == pytest.approx(75.0)
    assert math.isnan(S.task_score([]))
    with pytest.raises(ValueError):
        S.score_generations([a], [])


def test_answer_logprob_hand_case():
    logits = torch.zeros(2, 3, 4)
    logits[0, 0, 1] = math.log(3.0)  # p(token 1) = 3 / 6 at the first position of row 0
    ids = torch.tensor([[1, 2, 3], [0, 0, 0]])
    out = S.answer_logprob(logits, ids)
    expected0 = math.log(0.5) + 2 * math.log(0.25)
    assert out.total[0].item() == pytest.approx(expected0, abs=1e-6)
    assert out.total[1].item() == pytest.approx(3 * math.log(0.25), abs=1e-6)
    assert out.mean[1].item() == pytest.approx(math.log(0.25), abs=1e-6)
    masked = S.answer_logprob(logits, ids, mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert masked.total[0].item() == pytest.approx(2 * math.log(0.25), abs=1e-6)
    assert masked.mean[0].item() == pytest.approx(math.log(0.25), abs=1e-6)
    assert masked.per_token[0, 0].item() == 0.0
    with pytest.raises(ValueError):
        S.answer_logprob(logits, ids[:, :2])


def test_prompt_answer_ids_span(tok):
    ids, (start, end) = S.prompt_answer_ids(tok, "The pass key is", "12345")
    assert tok.decode(ids[start:end]) == " 12345"
    assert ids[:start] == tok.encode("The pass key is")


def test_answer_batch_matches_unpadded_scoring(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    ).eval()
    prompts = ["The pass key is", "A much longer prompt about the hills and the river. The pass key is"]
    answers = ["12345", "9"]
    batch = S.build_answer_batch(tok, prompts, answers)
    assert batch.answer_ids.shape[1] == max(batch.answer_lengths)
    for i, (s, e) in enumerate(batch.spans):
        assert e == batch.input_ids.shape[1] and tok.decode(batch.input_ids[i, s:e]) == " " + answers[i]
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
        got = S.answer_logprob(logits[:, batch.logits_slice], batch.answer_ids, batch.answer_mask)
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            ids, (s, e) = S.prompt_answer_ids(tok, p, a)
            x = torch.tensor([ids])
            single = model(input_ids=x).logits
            ref = S.answer_logprob(single[:, s - 1 : e - 1], x[:, s:e])
            assert got.total[i].item() == pytest.approx(ref.total[0].item(), abs=1e-4)
            assert got.mean[i].item() == pytest.approx(ref.mean[0].item(), abs=1e-4)


# --------------------------------------------------------------------------------------- LongBench

FIXTURES = {
    "passage_retrieval_en": {
        "input": "An abstract about lighthouses.",
        "context": "Paragraph 1: Bread is baked.\n\nParagraph 2: Lighthouses guide ships.",
        "answers": ["Paragraph 2"],
        "length": 12,
        "dataset": "passage_retrieval_en",
        "language": "en",
        "all_classes": None,
        "_id": "pr0",
    },
    "dureader": {
        "input": "天空是什么颜色？",
        "context": "文章说天空是蓝色的。",
        "answers": ["天空是蓝色的"],
        "length": 10,
        "dataset": "dureader",
        "language": "zh",
        "all_classes": None,
        "_id": "du0",
    },
    "narrativeqa": {
        "input": "Who rescued the cat?",
        "context": "Mara climbed the tree and rescued the cat.",
        "answers": ["Mara"],
        "length": 8,
        "dataset": "narrativeqa",
        "language": "en",
        "all_classes": None,
        "_id": "nq0",
    },
    "qasper": {
        "input": "Which dataset is used?",
        "context": "We evaluate on the Penn Treebank.",
        "answers": ["Penn Treebank", "PTB"],
        "length": 6,
        "dataset": "qasper",
        "language": "en",
        "all_classes": None,
        "_id": "qa0",
    },
    "hotpotqa": {
        "input": "Where was the author born?",
        "context": "Passage 1:\nThe author was born in Lisbon.",
        "answers": ["Lisbon"],
        "length": 8,
        "dataset": "hotpotqa",
        "language": "en",
        "all_classes": None,
        "_id": "hp0",
    },
}


@pytest.fixture
def longbench_dir(tmp_path):
    for name, rec in FIXTURES.items():
        second = dict(rec, _id=rec["_id"].replace("0", "1"), length=5000)
        (tmp_path / f"{name}.jsonl").write_text(
            "\n".join(json.dumps(r, ensure_ascii=False) for r in (rec, second)) + "\n", encoding="utf-8"
        )
    return tmp_path


def test_longbench_loader(longbench_dir):
    everything = LB.load_longbench(longbench_dir)
    assert len(everything) == 10 and {s.dataset for s in everything} == set(FIXTURES)
    hp = LB.load_longbench(longbench_dir, "hotpotqa")
    assert [s.id for s in hp] == ["hp0", "hp1"] and hp[0].answers == ["Lisbon"] and hp[0].all_classes is None
    assert len(LB.load_longbench(longbench_dir, ["qasper", "dureader"], limit=1)) == 2
    one_file = LB.load_longbench(longbench_dir / "qasper.jsonl", "narrativeqa")
    assert one_file == []
    assert LB.load_longbench(longbench_dir / "dureader.jsonl")[0].input == "天空是什么颜色？"
    with pytest.raises(FileNotFoundError):
        LB.load_longbench(longbench_dir, "musique")
    bad = longbench_dir / "bad.jsonl"
    bad.write_text(json.dumps({"input": "x"}) + "\n")
    with pytest.raises(ValueError, match="missing LongBench field"):
        LB.load_longbench(bad)


def test_longbench_prompts(longbench_dir, tok):
    s = LB.load_longbench(longbench_dir, "passage_retrieval_en")[0]
    p = LB.build_prompt(s)
    assert p.startswith("Here are 30 paragraphs from Wikipedia, along with an abstract.")
    assert s.context in p and s.input in p and p.endswith("The answer is: ")
    zh = LB.build_prompt(LB.load_longbench(longbench_dir, "dureader")[0])
    assert zh.startswith("请基于给定的文章回答下述问题。") and zh.endswith("回答：")
    nq = LB.build_prompt(FIXTURES["narrativeqa"])
    assert "asconcisely" in nq and nq.endswith("Answer:")  # LongBench's own wording, typo included
    for name in FIXTURES:
        assert name in LB.PROMPTS and name in LB.MAX_NEW_TOKENS and name in LB.METRICS
    chat = LB.build_prompt(s, tok)
    assert chat.startswith("<s>user\n") and chat.endswith("<s>assistant\n")
    assert not LB.build_prompt(dict(FIXTURES["hotpotqa"], dataset="trec"), tok).startswith("<s>")  # NO_CHAT
    long_prompt = LB.build_prompt(dict(FIXTURES["hotpotqa"], context="word " * 2000), tok, max_length=64, chat=False)
    assert len(tok.encode(long_prompt)) <= 70
    assert long_prompt.startswith("Answer the question") and long_prompt.endswith("Answer:")
    with pytest.raises(KeyError):
        LB.build_prompt(dict(FIXTURES["hotpotqa"], dataset="unknown"))


def test_longbench_qa_f1():
    assert LB.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert LB.qa_f1_score("The Eiffel Tower", "eiffel tower") == 1.0
    # prediction "tower in paris" vs "eiffel tower": one shared token, p = 1/3, r = 1/2 -> F1 = 0.4
    assert LB.qa_f1_score("tower in Paris", "Eiffel Tower") == pytest.approx(0.4)
    assert LB.qa_f1_score("", "x") == 0.0
    # best over the answers: "it is ptb" vs "ptb" -> p = 1/3, r = 1 -> F1 = 0.5 (0 against "penn treebank")
    assert LB.score_prediction("qasper", "It is the PTB.", ["Penn Treebank", "PTB"]) == pytest.approx(0.5)


def test_longbench_retrieval_count_classification():
    assert LB.retrieval_score("Paragraph 2", "Paragraph 2") == 1.0
    assert LB.retrieval_score("Paragraph 2 or Paragraph 5", "Paragraph 2") == 0.5
    assert LB.retrieval_score("I do not know", "Paragraph 2") == 0.0
    assert LB.retrieval_zh_score("段落3", "段落3") == 1.0
    assert LB.count_score("There are 7 unique paragraphs", "7") == 1.0
    assert LB.count_score("7 or 8", "7") == 0.5
    classes = ["Location", "Abbreviation", "Description"]
    assert LB.classification_score("Location", "Location", all_classes=classes) == 1.0
    assert LB.classification_score("Location or Description", "Location", all_classes=classes) == 0.5
    assert LB.code_sim_score("# comment\nx = 1\n", "x = 1") == 1.0


@pytest.mark.skipif(LB._rouge_package() is not None, reason="exact values are for the built-in ROUGE-L")
def test_longbench_rouge_builtin():
    assert LB.rouge_score("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # LCS("a b c d", "a c e") = 2 -> p = 2/4, r = 2/3 -> F1 = 4/7
    assert LB.rouge_score("a b c d", "a c e") == pytest.approx(4 / 7)
    assert LB.rouge_score("", "a") == 0.0


def test_longbench_rouge_zh():
    assert LB.rouge_zh_score("天空是蓝色的", "天空是蓝色的") == pytest.approx(1.0, abs=1e-6)
    assert LB.rouge_zh_score("大海", "天空是蓝色的") == pytest.approx(0.0, abs=1e-6)
    partial = LB.rouge_zh_score("天空蓝", "天空是蓝色的")
    assert 0.0 < partial < 1.0
    try:
        import jieba  # noqa: F401
    except ImportError:
        if LB._rouge_package() is None:  # characters: LCS 3, p = 3/3, r = 3/6 -> F1 = 2/3
            assert partial == pytest.approx(2 / 3)
    assert LB.qa_f1_zh_score("天空是蓝色的。", "天空是蓝色的") == pytest.approx(1.0)


def test_longbench_scorer(longbench_dir):
    samples = LB.load_longbench(longbench_dir, ["passage_retrieval_en", "hotpotqa"])
    preds = ["Paragraph 2", "Paragraph 1", "Lisbon", "It was Porto."]
    out = LB.score_samples(samples, preds)
    assert out == {"passage_retrieval_en": 50.0, "hotpotqa": 50.0}
    assert LB.scorer("trec", ["Location\nmore text"], [["Location"]], [["Location", "Description"]]) == 100.0
    by_len = LB.scorer_by_length("hotpotqa", ["Lisbon", "no"], [["Lisbon"], ["Lisbon"]], [100, 5000])
    assert by_len["0-4k"] == 100.0 and by_len["4-8k"] == 0.0 and math.isnan(by_len["8k+"])
    assert re.fullmatch(r"\d+\.\d+|\d+", str(LB.scorer("hotpotqa", ["Lisbon"], [["Lisbon"]])))


@pytest.mark.parametrize("task", ["kv_retrieval", "multikey_needle", "prose_fact"])
def test_the_question_asks_for_the_fact_that_holds_the_answer(task):
    """In the context, the answer is bound to the key / person the question names (not to a distractor's), and
    the prose haystack is prose, not one sentence repeated."""
    import re

    from namm_transfer.evals.language.tasks import make_split

    for s in make_split(task, "heldout", n=6, lengths=[600, 1200]):
        if task == "kv_retrieval":
            key = re.search(r'key "([^"]+)"', s.question).group(1)
            assert f'"{key}": "{s.answer}"' in s.context
        elif task == "multikey_needle":
            key = re.search(r"special number for (\S+)\?", s.question).group(1)
            assert f"One of the special numbers for {key} is {s.answer}." in s.context
        else:
            name = re.search(r"In which village was (.+) born\?", s.question).group(1)
            holding = [x for x in re.split(r"(?<=[.!?])\s+", s.context) if s.answer in x]
            assert holding and all(name in x for x in holding), (name, holding)
        if task != "kv_retrieval":
            sentences = re.split(r"(?<=[.!?])\s+", s.context)
            assert len(set(sentences)) > 0.5 * len(sentences)
