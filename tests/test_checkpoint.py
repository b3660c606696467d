"""Checkpoint save/load, verification, the shipped-weights registry and the reference importer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from namm_transfer import checkpoint as ckpt
from namm_transfer.checkpoint import (
    content_hash,
    import_reference_checkpoint,
    list_namms,
    load_namm,
    save_namm,
)
from namm_transfer.namm import NAMM, NAMMConfig


def _trained_namm(seed: int = 0, config: NAMMConfig | None = None) -> NAMM:
    g = torch.Generator().manual_seed(seed)
    namm = NAMM(config)
    namm.set_flat(torch.randn(namm.n_params, generator=g))
    namm.set_normalization(torch.randn(namm.config.n_bins, generator=g), torch.rand(namm.config.n_bins, generator=g))
    return namm


def _assert_same(a: NAMM, b: NAMM) -> None:
    assert a.config == b.config
    assert torch.equal(a.flat, b.flat)
    assert torch.equal(a.feature_mean, b.feature_mean)
    assert torch.equal(a.feature_std, b.feature_std)
    assert bool(a.normalization_ready) == bool(b.normalization_ready)


def _rewrite(folder: Path, tensors: dict[str, torch.Tensor], *, fix_hash: bool = True) -> None:
    """Replace the weights of a saved checkpoint, optionally updating the recorded hash."""
    save_file(tensors, str(folder / "model.safetensors"))
    if fix_hash:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["content_hash"] = content_hash(folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[NAMM, Path]:
    namm = _trained_namm()
    folder = tmp_path / "bam.test"
    save_namm(namm, folder, provenance={"trainer": "test", "generations": 3, "path": tmp_path})
    return namm, folder


def test_round_trip_exact(saved: tuple[NAMM, Path]) -> None:
    namm, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["format"] == "namm-transfer/1"
    assert cfg["name"] == "bam.test"
    assert cfg["n_params"] == 4172
    assert cfg["normalization"] == "estimated"
    assert cfg["namm_config"] == NAMMConfig().to_dict()
    assert cfg["provenance"]["generations"] == 3
    assert cfg["content_hash"] == content_hash(folder / "model.safetensors")
    assert cfg["created"].endswith("+00:00")

    loaded = load_namm(folder)
    _assert_same(namm, loaded)
    assert loaded.checkpoint_info["name"] == "bam.test"
    assert loaded.checkpoint_info["content_hash"] == cfg["content_hash"]
    assert loaded.checkpoint_info["provenance"]["trainer"] == "test"


def test_load_by_config_and_safetensors_path(saved: tuple[NAMM, Path]) -> None:
    namm, folder = saved
    _assert_same(namm, load_namm(folder / "config.json"))
    _assert_same(namm, load_namm(str(folder / "model.safetensors")))


def test_save_to_safetensors_path(tmp_path: Path) -> None:
    namm = _trained_namm(1)
    config = save_namm(namm, tmp_path / "run" / "mine.safetensors")
    assert config == tmp_path / "run" / "mine.json"
    assert json.loads(config.read_text())["name"] == "mine"
    _assert_same(namm, load_namm(tmp_path / "run" / "mine.safetensors"))
    _assert_same(namm, load_namm(config))


def test_calibrated_label_is_written_and_survives_a_round_trip(tmp_path: Path) -> None:
    namm = NAMM()
    namm.set_flat(torch.randn(namm.n_params))
    namm.set_normalization(torch.rand(17), torch.rand(17) + 0.5)

    def label(folder: Path) -> str:
        return json.loads((folder / "config.json").read_text())["normalization"]

    save_namm(namm, tmp_path / "a", normalization="calibrated")
    assert label(tmp_path / "a") == "calibrated"
    loaded = load_namm(tmp_path / "a")
    assert loaded.checkpoint_info["normalization"] == "calibrated"
    save_namm(loaded, tmp_path / "b")  # loaded and saved again: still labelled an ablation
    assert label(tmp_path / "b") == "calibrated"
    save_namm(loaded, tmp_path / "c", normalization="estimated")
    assert label(tmp_path / "c") == "estimated"
    with pytest.raises(ValueError, match="must be one of"):
        save_namm(namm, tmp_path / "d", normalization="guessed")
    with pytest.raises(ValueError, match="no normalization statistics"):
        save_namm(NAMM(), tmp_path / "e", normalization="calibrated")


def test_unset_normalization_round_trip(tmp_path: Path) -> None:
    namm = NAMM()
    namm.set_flat(torch.randn(namm.n_params))
    save_namm(namm, tmp_path / "x")
    assert json.loads((tmp_path / "x" / "config.json").read_text())["normalization"] == "unset"
    loaded = load_namm(tmp_path / "x")
    assert not bool(loaded.normalization_ready)
    _assert_same(namm, loaded)


def test_non_default_config_round_trip(tmp_path: Path) -> None:
    cfg = NAMMConfig(head_dim=8, max_tokens=64, threshold=-0.5)
    namm = _trained_namm(2, cfg)
    save_namm(namm, tmp_path / "small")
    loaded = load_namm(tmp_path / "small")
    assert loaded.config == cfg
    _assert_same(namm, loaded)


def test_wrong_length_flat(saved: tuple[NAMM, Path]) -> None:
    namm, folder = saved
    _rewrite(folder, {"flat": torch.zeros(100), "feature_mean": namm.feature_mean, "feature_std": namm.feature_std})
    with pytest.raises(ValueError, match="4172") as info:
        load_namm(folder)
    assert "100" in str(info.value) and "model.safetensors" in str(info.value)


def test_bad_normalization_shape(saved: tuple[NAMM, Path]) -> None:
    namm, folder = saved
    _rewrite(folder, {"flat": namm.flat.detach(), "feature_mean": torch.zeros(16), "feature_std": namm.feature_std})
    with pytest.raises(ValueError, match="feature_mean"):
        load_namm(folder)


@pytest.mark.parametrize("key", ["flat", "feature_mean", "feature_std"])
def test_non_finite(saved: tuple[NAMM, Path], key: str) -> None:
    namm, folder = saved
    tensors = {"flat": namm.flat.detach().clone(), "feature_mean": namm.feature_mean, "feature_std": namm.feature_std}
    tensors[key] = tensors[key].clone()
    tensors[key][3] = float("nan") if key != "feature_std" else float("inf")
    _rewrite(folder, tensors)
    with pytest.raises(ValueError, match="NaN or inf"):
        load_namm(folder)


def test_expect_config_mismatch(saved: tuple[NAMM, Path]) -> None:
    _, folder = saved
    load_namm(folder, expect_config=NAMMConfig())
    load_namm(folder, expect_config={"n_fft": 32})
    with pytest.raises(ValueError, match="mismatched hyperparameters") as info:
        load_namm(folder, expect_config=NAMMConfig(gamma=0.9, hop=8))
    assert "gamma" in str(info.value) and "hop" in str(info.value) and "n_fft" not in str(info.value)
    with pytest.raises(ValueError, match="mismatched hyperparameters"):
        load_namm(folder, expect_config={"head_dim": 16})


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file(saved: tuple[NAMM, Path], damage: str) -> None:
    _, folder = saved
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    new = {"truncate": data[: len(data) // 2], "garbage": b"\x00\x01not a safetensors file" * 10, "empty": b""}[damage]
    weights.write_bytes(new)
    with pytest.raises(ValueError, match="corrupt") as info:
        load_namm(folder)
    msg = str(info.value)
    assert str(weights) in msg and "re-download" in msg and "re-train" in msg


def test_modified_file_hash_mismatch(saved: tuple[NAMM, Path]) -> None:
    namm, folder = saved
    flat = namm.flat.detach().clone()
    flat[0] += 1.0
    _rewrite(folder, {"flat": flat, "feature_mean": namm.feature_mean, "feature_std": namm.feature_std}, fix_hash=False)
    with pytest.raises(ValueError, match="corrupt or was modified"):
        load_namm(folder)


def test_wrong_format(saved: tuple[NAMM, Path]) -> None:
    _, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    cfg["format"] = "something/9"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format"):
        load_namm(folder)


def test_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-namm") as info:
        load_namm("no-such-namm")
    assert "shipped" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_namm(tmp_path / "empty")


def test_missing_weights_next_to_config(saved: tuple[NAMM, Path]) -> None:
    _, folder = saved
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_namm(folder)


def test_registry(saved: tuple[NAMM, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(list_namms(), list)
    namm, folder = saved
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setattr(ckpt, "WEIGHTS_DIR", weights)
    assert list_namms() == []
    with pytest.raises(FileNotFoundError, match="namm-transfer evolve"):
        load_namm("default")

    shutil.copytree(folder, weights / "bam.tiny-test")
    (weights / "not-a-checkpoint").mkdir()
    assert list_namms() == ["bam.tiny-test"]
    loaded = load_namm("bam.tiny-test")
    _assert_same(namm, loaded)
    assert loaded.checkpoint_info["path"] == str(weights / "bam.tiny-test" / "model.safetensors")

    (weights / "DEFAULT").write_text("bam.tiny-test\n")
    _assert_same(namm, load_namm("default"))
    with pytest.raises(FileNotFoundError, match="bam.tiny-test"):
        load_namm("bam.other")


def _reference_payload(mean: torch.Tensor, var: torch.Tensor, flat: torch.Tensor, nested: bool) -> dict:
    buffers = {"x.token_embedding_0_output_mean": mean, "x.token_embedding_0_output_var": var}
    payload: dict = {"evolution_state": {"mean": flat, "sigma": 0.065}}
    if nested:
        payload["model_state_dict"] = buffers
    else:
        payload.update(buffers)
    return payload


@pytest.mark.parametrize("nested", [True, False])
def test_reference_importer(tmp_path: Path, nested: bool) -> None:
    torch.manual_seed(0)
    flat, mean, var = torch.randn(4172), torch.randn(1, 1, 1, 17), torch.rand(1, 1, 1, 17)
    path = tmp_path / "ref.pt"
    torch.save(_reference_payload(mean, var, flat, nested), path)
    namm = import_reference_checkpoint(path)
    assert namm.config == NAMMConfig()
    assert torch.equal(namm.flat, flat)
    assert torch.equal(namm.feature_mean, mean.reshape(17))
    torch.testing.assert_close(namm.feature_std, var.reshape(17).sqrt())
    assert bool(namm.normalization_ready)
    assert namm.checkpoint_info["content_hash"] == content_hash(path)

    # and it survives a save/load into the toolkit's format
    save_namm(namm, tmp_path / "converted", provenance=namm.checkpoint_info["provenance"])
    _assert_same(namm, load_namm(tmp_path / "converted"))


def test_reference_importer_list_mean(tmp_path: Path) -> None:
    flat = [float(i) / 4172 for i in range(4172)]
    path = tmp_path / "ref.pt"
    torch.save(_reference_payload(torch.zeros(1, 1, 1, 17), torch.ones(1, 1, 1, 17), flat, True), path)  # type: ignore[arg-type]
    namm = import_reference_checkpoint(path)
    assert torch.equal(namm.flat, torch.tensor(flat))
    assert torch.equal(namm.feature_std, torch.ones(17))


def test_reference_importer_wrong_length(tmp_path: Path) -> None:
    path = tmp_path / "ref.pt"
    torch.save(_reference_payload(torch.zeros(1, 1, 1, 17), torch.ones(1, 1, 1, 17), torch.zeros(10), True), path)
    with pytest.raises(ValueError, match="4172"):
        import_reference_checkpoint(path)


class Sneaky:
    """An arbitrary object: unpickling it would run code from this module."""

    def __init__(self) -> None:
        self.value = 1


def test_reference_importer_refuses_arbitrary_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    payload = _reference_payload(torch.zeros(1, 1, 1, 17), torch.ones(1, 1, 1, 17), torch.zeros(4172), True)
    payload["extra"] = Sneaky()
    torch.save(payload, path)
    with pytest.raises(ValueError, match="cannot be loaded safely") as info:
        import_reference_checkpoint(path)
    assert "never unpickles" in str(info.value)


def test_the_default_namm_ships_and_loads():
    """``load_namm("default")`` gives the NAMM named in the package's weights/DEFAULT, verified by its hash."""
    from namm_transfer.checkpoint import default_namm_name, list_namms, load_namm

    name = default_namm_name()
    assert name == "bam.smollm2-135m" and name in list_namms()
    namm = load_namm("default")
    assert namm.checkpoint_info["name"] == name and namm.normalization_ready
    assert torch.equal(namm.get_flat(), load_namm(name).get_flat())
