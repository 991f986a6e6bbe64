"""The command line: one-line errors with exit code 2 for bad input, and a real end-to-end run."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from huscf.cli import main
from huscf.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "data.clients_per_domain=1", "--set", "model.width=0.125", "--set", "train.rounds=1",
        "--set", "train.local_epochs=1", "--set", "train.max_iters_per_epoch=1", "--set", "output.samples_every=0"]


def _fails(capsys, argv, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("huscf: error: ")
    assert pattern in err, err
    return err


def test_config_typos_and_bad_values(capsys, tmp_path):
    _fails(capsys, ["train", "--set", "trian.rounds=1"], "unknown config key 'trian'")
    _fails(capsys, ["train", "--set", "train.roudns=1"], "unknown config key 'train.roudns'")
    _fails(capsys, ["train", "--set", "train.lr=-1"], "config key 'train.lr'")
    _fails(capsys, ["train", "--set", "federation.clusters=zero"], "config key 'federation.clusters'")
    _fails(capsys, ["train", "--set", "rounds"], "--set expects key=value")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  rounds: 2\n  epochs: 3\n")
    _fails(capsys, ["train", str(bad)], "unknown config key 'train.epochs'")
    _fails(capsys, ["train", str(tmp_path / "missing.yaml")], "config file not found")


def test_the_latency_weights_old_names_are_still_read(capsys, tmp_path):
    """Run directories written before the rename say devices.alpha / devices.gamma."""
    old = tmp_path / "old.yaml"
    old.write_text("devices:\n  alpha: 2.0\n  gamma: 0.25\nfederation:\n  alpha: 3.0\n")
    cfg = load_config(old)
    assert (cfg.devices.client_time_weight, cfg.devices.server_time_weight, cfg.federation.alpha) == (2.0, 0.25, 3.0)
    _fails(capsys, ["train", "--set", "devices.alpha=1", "--set", "devices.client_time_weight=1"],
           "give devices.client_time_weight or its old name devices.alpha, not both")
    _fails(capsys, ["train", "--set", "method=fedgann"], "config key 'method': got 'fedgann', must be one of huscf")


def test_more_bad_input_is_one_line(capsys, tmp_path):
    _fails(capsys, ["train", "--set", "train.rounds=true"], "config key 'train.rounds': true or false is not")
    _fails(capsys, ["train", "--set", "seed=false"], "config key 'seed': true or false is not")
    _fails(capsys, ["train", "--set", "train.lr=.inf"], "config key 'train.lr': Input should be a finite number")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    _fails(capsys, ["train", str(latin1)], "not a UTF-8 text file")
    profiles = tmp_path / "profiles.yaml"
    profiles.write_bytes(b"server: \xff\xfe\n")
    _fails(capsys, ["train", "--set", f"devices.profiles={profiles}"], "not a UTF-8 text file")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _fails(capsys, ["train", *TINY, "--out", str(blocker / "run")], "cannot write the run directory")
    for width in ("nan", "-1", "0", "inf"):
        _fails(capsys, ["cuts", "--clients", "4", f"--width={width}"], "--width must be a finite positive number")
    _fails(capsys, ["cuts", "--clients", "0"], "--clients must be a finite positive number")


def test_a_run_name_is_one_plain_file_name(capsys, tmp_path):
    """``runs/NAME-DATE``: a received config must not write outside the runs folder."""
    for name in ("../../x", "a/b", ".hidden", "..", "a\\b", "x" * 101):
        _fails(capsys, ["train", "--set", f"name={name}"], "config key 'name': must be a plain file name")
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: ../../outside\n")
    _fails(capsys, ["train", str(evil)], "config key 'name'")
    assert load_config(None, ["name=caf\u00e9_run-1.b"]).name == "caf\u00e9_run-1.b"


def test_cuts_that_leave_the_server_nothing(capsys, tmp_path):
    _fails(capsys, ["train", "--out", str(tmp_path / "r"), *TINY, "--set", "cuts.method=fixed",
                    "--set", "cuts.fixed=[1,2,0,0]"], "client 0: generator cuts head=1 + tail=2 leave the server no block")
    assert not (tmp_path / "r").exists()  # nothing written for a run that could not start


def test_missing_and_broken_data(capsys, tmp_path):
    _fails(capsys, ["train", "--out", str(tmp_path / "a"), "--data-dir", str(tmp_path / "nowhere"), *TINY,
                    "--set", "data.domains=[mnist]"], "data for 'mnist' not found")
    broken = tmp_path / "data" / "mnist"
    broken.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(broken / name, "wb") as f:
            f.write(b"this is not an IDX file")
    err = _fails(capsys, ["train", "--out", str(tmp_path / "b"), "--data-dir", str(tmp_path / "data"), *TINY,
                          "--set", "data.domains=[mnist]"], "idx")
    assert "mnist" in err


def test_output_dir_and_resume_errors(capsys, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    _fails(capsys, ["train", "--out", str(tmp_path / "busy"), *TINY], "is not empty")
    _fails(capsys, ["train", "--resume", str(tmp_path / "busy")], "not a huscf run directory")
    _fails(capsys, ["train", "default", "--resume", str(tmp_path / "busy")], "not both")


def test_shipped_configs_validate_and_default_yaml_is_the_schema_default():
    names = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert len([n for n in names if n[0].isdigit()]) == 7
    for name in names:
        load_config(REPO / "configs" / f"{name}.yaml")
    assert load_config(REPO / "configs" / "default.yaml") == RunConfig()
    paper = load_config(REPO / "configs" / "7_multi_domain_noniid.yaml")
    assert (paper.data.clients_per_domain, paper.train.batch_size, paper.train.local_epochs, paper.train.rounds,
            paper.train.lr, paper.train.betas, paper.model.width) == (20, 64, 5, 50, 2e-4, (0.5, 0.999), 1.0)
    assert paper.data.domains == ["mnist", "fashion_mnist", "kmnist", "notmnist"]


def test_console_script_runs_and_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "huscf.cli", "train", "--out", str(out), *TINY, "--set", "train.rounds=2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "round   1:" in done.stderr and "round   2:" in done.stderr  # per-round summaries
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    again = subprocess.run([sys.executable, "-m", "huscf.cli", "train", "--resume", str(out), "--set", "train.rounds=3"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert "Traceback" not in done.stderr + again.stderr


@pytest.mark.parametrize("argv", [["data", "list"]])
def test_data_list(capsys, argv):
    assert main(argv) == 0
    assert "digits_inverted" in capsys.readouterr().out.split()


def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path):
    import signal
    import time

    import torch

    args = [*TINY, "--set", "train.rounds=3", "--set", "train.max_iters_per_epoch=4", "--set", "data.clients_per_domain=2"]
    base = [sys.executable, "-m", "huscf.cli", "train", "--quiet"]
    subprocess.run([*base, "--out", str(tmp_path / "full"), *args], check=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*base, "--out", str(killed), *args])
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoints" / "round_0001.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "round_0001.pt").exists()
    subprocess.run([*base, "--resume", str(killed)], check=True, timeout=300)
    a = torch.load(tmp_path / "full" / "checkpoints" / "round_0003.pt", weights_only=False)["engine"]["model"]
    b = torch.load(killed / "checkpoints" / "round_0003.pt", weights_only=False)["engine"]["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line)["round"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]


def test_shipped_config_names_resolve_inside_the_installed_package(tmp_path):
    import zipfile

    import huscf
    from huscf.cli import _config_path

    resolved = _config_path("3_two_domain_iid")
    assert resolved.is_file() and resolved.parent == Path(huscf.__file__).resolve().parent / "configs"
    # the wheel carries them, so a non-editable install finds them too
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("huscf-*.whl"))).namelist()
    assert {f"huscf/configs/{n}.yaml" for n in ("default", "3_two_domain_iid", "7_multi_domain_noniid")} <= set(names)
