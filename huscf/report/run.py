"""The run a report is about: ``load_run`` reads config.yaml, metrics.jsonl, clients.json and
eval.json into a ``Run``; and the number formatting and per-round series the sections share."""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from huscf.errors import HuscfError
from huscf.report.render import one_line
from huscf.rundir import EvalRecord, GeneratorScore, RoundRecord, RunDir, read_eval

DASH = "–"


@dataclass
class Run:
    path: Path
    config_text: str
    config: dict
    metrics: list[RoundRecord]
    clients: dict | None
    eval: EvalRecord | None

    @property
    def client_domains(self) -> list[str]:
        """Each client's domain, from clients.json ([] without one)."""
        clients = get(self.clients, "clients")
        return [str(c.get("domain", "?")) for c in clients] if isinstance(clients, list) else []

    @property
    def domains(self) -> list[str]:
        sources = [self.client_domains, get(self.config, "data", "domains") or []]
        sources += [list(r.label_accuracy) for r in self.metrics[:1]]
        sources += [[e.domain for e in (self.eval.final if self.eval else [])]]
        return list(dict.fromkeys(str(d) for src in sources for d in src))  # in order of first appearance

    @property
    def rounds(self) -> list[int]:
        return [r.round for r in self.metrics]

    def evaluate_hint(self) -> str:
        return f"huscf evaluate {shlex.quote(str(self.path))}"


def or_dash(v, dash=DASH):
    return dash if v is None else v


def get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def load_run(run_dir: Path) -> Run:
    """Read everything the report needs; HuscfError naming the file when something required is missing or broken."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HuscfError(f"cannot report on {run_dir}: no such directory")
    missing = [n for n in ("config.yaml", "metrics.jsonl") if not (run_dir / n).is_file()]
    if missing:
        raise HuscfError(f"cannot report on {run_dir}: no {' and no '.join(missing)} there "
                         "(not a huscf run directory, or training has not started)")
    config_text = (run_dir / "config.yaml").read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError as exc:
        raise HuscfError(f"cannot read {run_dir / 'config.yaml'}: {one_line(exc)}") from None
    if not isinstance(config, dict):
        raise HuscfError(f"cannot read {run_dir / 'config.yaml'}: not a mapping of config keys")
    metrics = RunDir(run_dir).read_rounds()
    if not metrics:
        raise HuscfError(f"cannot report on {run_dir}: metrics.jsonl has no finished round")
    clients = None
    if (run_dir / "clients.json").is_file():
        try:
            clients = json.loads((run_dir / "clients.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise HuscfError(f"cannot read {run_dir / 'clients.json'}: {one_line(exc)}") from None
    ev = read_eval(run_dir / "eval.json") if (run_dir / "eval.json").is_file() else None
    return Run(run_dir, config_text, config, metrics, clients if isinstance(clients, dict) else None, ev)


# -- formatting --------------------------------------------------------------------------------------
def finite(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def num(v, digits: int = 3) -> str:
    f = finite(v)
    return DASH if f is None else f"{f:.{digits}f}"


def megabytes(b) -> str:
    f = finite(b)
    return DASH if f is None else f"{f / 1e6:,.2f} MB"


def seconds(s) -> str:
    f = finite(s)
    if f is None:
        return DASH
    if f >= 3600:
        return f"{f / 3600:.2f} h"
    return f"{f / 60:.1f} min" if f >= 120 else f"{f:.2f} s"


def series(rows: list[RoundRecord], key: str, domain: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of the round records' ``key`` (a dict by domain) where present and finite."""
    points = [(r.round, v) for r in rows if (v := finite(get(getattr(r, key), domain))) is not None]
    return [x for x, _ in points], [y for _, y in points]


def eval_series(entries: list[GeneratorScore], key: str,
                domain: str) -> tuple[list[int], list[float], list[tuple[int, float]]]:
    """Per round, the mean of ``key`` over the domain's evaluated generators, and every single point."""
    by_round: dict[int, list[float]] = {}
    for e in entries:
        v = finite(getattr(e, key))
        if e.domain == domain and v is not None:
            by_round.setdefault(e.round, []).append(v)
    rounds = sorted(by_round)
    points = [(r, v) for r in rounds for v in by_round[r]]
    return rounds, [sum(by_round[r]) / len(by_round[r]) for r in rounds], points
