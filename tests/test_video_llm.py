"""Video LLM adapter on tiny random models of every supported family, with their real processor classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")  # the transformers video processors need it
pytest.importorskip("av")

from namm_transfer.adapters.video_llm import (  # noqa: E402
    SUPPORTED_VIDEO_LLMS,
    VideoLLMAdapter,
    VideoQASession,
    build_inputs,
    format_prompt,
    frame_kept_fraction,
    retained_text,
    retained_video,
)
from tiny_vlms import check_full_policy_is_the_model, check_inputs_match_forward, synthetic_video  # noqa: E402
from tiny_vlms import tiny_tokenizer as _tokenizer  # noqa: E402
from tiny_vlms import tiny_vlm as _tiny  # noqa: E402

from namm_transfer.registry import find_adapter, list_adapters  # noqa: E402
from namm_transfer.session import attach  # noqa: E402

FAMILIES = ["llava-next-video", "video-llava", "llava-onevision"]
TOKENS_PER_FRAME = {"llava-next-video": 4, "video-llava": 17, "llava-onevision": 4}  # 32 px, patch 8
N_FRAMES = 8
NEXT_VIDEO_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return synthetic_video(tmp_path_factory.mktemp("synth"), N_FRAMES, size=32, seed=3)


@pytest.fixture(scope="module", params=FAMILIES)
def host(request, tok, video):
    model, proc = _tiny(request.param, tok)
    frames, question = video
    inputs = build_inputs(model, proc, frames, question)
    return request.param, model, proc, inputs


# ----- inputs are the model's own --------------------------------------------------------------------------
def test_build_inputs_equal_model_forward(host):
    family, model, proc, inputs = host
    extra = 1 if family == "llava-onevision" else 0  # OneVision's trailing image_newline
    video_pos = check_inputs_match_forward(model, inputs, N_FRAMES, TOKENS_PER_FRAME[family], extra)
    ids, kind = inputs["input_ids"][0], inputs["token_kind"]
    assert bool((ids[video_pos] == model.config.video_token_id).all())
    assert int(kind[: video_pos[0]].sum()) == 0 and video_pos[0] > 0  # video first, after the role prefix
    assert video_pos[-1] < len(kind) - 5  # the question follows


def test_question_first_prompt(host, video):
    family, model, proc, inputs = host
    frames, question = video
    q_first = build_inputs(model, proc, frames, question, video_first=False)
    first_video = int(torch.nonzero(q_first["token_kind"])[0])
    assert first_video > len(question)  # the question's bytes come before the video
    assert int(q_first["token_kind"].sum()) == int(inputs["token_kind"].sum())
    assert format_prompt(model, proc, "Why?", video_first=False).index("Why?") < q_first["prompt"].index("<video>")
    if family == "llava-next-video":  # a processor with a chat template (the official one's shape) uses it
        builtin = format_prompt(model, proc, "Why?")
        proc.chat_template = NEXT_VIDEO_TEMPLATE
        try:
            assert format_prompt(model, proc, "Why?") == builtin == "USER: <video>\nWhy? ASSISTANT:"
        finally:
            proc.chat_template = None


# ----- keep everything == unmodified model --------------------------------------------------------------------
def test_keep_everything_reproduces_generate(host):
    family, model, proc, inputs = host
    res = check_full_policy_is_the_model(model, proc, inputs)
    t = inputs["processor_outputs"]["input_ids"].shape[1]
    assert res.text == proc.tokenizer.decode(res.token_ids, skip_special_tokens=True)
    assert res.prompt_len == t and len(res.record.update_clock) >= t // 16
    assert retained_video(res) == 1.0 and retained_text(res) == 1.0
    assert model.config.text_config._attn_implementation == "sdpa"  # detached: the model is unmodified


# ----- evictions by modality and frame ---------------------------------------------------------------------------
def test_evictions_recorded_by_modality_and_frame(host, video):
    family, model, proc, inputs = host
    frames, question = video
    sess = VideoQASession(model, proc, "h2o", budget=0.5, update_interval=16, chunk_size=8)
    res = sess.answer(frames, question, max_new_tokens=6, inputs=inputs)
    rec, stats = res.record, res.stats
    kind = inputs["token_kind"].numpy()
    first_v, last_v = np.nonzero(kind)[0][[0, -1]]
    assert rec.layers == stats.managed_layers == (0, 1)
    assert any(first_v < s <= last_v for s in rec.update_seen), "no update while the video was being fed"

    # kept tokens split into video + text, exactly as many as the engine kept, per update, layer and head
    for u in range(rec.n_updates):
        for li, layer in enumerate(rec.layers):
            assert (rec.kept_video[u, li] + rec.kept_text[u, li]).tolist() == stats.kept_counts[u][layer][0]
            assert (rec.kept_video[u, li] <= rec.seen_video[u]).all() and (
                rec.kept_text[u, li] <= rec.seen_text[u]
            ).all()
    per_frame = rec.kept_per_frame.sum(-1)
    newline = rec.kept_video - per_frame
    assert newline.min() >= 0 and newline.max() <= (1 if family == "llava-onevision" else 0)
    assert (rec.seen_video + rec.seen_text == np.array(rec.update_seen)).all()
    assert (rec.seen_per_frame.sum(-1) <= rec.seen_video).all()

    # live cache after every forward call: video + text == the engine's cache_tokens
    live = rec.live_video + rec.live_text
    np.testing.assert_allclose(live, np.stack(stats.cache_tokens)[:, :, 0], atol=1e-9)
    seen = rec.call_seen_video + rec.call_seen_text
    np.testing.assert_allclose((live / seen[:, None]).mean(), stats.retained_cache(), atol=1e-9)

    # the video / text split of the kept tokens, counted independently from the kept positions and token kinds
    for u in range(rec.n_updates):
        for li, layer in enumerate(rec.layers):
            for h, pos in enumerate(stats.kept_positions[u][layer][0]):
                assert rec.kept_video[u, li, h] == int(kind[pos].sum())
                assert rec.kept_text[u, li, h] == len(pos) - int(kind[pos].sum())

    rv, rt = retained_video(res), retained_text(res)
    assert 0.0 < rv < 1.0 and 0.0 < rt <= 1.0
    has_video = rec.call_seen_video > 0
    assert rv == pytest.approx((rec.live_video[has_video] / rec.call_seen_video[has_video, None]).mean())
    assert rt == pytest.approx((rec.live_text / rec.call_seen_text[:, None]).mean())
    assert (rec.live_video <= rec.call_seen_video[:, None] + 1e-9).all()
    assert (rec.kept_video < rec.seen_video[:, None, None]).any()  # video tokens were evicted

    frac = frame_kept_fraction(res)
    assert frac.shape == (rec.n_updates, N_FRAMES)
    ok = ~np.isnan(frac)
    assert ok.any() and (frac[ok] >= 0).all() and (frac[ok] <= 1).all()
    end = res.frame_kept_fraction(at="end")
    assert end.shape == (N_FRAMES,) and (end >= 0).all() and (end <= 1).all() and end.min() < 1
    one_layer = res.frame_kept_fraction(layer=1)
    assert one_layer.shape == frac.shape
    json.dumps(rec.to_dict())  # JSON-ready
    assert len(res.token_ids) >= 1 and isinstance(res.text, str)


# ----- refusals ---------------------------------------------------------------------------------------------------
def test_models_without_video_path_are_refused(tok):
    import transformers as tf
    from tiny_models import tiny_decoder

    vision = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
    llava = tf.LlavaForConditionalGeneration(
        tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(**vision), text_config=tf.LlamaConfig(**text), image_token_index=4
        )
    ).eval()
    with pytest.raises(TypeError, match="no video path") as err:
        VideoLLMAdapter(llava)
    for name in SUPPORTED_VIDEO_LLMS:
        assert name in str(err.value)
    with pytest.raises(TypeError, match="no adapter supports LlavaForConditionalGeneration"):
        attach(llava, "full")
    frames = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(TypeError, match="no video path"):
        build_inputs(llava, None, frames, "What happens?")

    lm = tiny_decoder("llama")
    with pytest.raises(TypeError, match="text-only language model"):
        VideoLLMAdapter(lm)
    assert type(find_adapter(lm)).__name__ == "DecoderLMAdapter"  # still attachable as a plain LM

    fake_qwen2vl = type("Qwen2VLForConditionalGeneration", (torch.nn.Module,), {})()
    with pytest.raises(TypeError, match="M-RoPE"):
        VideoLLMAdapter(fake_qwen2vl)
    with pytest.raises(TypeError, match="not a supported video LLM"):
        VideoLLMAdapter(torch.nn.Linear(2, 2))
    assert "video-llm" in list_adapters()
