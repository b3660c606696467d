"""Matched-budget protocols: how every policy of a comparison is held to the same cache.

* ``ratio:R`` -- every policy, the NAMM included (its own top share of scores), keeps ``floor(R * n_seen)``
  tokens in every managed layer and KV head at every update and once more at the end of each prompt
  (:class:`~namm_transfer.policies.base.RatioBudget` with ``final_update``). The comparison readers know from
  kvpress and the KV-compression papers.
* ``threshold`` -- the paper's: the NAMM keeps every token it scores at or above zero, and each budgeted
  baseline replays the NAMM's kept counts per update, layer and head on the same unit
  (:class:`~namm_transfer.policies.base.ReplayBudget`).

The full cache (and the Decision Transformer's canonical window) belongs to no protocol: it runs once per
unit and every protocol's rows are compared with it. Results files record the protocols in their settings
and each record's ``protocol`` label.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_PROTOCOLS", "Protocol", "parse_protocols"]

DEFAULT_PROTOCOLS = "ratio:0.5,ratio:0.25,threshold"


@dataclass(frozen=True)
class Protocol:
    """One matched-budget protocol: ``kind`` is ``"ratio"`` (with ``ratio`` in (0, 1)) or ``"threshold"``."""

    kind: str
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "ratio":
            if self.ratio is None or not 0.0 < self.ratio < 1.0:
                raise ValueError(f"a ratio protocol needs a share in (0, 1), got {self.ratio!r}")
        elif self.kind == "threshold":
            if self.ratio is not None:
                raise ValueError("the threshold protocol takes no share")
        else:
            raise ValueError(f"unknown protocol {self.kind!r}: use ratio:R or threshold")

    @property
    def label(self) -> str:
        """``"ratio-50"``, ``"ratio-25"``, ``"threshold"``: the name used in records and tables."""
        if self.kind == "threshold":
            return "threshold"
        assert self.ratio is not None
        return f"ratio-{self.ratio * 100:g}"

    @property
    def spec(self) -> str:
        """The command-line form, ``"ratio:0.5"`` or ``"threshold"``."""
        return "threshold" if self.kind == "threshold" else f"ratio:{self.ratio:g}"

    def __str__(self) -> str:
        return self.spec


def parse_protocols(text: str) -> tuple[Protocol, ...]:
    """``"ratio:0.5,ratio:0.25,threshold"`` -> protocols, in the order given (duplicates refused).

    A share may be written ``0.5`` or ``50%``.
    """
    out: list[Protocol] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        if part == "threshold":
            proto = Protocol("threshold")
        elif part.startswith("ratio:"):
            value = part.split(":", 1)[1].strip()
            try:
                share = float(value[:-1]) / 100 if value.endswith("%") else float(value)
            except ValueError:
                raise ValueError(f"not a share in {part!r}: write ratio:0.5 or ratio:50%") from None
            proto = Protocol("ratio", share)
        else:
            raise ValueError(f"unknown protocol {part!r}: use ratio:R (R in (0, 1)) or threshold, comma-separated")
        if proto in out:
            raise ValueError(f"protocol {part!r} given twice")
        out.append(proto)
    if not out:
        raise ValueError("no protocol given: use e.g. ratio:0.5,ratio:0.25,threshold")
    return tuple(out)
