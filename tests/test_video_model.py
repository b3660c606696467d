"""The project's own video model (timm ViT + projector + frozen LM), its processor, training and shipping.

A tiny random Llama with a byte-level tokenizer stands in for SmolLM2; frames come from the synthetic benchmark.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("av")

from card_checks import assert_card_code_ok  # noqa: E402
from namm_transfer.adapters.video_llm import (  # noqa: E402
    VideoQASession,
    build_inputs,
    format_prompt,
    video_family,
)
from namm_transfer.evals.video_qa import model as vm  # noqa: E402
from namm_transfer.evals.video_qa import run as vqa  # noqa: E402
from namm_transfer.evals.video_qa.processor import NammVideoLlavaProcessor  # noqa: E402
from namm_transfer.evals.video_qa.synthetic import generate_benchmark  # noqa: E402
from namm_transfer.evals.video_qa.train import (  # noqa: E402
    VideoTrainConfig,
    latest_checkpoint,
    read_log,
    ship_video_model,
    train_video_model,
)
from tiny_vlms import check_full_policy_is_the_model, check_inputs_match_forward, synthetic_video  # noqa: E402

N_FRAMES = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return vqa.byte_level_tokenizer()


def tiny_lm(tok, seed: int = 0):
    """The tiny models' language model (:func:`~namm_transfer.evals.video_qa.run.tiny_text_config`) as SmolLM2
    is: a Llama with tied embeddings; 2048 positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    text = {**vqa.tiny_text_config(tok), "max_position_embeddings": 2048}
    cfg = LlamaConfig(**text, tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def tiny_model(tok, tokens_per_frame: int = 4, seed: int = 0):
    """(model, processor): 32-px frames in 8-px patches (a 4x4 grid) pooled to ``tokens_per_frame``."""
    lm = tiny_lm(tok, seed)
    cfg = vm.NammVideoLlavaConfig(
        image_size=32,
        patch_size=8,
        vision_embed_dim=32,
        vision_depth=1,
        vision_heads=2,
        tokens_per_frame=tokens_per_frame,
        text_config=lm.config.to_dict(),
        text_model="tiny",
        video_token_id=tok.convert_tokens_to_ids("<video>"),
    )
    torch.manual_seed(seed)
    model = vm.NammVideoLlavaForConditionalGeneration(cfg, lm).eval()
    return model, NammVideoLlavaProcessor.from_config(cfg, tok)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return synthetic_video(tmp_path_factory.mktemp("synth"), N_FRAMES, size=64, seed=5)


@pytest.fixture(scope="module")
def host(tok, video):
    model, proc = tiny_model(tok)
    inputs = build_inputs(model, proc, video[0], video[1])
    return model, proc, inputs


# ----- the model in the adapter's mould -----------------------------------------------------------------------
@pytest.mark.parametrize("tpf", [4, 16])  # pooled 4x4 -> 2x2, and the full 4x4 grid
def test_build_inputs_equal_model_forward(tok, video, tpf):
    model, proc = tiny_model(tok, tokens_per_frame=tpf)
    frames, question = video
    inputs = build_inputs(model, proc, frames, question)
    assert video_family(model) == vm.FAMILY
    check_inputs_match_forward(model, inputs, N_FRAMES, tpf)
    assert inputs["prompt"].startswith("<|im_start|>user\n<video>\n") and inputs["prompt"].endswith("assistant\n")
    q_first = format_prompt(model, proc, "Why?", video_first=False)
    assert q_first.index("Why?") < q_first.index("<video>")
    pix = inputs["processor_outputs"]["pixel_values_videos"]  # (1, frames, 3, H, W)
    with torch.no_grad():  # frame f's tokens are its own: changing one frame changes only its tokens
        feats = model.get_video_features(pix).pooler_output
        changed = pix.clone()
        changed[:, 2] = torch.randn_like(changed[:, 2])
        feats2 = model.get_video_features(changed).pooler_output
        alone = [model.get_video_features(pix[:, f : f + 1]).pooler_output[0] for f in range(N_FRAMES)]
    assert feats.shape == (N_FRAMES, tpf, 64)
    others = [f for f in range(N_FRAMES) if f != 2]
    assert torch.equal(feats2[others], feats[others]) and not torch.allclose(feats2[2], feats[2])
    for f in range(N_FRAMES):  # in order: frame f's tokens are what frame f alone gives
        torch.testing.assert_close(feats[f], alone[f], atol=1e-5, rtol=1e-5)
        assert feats[f].abs().sum() > 0


def test_save_load_round_trip_exact(host, tok, video, tmp_path):
    model, proc, inputs = host
    po = inputs["processor_outputs"]
    folder = model.save_pretrained(tmp_path / "m", processor=proc)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "processor_config.json"]
    from safetensors.torch import load_file

    stored = load_file(str(folder / "model.safetensors"))
    assert stored and all(k.startswith(vm.TRAINED_PREFIXES) for k in stored)  # no language-model weights
    assert vm.is_video_model_folder(folder) and not vm.is_video_model_folder(tmp_path)
    loaded, proc2 = vm.load_video_model(folder, language_model=tiny_lm(tok), tokenizer=tok)  # same seed, same LM
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, loaded.trainable_state_dict()[k]), k
    po2 = proc2(text=[inputs["prompt"]], videos=[video[0]], return_tensors="pt")
    assert torch.equal(po2["input_ids"], po["input_ids"])
    assert torch.equal(po2["pixel_values_videos"], po["pixel_values_videos"])
    with torch.no_grad():
        assert torch.equal(loaded(**po).logits, model(**po).logits)
    assert json.loads((folder / "config.json").read_text())["model_type"] == vm.MODEL_TYPE


def test_forward_labels_loss(host):
    model, _, inputs = host
    po = inputs["processor_outputs"]
    ids = po["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[0, -2:] = ids[0, -2:]
    with torch.no_grad():
        out = model(**po, labels=labels)
        full = model(**po).logits
    ref = torch.nn.functional.cross_entropy(full[0, -3:-1], ids[0, -2:])
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-6)


# ----- the memory: keep everything == unmodified model, evictions per frame -----------------------------------
def test_keep_everything_reproduces_generate(host):
    model, proc, inputs = host
    check_full_policy_is_the_model(model, proc, inputs)


def test_evictions_recorded_per_frame(host, video):
    model, proc, inputs = host
    sess = VideoQASession(model, proc, "h2o", budget=0.5, update_interval=16, chunk_size=8)
    res = sess.answer(video[0], video[1], max_new_tokens=4, inputs=inputs)
    rec, stats = res.record, res.stats
    assert rec.layers == stats.managed_layers == (0, 1) and rec.n_updates > 0
    for u in range(rec.n_updates):
        for li, layer in enumerate(rec.layers):
            assert (rec.kept_video[u, li] + rec.kept_text[u, li]).tolist() == stats.kept_counts[u][layer][0]
    assert (rec.kept_per_frame.sum(-1) == rec.kept_video).all()  # every video token belongs to a frame
    assert 0.0 < res.retained_video() < 1.0
    frac = res.frame_kept_fraction()
    assert frac.shape == (rec.n_updates, N_FRAMES)
    end = res.frame_kept_fraction(at="end")
    assert end.shape == (N_FRAMES,) and end.min() < 1.0 and ((end >= 0) & (end <= 1)).all()
    json.dumps(rec.to_dict())


# ----- bad input ----------------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error(host, tok, tmp_path, monkeypatch, capsys):
    model, proc, inputs = host
    with pytest.raises(ValueError, match=r"pixel_values_videos must be \(batch, frames, 3, 32, 32\)"):
        model.get_video_features(torch.zeros(1, 2, 3, 16, 16))
    with pytest.raises(ValueError, match="pixel_values_videos must be"):
        model.get_video_features(torch.zeros(2, 3, 32, 32))
    po = inputs["processor_outputs"]
    ids = po["input_ids"]
    first = int(torch.nonzero(inputs["token_kind"])[0])
    one_less = torch.cat([ids[:, :first], ids[:, first + 1 :]], dim=1)
    with pytest.raises(ValueError, match=r"holds \d+ video placeholder tokens but the video gives"):
        model(input_ids=one_less, pixel_values_videos=po["pixel_values_videos"])
    with pytest.raises(ValueError, match="no video placeholder"):
        model(input_ids=po["input_ids"][:, -5:], pixel_values_videos=po["pixel_values_videos"])
    frames = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        proc(text=["<video> x"], videos=[frames.astype(np.float32)])
    with pytest.raises(ValueError, match=r"\(frames, H, W, 3\)"):
        proc(text=["<video> x"], videos=[frames[..., 0]])
    with pytest.raises(ValueError, match="exactly one"):
        proc(text=["<video> <video>"], videos=[frames])
    with pytest.raises(ValueError, match="square"):
        vm.NammVideoLlavaConfig(image_size=32, patch_size=8, tokens_per_frame=8, text_config={"vocab_size": 300})
    other = tiny_lm(tok)
    other.config.num_hidden_layers = 3
    with pytest.raises(ValueError, match="does not match"):
        vm.NammVideoLlavaForConditionalGeneration(model.config, other)

    # a shipped model that is not there: the error names the command that makes it
    monkeypatch.setattr(vm, "shipped_video_dir", lambda: tmp_path / "shipped")
    with pytest.raises(FileNotFoundError, match="namm-transfer video train --preset device --ship nope"):
        vm.resolve_shipped("nope")
    with pytest.raises(vqa._UsageError, match="namm-transfer video train"):
        vqa._resolve_model(vqa.DEFAULT_MODEL)
    assert vqa._resolve_model("owner/hub-model") == "owner/hub-model"
    from namm_transfer.cli import main

    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path / "cache"))
    assert main(["eval", "--target", "video-llava", "--output", str(tmp_path / "r.json")]) == 2  # the default model
    err = capsys.readouterr().err
    assert f"no shipped video model {vqa.DEFAULT_MODEL!r}" in err and "namm-transfer video train" in err
    assert not (tmp_path / "cache").exists()  # refused before any data was generated


def test_cli_video_train_help_without_torch():
    code = textwrap.dedent(
        """
        import contextlib, io, sys
        from namm_transfer.cli import main
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["video", "train", "--help"])
        assert rc == 0, rc
        out = buf.getvalue()
        for word in ("--preset", "cpu-small", "device", "--ship", "--device", "--dtype", "--steps", "--restart"):
            assert word in out, word
        heavy = [m for m in ("torch", "transformers", "timm") if m in sys.modules]
        assert not heavy, heavy
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


# ----- training -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_train_data")
    folders = {}
    for split, n in (("train", 6), ("val", 2)):
        folders[split] = str(root / split)
        generate_benchmark(folders[split], n_videos=n, frames_per_video=16, size=32, split=split, seed=0)
    return folders


def _train_config(tok, **kw):
    base = dict(
        preset="test",
        train_videos=6,
        val_videos=2,
        video_frames=16,
        video_size=32,
        frames=4,
        image_size=32,
        patch_size=8,
        vision_embed_dim=32,
        vision_depth=1,
        vision_heads=2,
        tokens_per_frame=4,
        text_model="tiny",
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        steps=3,
        batch_size=2,
        warmup=1,
        log_every=1,
        checkpoint_every=1,
        threads=1,
    )
    base.update(kw)
    return VideoTrainConfig(**base)


def test_training_resumes_to_the_same_weights(tok, train_data, tmp_path, monkeypatch):
    cfg = _train_config(tok)
    straight = train_video_model(
        cfg, tmp_path / "a", language_model=tiny_lm(tok), tokenizer=tok, data_folders=train_data
    )
    assert straight.finished and straight.step == 3 and len(straight.losses) == 3
    assert all(np.isfinite(straight.losses))

    def crash(step, loss):
        if step == 2:  # killed during step 2, after step 1's checkpoint
            raise KeyboardInterrupt

    run = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train_video_model(cfg, run, language_model=tiny_lm(tok), tokenizer=tok, data_folders=train_data, on_step=crash)
    assert latest_checkpoint(run).name == "step-0000001"
    resumed = train_video_model(cfg, run, language_model=tiny_lm(tok), tokenizer=tok, data_folders=train_data)
    assert resumed.resumed_from == 1 and resumed.finished and resumed.losses == straight.losses[1:]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(run / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    log = read_log(run / "train_log.jsonl")
    assert [e["step"] for e in log if "loss" in e and "event" not in e] == [1, 2, 3]  # no step logged twice
    assert [e.get("event") for e in log if e.get("event")] == ["start", "eval", "end"]
    card = (run / "model" / "README.md").read_text()
    assert "3 steps of 2 questions" in card and "Final val accuracy" in card
    assert_card_code_ok(card)

    # another run's settings are refused; --ship copies model, card, log
    with pytest.raises(ValueError, match="another training run"):
        train_video_model(
            _train_config(tok, lr=5e-4), run, language_model=tiny_lm(tok), tokenizer=tok, data_folders=train_data
        )
    monkeypatch.setattr(vm, "shipped_video_dir", lambda: tmp_path / "shipped")
    dest = ship_video_model(run, "tiny-video")
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md", "train_log.jsonl"} <= {
        p.name for p in dest.iterdir()
    }
    assert vm.resolve_shipped("tiny-video") == dest and "# Video model: tiny-video" in (dest / "README.md").read_text()
    model, proc = vm.load_video_model("tiny-video", language_model=tiny_lm(tok), tokenizer=tok)
    assert torch.equal(
        model.trainable_state_dict()["model.multi_modal_projector.linear_1.weight"],
        b["model.multi_modal_projector.linear_1.weight"],
    )


def test_caption_task_labels_every_event_in_order(tok, train_data, tmp_path):
    """The caption task: the caption lists every event's colour and shape in time order and carries the labels;
    a batch mixing captions and questions has letter positions on the questions only; training with captions
    logs question accuracy only from the questions and says so in the card."""
    from namm_transfer.evals.video_qa.model import NammVideoLlavaForConditionalGeneration
    from namm_transfer.evals.video_qa.processor import NammVideoLlavaProcessor
    from namm_transfer.evals.video_qa.train_data import (
        CAPTION_QUESTION,
        QuestionBatcher,
        batch_metrics,
        caption_text,
        load_split,
    )

    samples, _ = load_split("train", 6, 16, 32, 4, 0, folder=train_data["train"])
    s0 = samples[0]
    events = sorted(s0.extra["events"], key=lambda e: e["start_frame"])
    assert caption_text(s0) == ", ".join(f"{e['colour']} {e['shape']}" for e in events) + "."
    cfg = _train_config(tok)
    lm = tiny_lm(tok)
    model = NammVideoLlavaForConditionalGeneration(cfg.model_config(lm.config), lm)
    batcher = QuestionBatcher(model, NammVideoLlavaProcessor.from_config(model.config, tok))
    frames = [np.zeros((cfg.frames, 32, 32, 3), np.uint8)] * 2
    b = batcher.batch(samples[:2], frames, captions=[True, False])
    labelled = b["labels"][0][b["labels"][0] != -100].tolist()
    assert tok.decode(labelled[:-1]) == caption_text(s0) and labelled[-1] == tok.eos_token_id
    assert CAPTION_QUESTION in tok.decode(b["input_ids"][0].tolist())
    assert b["letter_mask"][0].sum() == 0 and b["letter_mask"][1].sum() == 1
    m = batch_metrics(model, b, batcher.letter_ids, contextlib.nullcontext)  # mixed batch: acc of row 1 only
    assert m["acc4"] in (0.0, 1.0) and torch.isfinite(m["loss"])
    with pytest.raises(ValueError, match="no 'events'"):
        caption_text(dataclasses.replace(s0, extra={}))

    res = train_video_model(
        _train_config(tok, caption_share=1.0),
        tmp_path / "cap",
        language_model=tiny_lm(tok),
        tokenizer=tok,
        data_folders=train_data,
    )
    steps = [e for e in read_log(tmp_path / "cap" / "train_log.jsonl") if "loss" in e and "event" not in e]
    assert res.finished and all(e["acc"] is None for e in steps)  # no question was trained on
    assert res.val["val_caption_loss"] > 0 and res.val["val_caption_loss_shuffled"] > 0  # the "uses the video" probe
    card = (tmp_path / "cap" / "model" / "README.md").read_text()
    assert "caption task (every shape in order" in card and "with the next video's frames" in card
    assert_card_code_ok(card)
    with pytest.raises(ValueError, match="caption_share"):
        _train_config(tok, caption_share=1.5)


def test_synthetic_workers_give_identical_output(tmp_path):
    one = generate_benchmark(tmp_path / "one", n_videos=3, frames_per_video=16, size=32, split="val", seed=2)
    two = generate_benchmark(tmp_path / "two", n_videos=3, frames_per_video=16, size=32, split="val", seed=2, workers=2)
    assert one.read_bytes() == two.read_bytes()
    for mp4 in sorted((tmp_path / "one" / "videos").iterdir()):
        assert mp4.read_bytes() == (tmp_path / "two" / "videos" / mp4.name).read_bytes()


def test_cli_train_ship_and_eval_the_shipped_model(tok, tmp_path, monkeypatch, capsys):
    """`video train --ship NAME` on a tiny stand-in language model, then `eval --target video-llava --model NAME`."""
    from namm_transfer.cli import main

    lm_dir = tmp_path / "tiny-lm"
    tiny_lm(tok).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(vm, "shipped_video_dir", lambda: tmp_path / "shipped")
    argv = ["video", "train", "--preset", "cpu-small", "--text-model", str(lm_dir), "--steps", "2"]
    argv += ["--train-videos", "4", "--val-videos", "2", "--vision-depth", "1", "--vision-embed-dim", "48"]
    argv += ["--output", str(tmp_path / "run"), "--ship", "tiny-video", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "video model: 2 steps" in out and "shipped:" in out
    shipped = tmp_path / "shipped" / "tiny-video"
    assert (shipped / "README.md").is_file() and (shipped / "model.safetensors").is_file()
    assert (tmp_path / "cache" / "video_qa" / "synthetic-train-n4-f16-s32-seed0" / "frames-8-center.npy").is_file()

    bench = tmp_path / "bench"
    generate_benchmark(bench, n_videos=2, frames_per_video=16, size=32, split="test", seed=0)
    results = tmp_path / "results" / "v.json"
    argv = ["eval", "--target", "video-llava", "--model", "tiny-video", "--bench", "longvideobench"]
    argv += ["--data-dir", str(bench), "--policies", "full,namm,h2o", "--frames", "8", "--max-new-tokens", "2"]
    argv += ["--update-interval", "64", "--chunk-size", "64", "--plot-samples", "0", "--output", str(results)]
    assert main(argv) == 0
    summary = json.loads(results.read_text())
    assert summary["settings"]["model_family"] == vm.FAMILY and summary["settings"]["frames"] == 8
    assert summary["settings"]["mechanics_only"]  # hidden size 64: a stand-in, not the real model
    rows = {r["policy"]: r for r in summary["rows"]}
    assert rows["full"]["retained_video"] == 1.0 and rows["full"]["n"] == 2
    assert rows["h2o"]["retained_cache"] == pytest.approx(rows["namm"]["retained_cache"], abs=1e-6)  # replayed
    assert 0.0 < rows["namm"]["retained_video"] <= 1.0 and "retained_text" in rows["namm"]


@pytest.mark.parametrize("preset", ["cpu", "device"])
def test_training_presets_meet_the_model_spec(preset):
    """The presets that can produce the shipped model: >= 32 frames per video, >= 16 tokens per frame, the
    eval's synthetic videos (64 frames of 64 px) and a square token grid; only the device preset uses bfloat16."""
    from namm_transfer.evals.video_qa.run import SYNTHETIC_DEFAULTS
    from namm_transfer.evals.video_qa.train import PRESETS

    cfg = VideoTrainConfig(**PRESETS[preset])
    assert cfg.frames >= 32 and cfg.tokens_per_frame >= 16
    assert math.isqrt(cfg.tokens_per_frame) ** 2 == cfg.tokens_per_frame
    assert (cfg.video_frames, cfg.video_size) == (SYNTHETIC_DEFAULTS["frames_per_video"], SYNTHETIC_DEFAULTS["size"])
    assert (cfg.image_size // cfg.patch_size) ** 2 >= cfg.tokens_per_frame
    assert (cfg.dtype == "bfloat16") == (cfg.device == "cuda")


def test_shipped_default_video_model_fits_its_config():
    """The shipped smollm2-135m-video: weights fit the config exactly, 16 finite tokens per frame, a card."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = vm.resolve_shipped(vqa.DEFAULT_MODEL)
    config = vm.NammVideoLlavaConfig.from_pretrained(str(folder))
    assert config.tokens_per_frame >= 16 and config.text_model == "smollm2-135m"
    lm = LlamaForCausalLM(LlamaConfig(**config.text_config.to_dict()))  # random: only the shapes matter here
    model = vm.NammVideoLlavaForConditionalGeneration.from_pretrained(folder, language_model=lm)
    size = config.image_size
    pixels = torch.rand(1, 4, 3, size, size) * 2 - 1
    with torch.no_grad():
        tokens = model.model.get_video_features(pixels).pooler_output
    assert tokens.shape == (4, config.tokens_per_frame, config.text_config.hidden_size)
    assert torch.isfinite(tokens).all()
    card = (folder / "README.md").read_text()
    assert f"# Video model: {vqa.DEFAULT_MODEL}" in card and "Final val accuracy" in card
    assert (folder / "model.safetensors").stat().st_size < 20 * 2**20  # the size limit


def test_processor_scales_and_normalizes_frames(tok):
    """uint8 RGB -> [0, 1] -> (x - image_mean) / image_std, per channel, at the model's image size."""
    _, proc = tiny_model(tok)
    frames = np.zeros((2, proc.image_size, proc.image_size, 3), dtype=np.uint8)
    frames[..., 0], frames[..., 1], frames[..., 2] = 0, 51, 255
    x = proc.preprocess_frames(frames)
    assert x.shape == (2, 3, proc.image_size, proc.image_size)
    for c, v in enumerate((0, 51, 255)):
        expected = (v / 255.0 - proc.image_mean[c]) / proc.image_std[c]
        torch.testing.assert_close(x[:, c], torch.full_like(x[:, c], expected))
