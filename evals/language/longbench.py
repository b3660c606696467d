"""LongBench (v1) data loading, prompt formats and metrics, for users who have the data files.

LongBench (Bai et al., 2023, https://github.com/THUDM/LongBench, MIT licence) ships one JSONL file per
dataset (``data/<dataset>.jsonl``; LongBench-E files are ``<dataset>_e.jsonl``) with the fields
``input, context, answers (list), length, dataset, language, all_classes, _id``. The data is not
bundled here (it is fetched from the hub by users who have one); this module reads those files from
a local path and reproduces the benchmark's protocol:

- ``PROMPTS``: LongBench's per-dataset prompt templates (``dataset2prompt``), ``MAX_NEW_TOKENS``
  its generation budgets (``dataset2maxlen``), ``NO_CHAT`` the few-shot / code datasets it feeds
  without a chat template, and :func:`truncate_middle`, its rule for prompts longer than the model's
  budget (keep the first and last half).
- Metrics, re-implemented from the paper's definitions: ``qa_f1_score`` (token F1 after SQuAD-style
  ``normalize_answer``: lower-case, drop punctuation and articles, collapse spaces), ``qa_f1_zh_score``,
  ``rouge_score``, ``rouge_zh_score``, ``classification_score``, ``retrieval_score`` ("Paragraph N"),
  ``retrieval_zh_score``, ``count_score`` and ``code_sim_score``; :func:`scorer` takes the best score
  over the reference answers and averages in percent, like LongBench's ``eval.py``.

Differences from the reference implementation, kept small and documented:

- Chinese word segmentation uses ``jieba`` when it is installed; otherwise every CJK character is a
  token (Latin/digit runs stay whole words). Scores without jieba are character-level and can differ
  from published numbers by a few points.
- ROUGE-L uses the ``rouge`` package (as LongBench does) when it is installed; otherwise a built-in
  ROUGE-L F1 over the longest common subsequence of whitespace tokens (characters / jieba words for
  Chinese). The ``rouge`` package weights recall and precision slightly differently, so scores can
  differ in the first decimal.
- ``code_sim_score`` uses ``difflib.SequenceMatcher`` (the ratio that ``fuzzywuzzy.fuzz.ratio``
  computes without python-Levenshtein).
"""

from __future__ import annotations

import difflib
import json
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "LongBenchSample",
    "PROMPTS",
    "MAX_NEW_TOKENS",
    "METRICS",
    "NO_CHAT",
    "FIRST_LINE_DATASETS",
    "load_longbench",
    "build_prompt",
    "truncate_middle",
    "normalize_answer",
    "normalize_zh_answer",
    "qa_f1_score",
    "qa_f1_zh_score",
    "rouge_score",
    "rouge_zh_score",
    "classification_score",
    "retrieval_score",
    "retrieval_zh_score",
    "count_score",
    "code_sim_score",
    "score_prediction",
    "scorer",
    "scorer_by_length",
    "score_samples",
]

REQUIRED_FIELDS = ("input", "context", "answers", "length", "dataset", "language", "all_classes", "_id")

_QA_MULTI = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
)
_QA_MULTI_PROMPT = (
    f"{_QA_MULTI}\n\nThe following are given passages.\n{{context}}\n\n{_QA_MULTI}\n\nQuestion: {{input}}\nAnswer:"
)
_QASPER = (
    "Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question "
    'cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no '
    'question, answer "yes", "no", or "unanswerable". Do not provide any explanation.'
)

PROMPTS: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\n"
        "Story: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single "
        "phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "qasper": (
        f"You are given a scientific article and a question. {_QASPER}\n\nArticle: {{context}}\n\n "
        f"Answer the question based on the above article as concisely as you can, using a single phrase or sentence "
        f"if possible. If the question cannot be answered based on the information in the article, write "
        f'"unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not '
        f"provide any explanation.\n\nQuestion: {{input}}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n"
        "问题：{input}\n回答："
    ),
    "hotpotqa": _QA_MULTI_PROMPT,
    "2wikimqa": _QA_MULTI_PROMPT,
    "musique": _QA_MULTI_PROMPT,
    "dureader": (
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答："
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:"
    ),
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        'the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", '
        "etc.\n\nThe answer is: "
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
        '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：'
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}  # fmt: skip

NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
"""Datasets LongBench feeds as plain completion (few-shot or code), never through a chat template."""

FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
"""Datasets whose prediction is cut to its first line before scoring."""


# -------------------------------------------------------------------------------------------- loading


@dataclass
class LongBenchSample:
    """One LongBench record (``id`` is the file's ``_id``)."""

    input: str
    context: str
    answers: list[str]
    length: int
    dataset: str
    language: str
    all_classes: list[str] | None
    id: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["_id"] = d.pop("id")
        return d


def _parse(record: dict[str, Any], where: str) -> LongBenchSample:
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise ValueError(f"{where}: missing LongBench field(s) {', '.join(missing)}")
    answers = record["answers"]
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list):
        raise ValueError(f"{where}: 'answers' must be a list of strings")
    return LongBenchSample(
        input=record["input"] or "",
        context=record["context"] or "",
        answers=[str(a) for a in answers],
        length=int(record["length"]),
        dataset=str(record["dataset"]),
        language=str(record["language"]),
        all_classes=list(record["all_classes"]) if record["all_classes"] else None,
        id=str(record["_id"]),
        extra={k: v for k, v in record.items() if k not in REQUIRED_FIELDS},
    )


def load_longbench(
    path: str | Path, datasets: str | Sequence[str] | None = None, *, limit: int | None = None
) -> list[LongBenchSample]:
    """Read LongBench JSONL records.

    Args:
        path: a ``.jsonl`` file, or a folder holding ``<dataset>.jsonl`` files (LongBench's ``data/``).
        datasets: with a folder, which datasets to read (names of files without ``.jsonl``; e.g.
            ``"hotpotqa"`` or ``"hotpotqa_e"``); all files when None. With a file, keeps only records
            whose ``dataset`` field is listed.
        limit: at most this many records per file (the first ones, in file order).

    Raises:
        FileNotFoundError: no such file / dataset file. ValueError: a record lacks a LongBench field.
    """
    path = Path(path)
    wanted = [datasets] if isinstance(datasets, str) else list(datasets) if datasets is not None else None
    if path.is_dir():
        if wanted is None:
            files = sorted(path.glob("*.jsonl"))
        else:
            files = [path / f"{d}.jsonl" for d in wanted]
            absent = [str(f) for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"LongBench file(s) not found: {', '.join(absent)}")
        keep = None
    elif path.is_file():
        files, keep = [path], set(wanted) if wanted is not None else None
    else:
        raise FileNotFoundError(f"no LongBench file or folder at {path}")
    out: list[LongBenchSample] = []
    for f in files:
        n = 0
        with f.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                s = _parse(json.loads(line), f"{f}:{i}")
                if keep is not None and s.dataset not in keep:
                    continue
                out.append(s)
                n += 1
                if limit is not None and n >= limit:
                    break
    return out


# -------------------------------------------------------------------------------------------- prompts


def truncate_middle(prompt: str, tokenizer: Any, max_length: int) -> str:
    """LongBench's truncation: a prompt over ``max_length`` tokens keeps its first and last halves."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if len(ids) <= max_length:
        return prompt
    half = max_length // 2
    return tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(
        ids[-half:], skip_special_tokens=True
    )


def build_prompt(
    sample: LongBenchSample | dict[str, Any],
    tokenizer: Any = None,
    *,
    max_length: int | None = None,
    chat: bool | None = None,
) -> str:
    """The LongBench prompt for a sample, truncated in the middle and chat-formatted like ``pred.py``.

    Args:
        sample: a :class:`LongBenchSample` or a raw record.
        tokenizer: needed for ``max_length`` and for the chat template.
        max_length: prompt token budget (before the chat template); no truncation when None.
        chat: apply the tokenizer's chat template; default: when the tokenizer has one and the
            dataset is not in ``NO_CHAT``.
    """
    rec = sample if isinstance(sample, dict) else {"dataset": sample.dataset, "context": sample.context,
                                                    "input": sample.input}  # fmt: skip
    dataset = rec["dataset"].removesuffix("_e")
    if dataset not in PROMPTS:
        raise KeyError(f"no LongBench prompt for dataset {dataset!r}; known: {', '.join(sorted(PROMPTS))}")
    prompt = PROMPTS[dataset].format(context=rec["context"], input=rec["input"])
    if max_length is not None:
        if tokenizer is None:
            raise ValueError("max_length needs a tokenizer")
        prompt = truncate_middle(prompt, tokenizer, max_length)
    has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        chat = has_template and dataset not in NO_CHAT
    if chat:
        if not has_template:
            raise ValueError("chat=True but the tokenizer has no chat template")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


# -------------------------------------------------------------------------------------------- metrics


def normalize_answer(s: str) -> str:
    """SQuAD/LongBench normalization: lower-case, drop punctuation, drop a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_ZH_PUNCT = set(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


def normalize_zh_answer(s: str) -> str:
    """LongBench's Chinese normalization: lower-case, drop English and Chinese punctuation and all spaces."""
    s = s.lower()
    drop = _ZH_PUNCT | set(string.punctuation)
    return "".join("".join(ch for ch in s if ch not in drop).split())


def _f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    common = Counter(prediction) & Counter(ground_truth)
    same = sum(common.values())
    if same == 0:
        return 0.0
    p, r = same / len(prediction), same / len(ground_truth)
    return 2 * p * r / (p + r)


def qa_f1_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Token F1 between normalized prediction and answer (LongBench ``qa_f1_score``)."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _is_cjk(ch: str) -> bool:
    return "CJK" in unicodedata.name(ch, "") or "\u3040" <= ch <= "\u30ff"


def _zh_tokens(text: str) -> list[str]:
    """jieba words when jieba is installed; else CJK characters and whole Latin/digit runs."""
    try:
        import jieba  # type: ignore[import-not-found]
    except ImportError:
        jieba = None
    if jieba is not None:
        return list(jieba.cut(text, cut_all=False))
    out: list[str] = []
    buf = ""
    for ch in text:
        if _is_cjk(ch) or ch.isspace() or unicodedata.category(ch).startswith("P"):
            if buf:
                out.append(buf)
                buf = ""
            if not ch.isspace():
                out.append(ch)
        else:
            buf += ch
    if buf:
        out.append(buf)
    return out


def qa_f1_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """F1 over normalized Chinese tokens (jieba words, or characters without jieba)."""
    pred = [t for t in (normalize_zh_answer(x) for x in _zh_tokens(prediction)) if t]
    gt = [t for t in (normalize_zh_answer(x) for x in _zh_tokens(ground_truth)) if t]
    return _f1(pred, gt)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _rouge_l_f1(pred: Sequence[str], ref: Sequence[str]) -> float:
    if not pred or not ref:
        return 0.0
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


def _rouge_package() -> Any:
    try:
        from rouge import Rouge  # type: ignore[import-not-found]
    except ImportError:
        return None
    return Rouge()


def rouge_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """ROUGE-L F over whitespace tokens (the ``rouge`` package's when installed, else built-in F1)."""
    rouge = _rouge_package()
    if rouge is not None:
        try:
            return float(rouge.get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"])
        except Exception:  # the package raises on empty hypotheses; LongBench scores those 0
            return 0.0
    return _rouge_l_f1(prediction.split(), ground_truth.split())


def rouge_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """ROUGE-L for Chinese: jieba words (if installed) or characters, joined by spaces, then :func:`rouge_score`."""
    pred = " ".join(t for t in _zh_tokens(prediction) if t.strip())
    gt = " ".join(t for t in _zh_tokens(ground_truth) if t.strip())
    return rouge_score(pred, gt)


def classification_score(
    prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None, **_: Any
) -> float:
    """1/k if the answer is among the k classes named in the prediction (ignoring names inside the answer)."""
    classes = list(all_classes or [])
    named = [c for c in classes if c in prediction]
    named = [c for c in named if not (c in ground_truth and c != ground_truth)]
    return 1.0 / len(named) if ground_truth in named else 0.0


def _retrieval(prediction: str, ground_truth: str, pattern: str) -> float:
    found = re.findall(pattern, ground_truth)
    if not found:
        return 0.0
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == found[0] for n in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """passage_retrieval_en: the answer is "Paragraph N"; the share of numbers in the prediction equal to N."""
    return _retrieval(prediction, ground_truth, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """passage_retrieval_zh: as :func:`retrieval_score` with "段落N"."""
    return _retrieval(prediction, ground_truth, r"段落(\d+)")


def count_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """passage_count: the share of numbers in the prediction equal to the answer."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == str(ground_truth) for n in numbers) / len(numbers)


def code_sim_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """lcc / repobench-p: similarity of the first code line (skipping comment/fence lines) to the answer."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return round(100 * difflib.SequenceMatcher(None, line, ground_truth).ratio()) / 100


METRICS: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score, "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score, "musique": qa_f1_score,
    "dureader": rouge_zh_score, "gov_report": rouge_score, "qmsum": rouge_score, "multi_news": rouge_score,
    "vcsum": rouge_zh_score, "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score,
    "lsht": classification_score, "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score, "lcc": code_sim_score, "repobench-p": code_sim_score,
}  # fmt: skip


def score_prediction(
    dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None
) -> float:
    """Best metric value over the reference answers for one prediction, in [0, 1]."""
    dataset = dataset.removesuffix("_e")
    if dataset not in METRICS:
        raise KeyError(f"no LongBench metric for dataset {dataset!r}")
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[dataset]
    return max((metric(prediction, a, all_classes=all_classes) for a in answers), default=0.0)


def scorer(
    dataset: str,
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    all_classes: Sequence[Sequence[str] | None] | Sequence[str] | None = None,
) -> float:
    """Dataset score in percent, rounded to two decimals (LongBench ``eval.py``'s ``scorer``)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    classes = _per_sample_classes(all_classes, len(predictions))
    total = sum(score_prediction(dataset, p, a, c) for p, a, c in zip(predictions, answers, classes, strict=True))
    return round(100 * total / len(predictions), 2) if predictions else 0.0


def scorer_by_length(
    dataset: str,
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    lengths: Sequence[int],
    all_classes: Sequence[Sequence[str] | None] | Sequence[str] | None = None,
) -> dict[str, float]:
    """LongBench-E: scores in percent for lengths 0-4k, 4-8k and 8k+ (words / characters as in the files)."""
    classes = _per_sample_classes(all_classes, len(predictions))
    bins: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
    for p, a, n, c in zip(predictions, answers, lengths, classes, strict=True):
        key = "0-4k" if n < 4000 else "4-8k" if n < 8000 else "8k+"
        bins[key].append(score_prediction(dataset, p, a, c))
    return {k: round(100 * sum(v) / len(v), 2) if v else float("nan") for k, v in bins.items()}


def _per_sample_classes(all_classes: Any, n: int) -> list[Sequence[str] | None]:
    if all_classes is None:
        return [None] * n
    items = list(all_classes)
    if items and all(isinstance(c, str) for c in items):  # one class list shared by every sample
        return [items] * n
    if len(items) != n:
        raise ValueError(f"all_classes has {len(items)} entries for {n} predictions")
    return items


def score_samples(samples: Iterable[LongBenchSample], predictions: Sequence[str]) -> dict[str, float]:
    """Per-dataset scores (percent) for loaded samples and their predictions, in order."""
    by: dict[str, tuple[list[str], list[list[str]], list[list[str] | None]]] = {}
    samples = list(samples)
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    for s, p in zip(samples, predictions, strict=True):
        preds, answers, classes = by.setdefault(s.dataset, ([], [], []))
        preds.append(p)
        answers.append(s.answers)
        classes.append(s.all_classes)
    return {d: scorer(d, p, a, c) for d, (p, a, c) in by.items()}
