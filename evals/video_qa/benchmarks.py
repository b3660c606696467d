"""Readers, prompts, answer parsing and scoring for multiple-choice video QA benchmarks.

Every reader returns a list of :class:`QASample`; the original record stays in ``sample.extra``
(together with ``extra["benchmark"]``, which :func:`build_prompt` dispatches on).

Layouts read (see each reader for details):

- LongVideoBench (validation json, a list of records): ``id``, ``video_path`` (relative to
  ``<data_dir>/videos/`` or absolute), ``subtitle_path``, ``duration``, ``duration_group``,
  ``question_category``, ``question``, ``option0``..``option4`` (``"N/A"`` when unused) or a
  ``candidates`` list, ``correct_choice`` (int; absent on the test split),
  ``starting_timestamp_for_subtitles``. The synthetic benchmark of
  :mod:`namm_transfer.evals.video_qa.synthetic` is written in this layout.
- MLVU (dev): ``<data_dir>/json/<k>_<task>.json`` (e.g. ``1_plotQA.json``) with videos under
  ``<data_dir>/video/<k>_<task>/``. Two record shapes are accepted: the original release
  (``video``, ``question``, ``candidates``, ``answer`` as the option *text*, ``question_type``) and the
  lmms-eval one (``video_name``, ``question`` with the options inside the text as ``(A) ...`` lines,
  ``answer`` as a *letter*, ``task_type``). Task names are mapped to the paper's abbreviations
  (:data:`MLVU_TASK_TYPES`: plotQA -> PQA, needle -> NQA, ego -> ER, count -> AC, order -> AO,
  anomaly_reco -> AR, topic_reasoning -> TR, sub_scene -> SSC, summary -> VS). Open-ended records
  (SSC and VS have no options; they are scored by an LLM judge, not accuracy) are skipped with a
  log message.
- Video-MME: a parquet (needs pyarrow) or json / jsonl file of records with ``video_id``,
  ``duration`` (short / medium / long), ``domain``, ``sub_category``, ``videoID``, ``question_id``,
  ``task_type``, ``question``, ``options`` (four strings, usually already prefixed "A. ...") and
  ``answer`` (a letter). Videos are looked up as ``<data_dir>/data/<videoID>.mp4`` (also ``.MP4``,
  ``.mkv``, and ``<data_dir>/videos/``), the layout of the released archive.

Answer parsing (:func:`parse_answer`): the first standalone capital letter among the first
``n_options`` letters (a letter with no other letter directly before or after it, so "(C) because"
gives C and "The answer is D." gives D, but the "A" of "Apple" is not a choice; only capitals count,
so "b" is not read as B). When there is none, the default is deterministic: the prediction is
``None``, scored as wrong, and ``used_fallback`` is recorded. Passing ``rng`` reproduces the
reference evaluations' fallback instead (a random option, drawn from that seeded generator), still
flagged as a fallback. A standalone "A" used as an article ("A red circle ...") counts as option A,
as in the reference parsers.

Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ANSWER_DIRECTLY",
    "MLVU_POST_PROMPT",
    "MLVU_TASK_TYPES",
    "VIDEOMME_OFFICIAL_POST_PROMPT",
    "VIDEOMME_OFFICIAL_PRE_PROMPT",
    "QASample",
    "accuracy",
    "build_longvideobench_prompt",
    "build_mlvu_prompt",
    "build_prompt",
    "build_videomme_prompt",
    "format_options",
    "load_longvideobench",
    "load_mlvu",
    "load_videomme",
    "mlvu_m_avg",
    "parse_answer",
    "score_response",
]

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_DIRECTLY = "Answer with the option's letter from the given choices directly."
"""Post-prompt of the LongVideoBench (and, by default here, Video-MME) evaluations."""
MLVU_POST_PROMPT = "\nOnly give the best option.\nBest option: ("
"""Appended to the MLVU question (which already lists the options); the model continues after "(".
(lmms-eval's own ``mlvu_doc_to_text`` also prefixes a newline and puts a blank line before
"Best option"; this follows the task's configured post-prompt.)"""
VIDEOMME_OFFICIAL_PRE_PROMPT = (
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter (A, B, C, or D) of the correct option.\n"
)
"""The Video-MME paper's frames-only instruction, for ``build_videomme_prompt(pre_prompt=...)``."""
VIDEOMME_OFFICIAL_POST_PROMPT = "The best answer is:"
"""The Video-MME paper's answer cue, for ``build_videomme_prompt(post_prompt=...)``."""

MLVU_TASK_TYPES: dict[str, str] = {
    "plotQA": "PQA",
    "needle": "NQA",
    "needleQA": "NQA",
    "ego": "ER",
    "count": "AC",
    "order": "AO",
    "anomaly_reco": "AR",
    "topic_reasoning": "TR",
    "sub_scene": "SSC",
    "summary": "VS",
}
"""MLVU task names (file names, ``question_type`` / ``task_type`` values) -> abbreviations."""
MLVU_ABBREVIATIONS = ("TR", "AR", "VS", "NQA", "ER", "PQA", "SSC", "AO", "AC")
MLVU_OPEN_ENDED = ("SSC", "VS")

_NA = {"", "n/a"}  # "None" can be a real option text, so only these mark an unused slot


@dataclass
class QASample:
    """One multiple-choice question about one video.

    Attributes:
        id: unique id within its benchmark.
        video_path: the video file (not checked for existence here).
        question: the question stem, without the options.
        options: option texts without letter prefixes (at least one).
        answer_index: index of the correct option, or ``None`` when the split has no answers.
        category: question category / task type used for per-category accuracy.
        duration_group: duration bucket (LongVideoBench seconds such as 60 or 600, or Video-MME
            "short" / "medium" / "long").
        extra: everything else from the source record, plus ``benchmark``.
    """

    id: str
    video_path: Path
    question: str
    options: list[str]
    answer_index: int | None
    category: str | None = None
    duration_group: str | int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.video_path = Path(self.video_path)
        self.options = list(self.options)
        if not self.options:
            raise ValueError(f"sample {self.id!r} has no options; a multiple-choice question needs at least one")
        if len(self.options) > len(LETTERS):
            raise ValueError(f"sample {self.id!r} has {len(self.options)} options, more than {len(LETTERS)} letters")
        if self.answer_index is not None and not 0 <= self.answer_index < len(self.options):
            raise ValueError(
                f"sample {self.id!r}: answer index {self.answer_index} is outside its {len(self.options)} options"
            )

    @property
    def answer_letter(self) -> str | None:
        """The correct option's letter (``"A"``...), or ``None``."""
        return None if self.answer_index is None else LETTERS[self.answer_index]


# ------------------------------------------------------------------------------------------ helpers


def _load_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"annotation file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(
                f"reading {path} needs pyarrow (pip install pyarrow), or convert it to json first"
            ) from exc
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):
        for key in ("data", "records", "questions"):
            if isinstance(data.get(key), list):
                return data[key]
        raise ValueError(f"{path}: expected a list of records (or a dict with a 'data' list)")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


def _is_na(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NA)


_PREFIX = re.compile(r"^\s*\(?([A-Z])\s*[\.\):]\s*")


def _strip_letter(option: str, index: int) -> str:
    """Remove a leading "A. " / "(A) " / "A: " when its letter matches the option's position."""
    m = _PREFIX.match(option)
    if m and m.group(1) == LETTERS[index]:
        return option[m.end() :].strip()
    return option.strip()


_OPTION_LINE = re.compile(r"^\s*\(([A-Z])\)\s*(.*)$|^\s*([A-Z])[\.\)]\s+(.*)$")


def _split_question_options(text: str) -> tuple[str, list[str]]:
    """Split "stem\\n(A) x\\n(B) y" into the stem and option texts (options must run A, B, C, ...)."""
    lines = text.splitlines()
    for start, line in enumerate(lines):
        m = _OPTION_LINE.match(line)
        if m and (m.group(1) or m.group(3)) == "A":
            options: list[str] = []
            for ln in lines[start:]:
                mm = _OPTION_LINE.match(ln)
                if mm and (mm.group(1) or mm.group(3)) == LETTERS[len(options)]:
                    options.append((mm.group(2) if mm.group(1) else mm.group(4)).strip())
                elif ln.strip() and options:
                    options[-1] = options[-1] + " " + ln.strip()  # an option wrapped over lines
            stem = "\n".join(lines[:start]).strip()
            return stem, options
    return text.strip(), []


def _letter_index(answer: Any, n_options: int, sample_id: str) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer
    s = str(answer).strip().strip("()").strip()
    if len(s) >= 1 and s[0] in LETTERS[:n_options] and (len(s) == 1 or not s[1].isalpha()):
        return LETTERS.index(s[0])
    raise ValueError(f"sample {sample_id!r}: cannot read answer {answer!r} as one of {LETTERS[:n_options]}")


# ---------------------------------------------------------------------------------- LongVideoBench


def load_longvideobench(
    json_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    *,
    video_dir: str = "videos",
) -> list[QASample]:
    """Read a LongVideoBench-style json (the validation file, or the synthetic benchmark).

    Args:
        json_path: the annotation json (a list of records).
        data_dir: the dataset root; relative ``video_path`` values resolve to
            ``<data_dir>/<video_dir>/<video_path>``. Defaults to the json's folder.
        video_dir: sub-folder of ``data_dir`` holding the videos.

    Returns:
        One :class:`QASample` per record; ``category`` is ``question_category`` and
        ``duration_group`` is kept as stored (an int number of seconds in LongVideoBench).

    Raises:
        ValueError: a record without options, or whose ``correct_choice`` is not one of its options.
    """
    path = Path(json_path)
    root = Path(data_dir) if data_dir is not None else path.parent
    samples = []
    for n, rec in enumerate(_load_records(path)):
        sample_id = str(rec.get("id", f"{path.stem}-{n}"))
        if "candidates" in rec and isinstance(rec["candidates"], list):
            raw = list(rec["candidates"])
        else:
            raw = [rec.get(f"option{i}") for i in range(5)]
        options = []
        for value in raw:
            if _is_na(value):
                break  # options are contiguous; "N/A" marks the unused tail
            options.append(str(value))
        answer = rec.get("correct_choice")
        answer_index = None if answer is None else int(answer)
        video = Path(str(rec.get("video_path", "")))
        if not video.is_absolute():
            video = root / video_dir / video
        extra = {k: v for k, v in rec.items() if not re.fullmatch(r"option\d", k)}
        extra["benchmark"] = "longvideobench"
        samples.append(
            QASample(
                id=sample_id,
                video_path=video,
                question=str(rec.get("question", "")),
                options=options,
                answer_index=answer_index,
                category=rec.get("question_category"),
                duration_group=rec.get("duration_group"),
                extra=extra,
            )
        )
    logger.info("read %d LongVideoBench-style questions from %s", len(samples), path)
    return samples


# -------------------------------------------------------------------------------------------- MLVU


def _mlvu_task(name: str) -> str:
    if name in MLVU_ABBREVIATIONS:
        return name
    stem = re.sub(r"^\d+_", "", name)
    return MLVU_TASK_TYPES.get(stem, stem)


def load_mlvu(
    path: str | os.PathLike[str],
    *,
    task_types: Iterable[str] | None = None,
) -> list[QASample]:
    """Read MLVU dev multiple-choice questions.

    Args:
        path: the MLVU root (holding ``json/`` and ``video/``), a ``json/`` folder, or one task's
            json file (its ``video/<file stem>/`` folder is then looked up next to ``json/``).
        task_types: keep only these task types (abbreviations such as ``"NQA"`` or MLVU names).

    Returns:
        :class:`QASample` list with ``category`` the task abbreviation (``PQA``, ``NQA``, ...).
        Video paths: ``<root>/video/<json stem>/<video>``; for lmms-eval records whose
        ``video_name`` already contains a folder, ``<root>/video/<video_name>`` (an existing
        candidate among these and ``<root>/<video_name>`` wins).

    Raises:
        ValueError: a multiple-choice record without options, or an unreadable answer.
    """
    p = Path(path)
    if p.is_file():
        files = [p]
        root = p.parent.parent if p.parent.name == "json" else p.parent
    else:
        json_dir = p / "json" if (p / "json").is_dir() else p
        root = json_dir.parent if json_dir.name == "json" else json_dir
        files = sorted(json_dir.glob("*.json")) + sorted(json_dir.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"no MLVU json files under {json_dir}")
    wanted = None if task_types is None else {_mlvu_task(t) for t in task_types}

    samples: list[QASample] = []
    skipped_open = 0
    for f in files:
        for n, rec in enumerate(_load_records(f)):
            task = _mlvu_task(str(rec.get("task_type") or rec.get("question_type") or f.stem))
            if wanted is not None and task not in wanted:
                continue
            sample_id = str(rec.get("id", rec.get("question_id", f"{f.stem}-{n}")))
            video_name = str(rec.get("video_name") or rec.get("video") or "")
            raw_question = str(rec.get("question", ""))
            if isinstance(rec.get("candidates"), list):
                stem, options = raw_question.strip(), [str(c) for c in rec["candidates"]]
                answer = rec.get("answer")
                if answer is None:
                    answer_index = None
                elif str(answer) in options:
                    answer_index = options.index(str(answer))
                else:
                    answer_index = _letter_index(answer, len(options), sample_id)
                question_with_options = None
            else:
                stem, options = _split_question_options(raw_question)
                answer = rec.get("answer")
                answer_index = None if answer is None or not options else _letter_index(answer, len(options), sample_id)
                question_with_options = raw_question
            if not options and task in MLVU_OPEN_ENDED:
                skipped_open += 1
                continue
            candidates = [root / "video" / f.stem / video_name, root / "video" / video_name, root / video_name]
            video = next((c for c in candidates if c.exists()), candidates[1] if "/" in video_name else candidates[0])
            extra = dict(rec)
            extra.update({"benchmark": "mlvu", "task_type": task, "question_with_options": question_with_options})
            samples.append(
                QASample(
                    id=sample_id,
                    video_path=video,
                    question=stem,
                    options=options,
                    answer_index=answer_index,
                    category=task,
                    duration_group=rec.get("duration_group"),
                    extra=extra,
                )
            )
    if skipped_open:
        logger.info("skipped %d open-ended MLVU records (SSC / VS have no options)", skipped_open)
    logger.info("read %d MLVU questions from %s", len(samples), p)
    return samples


# ---------------------------------------------------------------------------------------- Video-MME


def load_videomme(
    path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    *,
    durations: Iterable[str] | None = None,
) -> list[QASample]:
    """Read Video-MME questions from a parquet (needs pyarrow), json or jsonl file.

    Args:
        path: the annotation file.
        data_dir: dataset root; videos are ``<data_dir>/data/<videoID>.mp4`` (``.MP4`` / ``.mkv``
            and ``<data_dir>/videos/`` are tried too). Defaults to the file's folder, or its parent
            when the file sits in a ``videomme/`` sub-folder.
        durations: keep only these duration groups (``"short"``, ``"medium"``, ``"long"``).

    Returns:
        :class:`QASample` list with ``category`` the ``task_type`` and ``duration_group`` the
        ``duration``; ``extra`` keeps ``domain``, ``sub_category``, ``video_id``, ``videoID`` etc.
    """
    p = Path(path)
    root = Path(data_dir) if data_dir is not None else (p.parent.parent if p.parent.name == "videomme" else p.parent)
    keep = None if durations is None else set(durations)
    samples = []
    for n, rec in enumerate(_load_records(p)):
        if keep is not None and rec.get("duration") not in keep:
            continue
        sample_id = str(rec.get("question_id") or f"{rec.get('video_id', p.stem)}-{n}")
        raw_options = rec.get("options")
        if raw_options is None:
            raw_options = [rec[k] for k in ("A", "B", "C", "D") if k in rec]
        options = [_strip_letter(str(o), i) for i, o in enumerate(raw_options or [])]
        answer = rec.get("answer")
        answer_index = None if answer in (None, "") or not options else _letter_index(answer, len(options), sample_id)
        vid = str(rec.get("videoID") or rec.get("video_id") or "")
        candidates = [root / sub / f"{vid}{ext}" for sub in ("data", "videos") for ext in (".mp4", ".MP4", ".mkv")]
        video = next((c for c in candidates if c.exists()), candidates[0])
        extra = dict(rec)
        extra["benchmark"] = "videomme"
        samples.append(
            QASample(
                id=sample_id,
                video_path=video,
                question=str(rec.get("question", "")),
                options=options,
                answer_index=answer_index,
                category=rec.get("task_type"),
                duration_group=rec.get("duration"),
                extra=extra,
            )
        )
    logger.info("read %d Video-MME questions from %s", len(samples), p)
    return samples


# ------------------------------------------------------------------------------------------ prompts


def format_options(options: Sequence[str], style: str = "dot") -> str:
    """Options one per line: ``style="dot"`` gives "A. x", ``style="paren"`` gives "(A) x"."""
    if style == "dot":
        return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    if style == "paren":
        return "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    raise ValueError(f"style must be 'dot' or 'paren', got {style!r}")


def build_longvideobench_prompt(sample: QASample, pre_prompt: str = "", post_prompt: str = ANSWER_DIRECTLY) -> str:
    """``{pre_prompt}{question}\\nA. ...\\nB. ...\\n{post_prompt}`` (the LongVideoBench reference text)."""
    return f"{pre_prompt}{sample.question}\n{format_options(sample.options)}\n{post_prompt}"


def build_mlvu_prompt(sample: QASample, pre_prompt: str = "", post_prompt: str = MLVU_POST_PROMPT) -> str:
    """``{pre_prompt}{question with options}{post_prompt}``, ending "Only give the best option.\\nBest option: (".

    The question text is the record's own (options inside, lmms-eval layout) when there is one;
    otherwise the stem followed by "(A) ..." lines, as MLVU's own template lists them.
    """
    body = sample.extra.get("question_with_options")
    if not body:
        body = f"{sample.question}\n{format_options(sample.options, style='paren')}"
    return f"{pre_prompt}{body}{post_prompt}"


def build_videomme_prompt(sample: QASample, pre_prompt: str = "", post_prompt: str = ANSWER_DIRECTLY) -> str:
    """``{pre_prompt}{question}\\nA. ...\\n...\\n{post_prompt}``.

    The defaults match the LLaVA-style evaluation; for the paper's own wording pass
    ``pre_prompt=VIDEOMME_OFFICIAL_PRE_PROMPT, post_prompt=VIDEOMME_OFFICIAL_POST_PROMPT``.
    """
    return f"{pre_prompt}{sample.question}\n{format_options(sample.options)}\n{post_prompt}"


_BUILDERS = {
    "longvideobench": build_longvideobench_prompt,
    "mlvu": build_mlvu_prompt,
    "videomme": build_videomme_prompt,
}


def build_prompt(sample: QASample, benchmark: str | None = None, **kwargs: str) -> str:
    """Build the prompt for ``sample`` with its benchmark's builder (``sample.extra["benchmark"]`` by default)."""
    name = benchmark or sample.extra.get("benchmark") or "longvideobench"
    if name not in _BUILDERS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(_BUILDERS)}")
    return _BUILDERS[name](sample, **kwargs)


# ----------------------------------------------------------------------------------------- scoring

_STANDALONE = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")


def parse_answer(text: str, n_options: int, rng: Any | None = None) -> tuple[int | None, bool]:
    """Read the chosen option out of a model's reply.

    Args:
        text: the generated text.
        n_options: number of options (letters beyond it are ignored).
        rng: optional seeded generator (``numpy.random.Generator`` or ``random.Random``) for the
            reference evaluations' random fallback.

    Returns:
        ``(index, used_fallback)``: the index of the first standalone letter among the first
        ``n_options`` letters and ``False``; when there is none, ``(None, True)`` (scored as wrong),
        or with ``rng`` a random index and ``True``.

    Examples: ``"B"`` -> 1, ``"(C) because"`` -> 2, ``"The answer is D."`` -> 3, ``"none"`` -> None.
    """
    if n_options < 1 or n_options > len(LETTERS):
        raise ValueError(f"n_options must be in 1..{len(LETTERS)}, got {n_options}")
    for m in _STANDALONE.finditer(text or ""):
        idx = LETTERS.index(m.group(1))
        if idx < n_options:
            return idx, False
    if rng is None:
        return None, True
    if hasattr(rng, "integers"):
        return int(rng.integers(n_options)), True
    return int(rng.randrange(n_options)), True


def score_response(sample: QASample, response: str, rng: Any | None = None) -> dict[str, Any]:
    """One results record: ids, grouping keys, the parsed prediction and whether it is correct.

    ``correct`` is ``None`` when the sample has no answer (a test split); :func:`accuracy` skips those.
    """
    pred, fallback = parse_answer(response, len(sample.options), rng=rng)
    correct = None if sample.answer_index is None else pred == sample.answer_index
    return {
        "id": sample.id,
        "category": sample.category,
        "duration_group": sample.duration_group,
        "answer_index": sample.answer_index,
        "pred_index": pred,
        "pred_letter": None if pred is None else LETTERS[pred],
        "used_fallback": fallback,
        "correct": correct,
        "response": response,
    }


def _group_value(rec: Mapping[str, Any], key: str) -> Any:
    if key in rec:
        return rec[key]
    extra = rec.get("extra")
    if isinstance(extra, Mapping) and key in extra:
        return extra[key]
    raise KeyError(f"record {rec.get('id')!r} has no field {key!r} to group by")


def _is_correct(rec: Mapping[str, Any]) -> bool | None:
    if "correct" in rec:
        return None if rec["correct"] is None else bool(rec["correct"])
    if rec.get("answer_index") is None:
        return None
    return rec.get("pred_index") == rec["answer_index"]


def accuracy(records: Iterable[Mapping[str, Any]], by: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy overall and per group.

    Args:
        records: mappings with ``correct`` (bool or ``None``), or ``pred_index`` and
            ``answer_index``, as :func:`score_response` returns; records without an answer are skipped.
        by: field name(s) to group by, e.g. ``"category"`` or ``("category", "duration_group")``
            (looked up in the record, then in its ``extra``).

    Returns:
        ``{"accuracy": float, "n": int, "correct": int, "n_fallback": int, "by": {field: {group:
        {"accuracy", "n", "correct"}}}}``. ``accuracy`` is ``nan`` when there are no scored records.
        Groups are keyed by ``str(value)``.
    """
    keys = [] if by is None else ([by] if isinstance(by, str) else list(by))
    n = n_correct = n_fallback = 0
    groups: dict[str, dict[str, list[int]]] = {k: {} for k in keys}
    for rec in records:
        ok = _is_correct(rec)
        if ok is None:
            continue
        n += 1
        n_correct += int(ok)
        n_fallback += int(bool(rec.get("used_fallback", False)))
        for k in keys:
            cell = groups[k].setdefault(str(_group_value(rec, k)), [0, 0])
            cell[0] += int(ok)
            cell[1] += 1
    return {
        "accuracy": n_correct / n if n else float("nan"),
        "n": n,
        "correct": n_correct,
        "n_fallback": n_fallback,
        "by": {
            k: {g: {"accuracy": c / t, "n": t, "correct": c} for g, (c, t) in sorted(groups[k].items())} for k in keys
        },
    }


def mlvu_m_avg(records: Iterable[Mapping[str, Any]], key: str = "category") -> float:
    """MLVU's headline M-Avg: the unweighted mean over task types of each type's accuracy.

    Task types absent from ``records`` are left out of the mean (the dev set has 7 multiple-choice
    types; SSC and VS are open-ended).
    """
    per = accuracy(records, by=key)["by"][key]
    if not per:
        return float("nan")
    return sum(v["accuracy"] for v in per.values()) / len(per)
