"""How well does the frozen SmolLM2-135M-Instruct answer the synthetic video questions when it is *told* the events?

The video model (``namm-transfer video train``) trains only the vision tower and projector; the language model
stays frozen. Whatever the vision part learns, the frozen model still has to read the options and pick a letter.
This script measures that reading step with no vision at all: the video placeholder is replaced by the
ground-truth events written out as text ("The video shows: red circle, blue square."), in the eval's exact
prompt (LongVideoBench text in SmolLM2's chat turn), and the answer is the option letter with the highest logit
(the eval's greedy letter among the options). Variants: the description where the video goes (video first)
and after the question (question first).

Usage (about 2 minutes per variant on 2 CPU cores)::

    python training/video_text_ceiling.py --n 50 --out training/video-logs/text-ceiling.json

The numbers go to the README's video section; they bound what a frozen-LM video model of this size can reach.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from namm_transfer.evals.args import StrictParser


def main() -> None:
    p = StrictParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--n", type=int, default=50, help="questions (videos) of the split")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--chat",
        choices=["smollm2", "gemma"],
        default=None,
        help="chat turn around the prompt (default: gemma for gemma* models, else SmolLM2's, the eval's)",
    )
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args()

    import numpy as np
    import torch
    from namm_transfer.evals.video_qa.benchmarks import build_prompt
    from namm_transfer.evals.video_qa.model import PROMPT_FORMATS
    from namm_transfer.evals.video_qa.train_data import LETTERS, caption_text, load_split, split_folder

    from namm_transfer.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    samples, _ = load_split(args.split, args.n, 64, 64, 32, 0)  # the eval's synthetic defaults
    folder = split_folder(args.split, args.n, 64, 64, 0)
    lm, tok = load_model(args.model, device="cpu", dtype="float32")
    letter_ids = [tok(x, add_special_tokens=False)["input_ids"][0] for x in LETTERS[:8]]

    def option_logprobs(ids: list[int], options: list[str]) -> list[tuple[float, int]]:
        """(sum of log-probabilities, tokens) of each option's text as the assistant's reply."""
        out = []
        with torch.no_grad():
            for o in options:
                cont = tok(str(o), add_special_tokens=False)["input_ids"]
                logits = lm(torch.tensor([ids + cont])).logits[0, len(ids) - 1 : -1].float()
                lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum()
                out.append((float(lp), len(cont)))
        return out

    chat = args.chat or ("gemma" if args.model.startswith("gemma") else "smollm2")
    formats = PROMPT_FORMATS
    if chat == "gemma":  # Gemma's turn markers; the SmolLM2 formats with the markers swapped
        formats = tuple(
            "<bos>"
            + f.replace("<|im_start|>assistant", "<start_of_turn>model")
            .replace("<|im_start|>", "<start_of_turn>")
            .replace("<|im_end|>", "<end_of_turn>")
            for f in PROMPT_FORMATS
        )
    results: dict[str, dict] = {}
    for variant, fmt in (("description-first", formats[0]), ("question-first", formats[1])):
        t0 = time.perf_counter()
        per: dict[str, dict[str, list[bool]]] = {"letter": {}, "likelihood": {}, "likelihood-per-token": {}}
        hist = [0] * 4
        for s in samples:
            desc = "The video shows: " + caption_text(s)
            text = fmt.format(video=desc, question=build_prompt(s, "longvideobench"))
            ids = tok(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = lm(torch.tensor([ids])).logits[0, -1]
            pred = int(logits[letter_ids[: len(s.options)]].argmax())
            hist[min(pred, 3)] += 1
            lps = option_logprobs(ids, list(s.options))
            preds = {
                "letter": pred,
                "likelihood": int(np.argmax([lp for lp, _ in lps])),
                "likelihood-per-token": int(np.argmax([lp / n for lp, n in lps])),
            }
            for mode, p in preds.items():
                per[mode].setdefault(str(s.category), []).append(p == int(s.answer_index))
        results[variant] = {
            mode: {
                "accuracy": float(np.mean([x for v in cats.values() for x in v])),
                "per_category": {k: float(np.mean(v)) for k, v in cats.items()},
            }
            for mode, cats in per.items()
        }
        results[variant]["letter"]["predicted_letters"] = dict(zip("ABCD", hist, strict=True))
        results[variant].update(n=len(samples), seconds=round(time.perf_counter() - t0, 1), example_prompt=text)
        line = ", ".join(f"{m} {results[variant][m]['accuracy']:.3f}" for m in per)
        print(f"{variant}: {line}; letters {hist}", flush=True)
    if args.out:
        out = {
            "what": "the frozen language model answering the synthetic video questions from a text description",
            "model": args.model,
            "chat": chat,
            "split": args.split,
            "data": str(folder),
            "chance": 0.25,
            "results": results,
        }
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
