"""Checks shared by the tests of generated model cards."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path


def _ruff() -> str | None:
    beside = Path(sys.executable).parent / "ruff"
    return str(beside) if beside.is_file() else shutil.which("ruff")


def assert_card_code_ok(card_text: str) -> None:
    """Every ```python block of a card compiles and, where ruff is installed, is ruff-formatted (CI's
    ``ruff format --check`` reads the code blocks of the cards shipped inside the package)."""
    blocks = re.findall(r"```python\n(.*?)```", card_text, flags=re.S)
    assert blocks, "the card has a ```python usage block"
    ruff = _ruff()
    for block in blocks:
        compile(block, "<card>", "exec")
        if ruff:
            done = subprocess.run(
                [ruff, "format", "--check", "--stdin-filename", "card.py", "-"],
                input=block,
                text=True,
                capture_output=True,
            )
            assert done.returncode == 0, f"card code is not ruff-formatted:\n{block}\n{done.stdout}{done.stderr}"
