"""The typed run records: written exactly as the files have always been, read back with their
types checked, a damaged file refused with one line."""

import json

import pytest

from huscf.errors import HuscfError
from huscf.rundir import EvalRecord, RoundRecord, RunDir, read_eval, read_rounds

ROW = {"round": 1, "loss_d": 1.2, "loss_d_per_client": [1.1, 1.3], "loss_g": 0.7, "loss_g_per_client": [0.6, 0.8],
       "clusters": [0, 0], "num_clusters": 1, "ari_vs_domains": 0.0, "cluster_weights": [0.5, 0.5],
       "global_weights": [0.5, 0.5], "federation": {"phase": "warmup", "k": 1}, "label_accuracy": {"digits": 0.3},
       "iterations": 6, "method": "huscf", "latency_s_per_iteration": 0.1, "latency_s_round": 0.6,
       "bytes_round_per_client": [10.0, 20.0], "train_seconds": 3.2}


def _with_groups(row: dict) -> dict:
    """``row`` with ari_vs_groups where the trainer writes it: right after ari_vs_domains."""
    out = {}
    for k, v in row.items():
        out[k] = v
        if k == "ari_vs_domains":
            out["ari_vs_groups"] = 0.5
    return out


@pytest.mark.parametrize("raw", [
    ROW, _with_groups(ROW), ROW | {"failures": [], "skipped_iterations": {}, "iterations_per_client": [6, 6]},
    ROW | {"generation_score": {"digits": 2.0}},
], ids=["plain", "groups", "ray-events", "generation-score"])
def test_a_round_record_writes_the_keys_it_read_in_the_same_order(raw):
    assert list(RoundRecord.from_json(raw).to_json().items()) == list(raw.items())


def test_the_engines_events_are_kept_beside_the_declared_keys():
    record = RoundRecord.from_json(ROW | {"failures": [1]})
    assert record.events == {"failures": [1]} and record.ari_vs_groups is None and record.generation_score is None


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_read_rounds_drops_only_a_last_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps(ROW | {"round": r}) for r in (1, 2)]
    _write(path, [*rows, '{"round": 3, "loss'])
    assert [r.round for r in read_rounds(path)] == [1, 2]


@pytest.mark.parametrize("lines, match", [
    ([json.dumps(ROW), "garbage", json.dumps(ROW | {"round": 2})], r"line 2: not JSON"),
    ([json.dumps(ROW), json.dumps(ROW | {"round": 3})], r"line 2: round 3 where round 2 should be"),
    ([json.dumps(ROW | {"round": 9})], r"line 1: round 9 where round 1 should be"),
    ([json.dumps(ROW | {"round": True})], r"line 1: 'round' should be an int"),
    ([json.dumps({k: v for k, v in ROW.items() if k != "loss_g"})], r"line 1: missing key 'loss_g'"),
    ([json.dumps(ROW | {"clusters": ["a", "b"]})], r"line 1: 'clusters' should be a list of integers"),
    (["[1, 2]"], r"line 1: the entry is not a JSON object"),
])
def test_a_damaged_metrics_file_is_one_line_naming_the_line(tmp_path, lines, match):
    path = tmp_path / "metrics.jsonl"
    _write(path, lines)
    with pytest.raises(HuscfError, match=match):
        read_rounds(path)


def test_truncating_keeps_the_rounds_a_checkpoint_holds(tmp_path):
    run = RunDir(tmp_path)
    for r in (1, 2, 3):
        run.append_round(RoundRecord.from_json(ROW | {"round": r}))
    run.truncate_rounds(2)
    assert [r.round for r in run.read_rounds()] == [1, 2]
    assert not list(tmp_path.glob(".*.tmp"))


def _eval():
    final = {"round": 3, "cluster": 0, "client": 0, "domain": "digits", "generation_score": 2.0, "fid": 10.0,
             "tstr": {"accuracy": 0.8}, "real_ceiling": None}
    return {"run_dir": "r", "created": "t",
            "settings": {"samples": 10, "tstr_samples": 0, "tstr_epochs": 3, "seed": 0, "tstr_min_steps": 600,
                         "rounds": [3], "client": None, "every_client": True, "fid_reference": "heldout"},
            "classifiers": {}, "inception_fid": {"available": False, "reason": "offline"},
            "generators": [{"round": 3, "cluster": 0, "client": 0, "domain": "digits", "members": [0, 1]}],
            "per_round": [{k: final[k] for k in ("round", "cluster", "client", "domain", "generation_score", "fid")}],
            "final": [final], "samples": {"digits": "eval_samples/digits.png"}, "audio": {}}


def test_an_eval_record_round_trips_and_old_files_get_the_old_defaults(tmp_path):
    raw = _eval()
    assert EvalRecord.from_json(raw).to_json() == raw
    old = _eval()
    del old["settings"]["tstr_min_steps"], old["settings"]["every_client"], old["settings"]["fid_reference"]
    del old["audio"]
    settings = EvalRecord.from_json(old).settings  # written before these keys existed
    assert settings.tstr_min_steps == 600 and settings.every_client is False and settings.fid_reference == "test"


@pytest.mark.parametrize("mutate, match", [
    (lambda e: e["final"][0].pop("domain"), r"missing key 'final\[0\]\.domain'"),
    (lambda e: e["final"][0].update(tstr=[1]), r"'final\[0\]\.tstr' should be a dict or null"),
    (lambda e: e["settings"].update(samples="many"), r"'settings\.samples' should be an int"),
    (lambda e: e.update(per_round={}), r"'per_round' should be a list"),
])
def test_a_broken_eval_json_is_one_line(tmp_path, mutate, match):
    raw = _eval()
    mutate(raw)
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(HuscfError, match=rf"cannot read {path}: .*{match}"):
        read_eval(path)


def test_the_schema_is_the_dataclass_annotations():
    """Issue 27: a record's JSON types are read from its field annotations, not a second table: a
    new field is checked as soon as it is declared."""
    from dataclasses import dataclass

    from huscf.rundir.records import GeneratorScore, RecordError, json_types

    assert json_types(GeneratorScore) == {"round": ("int", False), "cluster": ("int", True), "client": ("int", True),
                                          "domain": ("str", False), "generation_score": ("number", True),
                                          "fid": ("number", True)}

    @dataclass(kw_only=True)
    class WithSteps(GeneratorScore):
        steps: list[int | None] | None = None

    assert json_types(WithSteps)["steps"] == ("list", True)
    ok = {"round": 1, "domain": "mnist", "steps": [1, None]}
    assert WithSteps.from_json(ok).steps == [1, None]
    with pytest.raises(RecordError, match="'steps' should be a list or null"):
        WithSteps.from_json(ok | {"steps": 3})
