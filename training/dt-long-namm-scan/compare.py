"""Paired intervals of one scan file's NAMM rows against the baselines of a results file run on the same seeds.

    python training/dt-long-namm-scan/compare.py SCAN.jsonl RESULTS.jsonl

Both files must hold the same full-cache episodes (same env, seeds and scores: checked); the differences are the
scan's NAMM minus each policy of the results file under the same protocol, per (env, seed), with
namm_transfer.stats.paired_bootstrap (2,000 resamples, fixed seed, stratified by env).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from namm_transfer.stats import paired_bootstrap


def episodes(path: Path) -> dict[tuple[str, str | None, str, int], float]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if "_header" in r or "seed" not in r:
            continue
        out[(r["policy"], r.get("protocol"), r["env"], int(r["seed"]))] = float(r["score"])
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    scan, res = (episodes(Path(a)) for a in argv)
    full_scan = {k[2:]: v for k, v in scan.items() if k[0] == "full"}
    full_res = {k[2:]: v for k, v in res.items() if k[0] == "full"}
    if not full_scan or full_scan != full_res:
        print("error: the two files do not hold the same full-cache episodes (env, seed, score)", file=sys.stderr)
        return 1
    protocols = sorted({k[1] for k in scan if k[0] == "namm" and k[1] is not None})
    policies = sorted({k[0] for k in res if k[1] is not None})
    print("| protocol | scan NAMM minus | mean | 95% interval |\n|:--|:--|--:|:--|")
    for prot in protocols:
        for pol in policies:
            strata: dict[str, list[float]] = {}
            for (p, pr, env, seed), v in scan.items():
                if p == "namm" and pr == prot and (pol, prot, env, seed) in res:
                    strata.setdefault(env, []).append(v - res[(pol, prot, env, seed)])
            if strata:
                i = paired_bootstrap(strata)
                mark = "*" if i.excludes_zero else ""
                print(f"| {prot} | {pol} | {i.mean:+.1f} | [{i.lo:+.1f}, {i.hi:+.1f}]{mark} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
