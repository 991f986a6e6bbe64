"""What a run writes and reads back, as typed records.

* ``RoundRecord``: one line of ``metrics.jsonl`` (one finished round);
* ``EvalRecord``: ``eval.json`` (``huscf evaluate``), with a ``GeneratorRef`` per evaluated
  generator, a ``GeneratorScore`` per generator and round, a ``FinalScore`` (with TSTR) per
  generator at the last evaluated round, and the ``EvalSettings`` that produced it.

Each record writes itself (``to_json``: the same keys, in the same order, as the files have
always had) and reads itself back (``from_json``) with its types checked: a file that is not
what huscf wrote is refused with one line naming the file and the entry (``HuscfError``).
``read_rounds`` and ``read_eval`` are the one reader that evaluate, report and compare use.
"""

from __future__ import annotations

import functools
import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, get_args, get_origin, get_type_hints

from huscf.errors import HuscfError


class RecordError(ValueError):
    """A JSON entry that does not have a record's shape (the reader adds the file and the entry)."""


_KINDS = {int: "int", float: "number", str: "str", bool: "bool", list: "list", dict: "dict"}  # annotation -> kind
_PYTHON = {"int": int, "number": (int, float), "str": str, "bool": bool, "list": list, "dict": dict}  # kind -> types


def _check(value, kind: str, key: str, optional: bool = False):
    """``value`` if it is of ``kind`` (int, number, str, list, dict, bool), else RecordError."""
    if value is None and optional:
        return None
    if not isinstance(value, _PYTHON[kind]) or (isinstance(value, bool) and kind in ("int", "number")):
        raise RecordError(f"'{key}' should be {'an' if kind == 'int' else 'a'} {kind}"
                          f"{' or null' if optional else ''}, got {value!r:.60}")
    return value


@functools.cache  # resolving the annotations takes half a millisecond, and every entry of a file is checked
def json_types(cls, skip: tuple[str, ...] = ()) -> dict[str, tuple[str, bool]]:
    """{field: (JSON kind, may be null)} read from a record's annotations, the one schema: ``int``,
    ``float`` (a number), ``str``, ``bool``, ``list[...]``, ``dict[...]``, a nested record (an
    object); ``| None``: null allowed. ``skip``: fields that are not keys of their own."""
    hints = get_type_hints(cls)  # annotations written as strings (postponed evaluation) resolved to types
    out = {}
    for f in fields(cls):
        if f.name not in skip:
            t = hints[f.name]
            members = get_args(t) if isinstance(t, UnionType) else (t,)
            base = next(m for m in members if m is not NoneType)
            out[f.name] = (_KINDS.get(get_origin(base) or base, "dict"), NoneType in members)
    return out


def _fields_from(cls, raw: Any, where: str = "", skip: tuple[str, ...] = ()) -> dict:
    """The declared keys of ``raw`` checked against the record's field types (``json_types``); a
    missing key is an error unless the field has a default."""
    if not isinstance(raw, dict):
        raise RecordError(f"{where or 'the entry'} is not a JSON object")
    out = {}
    defaults = {f.name for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING}
    for key, (kind, optional) in json_types(cls, skip).items():
        if key in raw:
            out[key] = _check(raw[key], kind, f"{where}{key}", optional)
        elif key not in defaults:
            raise RecordError(f"missing key '{where}{key}'")
    return out


# -- metrics.jsonl -----------------------------------------------------------------------------------
@dataclass(kw_only=True)
class RoundRecord:
    """One finished round, as the trainer writes it to ``metrics.jsonl`` (docs/evaluation.md)."""

    round: int
    loss_d: float | None
    loss_d_per_client: list[float | None] = field(default_factory=list)
    loss_g: float | None
    loss_g_per_client: list[float | None] = field(default_factory=list)
    clusters: list[int] = field(default_factory=list)  # cluster per client, -1: absent this round
    num_clusters: int | None = None
    ari_vs_domains: float | None = None
    ari_vs_groups: float | None = None  # by_group scenarios only (omitted otherwise)
    cluster_weights: list[float] = field(default_factory=list)
    global_weights: list[float] = field(default_factory=list)
    federation: dict = field(default_factory=dict)  # what the strategy decided and scored
    label_accuracy: dict[str, float] = field(default_factory=dict)  # the label probe, per domain
    iterations: int | None = None
    method: str | None = None
    latency_s_per_iteration: float | None = None  # simulated; None when the networks are not split
    latency_s_round: float | None = None
    bytes_round_per_client: list[float] | None = None
    train_seconds: float | None = None
    threads: list[int] | None = None  # torch threads of each epoch (train.threads: auto follows the load)
    # privacy.seam_noise: the epsilon (at privacy.delta) of what crossed, rounds 1..this (split/noise.py)
    seam_epsilon: float | None = None
    # the engine's events of the round (Ray: failures, skipped_iterations, iterations_per_client,
    # dropped_clients), written as top-level keys
    events: dict = field(default_factory=dict)
    generation_score: dict[str, float] | None = None  # every output.eval_every rounds (omitted otherwise)

    _OMIT_WHEN_NONE = ("ari_vs_groups", "generation_score", "threads", "seam_epsilon")

    def to_json(self) -> dict:
        out: dict = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "events":
                out.update(value)
            elif not (f.name in self._OMIT_WHEN_NONE and value is None):
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, raw: Any) -> "RoundRecord":
        known = _fields_from(cls, raw, skip=("events",))
        if known["round"] < 1:
            raise RecordError(f"'round' should be >= 1, got {known['round']}")
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in known.get("clusters", [])):
            raise RecordError("'clusters' should be a list of integers")
        return cls(**known, events={k: v for k, v in raw.items() if k not in known})


def json_lines(path: Path, damaged: str) -> list[tuple[int, object]]:
    """(line number, value) of every non-blank line of an append-only JSONL file. A last line cut
    short (a process killed while writing it) is dropped; any other line that is not JSON is an
    error naming the line and ``damaged`` (what the file is and what to do)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((no for no, line in enumerate(lines, 1) if line.strip()), default=0)
    out = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((no, json.loads(line)))
        except json.JSONDecodeError:
            if no == last:  # the line a kill cut short
                break
            raise HuscfError(f"{path} line {no}: not JSON ({damaged})") from None
    return out


def read_rounds(path: Path) -> list[RoundRecord]:
    """The rounds of a ``metrics.jsonl``: one record per line, rounds 1, 2, 3, ... in order. A
    last line cut short (a run killed while writing it) is dropped; any other line that is not a
    round, or a round out of sequence, is an error naming the line."""
    if not path.exists():
        return []
    rows: list[RoundRecord] = []
    for no, raw in json_lines(path, "a damaged metrics file: repair or delete that line; nothing else reads "
                                    "or rewrites it until then"):
        try:
            row = RoundRecord.from_json(raw)
        except RecordError as err:
            raise HuscfError(f"{path} line {no}: {err}") from None
        if row.round != len(rows) + 1:
            raise HuscfError(f"{path} line {no}: round {row.round} where round {len(rows) + 1} should be "
                             f"(a damaged or hand-edited metrics file)")
        rows.append(row)
    return rows


def write_rounds(path: Path, rows: list[RoundRecord]) -> None:
    """Replace ``path`` with these rounds (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r.to_json()) + "\n" for r in rows))
    tmp.replace(path)


# -- eval.json ---------------------------------------------------------------------------------------
class _FlatRecord:
    """A record whose JSON object is its fields, in order (their types: ``json_types``)."""

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, raw: Any, where: str = ""):
        return cls(**_fields_from(cls, raw, where))


@dataclass(kw_only=True)
class EvalSettings(_FlatRecord):
    """How ``huscf evaluate`` scored a run (defaults: what files written before a key existed meant)."""

    samples: int
    tstr_samples: int
    tstr_epochs: int = 3
    seed: int = 0
    tstr_min_steps: int = 600
    rounds: list[int] = field(default_factory=list)  # the rounds scored (``evaluate_run`` fills it in)
    client: int | None = None
    every_client: bool = False
    # what the FID compares with: "test" the domain's test split; "heldout" training images the run
    # did not use (those beyond data.limit_per_domain), so that a choice made on FID never sees the test split
    fid_reference: str = "test"


@dataclass(kw_only=True)
class GeneratorRef(_FlatRecord):
    """Which generator is evaluated: ``client``'s, at ``round``, in ``cluster`` with ``members``."""

    round: int
    cluster: int | None = None
    client: int | None = None
    domain: str
    members: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class GeneratorScore(_FlatRecord):
    """One generator at one round: the generation score and the classifier FID."""

    round: int
    cluster: int | None = None
    client: int | None = None
    domain: str
    generation_score: float | None = None
    fid: float | None = None


@dataclass(kw_only=True)
class FinalScore(GeneratorScore):
    """A generator at the last evaluated round, with TSTR and the real-data ceiling (dicts of
    accuracy, precision, recall, f1, fpr, per-class accuracy, confusion; None when skipped)."""

    tstr: dict | None = None
    real_ceiling: dict | None = None


@dataclass(kw_only=True)
class EvalRecord:
    """``eval.json``: what ``huscf evaluate`` measured (docs/evaluation.md)."""

    run_dir: str = ""
    created: str = ""
    settings: EvalSettings
    classifiers: dict = field(default_factory=dict)
    inception_fid: dict = field(default_factory=dict)
    generators: list[GeneratorRef] = field(default_factory=list)
    per_round: list[GeneratorScore] = field(default_factory=list)
    final: list[FinalScore] = field(default_factory=list)
    samples: dict[str, str] = field(default_factory=dict)  # domain -> sample grid, relative to the run
    audio: dict[str, list[str]] = field(default_factory=dict)  # spectrogram domains: WAV files per class

    def to_json(self) -> dict:
        return {"run_dir": self.run_dir, "created": self.created, "settings": self.settings.to_json(),
                "classifiers": self.classifiers, "inception_fid": self.inception_fid,
                "generators": [g.to_json() for g in self.generators],
                "per_round": [p.to_json() for p in self.per_round], "final": [f.to_json() for f in self.final],
                "samples": self.samples, "audio": self.audio}

    @classmethod
    def from_json(cls, raw: Any) -> "EvalRecord":
        top = _fields_from(cls, raw)

        def items(key, kind):
            return [kind.from_json(x, f"{key}[{i}].") for i, x in enumerate(top.get(key, []))]

        return cls(**(top | {"settings": EvalSettings.from_json(top["settings"], "settings."),
                             "generators": items("generators", GeneratorRef),
                             "per_round": items("per_round", GeneratorScore),
                             "final": items("final", FinalScore)}))


def read_eval(path: Path) -> EvalRecord:
    """``eval.json`` as an ``EvalRecord``; one line naming the file and the entry when it is not one."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HuscfError(f"cannot read {path}: {msg}") from None
    try:
        return EvalRecord.from_json(raw)
    except RecordError as err:
        raise HuscfError(f"cannot read {path}: {err} (not written by `huscf evaluate`?)") from None

