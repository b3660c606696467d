"""A user's run never touches tracked files: the main eval command in a fresh clone writes under the ignored runs/,
runs every unit (the committed results/ are not taken for its own), and a rerun with nothing left to do keeps its
summary byte for byte."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from namm_transfer.evals.args import repository_root

from namm_transfer.protocols import DEFAULT_PROTOCOLS, parse_protocols

# the shipped DT and NAMM on one env, one short episode: the same command as the README's, made tiny
TINY = ["--env", "hopper", "--episodes", "1", "--max-ep-len", "6", "--update-interval", "6", "--device", "cpu"]
COMMAND = ["eval", "--target", "decision-transformer", *TINY, "--no-progress"]


def _git(*args: str, cwd) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def fresh_clone(tmp_path, monkeypatch):
    """A clone of the checkout the package runs from, at its HEAD, as the current folder."""
    root = repository_root()
    if root is None or shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("needs git and a git checkout of namm-transfer")
    clone = tmp_path / "clone"
    _git("clone", "--quiet", "--no-checkout", str(root), str(clone), cwd=tmp_path)
    _git("checkout", "--quiet", _git("rev-parse", "HEAD", cwd=root).strip(), cwd=clone)
    assert (clone / "results" / "decision-transformer.jsonl").is_file()  # the committed results the run must skip
    assert _git("status", "--porcelain", cwd=clone) == ""
    monkeypatch.chdir(clone)
    return clone


def test_the_main_eval_command_in_a_fresh_clone_runs_every_unit_and_leaves_the_clone_clean(
    fresh_clone, monkeypatch, capsys
):
    pytest.importorskip("mujoco")
    from namm_transfer.evals.offline_rl import run as dt_run

    from namm_transfer.cli import main

    ran: list[tuple[str, str]] = []
    run_batch = dt_run._run_batch

    def spy(s, env, p, proto, *a):
        ran.append((env, p, proto.label if proto is not None else None))
        return run_batch(s, env, p, proto, *a)

    monkeypatch.setattr(dt_run, "_run_batch", spy)
    committed = {p.name: p.read_bytes() for p in (fresh_clone / "results").iterdir()}

    assert main(COMMAND) == 0
    out = capsys.readouterr().out
    assert _git("status", "--porcelain", cwd=fresh_clone) == ""  # nothing tracked changed, nothing untracked shown
    assert {p.name: p.read_bytes() for p in (fresh_clone / "results").iterdir()} == committed
    runs = fresh_clone / "runs" / "decision-transformer"
    assert sorted(p.name for p in runs.iterdir()) == [f"decision-transformer.{x}" for x in ("json", "jsonl", "png")]
    summary_path = runs / "decision-transformer.json"
    summary = json.loads(summary_path.read_text())
    policies = dt_run.DEFAULT_POLICIES.split(",")
    shared = ["canonical", "full", "full-alt"]  # once per seed; the others once per protocol
    labels = [p.label for p in parse_protocols(DEFAULT_PROTOCOLS)]
    units = [("hopper", p, None) for p in shared] + [
        ("hopper", p, label) for label in labels for p in policies if p not in shared
    ]
    assert sorted(ran, key=str) == sorted(units, key=str)  # every unit ran: none was taken from results/
    assert summary["n_records"] == len(units)
    assert sorted((r["policy"], r["protocol"]) for r in summary["rows"]) == sorted((p, lab) for _, p, lab in units)
    assert summary["settings"]["episodes"] == {"hopper": 1} and summary["settings"]["max_ep_len"] == 6
    assert "results: runs/decision-transformer/decision-transformer.json\n" in out
    assert "\nthis run: runs/decision-transformer/decision-transformer.json\n" in out
    reference = repository_root() / "results" / "decision-transformer.json"
    assert f"\ncommitted reference: {reference} (`" in out
    assert "note: the reference ran with other settings (" in out and "settings.episodes" in out

    # nothing left to do: no unit runs, and the summary keeps the run that produced it byte for byte, also when
    # asked with another command line that names the same file
    written = summary_path.read_bytes()
    for again in (COMMAND, [*COMMAND, "--log-level", "WARNING", "--output", str(summary_path)]):
        ran.clear()
        assert main(again) == 0
        assert ran == [] and summary_path.read_bytes() == written, again
    assert json.loads(written)["command"] == "namm-transfer " + " ".join(COMMAND)
    assert _git("status", "--porcelain", cwd=fresh_clone) == ""
