"""Execute the project's own notebooks end to end with small settings (a tiny random model, 2 generations), on
fresh copies: the committed notebooks, which carry the outputs of ``python notebooks/execute.py`` with the same
settings, are read and checked, never rewritten.

Parameters are injected papermill-style without papermill: a code cell tagged ``injected-parameters`` is
inserted right after the cell tagged ``parameters``, so its assignments win. The kernel is ``python3``, run
by this interpreter (a temporary kernelspec put first on ``JUPYTER_PATH``), so it sees this virtualenv.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
OURS = ["quickstart.ipynb", "train_namm.ipynb"]
# all four are committed with outputs; the DT and video notebooks are executed by test_dt_train_eval.py and
# test_video_eval.py (their tiny models and NAMMs come from those files' fixtures)
ALL = [*OURS, "decision_transformer.ipynb", "video_llava.ipynb"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_NOTEBOOK_BYTES = 1_000_000
MAX_PNG_WIDTH = 1000  # pixels: figures at 72 dpi; the video eval's kept-frames picture (its own size) is 1000
QUICKSTART = dict(
    model_name="tiny-random", prompt_tokens=320, update_interval=64, chunk_size=32, max_new_tokens=4, budget=None
)
TRAIN_NAMM = dict(
    model_name="tiny-random",
    prompt_lengths=[256, 320],
    pool_size=2,
    heldout_prompts=1,
    generations=2,
    population=4,
    update_interval=64,
    chunk_size=64,
)


def inject_parameters(nb: Any, params: dict[str, Any]) -> Any:
    """Insert an ``injected-parameters`` cell after the ``parameters`` cell (error if there is none)."""
    where = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(where) != 1:
        raise AssertionError(f"expected exactly one cell tagged 'parameters', found {len(where)}")
    lines = ["# injected by tests/test_notebooks.py", "import sys", "", "import torch", ""]
    lines += ["torch.set_num_threads(1)", "print('kernel python:', sys.executable)"]
    lines += [f"{k} = {v!r}" for k, v in params.items()]
    cell = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(where[0] + 1, cell)
    return nb


def run_notebook(name: str, params: dict[str, Any], workdir: Path, timeout: int = 900) -> Any:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    inject_parameters(nb, params)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()
    return nb


def outputs(nb: Any) -> list[Any]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def pngs(nb: Any) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"]) for o in outputs(nb) if "image/png" in o.get("data", {})]


def text_of(nb: Any) -> str:
    parts = []
    for o in outputs(nb):
        if o.get("output_type") == "stream":
            parts.append(o.get("text", ""))
        elif "text/plain" in o.get("data", {}):
            parts.append(o["data"]["text/plain"])
    return "".join(parts)


@pytest.fixture
def kernel_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """What the kernel inherits: no download, an empty model cache (so the tiny model is used), one thread,
    and a ``python3`` kernelspec that points at this interpreter (so the kernel sees this virtualenv)."""
    monkeypatch.setenv("NAMM_TRANSFER_OFFLINE", "1")
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    # a "python3" kernelspec that runs this interpreter, found before any other installed one
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    work = tmp_path / "work"
    work.mkdir()
    return work


def _execute_module() -> Any:
    """``notebooks/execute.py``, the script that makes the committed outputs (imported by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS / "execute.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png_width(png: bytes) -> int:
    return int.from_bytes(png[16:20], "big")  # IHDR: width, then height


@pytest.mark.parametrize("name", ALL)
def test_committed_notebook_has_small_outputs(name: str) -> None:
    """Committed with the outputs of ``python notebooks/execute.py`` (docs/notebooks.md): executed, no error, the
    settings that made them written in a markdown cell, figures small, no path of the machine that ran them."""
    path = NOTEBOOKS / name
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{name}: {path.stat().st_size:,} bytes"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and code.index(tagged[0]) == 0, "the first code cell is the one tagged 'parameters'"
    assert not [c for c in code if "injected-parameters" in c.get("metadata", {}).get("tags", [])]
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert all(c.get("execution_count") is not None for c in code), "run python notebooks/execute.py"
    assert not [o for o in outputs(nb) if o.get("output_type") == "error"] and "Traceback" not in text_of(nb)
    images = pngs(nb)
    assert images and all(img.startswith(PNG_MAGIC) and _png_width(img) <= MAX_PNG_WIDTH for img in images)
    text = text_of(nb)
    assert "/tmp/" not in text and str(NOTEBOOKS.parent) not in text
    settings = _execute_module().SETTINGS[name.removesuffix(".ipynb")]
    notes = [c for c in nb.cells if "execute-settings" in c.get("metadata", {}).get("tags", [])]
    assert len(notes) == 1 and nb.cells.index(notes[0]) == nb.cells.index(tagged[0]) + 1
    assert notes[0].cell_type == "markdown" and all(f"`{k} = " in notes[0].source for k in settings)


def test_committed_outputs_use_the_tests_settings() -> None:
    settings = _execute_module().SETTINGS
    assert set(settings) == {n.removesuffix(".ipynb") for n in ALL}
    assert settings["quickstart"] == QUICKSTART
    assert {k: v for k, v in settings["train_namm"].items() if k != "run_dir"} == TRAIN_NAMM


def test_inject_parameters_goes_after_the_parameters_cell() -> None:
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# t"),
            nbformat.v4.new_code_cell("a = 1", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("print(a)"),
        ]
    )
    inject_parameters(nb, {"a": 2, "b": "x"})
    assert [c.metadata.get("tags") for c in nb.cells][1:3] == [["parameters"], ["injected-parameters"]]
    assert "a = 2\nb = 'x'" in nb.cells[2].source
    with pytest.raises(AssertionError, match="exactly one"):
        inject_parameters(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("a = 1")]), {})


def test_quickstart_runs_and_plots(kernel_env: Path) -> None:
    nb = run_notebook("quickstart.ipynb", QUICKSTART, kernel_env)
    images = pngs(nb)
    assert len(images) == 2, "expected two figures: cache size over time and the kept-positions heatmap"
    assert all(img.startswith(PNG_MAGIC) and len(img) > 2000 for img in images)
    text = text_of(nb)
    assert f"kernel python: {sys.executable}" in text
    assert "tiny random Llama" in text
    assert "retained cache" in text
    assert "Traceback" not in text


def test_train_namm_runs_two_generations_and_plots(kernel_env: Path) -> None:
    params = dict(TRAIN_NAMM, run_dir=str(kernel_env / "run"))
    nb = run_notebook("train_namm.ipynb", params, kernel_env)
    images = pngs(nb)
    assert len(images) >= 1 and all(img.startswith(PNG_MAGIC) for img in images)
    log = (kernel_env / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2, "two generations logged"
    assert (kernel_env / "run" / "namm" / "config.json").is_file(), "the mean is saved as a checkpoint"
    assert (kernel_env / "run" / "fitness.png").is_file(), "card.write_curve wrote the curve"
    assert "Traceback" not in text_of(nb)


if __name__ == "__main__":  # pragma: no cover - run one notebook by hand: python tests/test_notebooks.py quickstart
    sys.exit(pytest.main([__file__, "-k", sys.argv[1] if len(sys.argv) > 1 else ""]))
