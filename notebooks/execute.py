"""Execute the notebooks in place with small settings, so that they are committed with their outputs.

    python notebooks/execute.py                     # all four
    python notebooks/execute.py quickstart video_llava

Each notebook runs in a ``python3`` kernel of this interpreter (a temporary kernelspec, so the kernel sees this
virtualenv), offline, on one thread, with the settings below inserted as a code cell after the cell tagged
``parameters`` (figures at 72 dpi). After the run that cell becomes a markdown cell listing the settings, so the
committed notebook says what made its outputs and keeps a single parameters cell. The settings are the ones the
tests use (tests/test_notebooks.py, test_dt_train_eval.py, test_video_eval.py), except that the last two
notebooks use the shipped NAMM. See docs/notebooks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DPI = 72

# notebook -> settings (assignments injected after its parameters cell); "{work}" is a temporary folder
SETTINGS: dict[str, dict[str, Any]] = {
    "quickstart": dict(
        model_name="tiny-random", prompt_tokens=320, update_interval=64, chunk_size=32, max_new_tokens=4, budget=None
    ),
    "train_namm": dict(
        model_name="tiny-random",
        prompt_lengths=[256, 320],
        pool_size=2,
        heldout_prompts=1,
        generations=2,
        population=4,
        update_interval=64,
        chunk_size=64,
        run_dir="{work}/run",
    ),
    "decision_transformer": dict(env="hopper", steps=20, model="tiny", namm="default", update_interval=6),
    "video_llava": dict(WORK_DIR="{work}", NAMM_CHECKPOINT="default"),
}


def _settings_cell_source(settings: dict[str, Any], work: str) -> str:
    lines = [
        "# inserted by notebooks/execute.py",
        "import warnings",
        "",
        "import matplotlib.pyplot as plt",
        "import torch",
        "",
    ]
    lines += ["warnings.filterwarnings('ignore', message='IProgress not found')  # tqdm without ipywidgets"]
    lines += ["torch.set_num_threads(1)", f"plt.rcParams['figure.dpi'] = {DPI}", f"plt.rcParams['savefig.dpi'] = {DPI}"]
    for key, value in settings.items():
        value = value.replace("{work}", work) if isinstance(value, str) else value
        lines.append(f"{key} = {value!r}")
    return "\n".join(lines)


def _settings_note(settings: dict[str, Any]) -> str:
    shown = ", ".join(f"`{k} = {v!r}`" for k, v in settings.items())
    return (
        "*The outputs below were made by `python notebooks/execute.py` with small settings (tiny models: they show "
        f"the mechanics, not accuracy), set after the parameters cell: {shown}; one thread, figures at {DPI} dpi. "
        "Change the parameters cell and run the notebook to see your own.*"
    )


def _scrub_paths(nb: Any, replace: dict[str, str]) -> None:
    """Write this machine's temporary and checkout folders in text outputs as ``work`` and ``.``."""

    def fix(text: Any) -> Any:
        joined = "".join(text) if isinstance(text, list) else text
        for old, new in replace.items():
            joined = joined.replace(old, new)
        return joined

    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if "text" in out:
                out["text"] = fix(out["text"])
            for mime in ("text/plain", "text/markdown"):
                if mime in out.get("data", {}):
                    out["data"][mime] = fix(out["data"][mime])


def execute(name: str, timeout: int = 1200) -> Path:
    """Run ``notebooks/NAME.ipynb`` in place with ``SETTINGS[name]``; returns its path."""
    import nbclient
    import nbformat

    path = HERE / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    where = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(where) != 1:
        raise SystemExit(f"{path}: expected exactly one cell tagged 'parameters', found {len(where)}")
    nb.cells = [c for c in nb.cells if "execute-settings" not in c.get("metadata", {}).get("tags", [])]
    where = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    with tempfile.TemporaryDirectory(prefix=f"nb-{name}-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        settings = SETTINGS[name]
        cell = nbformat.v4.new_code_cell(_settings_cell_source(settings, str(work)))
        nb.cells.insert(where[0] + 1, cell)
        spec = Path(tmp) / "jupyter" / "kernels" / "python3"
        spec.mkdir(parents=True)
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
        env = {
            "JUPYTER_PATH": str(Path(tmp) / "jupyter"),
            "NAMM_TRANSFER_OFFLINE": "1",
            "NAMM_TRANSFER_CACHE": str(Path(tmp) / "cache"),
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TQDM_DISABLE": "1",  # no progress bars in the committed outputs
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        saved = {k: os.environ.get(k) for k in [*env, "MPLBACKEND"]}
        os.environ.update(env)
        os.environ.pop("MPLBACKEND", None)
        try:
            client = nbclient.NotebookClient(
                nb,
                kernel_name="python3",
                timeout=timeout,
                record_timing=False,
                resources={"metadata": {"path": str(work)}},
            )
            client.execute()
            _scrub_paths(nb, {str(work): "work", str(HERE.parent): "."})
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    note = nbformat.v4.new_markdown_cell(_settings_note(settings), metadata={"tags": ["execute-settings"]})
    nb.cells[where[0] + 1] = note
    nb.metadata.pop("widgets", None)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"notebooks to run, of {', '.join(SETTINGS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in SETTINGS]
    if unknown:
        parser.error(f"no notebook {', '.join(unknown)}: choose from {', '.join(SETTINGS)}")
    for name in args.names or list(SETTINGS):
        path = execute(name)
        print(f"{path.relative_to(HERE.parent)}: {path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
