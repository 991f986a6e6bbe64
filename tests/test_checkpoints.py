"""Checkpoints are data, not code, and a resume never loses finished work: crafted, damaged and
half-written checkpoints, interrupted slimming, stale temporary files."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import read_metrics

from huscf.cli import main
from huscf.config import build_config
from huscf.errors import HuscfError
from huscf.rundir import files as rundir_files
from huscf.rundir.files import DamagedCheckpoint, RunDir
from huscf.trainer import Trainer

TINY = ["data.clients_per_domain=1", "model.width=0.125", "train.local_epochs=1", "train.max_iters_per_epoch=1",
        "output.samples_every=0", "federation.warmup_rounds=1"]


def _run(tmp_path, rounds=2, keep_full=2):
    run = tmp_path / "run"
    cfg = build_config({}, [*TINY, f"train.rounds={rounds}", f"output.keep_full_checkpoints={keep_full}"])
    Trainer.new(cfg, run, quiet=True).fit()
    return run


def _state(r: int) -> dict:
    return {"round": r, "engine": {"model": {"w": torch.full((3,), float(r)), "v": torch.ones(2)},
                                   "client_opts": [], "server_opts": {}}}


class _Payload:
    """Unpickling this runs a shell command (what a hostile checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_is_refused_not_run_and_resume_continues(tmp_path):
    run = _run(tmp_path)
    marker = tmp_path / "pwned"
    with open(run / "checkpoints" / "round_0003.pt", "wb") as f:  # newer than any real one, no checksum
        pickle.dump({"round": 3, "engine": _Payload(marker)}, f)
    with pytest.raises(HuscfError, match="round_0003.pt: not signed .* pass --allow-unsigned"):
        RunDir(run).load_model_state(3)  # huscf evaluate's path
    with pytest.raises(HuscfError, match="not a checkpoint huscf can load as data"):  # allowed, still only data
        RunDir(run, allow_unsigned=True).load_model_state(3)
    t = Trainer.resume(run, quiet=True, allow_unsigned=True)
    assert not marker.exists()
    assert t.start_round == 3  # after round 2, the newest checkpoint that verifies
    aside = list((run / "set_aside").glob("*/round_0003.pt"))
    assert len(aside) == 1 and not (run / "checkpoints" / "round_0003.pt").exists()


def test_flipped_bytes_fail_the_checksum_and_the_round_is_trained_again_and_kept_aside(tmp_path):
    run = _run(tmp_path)
    before = read_metrics(run)
    newest = run / "checkpoints" / "round_0002.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # flipped, not truncated: torch would load it
    newest.write_bytes(bytes(data))
    with pytest.raises(HuscfError, match=r"SHA-256 does not match round_0002\.pt\.json"):
        RunDir(run).load_model_state(2)
    t = Trainer.resume(run, quiet=True)
    assert t.start_round == 2
    (aside,) = (run / "set_aside").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "round_0002.pt", "round_0002.pt.json"]
    assert [json.loads(line) for line in (aside / "metrics.jsonl").read_text().splitlines()] == before[1:]
    t.fit()
    assert [r["round"] for r in read_metrics(run)] == [1, 2]
    RunDir(run).load_model_state(2)  # the retrained round verifies


def test_resume_with_no_verifiable_full_checkpoint_stops_and_changes_nothing(tmp_path, capsys):
    run = _run(tmp_path, rounds=3, keep_full=2)  # round 1 slim, rounds 2 and 3 full
    for r in (2, 3):
        path = run / "checkpoints" / f"round_{r:04d}.pt"
        path.write_bytes(path.read_bytes()[:1000])  # truncated
    snapshot = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    metrics = (run / "metrics.jsonl").read_text()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3 finished round(s) but no full checkpoint that verifies" in err
    assert (run / "metrics.jsonl").read_text() == metrics
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == snapshot


def test_every_older_full_checkpoint_is_slimmed_and_stale_temporaries_removed(tmp_path):
    """A run killed while slimming left a full older checkpoint and a 0-byte temporary file."""
    rd = RunDir(tmp_path / "run")
    rd.create()
    for r in (1, 2):
        rd.save_checkpoint(r, _state(r), keep_full=0)
    rd.flush()
    stale = rd.checkpoints / ".round_0001.pt.tmp"
    stale.write_bytes(b"")
    rd.remove_stale_temporaries()
    assert not stale.exists()
    rd.save_checkpoint(3, _state(3), keep_full=1)
    rd.flush()
    assert [json.loads((rd.checkpoints / f"round_{r:04d}.pt.json").read_text())["slim"] for r in (1, 2, 3)] == [
        True, True, False]
    assert torch.equal(rd.load_model_state(1)["w"], torch.full((3,), 1.0))
    assert not list(rd.checkpoints.glob("*.tmp")) and not list(rd.checkpoints.glob(".*.tmp"))


def test_a_kill_while_a_checkpoint_is_rewritten_leaves_one_that_verifies(tmp_path, monkeypatch):
    rd = RunDir(tmp_path / "run")
    rd.create()
    rd.save_checkpoint(1, _state(1))
    rd.flush()
    path = rd.checkpoints / "round_0001.pt"
    real = rundir_files._write_atomic

    def killed_at_the_data_file(target, data):
        if target == path:
            raise KeyboardInterrupt  # the process dies after the checksum file listed both digests
        real(target, data)

    monkeypatch.setattr(rundir_files, "_write_atomic", killed_at_the_data_file)
    with pytest.raises(KeyboardInterrupt):
        rd._atomic_save({"round": 1, "slim": True, "tensors": [torch.zeros(1)], "index": {"w": 0}}, path, slim=True)
    monkeypatch.setattr(rundir_files, "_write_atomic", real)
    assert torch.equal(rd.load_model_state(1)["w"], torch.full((3,), 1.0))  # the old file still verifies
    assert len(json.loads((rd.checkpoints / "round_0001.pt.json").read_text())["sha256"]) == 2


@pytest.mark.parametrize("killed_at", ["data", "checksum"])
def test_a_kill_while_a_new_checkpoint_is_written_leaves_the_round_or_none_never_an_unsigned_one(
        tmp_path, monkeypatch, killed_at):
    """A new round's checkpoint: a kill before its data file is renamed leaves no checkpoint (the
    round before is resumed); a kill after it leaves one that verifies, signed (the order was once
    data first, which a SIGKILL right after the data file left unsigned, and resume refused)."""
    rd = RunDir(tmp_path / "run")
    rd.create()
    rd.save_checkpoint(1, _state(1))
    rd.flush()
    path = rd.checkpoint_path(2)
    real = rundir_files._write_atomic
    writes = []

    def killed(target, data):
        writes.append(target)
        if (killed_at == "data" and target == path) or (killed_at == "checksum" and target != path and path.exists()):
            raise KeyboardInterrupt
        real(target, data)

    monkeypatch.setattr(rundir_files, "_write_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        rd._atomic_save(_state(2), path, slim=False)
    monkeypatch.setattr(rundir_files, "_write_atomic", real)
    assert writes[0] == rd.checkpoints / "round_0002.pt.json"  # the signed digest goes first
    if killed_at == "data":
        assert not path.exists() and [r for r, _ in rd.list_checkpoints()] == [1]
    else:
        assert torch.equal(rd.load_model_state(2)["w"], torch.full((3,), 2.0))  # signed: verifies
    assert rd.latest_checkpoint()[0][0] == (1 if killed_at == "data" else 2)


def test_a_checksum_file_that_is_not_one_is_a_damaged_checkpoint(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create()
    rd.save_checkpoint(1, _state(1))
    rd.flush()
    (rd.checkpoints / "round_0001.pt.json").write_text("{")
    with pytest.raises(DamagedCheckpoint, match="not a huscf checksum file"):
        rd._load_verified(rd.checkpoints / "round_0001.pt")


def test_a_full_disk_is_one_line_leaves_no_temporary_file_and_resume_keeps_the_rows(tmp_path):
    """A file-size limit stands in for a full disk: the metrics line fits, the checkpoint does not."""
    run = tmp_path / "run"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))\n"
        "from huscf.cli import main\n"
        f"sys.exit(main(['train', '--quiet', '--out', {str(run)!r}, "
        + ", ".join(repr(x) for a in TINY + ["train.rounds=2"] for x in ("--set", a)) + "]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1 and "could not write a checkpoint" in err and "File too large" in err
    assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".tmp.png"))]
    rows = read_metrics(run)
    # checkpoints are written in the background: round 1's failure surfaces when round 2 saves,
    # after round 2's metrics line; neither round's checkpoint reached the disk
    assert [r["round"] for r in rows] == [1, 2] and not list((run / "checkpoints").glob("*.pt"))
    t = Trainer.resume(run, quiet=True)
    assert t.start_round == 1
    (aside,) = (run / "set_aside").iterdir()  # the row is kept, not deleted
    assert [json.loads(line) for line in (aside / "metrics.jsonl").read_text().splitlines()] == rows
    t.fit()
    assert [r["round"] for r in read_metrics(run)] == [1, 2]


def test_an_unsigned_checkpoint_loads_only_when_allowed_and_is_never_signed_on_load(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create()
    rd.save_checkpoint(1, _state(1))
    rd.flush()
    side = rd.checkpoints / "round_0001.pt.json"
    side.unlink()  # as a run written before checksums left it, or someone who removed the signature
    with pytest.raises(HuscfError, match="not signed"):
        rd.load_model_state(1)
    assert rd.latest_checkpoint() == (None, [f"{rd.checkpoints / 'round_0001.pt'}: not signed (a run from before "
                                             f"signed checkpoints, or its round_0001.pt.json was removed or replaced); "
                                             f"pass --allow-unsigned to load it anyway"])
    allowed = RunDir(rd.path, allow_unsigned=True)
    assert torch.equal(allowed.load_model_state(1)["w"], torch.full((3,), 1.0))
    (found, _), skipped = allowed.latest_checkpoint()
    assert found == 1 and skipped == [] and not side.exists()  # huscf signs only what it wrote


def test_a_checkpoint_changed_with_its_checksum_is_refused_and_so_is_another_key(tmp_path, monkeypatch):
    """The checksum file catches damage; the signature catches a change made by whoever can write
    the run directory but not read the key (issue 30, item 5)."""
    import hashlib

    rd = RunDir(tmp_path / "run")
    rd.create()
    rd.save_checkpoint(1, _state(1))
    rd.flush()
    path, side = rd.checkpoints / "round_0001.pt", rd.checkpoints / "round_0001.pt.json"
    good, good_side = path.read_bytes(), side.read_text()
    meta = json.loads(good_side)
    assert len(meta["hmac_sha256"]) == 1 and meta["key_id"] == rd.signing_key().key_id
    forged = {**_state(1), "engine": {**_state(1)["engine"], "model": {"w": torch.full((3,), 9.0), "v": torch.ones(2)}}}
    torch.save(forged, path)
    side.write_text(json.dumps({**meta, "sha256": [hashlib.sha256(path.read_bytes()).hexdigest()]}))
    for check in (lambda: rd.load_model_state(1), lambda: RunDir(rd.path, allow_unsigned=True).load_model_state(1)):
        with pytest.raises(HuscfError, match="its signature does not verify with the key .*: changed since huscf"):
            check()
    assert rd.latest_checkpoint()[0] is None
    # the signature binds the round: round 1's file and signature copied over round 2's are refused
    path.write_bytes(good)
    side.write_text(good_side)
    (rd.checkpoints / "round_0002.pt").write_bytes(good)
    (rd.checkpoints / "round_0002.pt.json").write_text(good_side)
    with pytest.raises(HuscfError, match="round_0002.pt: its signature does not verify"):
        rd.load_model_state(2)
    assert torch.equal(rd.load_model_state(1)["w"], torch.full((3,), 1.0))  # the untouched file still loads
    # another machine's key (or none) does not verify this machine's checkpoints
    monkeypatch.setenv("HUSCF_SIGNING_KEY", str(tmp_path / "keys" / "other.key"))
    with pytest.raises(HuscfError, match=f"signed with key {meta['key_id']}, but there is no signing key at "):
        RunDir(rd.path).load_model_state(1)
    other = RunDir(tmp_path / "other")
    other.create()
    other.save_checkpoint(1, _state(1))  # makes the other key
    other.flush()
    with pytest.raises(HuscfError, match=f"the file names {meta['key_id']}"):
        RunDir(rd.path).load_model_state(1)


def test_the_signing_key_is_private_outside_the_run_and_made_once(tmp_path, monkeypatch):
    from huscf.rundir.signing import SigningKey

    key_path = tmp_path / "cfg" / "huscf" / "signing.key"
    made = SigningKey.load(key_path, create=True)
    assert made is not None and made.made and oct(key_path.stat().st_mode & 0o777) == "0o600"
    again = SigningKey.load(key_path, create=True)
    assert again.key_id == made.key_id and not again.made  # made once, then read
    assert SigningKey.load(tmp_path / "absent.key") is None
    key_path.chmod(0o644)
    with pytest.raises(HuscfError, match="can be read or written by other users.*chmod 600"):
        SigningKey.load(key_path)
    key_path.chmod(0o600)
    key_path.write_text("not hex\n")
    with pytest.raises(HuscfError, match="not a hex-encoded key"):
        SigningKey.load(key_path)
    run = tmp_path / "run"
    monkeypatch.setenv("HUSCF_SIGNING_KEY", str(run / "signing.key"))
    with pytest.raises(HuscfError, match="is inside the run directory"):
        Trainer.new(build_config({}, [*TINY, "train.rounds=1"]), run, quiet=True)
    assert not run.exists()  # refused before anything was written


def test_cli_allow_unsigned_loads_an_unsigned_run_and_is_refused_without_resume(tmp_path, capsys):
    run = _run(tmp_path, rounds=1)
    (run / "checkpoints" / "round_0001.pt.json").unlink()
    assert main(["train", "--allow-unsigned", "--set", "train.rounds=1"]) == 2
    assert "use it with --resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--quiet", "--set", "train.rounds=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not signed" in err and "nothing was changed" in err
    assert main(["train", "--resume", str(run), "--quiet", "--set", "train.rounds=2", "--allow-unsigned"]) == 0
    assert [r["round"] for r in read_metrics(run)] == [1, 2]
    assert "hmac_sha256" in json.loads((run / "checkpoints" / "round_0002.pt.json").read_text())


def test_links_inside_a_run_directory_are_refused_by_resume_evaluate_and_audit(tmp_path):
    from huscf.metrics.evaluate import RunEvaluator
    from huscf.runtime.audit import summarise

    run = _run(tmp_path, rounds=1)
    secret = tmp_path / "elsewhere.yaml"
    secret.write_text((run / "config.yaml").read_text())
    (run / "config.yaml").unlink()
    (run / "config.yaml").symlink_to(secret)
    for opens in (lambda: Trainer.resume(run, quiet=True), lambda: RunEvaluator(run), lambda: summarise(run)):
        with pytest.raises(HuscfError, match="config.yaml is a symbolic link"):
            opens()
    (run / "config.yaml").unlink()
    (run / "config.yaml").write_text(secret.read_text())
    (run / "checkpoints" / "round_0009.pt").symlink_to(run / "checkpoints" / "round_0001.pt")  # deeper too
    with pytest.raises(HuscfError, match="round_0009.pt is a symbolic link"):
        Trainer.resume(run, quiet=True)
    (run / "checkpoints" / "round_0009.pt").unlink()
    assert Trainer.resume(run, quiet=True).start_round == 2  # without links it resumes


def test_resume_takes_the_ray_address_only_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = build_config({}, [*TINY, "train.rounds=1", "runtime.address=203.0.113.7:6379"])  # a received config
    Trainer.new(cfg, run, quiet=True).fit()
    t = Trainer.resume(run)
    assert t.cfg.runtime.address is None
    assert "names the Ray address '203.0.113.7:6379'" in capsys.readouterr().err
    assert Trainer.resume(run, ["runtime.address=auto"], quiet=True).cfg.runtime.address == "auto"


def test_a_checkpoint_that_verifies_but_holds_nans_or_another_model_is_one_line(tmp_path):
    """The checksum proves the file is the one written, not that it holds this run's model: keys,
    shapes and finite values are checked on load, by resume and by evaluate."""
    from huscf.metrics.evaluate import RunEvaluator

    run = _run(tmp_path, rounds=1)
    rd = RunDir(run)
    (_, good), _ = rd.latest_checkpoint()
    key = next(k for k, v in good["engine"]["model"].items() if v.is_floating_point() and v.numel() > 1)

    def rewrite(change):
        state = {**good, "engine": {**good["engine"], "model": change(dict(good["engine"]["model"]))}}
        rd.save_checkpoint(1, state)  # written and checksummed as huscf writes any checkpoint
        rd.flush()

    nan = good["engine"]["model"][key].clone()
    nan.view(-1)[0] = float("nan")
    cases = [(lambda m: m | {key: nan}, f"'{key}' holds values that are not finite"),
             (lambda m: m | {key: m[key].flatten()[:-1]}, f"'{key}' is ("),
             (lambda m: {k: v for k, v in m.items() if k != key}, f"1 tensors missing, 0 unexpected; '{key}' missing"),
             (lambda m: m | {"clients.99.nets.G.0.fc.weight": m[key]}, "0 tensors missing, 1 unexpected")]
    for change, message in cases:
        rewrite(change)
        with pytest.raises(HuscfError, match="round 1's checkpoint") as resumed:
            Trainer.resume(run, quiet=True)
        assert message in str(resumed.value) and "\n" not in str(resumed.value)
        with pytest.raises(HuscfError, match="round 1's checkpoint") as evaluated:
            RunEvaluator(run).load_round(1)
        assert message in str(evaluated.value)
    rewrite(lambda m: m)
    assert Trainer.resume(run, quiet=True).start_round == 2
