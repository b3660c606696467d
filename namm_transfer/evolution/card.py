"""Model card and curves of an evolution run, generated from its log (no number is typed by hand)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

__all__ = ["read_log", "write_curve", "write_card", "compute_lines"]


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "log.jsonl"
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def write_curve(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Fitness (mean, best) and retained cache per generation as a PNG; None without matplotlib or log."""
    rows = read_log(run_dir)
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    gens = [r["generation"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(gens, [r["fitness_mean"] for r in rows], label="population mean")
    ax[0].plot(gens, [r["fitness_best"] for r in rows], label="best member")
    ax[0].set_xlabel("generation")
    ax[0].set_ylabel("fitness (score / full-cache score)")
    ax[0].legend()
    ax[1].plot(gens, [r["retained_mean"] for r in rows], color="tab:green")
    ax[1].set_xlabel("generation")
    ax[1].set_ylabel("retained cache (population mean)")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "fitness.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def compute_lines(run_dir: str | Path, rows: list[dict[str, Any]], namm_config: dict[str, Any] | None) -> list[str]:
    """The card's compute, where-trained and outside-the-spec lines, from the log rows and run.json.

    Compute counts the generations whose log line records its member-prompts (population x prompts; lines written
    before they were recorded are left out, and the line says how many are counted).
    """
    from namm_transfer.namm import NAMMConfig

    record = json.loads((Path(run_dir) / "run.json").read_text())
    cfg, default_lengths = record["config"], record.get("identity", {}).get("lengths")
    lines = []
    counted = [r for r in rows if "member_prompts" in r]
    if counted:
        seconds = sum(r["seconds"] for r in counted)
        mp = sum(r["member_prompts"] for r in counted)
        per_hour = 3600 * len(counted) / seconds if seconds > 0 else float("inf")
        note = "" if len(counted) == len(rows) else f"; recorded for {len(counted)} of {len(rows)} generations"
        lines.append(
            f"- compute: {seconds:.1f} s of evaluation wall time for {mp} member-prompts "
            f"({seconds / mp:.2f} s per member-prompt, {per_hour:.1f} generations per hour{note})"
        )
    elif rows:
        lines.append("- compute: not recorded in this log (member-prompts per generation were logged from 2026-12-07)")
    places: dict[str, int] = {}
    for r in rows:
        where = r.get("device", "an unrecorded device")
        places[where] = places.get(where, 0) + 1
    if places:
        lines.append(
            "- where trained: "
            + "; ".join(f"`{cfg['model']}` on {where} ({n} generations)" for where, n in places.items())
        )
    per_stage = []
    for i, st in enumerate(cfg["stages"]):
        lengths = st.get("lengths") or default_lengths
        shown = ", ".join(map(str, lengths)) + " tokens" if lengths else "not recorded"
        per_stage.append(f"stage {i} ({', '.join(st['tasks'])}): {shown}")
    lines.append("- prompt lengths per stage: " + "; ".join(per_stage))
    outside = NAMMConfig.from_dict(namm_config).outside_spec() if namm_config is not None else {}
    lines.append(
        "- options outside the spec (namm-spec.md): "
        + (", ".join(f"`{k}` = {v}" for k, v in outside.items()) if outside else "none (the paper's network)")
    )
    return lines


def write_card(run_dir: str | Path, dest: str | Path, name: str, eval_summary: str | Path | None = None) -> Path:
    """Write ``dest/README.md`` (and ``dest/fitness.png``) from the run's log and settings."""
    run_dir, dest = Path(run_dir), Path(dest)
    rows = read_log(run_dir)
    cfg = json.loads((run_dir / "run.json").read_text())["config"]
    curve = write_curve(run_dir, dest / "fitness.png")
    seconds = sum(r["seconds"] for r in rows)
    ws_config = run_dir / "warmstart" / "config.json"
    ws_labels = json.loads(ws_config.read_text()).get("provenance", {}).get("labels") if ws_config.exists() else None
    scorer = "answer-attention" if ws_labels == "answer" else "future-attention"
    warm = f"yes (supervised {scorer} scorer)" if (run_dir / "init.safetensors").exists() else "no"
    lines = [
        f"# NAMM `{name}`",
        "",
        "A Neural Attention Memory Model (BAM scorer, 4,172 parameters) evolved by this project's own trainer",
        "(`namm-transfer evolve`, pycma CMA-ES; the deployed weights are the CMA-ES mean). Everything below is",
        "generated from the run's log by `namm_transfer.evolution.card`.",
        "",
        f"- host model during evolution: `{cfg['model']}`",
        "- stages (tasks: generations): "
        + "; ".join(f"{', '.join(s['tasks'])}: {s['generations']}" for s in cfg["stages"]),
        f"- population {cfg['population']}, elite ratio {cfg['elite_ratio']}, sigma0 {cfg['sigma0']}, "
        f"{'separable (diagonal)' if cfg['separable'] else 'full'} covariance, seed {cfg['seed']}",
        (
            f"- fitness: answer probability ratio vs the full cache, every member at its own top "
            f"{cfg['fitness']['ratio']:.0%} of the tokens seen (ratio mode); update interval "
            f"{cfg['fitness']['update_interval']}"
            if cfg["fitness"].get("ratio") is not None
            else "- fitness: answer probability ratio vs the full cache; cache weight "
            f"{cfg['fitness']['cache_weight']} above {cfg['fitness']['cache_target']}; update interval "
            f"{cfg['fitness']['update_interval']}"
        ),
        f"- generations run: {len(rows)}; evaluation wall time {seconds / 3600:.2f} h",
        *compute_lines(run_dir, rows, json.loads((dest / "config.json").read_text()).get("namm_config")),
        f"- fitness curve: `{curve.name}`" if curve else "- fitness curve: not drawn (no matplotlib or no log)",
        f"- hardware of the last run: {platform.machine()}, {platform.system()} (see the log for timings)",
        f"- warm start: {warm}",
        "",
        "| generation | stage | fitness mean | fitness best | retained cache (mean) | sigma |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['generation']} | {r['stage']} | {r['fitness_mean']:.4f} | {r['fitness_best']:.4f} | "
            f"{r['retained_mean']:.3f} | {r['sigma']:.4f} |"
        )
    old_measure = [r for r in rows if r.get("retained_measure", 1) < 2]
    if old_measure:
        lines += [
            "",
            f"The retained cache of {'these' if len(old_measure) == len(rows) else len(old_measure)} generations "
            "was measured before the fitness counted the members' first eviction (fixed 2026-11-28, "
            "`namm_transfer.evolution.fitness.RETAINED_MEASURE`): it is too high by (1 - r1) / n, r1 the share kept "
            "at the first update and n a prompt's forward calls. The fitness values include that measure.",
        ]
    if not rows:
        lines += [
            "",
            "No CMA-ES generation has run yet: these weights are the CMA-ES initial mean, i.e. the"
            " supervised warm start. Resume the run to evolve them (the run folder replays exactly).",
        ]

    def nan(v: Any) -> float:
        return float("nan") if v is None else float(v)

    ws = run_dir / "warmstart" / "config.json"
    if ws.exists():
        prov = json.loads(ws.read_text()).get("provenance", {})
        source = (
            "attention from the final question and the teacher-forced answer"
            if prov.get("labels") == "answer"
            else "future attention"
        )
        lines += [
            "",
            f"Warm start (supervised, {source} in full-cache runs of the stage-1 training prompts): "
            f"{prov.get('rows')} (layer, head, update) rows, train accuracy {nan(prov.get('accuracy')):.3f}, "
            f"kept fraction per update {nan(prov.get('kept_fraction')):.3f}, loss {nan(prov.get('loss')):.4f}"
            + (
                f"; labels: the top {nan(prov['keep_label_share']):.0%} of each row by {source} are 'keep'"
                + (", readout bias calibrated to keep that share" if prov.get("calibrated") else "")
                if "keep_label_share" in prov
                else ""
            )
            + ".",
        ]
    cal = json.loads((dest / "config.json").read_text()).get("provenance", {}).get("bias_calibration")
    if cal:
        lines += [
            "",
            "Readout-bias calibration after the generations (`evolve --calibrate-bias`): the mean evaluated with "
            f"each bias offset on {len(cal['prompts'])} fresh training-split prompts of "
            f"{', '.join(map(str, cal['lengths']))} tokens"
            + (f", the first {cal['sink_tokens']} positions always kept" if cal.get("sink_tokens") else "")
            + f"; the offset with the best fitness is shipped ({cal['best_offset']:+.3f}).",
            "",
            "| bias offset | fitness | retained cache (mean) |",
            "|---|---|---|",
        ]
        for off, fit, ret in zip(cal["offsets"], cal["fitness"], cal["retained"], strict=True):
            mark = " (shipped)" if off == cal["best_offset"] else ""
            lines.append(f"| {off:+.3f}{mark} | {fit:.4f} | {ret:.3f} |")
        if cal.get("retained_measure", 1) < 2:
            lines += [
                "",
                "This calibration measured the retained cache before the fitness counted the first eviction (see "
                "above): its retained values are too high by (1 - r1) / n, and its fitness values include them.",
            ]
    if curve:
        lines += ["", "![fitness](fitness.png)"]
    if eval_summary and Path(eval_summary).exists():
        from namm_transfer.report import render_summary

        lines += ["", "## Held-out evaluation", "", render_summary(json.loads(Path(eval_summary).read_text()))]
    path = dest / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
