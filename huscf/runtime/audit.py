"""``huscf audit RUN_DIR``: what crossed between processes in a Ray run, from ``audit.jsonl``.

Per client: tensor bytes per finished iteration of the cut-layer traffic (activations and
gradients, both directions; message headers counted apart), next to the latency model's prediction for its cuts
(``clients.json``), and the round-end traffic (aggregation weights, checkpoint state). Overall:
bytes by kind and direction, and the privacy verdict: every kind a client sent must be one of
``messages.CLIENT_KINDS`` and no array it sent may be integer-typed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from huscf.errors import HuscfError
from huscf.rundir import RunDir
from huscf.rundir.records import json_lines
from huscf.runtime.messages import CLIENT_KINDS, FLOAT_DTYPES

_FLOATS = {*FLOAT_DTYPES, "json", ""}  # json: message headers; "": a message without arrays
_KEYS = ("src", "dst", "kind", "name", "dtype", "bytes")


def read_audit(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "audit.jsonl"
    if not path.is_file():
        raise HuscfError(f"{run_dir}: no audit.jsonl (only runs with --engine ray write one)")
    rows = []
    for no, row in json_lines(path, "a damaged audit log"):
        if missing := [k for k in _KEYS if not isinstance(row, dict) or k not in row]:
            raise HuscfError(f"{path} line {no}: not an audit record (missing '{missing[0]}')")
        rows.append(row)
    return rows


def _client_of(end: str) -> int | None:
    return int(end.split(":", 1)[1]) if end.startswith("client:") else None


def summarise(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    run.check_no_links()
    rows = read_audit(run_dir)
    clients_json = {}
    if (run_dir / "clients.json").is_file():
        try:
            clients_json = json.loads((run_dir / "clients.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise HuscfError(f"cannot read {run_dir / 'clients.json'}: damaged or not written by huscf train") from None
    predicted = (clients_json.get("latency_per_iteration") or {}).get("bytes_per_client") or []
    iterations: dict[int, int] = defaultdict(int)
    for row in run.read_rounds():
        for i, n in enumerate(row.events.get("iterations_per_client") or []):
            iterations[i] += n
    per_client: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    by_kind: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    sent_by_clients: set[str] = set()
    violations = []
    for r in rows:
        src, dst = _client_of(r["src"]), _client_of(r["dst"])
        direction = "from client" if src is not None else ("to client" if dst is not None else "other")
        by_kind[r["kind"]][direction] += r["bytes"]
        c = src if src is not None else dst
        if c is not None:  # the tensors by kind; the small JSON headers apart
            per_client[c]["meta" if r["name"] == "meta" else r["kind"]] += r["bytes"]
        if src is not None or r["src"].startswith("host:"):  # a client, or the actor hosting clients
            sent_by_clients.add(r["kind"])
            masked_words = r["kind"] == "masked" and r["dtype"] == "uint64"  # secure aggregation's sums
            if r["kind"] not in CLIENT_KINDS or (r["dtype"] not in _FLOATS and not masked_words):
                violations.append(r)
    clients = []
    for c in sorted(per_client):
        cut = per_client[c]["activation"] + per_client[c]["gradient"]  # before bytes_by_kind: both keys listed
        n = iterations.get(c, 0)
        per = cut / n if n else None
        p = predicted[c] if c < len(predicted) else None
        clients.append({"client": c, "iterations": n, "bytes_by_kind": dict(per_client[c]),
                        "cut_bytes_per_iteration": per, "predicted_bytes_per_iteration": p,
                        "measured_over_predicted": per / p if p and per is not None else None})
    return {"run_dir": str(run_dir), "records": len(rows), "clients": clients,
            "bytes_by_kind": {k: dict(v) for k, v in by_kind.items()},
            "kinds_sent_by_clients": sorted(sent_by_clients), "violations": violations}


def _mb(b: float) -> str:
    return f"{b / 1e6:.3f} MB" if b >= 1e5 else f"{b / 1e3:.1f} kB"


def format_summary(s: dict) -> str:
    lines = [f"audit of {s['run_dir']}: {s['records']} records",
             f"{'client':>6} {'iters':>6} {'cut bytes/iter':>15} {'predicted':>12} {'ratio':>6}  round-end traffic"]
    for c in s["clients"]:
        k, per, ratio = c["bytes_by_kind"], c["cut_bytes_per_iteration"], c["measured_over_predicted"]
        pred = c["predicted_bytes_per_iteration"]
        lines.append(f"{c['client']:>6} {c['iterations']:>6} {_mb(per) if per is not None else '-':>15} "
                     f"{_mb(pred) if pred else '-':>12} {f'{ratio:.3f}' if ratio is not None else '-':>6}  "
                     f"weights {_mb(k.get('weights', 0))}, state {_mb(k.get('state', 0))}")
    lines.append("bytes by kind:")
    for kind, dirs in sorted(s["bytes_by_kind"].items()):
        lines.append(f"  {kind:<10} " + ", ".join(f"{d} {_mb(b)}" for d, b in sorted(dirs.items())))
    verdict = "OK" if not s["violations"] else f"{len(s['violations'])} VIOLATION(S)"
    lines.append(f"message policy: clients sent only {', '.join(s['kinds_sent_by_clients'])}, each with the "
                 f"shapes, dtypes and finite values its cuts allow: {verdict}")
    lines.append("  (a policy on form, not a privacy verdict: cut-layer activations reveal labels and, at "
                 "shallow cuts, images; docs/security.md)")
    if "given" in s["bytes_by_kind"]:  # samples and labels the method handed clients (Engine.give)
        lines.append(f"clients were given samples with their labels ({_mb(sum(s['bytes_by_kind']['given'].values()))}, "
                     f"kind 'given'): the method shares data, see its 'shares'")
    return "\n".join(lines)
