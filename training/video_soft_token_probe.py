"""Can trainable video tokens steer the frozen SmolLM2-135M-Instruct to the right option letter at all?

A probe with the vision problem removed: every sampled frame becomes ``TPF`` tokens taken from a learned
table indexed by the frame's ground-truth event (generator annotations: half the tokens by the event's colour,
half by its shape; one shared set for background frames), initialized at the word embeddings of the colour and
shape names. Only the table trains (Adam), through the frozen language model, with the video model's loss (the
answer letter + end of turn) on the synthetic train split; every 50 steps the option-letter accuracy on 50 val
questions. If even this stays at chance, the bottleneck is the frozen model's reading step, not the vision.

Usage (about 9 s a step with 4 questions and 4 tokens per frame on one CPU core)::

    python training/video_soft_token_probe.py vfirst|qfirst STEPS BATCH LR OUT.jsonl TPF
    # session 5: vfirst / qfirst 600 4 3e-3 ... 4, stopped after 112 / 100 steps
    #   -> training/video-logs/soft-token-probe-{video,question}-first.jsonl

``qfirst`` puts the question before the video (the model's second prompt format).
"""

import json
import sys
import time


def main() -> None:
    import numpy as np
    import torch
    from namm_transfer.evals.video_qa.model import PROMPT_FORMATS, NammVideoLlavaForConditionalGeneration
    from namm_transfer.evals.video_qa.processor import NammVideoLlavaProcessor
    from namm_transfer.evals.video_qa.synthetic import COLOURS, SHAPES
    from namm_transfer.evals.video_qa.train import VideoTrainConfig
    from namm_transfer.evals.video_qa.train_data import QuestionBatcher, load_split, shuffle_options

    from namm_transfer.models import load_model

    order, steps, bs, lr, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    tpf = int(sys.argv[6])
    half = tpf // 2
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tr, _ = load_split("train", 2000, 64, 64, 32, 0)
    va, _ = load_split("val", 50, 64, 64, 32, 0)
    lm, tok = load_model("smollm2-135m", device="cpu", dtype="float32")
    lm.requires_grad_(False)
    cfg = VideoTrainConfig(tokens_per_frame=tpf)
    m = NammVideoLlavaForConditionalGeneration(cfg.model_config(lm.config), lm)
    proc = NammVideoLlavaProcessor.from_config(m.config, tok)
    b = QuestionBatcher(m, proc)
    if order == "qfirst":
        b.template = PROMPT_FORMATS[1].replace("{video}", "<video>")
    emb = lm.get_input_embeddings().weight

    def wemb(s: str, n: int) -> torch.Tensor:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        return emb[(ids * n)[:n]].clone()

    colours, shapes = list(COLOURS), list(SHAPES)
    e_col = torch.nn.Parameter(torch.stack([wemb(" " + c, half) for c in colours]))  # (6, half, H)
    e_shp = torch.nn.Parameter(torch.stack([wemb(" " + s, half) for s in shapes]))
    e_bg = torch.nn.Parameter(wemb(" .", tpf))
    opt = torch.optim.Adam([e_col, e_shp, e_bg], lr=lr)

    def video_tokens(s: object) -> torch.Tensor:
        ev = {f: e for e in s.extra["events"] for f in e["frames"]}  # type: ignore[attr-defined]
        rows = []
        for i in range(32):
            e = ev.get(2 * i + 1)  # the frame the eval's centre rule samples (32 of 64)
            rows.append(torch.cat([e_col[colours.index(e["colour"])], e_shp[shapes.index(e["shape"])]]) if e else e_bg)
        return torch.cat(rows)

    def run(samples: list) -> tuple[torch.Tensor, float]:
        batch = b.batch(samples, [np.zeros((32, 64, 64, 3), np.uint8)] * len(samples))
        ids = batch["input_ids"]
        x = emb[ids].clone()
        for i, s in enumerate(samples):
            x[i, ids[i] == m.config.video_token_id] = video_tokens(s)
        h = lm.model(inputs_embeds=x, attention_mask=batch["attention_mask"]).last_hidden_state
        lab = batch["labels"]
        where = lab[:, 1:] != -100
        logits = lm.lm_head(h[:, :-1][where])
        tg = lab[:, 1:][where]
        loss = torch.nn.functional.cross_entropy(logits, tg)
        isl = batch["letter_mask"][:, 1:][where]
        cols = torch.tensor(b.letter_ids[:4])
        acc4 = (cols[logits[isl][:, cols].argmax(-1)] == tg[isl]).float().mean()
        return loss, float(acc4)

    rng = np.random.default_rng(0)
    t0 = time.time()
    with open(out, "a") as log:
        for step in range(1, steps + 1):
            idx = rng.integers(0, len(tr), size=bs)
            loss, acc = run([shuffle_options(tr[i], rng) for i in idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec = {"step": step, "loss": round(float(loss.detach()), 4), "acc4": acc, "s": round(time.time() - t0)}
            if step % 50 == 0 or step == 1:
                with torch.no_grad():
                    rec["val_acc4"] = float(np.mean([run(va[j : j + 10])[1] for j in range(0, 50, 10)]))
            log.write(json.dumps(rec) + "\n")
            log.flush()


if __name__ == "__main__":
    main()
