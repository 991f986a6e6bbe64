"""The Ray runtime: same numerics as the simulation, the privacy audit, faults, stragglers, resume.

Ray runs on loopback only, with usage stats off and its temp folder inside this module's tmp
path; the fixture shuts it down and checks that none of its processes outlive the tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_metrics

from huscf.cli import main
from huscf.config import build_config
from huscf.rundir.files import RunDir
from huscf.runtime.audit import summarise
from huscf.runtime.driver import plan_hosts
from huscf.trainer import Trainer
from numerics import RECORD_ROUNDING, assert_close64, assert_within_rounding

# one worker runs every Ray test: local Ray clusters of several workers at once would compete for
# the same cores and memory
pytestmark = pytest.mark.xdist_group("ray")

# read by Ray when it is imported: keep every Ray process on 127.0.0.1, report nothing
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")

SMALL = ["data.clients_per_domain=2", "train.rounds=2", "train.local_epochs=1", "train.max_iters_per_epoch=3",
         "train.batch_size=16", "model.width=0.125", "cuts.method=random", "compute.channels_last=false",
         "federation.warmup_rounds=1", "output.samples_every=0", "train.threads=1"]


def _descendants(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of every process below ``pid``."""
    from huscf.runtime.reaper import descendants

    return {p for p in descendants([pid]) if p[0] != pid}


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, resources={"edge": 4, "hub": 1}, _node_ip_address="127.0.0.1", _temp_dir=str(tmp),
             include_dashboard=False, logging_level="error", log_to_driver=False)
    assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
    yield tmp
    # Ray's processes (its agents retitle themselves, so pgrep -f alone misses them), not the
    # reaper watchers that other modules' owned Ray runs left waiting for this process to end
    started = {(pid, start) for pid, start in _descendants(os.getpid()) if b"huscf.runtime.reaper" not in
               (open(f"/proc/{pid}/cmdline", "rb").read() if os.path.exists(f"/proc/{pid}/cmdline") else b"")}
    ray.shutdown()
    from huscf.runtime.reaper import still_running

    deadline = time.time() + 20
    while time.time() < deadline:  # every process Ray started is gone once it has shut down
        left = still_running(started)
        left += subprocess.run(["pgrep", "-f", str(tmp)], check=False, capture_output=True, text=True).stdout.split()
        if not left:
            break
        time.sleep(0.5)
    names = {pid: (open(f"/proc/{pid}/cmdline", "rb").read()[:80], open(f"/proc/{pid}/stat").read()[:120])
             for pid in left if isinstance(pid, int) and os.path.exists(f"/proc/{pid}/cmdline")}
    assert not left, f"Ray processes still running: {left} {names}"


FP64 = ["compute.precision=fp64"]  # tests/numerics.py rule 1: Ray and one process sum in other orders


def _outputs(model, cuts_clients) -> dict[str, torch.Tensor]:
    """Every client's assembled G and D on fixed inputs (what the weights compute), in the model's dtype."""
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(16, 100, generator=g), torch.randint(0, 10, (16,), generator=g)
    z = z.to(next(model.parameters()).dtype)
    out = {}
    with torch.no_grad():
        for i in cuts_clients:
            img = model.generate(i, z, y)
            out[f"G{i}"] = img
            out[f"D{i}"] = model.discriminate(i, img, y)
    return out


def _assert_rows_close64(sim_rows, ray_rows):
    """Per-client losses of float64 runs, as metrics.jsonl keeps them (rules 1 and 6)."""
    assert len(ray_rows) == len(sim_rows)
    for a, b in zip(sim_rows, ray_rows):
        for key in ("loss_d_per_client", "loss_g_per_client"):
            assert_close64(b[key], a[key], extra=RECORD_ROUNDING, msg=f"round {a['round']} {key}")


def _assert_outputs_close64(model, ref):
    o, o_ref = _outputs(model, range(len(model.clients))), _outputs(ref, range(len(ref.clients)))
    for k in o_ref:
        assert_close64(o[k], o_ref[k], msg=k)


def test_ray_engine_matches_simulation_and_audit_is_clean(local_ray, tmp_path, capsys):
    """In fp32, as the audit counts fp32 bytes: Ray may differ from the simulation by what the
    simulation's own fp32 rounding is (its gap to a float64 run; tests/numerics.py rule 2)."""
    sim_dir, ray_dir, sim64_dir = tmp_path / "sim", tmp_path / "ray", tmp_path / "sim64"
    Trainer.new(build_config({}, SMALL), sim_dir, quiet=True).fit()
    Trainer.new(build_config({}, SMALL + FP64), sim64_dir, quiet=True).fit()
    args = ["train", "--engine", "ray", "--out", str(ray_dir), "--quiet"]
    # actors pinned by custom resources (the fixture's node offers edge: 4, hub: 1)
    for s in SMALL + ["runtime.clients_per_actor=2", "runtime.client_resources={edge: 1}",
                      "runtime.server_resources={hub: 1}"]:
        args += ["--set", s]
    assert main(args) == 0

    sim, ray_rows, sim64 = read_metrics(sim_dir), read_metrics(ray_dir), read_metrics(sim64_dir)
    assert len(ray_rows) == 2
    for a, b, c in zip(sim, ray_rows, sim64):
        for key in ("loss_d_per_client", "loss_g_per_client"):
            assert_within_rounding(b[key], a[key], c[key], extra=RECORD_ROUNDING, msg=f"round {a['round']} {key}")
        assert b["clusters"] == a["clusters"] == c["clusters"] and b["failures"] == []
    # the weights compute the same functions (raw weights differ where Adam's first step takes
    # the sign of a float-noise gradient, e.g. conv biases before BatchNorm, which change nothing)
    t_sim = Trainer.resume(sim_dir, quiet=True)
    t_ray = Trainer.resume(ray_dir, ["runtime.engine=simulation"], quiet=True)
    t_sim64 = Trainer.resume(sim64_dir, quiet=True)
    o_sim, o_ray, o_sim64 = (_outputs(t.model, range(4)) for t in (t_sim, t_ray, t_sim64))
    for k in o_sim:
        assert_within_rounding(o_ray[k], o_sim[k], o_sim64[k], msg=k)

    # privacy: what crossed from a client is activations/gradients of cut layers, its own
    # segment's weights and state, scalar metrics; never an image, a label or a D output
    rows = [json.loads(line) for line in (ray_dir / "audit.jsonl").read_text().splitlines()]
    assert rows
    image = [1, 28, 28]
    # a client actor's own messages (losses of the clients it hosts) come from "host:K"
    from_clients = [r for r in rows if r["src"].startswith(("client:", "host:"))]
    assert {r["kind"] for r in from_clients} == {"activation", "gradient", "weights", "state", "metric"}
    for r in from_clients:
        assert r["dtype"] in ("float32", "json"), r
        assert r["shape"][1:] != image and r["shape"][1:] != [1], r
        if r["kind"] in ("weights", "state"):
            assert r["name"].startswith((f"clients.{r['src'].split(':')[1]}.", "opt/", "meta")), r
    sent_weights = {(r["client"], r["name"]) for r in from_clients if r["kind"] == "weights"}
    expected = {(i, f"clients.{i}.{k}") for i in range(4) for k in t_sim.model.clients[i].state_dict()}
    assert sent_weights == expected  # aggregation traffic: exactly the client-side segments
    # nothing but noise and control goes from the driver to a client during training
    assert {r["kind"] for r in rows if r["src"] == "driver" and r["dst"].startswith("client:")} <= {"noise", "state"}

    # measured cut traffic per iteration equals the latency model's prediction (fp32, full batches)
    summary = summarise(ray_dir)
    assert not summary["violations"]
    for c in summary["clients"]:
        assert c["iterations"] == 6
        if c["predicted_bytes_per_iteration"]:
            assert c["measured_over_predicted"] == pytest.approx(1.0)
    capsys.readouterr()
    assert main(["audit", str(ray_dir)]) == 0
    out = capsys.readouterr().out
    assert "message policy: clients sent only" in out and ": OK" in out and "not a privacy verdict" in out


def _kill_once(engine, host: int, at: tuple[int, int, int]):
    pid = engine.host_pids()[host]

    def hook(r, e, t):
        if (r, e, t) == at and pid is not None:
            os.kill(pid, signal.SIGKILL)

    return hook


def test_killed_client_actor_round_finishes_and_client_restarts(local_ray, tmp_path):
    cfg = build_config({}, SMALL + ["runtime.engine=ray", "runtime.clients_per_actor=1", "federation.warmup_rounds=2",
                                    "runtime.call_timeout_s=60"])
    t = Trainer.new(cfg, tmp_path / "run", quiet=True)
    init = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.engine.after_iteration.append(_kill_once(t.engine, 2, (0, 0, 0)))  # client 2, round 1, after iteration 0
    t.fit()
    rows = read_metrics(tmp_path / "run")
    assert [f["clients"] for f in rows[0]["failures"]] == [[2]] and rows[0]["failures"][0]["iteration"] == 1
    assert rows[0]["clusters"][2] == -1 and rows[0]["iterations_per_client"] == [3, 3, 1, 3]
    assert rows[0]["global_weights"][2] == 0 and sum(rows[0]["global_weights"]) == pytest.approx(1, abs=1e-5)
    assert rows[1]["failures"] == [] and min(rows[1]["clusters"]) == 0  # restarted: back in round 2

    state = RunDir(tmp_path / "run").load_model_state(1)
    assert all(torch.isfinite(v).all() for v in state.values())
    # restarted from the last aggregated weights (round 0: the broadcast initialisation)
    for k, v in state.items():
        if k.startswith("clients.2."):
            torch.testing.assert_close(v, init[k])
    # survivors averaged (FedAvg warm-up: one group): every block held by several survivors is equal
    survivors = [0, 1, 3]
    shared = {}
    for k, v in state.items():
        if k.startswith("clients.") and int(k.split(".")[1]) in survivors:
            shared.setdefault(k.split(".", 2)[2], []).append(v)
    assert any(len(vs) > 1 for vs in shared.values())
    for vs in shared.values():
        for v in vs[1:]:
            torch.testing.assert_close(v, vs[0])


def test_stragglers_skip_and_drop_mode(local_ray, tmp_path):
    # 6 clients, 2 per actor: a slow client 1 skips alone (its actor-mate 0 keeps training);
    # actor 2 (clients 4, 5) is killed at the end of round 1 and dropped
    cfg = build_config({}, SMALL + ["data.clients_per_domain=3", "runtime.engine=ray", "runtime.clients_per_actor=2",
                                    "runtime.deadline_s=5", "runtime.inject_delay_s={1: 10}",
                                    "runtime.on_failure=drop"])
    t = Trainer.new(cfg, tmp_path / "run", quiet=True)
    t.engine.after_iteration.append(_kill_once(t.engine, 2, (0, 0, 2)))
    t.fit()
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["skipped_iterations"] == {"1": 3} and rows[1]["skipped_iterations"] == {"1": 3}
    assert rows[0]["iterations_per_client"] == [3, 0, 3, 3, 3, 3]
    assert rows[0]["clusters"][1] == -1 and rows[0]["loss_d_per_client"][1] is None
    assert [f["clients"] for f in rows[0]["failures"]] == [[4, 5]]  # died before sending its weights
    assert rows[0]["clusters"][4] == rows[0]["clusters"][5] == -1
    assert rows[1]["dropped_clients"] == [4, 5] and rows[1]["clusters"][4] == -1
    assert rows[1]["iterations_per_client"] == [3, 0, 3, 3, 0, 0]
    assert rows[1]["failures"] == [] and min(rows[1]["clusters"][i] for i in (0, 2, 3)) >= 0


def test_dead_server_stops_the_run_in_one_line_and_resume_recovers(local_ray, tmp_path):
    from huscf.errors import HuscfError

    cfg = build_config({}, SMALL + ["runtime.engine=ray"])
    t = Trainer.new(cfg, tmp_path / "run", quiet=True)
    pid = ray.get(t.engine.server.pid.remote())

    def kill_server(r, e, it):
        if (r, e, it) == (1, 0, 0):
            os.kill(pid, signal.SIGKILL)

    t.engine.after_iteration.append(kill_server)
    with pytest.raises(HuscfError, match="resume") as info:
        t.fit()
    assert len(str(info.value).splitlines()) == 1
    assert [r["round"] for r in read_metrics(tmp_path / "run")] == [1]  # round 1 was kept
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    assert [r["round"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def test_resume_continues_a_ray_run(local_ray, tmp_path):
    cfg = build_config({}, SMALL + FP64 + ["runtime.engine=ray", "train.rounds=1"])
    Trainer.new(cfg, tmp_path / "run", quiet=True).fit()
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "train.rounds=2", "--quiet"]) == 0
    rows = read_metrics(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2]
    ref = tmp_path / "ref"
    Trainer.new(build_config({}, SMALL + FP64), ref, quiet=True).fit()
    _assert_rows_close64(read_metrics(ref), rows)


PER_CLUSTER = SMALL + FP64 + ["federation.server_body=per_cluster", "federation.clusters=2",
                             "federation.warmup_rounds=0", "train.rounds=3"]


def test_per_cluster_bodies_on_ray_match_the_simulation_and_resume(local_ray, tmp_path):
    """The server actor keeps a body per cluster (clusters form at the end of round 1): the same
    losses, slots and functions as the simulation, also across a resume after the first slots."""
    sim_dir, ray_dir = tmp_path / "sim", tmp_path / "ray"
    sim = Trainer.new(build_config({}, PER_CLUSTER), sim_dir, quiet=True)
    sim.fit()
    Trainer.new(build_config({}, PER_CLUSTER + ["runtime.engine=ray", "runtime.clients_per_actor=2",
                                                "train.rounds=2"]), ray_dir, quiet=True).fit()
    assert main(["train", "--resume", str(ray_dir), "--set", "train.rounds=3", "--quiet"]) == 0
    sim_rows, ray_rows = read_metrics(sim_dir), read_metrics(ray_dir)
    assert len(ray_rows) == 3
    _assert_rows_close64(sim_rows, ray_rows)
    for a, b in zip(sim_rows, ray_rows):
        assert b["federation"]["bodies"] == a["federation"]["bodies"]
    assert len(set(sim_rows[0]["federation"]["bodies"]["body_of"])) == 2
    ray_model = Trainer.resume(ray_dir, ["runtime.engine=simulation"], quiet=True).model
    assert ray_model.body_of.tolist() == sim.model.body_of.tolist()
    _assert_outputs_close64(ray_model, sim.model)


SECURE = SMALL + FP64 + ["federation.secure_aggregation=true", "federation.strategy=fedavg", "cuts.method=fixed",
                  "cuts.fixed=[[1,0,1,0],[1,0,1,0],[1,1,1,1],[1,1,1,1]]"]  # every shared block: 2+ holders


def test_secure_aggregation_on_ray_matches_the_simulation_and_no_client_sends_its_weights(local_ray, tmp_path):
    sim_dir, ray_dir = tmp_path / "sim", tmp_path / "ray"
    Trainer.new(build_config({}, SECURE), sim_dir, quiet=True).fit()
    Trainer.new(build_config({}, SECURE + ["runtime.engine=ray", "runtime.clients_per_actor=2"]), ray_dir,
                quiet=True).fit()
    sim, ray_rows = read_metrics(sim_dir), read_metrics(ray_dir)
    _assert_rows_close64(sim, ray_rows)
    for a, b in zip(sim, ray_rows):
        assert b["federation"]["secure_aggregation"] == a["federation"]["secure_aggregation"]
        assert b["federation"]["secure_aggregation"]["opened"] > 0
    rows = [json.loads(line) for line in (ray_dir / "audit.jsonl").read_text().splitlines()]
    from_clients = [r for r in rows if r["src"].startswith("client:")]
    # to the server: cut layers, the secure aggregation's steps (signed keys, sealed shares, masked
    # words, the signed survivor list, self-mask shares); a client's weights go nowhere but
    # its own checkpoint state (to the driver)
    assert {r["kind"] for r in from_clients if r["dst"] == "server"} == {"activation", "gradient", "keys", "shares",
                                                                         "masked", "signed", "unmask"}
    assert {r["dtype"] for r in from_clients if r["kind"] == "masked" and r["name"] != "meta"} == {"uint64"}
    assert not summarise(ray_dir)["violations"]


def test_seam_noise_on_ray_noises_what_the_hosts_send_and_passes_the_guard(local_ray, tmp_path):
    """The Ray client hosts clip and noise what they send (split/noise.py): the run differs from the
    noise-free simulation, which a plain Ray run matches (test_ray_engine_matches_simulation_and_
    audit_is_clean), its noisy activations pass the privacy guard, and every round records its
    epsilon."""
    noised = SMALL + ["privacy.seam_noise=1.0"]
    Trainer.new(build_config({}, SMALL), tmp_path / "sim", quiet=True).fit()
    Trainer.new(build_config({}, noised + ["runtime.engine=ray", "runtime.clients_per_actor=2"]), tmp_path / "ray",
                quiet=True).fit()
    plain, ray_rows = read_metrics(tmp_path / "sim"), read_metrics(tmp_path / "ray")
    assert ray_rows[0]["loss_d"] != plain[0]["loss_d"]
    assert [r["seam_epsilon"] for r in ray_rows] == [r["seam_epsilon"] for r in read_metrics(
        Trainer.new(build_config({}, noised), tmp_path / "sim_noised", quiet=True).fit())]
    assert not summarise(tmp_path / "ray")["violations"]


def test_ray_hosts_clip_the_gradients_they_return_as_the_simulation_does(local_ray, tmp_path):
    """The gradients a client returns are clipped on the Ray hosts as in one process: with noise far
    below float64's rounding and a gradient clip that bites, the runs agree, and differ from a run
    whose gradient clip never bites (so the clip is what they share)."""
    quiet = SMALL + FP64 + ["privacy.seam_noise=1e-30"]
    bites, loose = quiet + ["privacy.seam_grad_clip=1e-4"], quiet + ["privacy.seam_grad_clip=1e6"]
    sim = read_metrics(Trainer.new(build_config({}, bites), tmp_path / "sim", quiet=True).fit())
    ray_rows = read_metrics(Trainer.new(build_config({}, bites + ["runtime.engine=ray", "runtime.clients_per_actor=2"]),
                                        tmp_path / "ray", quiet=True).fit())
    _assert_rows_close64(sim, ray_rows)
    unclipped = read_metrics(Trainer.new(build_config({}, loose), tmp_path / "loose", quiet=True).fit())
    with pytest.raises(AssertionError):
        _assert_rows_close64(sim, unclipped)


def test_secure_per_cluster_bodies_on_ray_match_the_simulation(local_ray, tmp_path):
    cfg = SECURE + ["federation.strategy=clustered_kld", "federation.server_body=per_cluster",
                    "federation.clusters=2", "federation.warmup_rounds=0"]
    Trainer.new(build_config({}, cfg), tmp_path / "sim", quiet=True).fit()
    Trainer.new(build_config({}, cfg + ["runtime.engine=ray", "runtime.clients_per_actor=2"]), tmp_path / "ray",
                quiet=True).fit()
    sim, ray_rows = read_metrics(tmp_path / "sim"), read_metrics(tmp_path / "ray")
    assert len(set(sim[0]["federation"]["bodies"]["body_of"])) == 2
    _assert_rows_close64(sim, ray_rows)
    for a, b in zip(sim, ray_rows):
        assert b["federation"]["bodies"] == a["federation"]["bodies"]
        assert b["federation"]["secure_aggregation"] == a["federation"]["secure_aggregation"]
    assert not summarise(tmp_path / "ray")["violations"]


def test_hidden_ends_on_ray_match_the_simulation_and_reach_the_server_only_as_words(local_ray, tmp_path):
    """federation.hide_ends: the heads' and tails' sums go to the server and back as masked words
    only its members can read; the run is the simulation's."""
    cfg = SECURE + ["federation.hide_ends=true"]
    Trainer.new(build_config({}, cfg), tmp_path / "sim", quiet=True).fit()
    Trainer.new(build_config({}, cfg + ["runtime.engine=ray", "runtime.clients_per_actor=2"]), tmp_path / "ray",
                quiet=True).fit()
    sim, ray_rows = read_metrics(tmp_path / "sim"), read_metrics(tmp_path / "ray")
    _assert_rows_close64(sim, ray_rows)
    for a, b in zip(sim, ray_rows):
        assert b["federation"]["secure_aggregation"] == a["federation"]["secure_aggregation"]
        assert b["federation"]["secure_aggregation"]["hidden"] == 4  # G and D, first and last block
    rows = [json.loads(line) for line in (tmp_path / "ray" / "audit.jsonl").read_text().splitlines()]
    back = [r for r in rows if r["src"] == "server" and r["dst"].startswith("client:") and r["name"] != "meta"]
    assert {r["dtype"] for r in back if r["kind"] == "opened"} == {"uint64"}
    assert any(r["kind"] == "opened" for r in back)
    # the averages the server sends as weights are of middle blocks only (G 0-4 and D 0-4 here)
    sent_blocks = {r["name"].split(".")[3:5][1] for r in back if r["kind"] == "weights"}
    assert sent_blocks and not sent_blocks & {"0", "4"}
    assert not summarise(tmp_path / "ray")["violations"]


def test_labels_in_the_tail_on_ray_match_the_simulation_and_no_head_takes_the_label(local_ray, tmp_path):
    """model.labels: tail: the Ray hosts hand each client's labels to its tails as one process does
    (the runs agree) and every message passes the guard (that the heads' rows carry no label is
    test_training.py's)."""
    cfg = SMALL + FP64 + ["model.labels=tail"]
    sim = read_metrics(Trainer.new(build_config({}, cfg), tmp_path / "sim", quiet=True).fit())
    ray_rows = read_metrics(Trainer.new(build_config({}, cfg + ["runtime.engine=ray", "runtime.clients_per_actor=2"]),
                                        tmp_path / "ray", quiet=True).fit())
    _assert_rows_close64(sim, ray_rows)
    assert not summarise(tmp_path / "ray")["violations"]


def test_a_client_that_dies_before_masking_leaves_sums_the_survivors_open(local_ray, tmp_path):
    cfg = build_config({}, SECURE + ["runtime.engine=ray", "runtime.clients_per_actor=1", "runtime.call_timeout_s=60"])
    t = Trainer.new(cfg, tmp_path / "run", quiet=True)
    pid = t.engine.host_pids()[2]
    t.engine.before_masking.append(lambda r: os.kill(pid, signal.SIGKILL) if r == 0 else None)
    t.fit()
    rows = read_metrics(tmp_path / "run")
    assert [f["clients"] for f in rows[0]["failures"]] == [[2]]
    record = rows[0]["federation"]["secure_aggregation"]
    assert record["opened"] > 0  # the sums client 2 was in (with 1 or more survivors besides) opened
    assert rows[1]["failures"] == [] and np.isfinite(rows[1]["loss_d"])
    state = RunDir(tmp_path / "run").load_model_state(1)
    # survivors (one group) hold the same opened averages; an unremoved mask would be ~2^31 in size
    shared = {}
    for k, v in state.items():
        if k.startswith("clients.") and int(k.split(".")[1]) in (0, 1, 3) and v.is_floating_point():
            shared.setdefault(k.split(".", 2)[2], []).append(v)
    assert any(len(vs) > 1 for vs in shared.values())
    for vs in shared.values():
        assert all(v.abs().max() < 100 for v in vs)
        for v in vs[1:]:
            torch.testing.assert_close(v, vs[0])


def test_a_killed_driver_leaves_no_ray_process_behind(tmp_path):
    """kill -9 the driver mid-run: every process its private Ray started ends within seconds
    (Ray alone leaves its dashboard and runtime-env agents running; runtime/reaper.py)."""
    from huscf.runtime.reaper import still_running

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "huscf.cli", "train", "--engine", "ray", "--out", str(out), "--quiet"]
    for s in SMALL + ["train.rounds=20"]:
        cmd += ["--set", s]
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="hr", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")} | {"HUSCF_RAY_TMPDIR": ray_tmp}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "metrics.jsonl").exists():  # mid-run: round 1 done
            assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
            time.sleep(1)
        ray_procs = _descendants(driver.pid)
        names = {pid: open(f"/proc/{pid}/cmdline", "rb").read()[:60] for pid, _ in ray_procs
                 if os.path.exists(f"/proc/{pid}/cmdline")}
        assert any(b"DashboardAgent" in n for n in names.values()), names  # the ones Ray leaves behind
        driver.kill()
        driver.wait()
        deadline = time.time() + 30
        while time.time() < deadline:
            left = still_running(ray_procs)
            if not left:
                break
            time.sleep(0.5)
        assert not left, {pid: names.get(pid) for pid in left}
    finally:
        if driver.poll() is None:
            driver.kill()


# -- no Ray needed --------------------------------------------------------------------------------
def test_the_watcher_finds_a_ray_process_it_first_saw_between_fork_and_exec():
    """The cause of a killed-driver run that left two Ray agents behind: a child the watcher first
    reads between fork and exec still has the driver's environment, without the mark; it must be
    read again once it has exec'd (here a child that sleeps 1 s before its exec, then carries the
    mark), or the whole tree below it is never tracked."""
    import threading
    import uuid

    from huscf.runtime.reaper import MARK, Tracker, process_table

    owner, started = uuid.uuid4().hex, []
    spawn = threading.Thread(target=lambda: started.append(subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"], env=os.environ | {MARK: owner},
        preexec_fn=lambda: time.sleep(1.0))))  # noqa: PLW1509 (the window between fork and exec, made wide)
    tracker = Tracker(os.getpid(), owner)
    before = {pid for pid, (ppid, _) in process_table().items() if ppid == os.getpid()}
    spawn.start()
    try:
        time.sleep(0.5)  # the child is forked and sleeping before its exec
        in_window = {pid for pid, (ppid, _) in process_table().items() if ppid == os.getpid()} - before
        first = {pid for pid, _ in tracker.scan()}
        spawn.join()
        child = started[0].pid
        assert child in in_window and child not in first  # seen as the fork, without the mark
        assert child in {pid for pid, _ in tracker.scan()}  # read again after its exec: tracked
    finally:
        spawn.join()
        for proc in started:
            proc.kill()
            proc.wait()


def test_plan_hosts_groups_clients():
    assert plan_hosts(8, 3, 16) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert plan_hosts(8, "auto", 2) == [[0, 1, 2, 3, 4, 5, 6, 7]]  # one client actor + the server on 2 CPUs
    assert plan_hosts(8, "auto", 4) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert plan_hosts(3, "auto", 64) == [[0], [1], [2]]


@pytest.mark.parametrize("clients, cpus", [(8, 1), (8, 2), (8, 3), (8, 4), (8, 16), (3, 64), (64, 16)])
def test_auto_actors_never_oversubscribe_the_cpus(clients, cpus):
    """Issue 31: with runtime.clients_per_actor and threads_per_actor at auto, the client actors
    plus the server actor times their torch threads fit the CPUs Ray was given (one CPU: one
    thread in each of the two actors is the least there is)."""
    from huscf.runtime.driver import actor_threads

    actors = len(plan_hosts(clients, "auto", cpus)) + 1
    threads = actor_threads("auto", cpus, actors)
    assert threads >= 1 and (actors * threads <= cpus or (cpus == 1 and threads == 1 and actors == 2))
    assert actor_threads(3, cpus, actors) == 3  # a fixed count is taken as given


def test_a_damaged_audit_log_is_one_line_and_a_cut_last_line_is_dropped(tmp_path, capsys):
    row = {"round": 1, "kind": "activation", "src": "client:0", "dst": "server", "client": 0, "net": "G",
           "block": None, "name": "h", "shape": [4, 8], "dtype": "float32", "count": 1, "bytes": 128}
    log = tmp_path / "audit.jsonl"
    log.write_text(json.dumps(row) + "\n" + json.dumps(row)[:30])  # killed while writing the last line
    assert summarise(tmp_path)["violations"] == []
    log.write_text(json.dumps(row) + "\n{garbage\n" + json.dumps(row) + "\n")
    assert main(["audit", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "audit.jsonl line 2: not JSON" in err
    log.write_text(json.dumps({k: v for k, v in row.items() if k != "bytes"}) + "\n")
    assert main(["audit", str(tmp_path)]) == 2
    assert "line 1: not an audit record (missing 'bytes')" in capsys.readouterr().err


def test_runtime_bad_input_is_one_line(tmp_path, capsys):
    assert main(["train", "--address", "auto", "--out", str(tmp_path / "x")]) == 2
    assert "--address joins a Ray cluster" in capsys.readouterr().err
    assert main(["train", "--set", "runtime.clients_per_actor=0", "--out", str(tmp_path / "y")]) == 2
    assert "runtime.clients_per_actor" in capsys.readouterr().err
    assert main(["train", "--engine", "ray", "--set", "method=mdgan", "--set", "train.rounds=1",
                 "--out", str(tmp_path / "z")]) == 2
    assert "runtime.engine=simulation" in capsys.readouterr().err
    assert main(["audit", str(tmp_path)]) == 2
    assert "no audit.jsonl" in capsys.readouterr().err
    from huscf.errors import HuscfError
    from huscf.runtime.cluster import _probe

    with pytest.raises(HuscfError, match="cannot reach a Ray cluster at '127.0.0.1:1'"):
        _probe("127.0.0.1:1")


def test_privacy_guard_refuses_data_leaving_a_client():
    from huscf.runtime.messages import PrivacyGuard, PrivacyViolation, Wire, run_dtypes

    w = Wire("host:0", PrivacyGuard((1, 28, 28)))
    ok = w.pack("activation", "server", 3, {"h": torch.randn(16, 8, 7, 7)}, {"net": "G"}, src="client:3")
    assert ok.tensor("h").shape == (16, 8, 7, 7)
    bad = [
        ("activation", {"x": torch.randn(16, 1, 28, 28)}, "batch of its images"),  # a real or synthetic image
        ("activation", {"y": torch.randint(0, 10, (16,))}, "integer array"),  # labels
        ("gradient", {"d": torch.randn(16, 1)}, "one value per sample"),  # a discriminator output
        ("weights", {"clients.4.nets.G.0.fc.weight": torch.randn(3, 3)}, "not its own segment"),
        ("noise", {}, "'noise' message"),
        ("metric", {"loss": torch.randn(16, 4)}, "in a 'metric' message"),
    ]
    for kind, tensors, why in bad:
        with pytest.raises(PrivacyViolation, match=why):
            w.pack(kind, "server", 3, tensors, src="client:3")
    with pytest.raises(PrivacyViolation, match="metadata"):
        w.pack("metric", "driver", 3, meta={"labels": list(range(2000))})
    # values, not only shapes: no NaN or infinity (any float dtype), no dtype the run does not
    # compute in, no free text, and no orchestration from a client
    fp32 = Wire("host:0", PrivacyGuard((1, 28, 28), dtypes=run_dtypes("fp32")))
    h = torch.randn(16, 8, 7, 7)
    for bad_h in (h.clone().index_put_((torch.tensor([3]),), torch.tensor(float("nan"))),
                  h.clone().index_put_((torch.tensor([0]),), torch.tensor(float("inf"))),
                  h.to(torch.bfloat16).clone().index_put_((torch.tensor([1]),), torch.tensor(float("nan"),
                                                                                              dtype=torch.bfloat16))):
        with pytest.raises(PrivacyViolation, match="not finite"):
            w.pack("activation", "server", 3, {"h": bad_h}, {"net": "G"}, src="client:3")
    with pytest.raises(PrivacyViolation, match="the run computes in float32"):
        fp32.pack("activation", "server", 3, {"h": h.double()}, {"net": "G"}, src="client:3")
    assert fp32.pack("activation", "server", 3, {"h": h}, {"net": "G"}, src="client:3").tensor("h").dtype == h.dtype
    bf16 = Wire("host:0", PrivacyGuard((1, 28, 28), dtypes=run_dtypes("bf16")))
    bf16.pack("activation", "server", 3, {"h": h.to(torch.bfloat16)}, {"net": "G"}, src="client:3")
    with pytest.raises(PrivacyViolation, match="metadata key 'note'"):
        w.pack("weights", "server", 3, {"clients.3.nets.G.0.fc.weight": torch.randn(3, 3)}, {"note": "a label: 7"},
               src="client:3")
    with pytest.raises(PrivacyViolation, match="a 'control' message"):
        w.pack("control", "server", 3, meta={"round": 1}, src="client:3")
    rows = w.audit.drain()  # only what was sent is counted
    assert [(r["kind"], r["name"], r["shape"], r["bytes"]) for r in rows if r["name"] != "meta"] == [
        ("activation", "h", [16, 8, 7, 7], 16 * 8 * 7 * 7 * 4)]


def _contract_guard():
    """A host of clients 0 and 1 of a real split cGAN (heterogeneous cuts) with its contracts."""
    from huscf.models import build_architecture
    from huscf.runtime.spec import contracts as _contracts
    from huscf.runtime.messages import PrivacyGuard
    from huscf.split.plan import Cuts
    from huscf.split.segments import SplitGAN

    arch = build_architecture("cgan28", 0.125)
    g, d = arch.generator(), arch.discriminator()
    model = SplitGAN(g, d, [Cuts(0, 0, 0, 0), Cuts(1, 0, 1, 1)])
    segs = {i: model.clients[i] for i in (0, 1)}
    return model, segs, PrivacyGuard(arch.image_shape, _contracts(segs, g, d, arch), batch_size=16), arch


def test_the_privacy_guard_checks_content_against_the_cuts_contract():
    from huscf.runtime.messages import PrivacyViolation, Wire, pack_state

    model, segs, guard, arch = _contract_guard()
    w = Wire("host:0", guard)
    z, y = torch.randn(16, arch.z_dim), torch.randint(0, 10, (16,))
    x = torch.rand(16, *arch.image_shape)
    for i in (0, 1):  # what the clients really send passes: heads' outputs, the server outputs' gradients
        h = segs[i].run_head("G", (z, y))
        w.pack("activation", "server", i, {"h": h}, {"net": "G"}, src=f"client:{i}")
        out = model.server.run("G", h, model.ranges(i, "G").server)
        w.pack("gradient", "server", i, {"h": torch.randn_like(out)}, {"net": "G"}, src=f"client:{i}")
        hd = segs[i].run_head("D", (x, y))
        w.pack("activation", "server", i, {"fake": hd, "real": hd}, {"net": "D", "collect": True}, src=f"client:{i}")
        w.pack("weights", "server", i, {f"clients.{i}.{k}": v for k, v in segs[i].state_dict().items()},
               src=f"client:{i}")
    opt = torch.optim.Adam(segs[1].nets["G"].parameters())
    sum(p.sum() for p in segs[1].nets["G"].parameters()).backward()
    opt.step()  # Adam moments and step counters, as a checkpoint's state message carries them
    tensors, meta = pack_state({}, {"G": opt.state_dict()})
    w.pack("state", "driver", 1, tensors, meta, src="client:1")
    w.pack("metric", "driver", None, meta={"loss_d": {"0": 1.2, "1": 0.8}, "skipped": [1]})

    h0 = segs[0].run_head("G", (z, y))
    bad = [
        ("activation", 0, {"h": x.reshape(16, -1)}, {"net": "G"}, "its cut produces"),  # an image, flattened
        ("activation", 0, {"h": torch.nn.functional.pad(x, (0, 1))}, {"net": "G"}, "its cut produces"),
        ("activation", 0, {"h": torch.nn.functional.one_hot(y, 10).float()}, {"net": "G"}, "its cut produces"),
        ("activation", 0, {"h": torch.cat([h0, h0])}, {"net": "G"}, "batch <= 16"),  # more rows than a batch
        ("activation", 0, {"x": h0}, {"net": "G"}, "under that name"),
        ("activation", 0, {"h": h0}, {"net": "G", "labels": [1, 2]}, "metadata key 'labels'"),
        ("activation", 5, {"h": h0}, {"net": "G"}, "does not host"),
        ("weights", 0, {"clients.0.nets.G.0.0.weight": torch.randn(16, 784)}, {}, "not a tensor of its segment"),
        ("state", 1, {"opt/G/0/exp_avg": torch.randn(16, 1, 28, 28)}, {}, "of shape"),
        ("state", 1, {"opt/G/99/exp_avg": torch.randn(3)}, {}, "not one of its optimiser states"),
        ("metric", None, {}, {"loss_d": {"0": [0.1] * 16}}, "one loss per client"),
        ("metric", None, {}, {"labels": [3] * 16}, "metadata key 'labels'"),
        ("metric", None, {}, {"loss_g": {"7": 0.5}}, "clients it does not host"),
        ("state", 1, {}, {"param_groups": {"G": [{"params": [0], "lr": list(range(16))}]}}, "optimiser setting 'lr'"),
    ]
    for kind, client, tensors, meta, why in bad:
        with pytest.raises(PrivacyViolation, match=why):
            w.pack(kind, "server", client, tensors, meta, src=f"client:{client}")


def test_the_privacy_guard_admits_only_well_formed_secure_aggregation_messages():
    from huscf.federation.secagg import Enrollment, SecAggClient
    from huscf.federation.secure import Policy, plan_sums
    from huscf.federation.strategies import Aggregation
    from huscf.runtime.messages import PrivacyViolation, Wire

    model, segs, guard, arch = _contract_guard()
    w = Wire("host:0", guard)
    plan = plan_sums(model, Aggregation(np.zeros(2, dtype=int), np.full(2, 0.5), np.full(2, 0.5)), [0, 1], 0)
    enrolled = Enrollment.of([0, 1])
    parties = {i: SecAggClient(i, enrolled.identities[i], enrolled.roster, 0, Policy()) for i in (0, 1)}
    keys = {i: p.advertise() for i, p in parties.items()}
    sealed = {i: p.share_keys(plan, keys) for i, p in parties.items()}
    masked = parties[0].masked(segs[0], {1: sealed[1][0]})
    parties[1].masked(segs[1], {0: sealed[0][1]})
    assert masked  # the G and D heads and tails both clients hold
    sig = parties[0].sign_survivors([0, 1])
    answer = parties[0].unmask({0: sig, 1: parties[1].sign_survivors([0, 1])})
    shares = answer["masks"][1]
    w.pack("keys", "server", 0, meta=keys[0], src="client:0")
    w.pack("shares", "server", 0, meta={"to": 1, "sealed": sealed[0][1]}, src="client:0")
    w.pack("masked", "server", 0, {f"masked/{k}": v for k, v in masked.items()}, {"round": 0}, src="client:0")
    w.pack("signed", "server", 0, meta={"survivors": [0, 1], "sig": sig}, src="client:0")
    w.pack("unmask", "server", 0, meta={"peer": 1, "masks": {str(k): h for k, h in shares.items()}}, src="client:0")
    w.pack("unmask", "server", 0, meta={"peer": 1, "key": "ab" * 32}, src="client:0")
    k, v = next(iter(masked.items()))
    image_words = np.zeros(16 * 784, dtype=np.uint64)  # a batch of images in 64-bit words
    bad = [
        ("masked", {f"masked/{k}": v.view(np.int64)}, {"round": 0}, "one uint64 vector"),
        ("masked", {f"masked/{k}": v.view(np.float64)}, {"round": 0}, "one uint64 vector"),
        ("masked", {f"masked/{k}": v.reshape(1, -1)}, {"round": 0}, "one uint64 vector"),
        ("masked", {f"masked/{k}": image_words}, {"round": 0}, "none of its blocks"),
        ("masked", {f"masked/{k}": v}, {"round": 0, "labels": [1]}, "metadata key 'labels'"),
        ("weights", {"clients.0.nets.G.0.fc.bias": v[:4]}, {}, "integer array"),  # words only in 'masked'
        ("keys", {}, keys[0] | {"s_pk": "zz" * 32}, "two 32-byte public keys"),
        ("keys", {}, keys[0] | {"labels": [1, 2]}, "metadata key 'labels'"),
        ("shares", {}, {"to": 1, "sealed": "a digit 7"}, "a sealed box"),
        ("shares", {}, {"to": True, "sealed": sealed[0][1]}, "a sealed box"),
        ("signed", {}, {"survivors": ["0"], "sig": sig}, "client ids"),
        ("unmask", {}, {"peer": 1, "masks": {"0": [1, 2, 3]}}, "self-mask shares"),
        ("unmask", {}, {"peer": 1, "masks": {"labels": "ab" * 16}}, "self-mask shares"),
        ("unmask", {}, {"peer": 1, "key": "ab" * 32, "masks": {"0": "ab" * 16}}, "one peer's key share"),
    ]
    for kind, tensors, meta, why in bad:
        with pytest.raises(PrivacyViolation, match=why):
            w.pack(kind, "server", 0, tensors, meta, src="client:0")


def test_the_server_refuses_masked_words_after_it_named_the_survivors():
    """A late delivery after the survivor list was signed would meet reveals made for a dropout."""
    from huscf.federation.secagg import SecAggServer
    from huscf.federation.secure import Policy, SecurePlan
    from huscf.runtime.messages import Wire
    from huscf.runtime.server import ServerNode

    server = object.__new__(ServerNode)  # only its secure round-end state, no actor
    server._secure = {"protocol": SecAggServer(SecurePlan(0, ()), Policy())}
    server._secure["protocol"].route({0: {1: "ab"}, 1: {0: "cd"}})
    words = np.arange(4, dtype=np.uint64)
    on_time = Wire("host:0").pack("masked", "server", 0, {"masked/0": words}, {"round": 0}, src="client:0")
    late = Wire("host:1").pack("masked", "server", 1, {"masked/0": words}, {"round": 0}, src="client:1")
    server.receive_masked([on_time])
    assert server.delivered() == [0]
    server.receive_masked([late])
    assert sorted(server._secure["protocol"].words) == [0]


def test_state_round_trips_through_messages_with_bf16():
    from huscf.runtime.messages import Wire, pack_state, unpack_state

    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(lin.parameters())
    lin(torch.randn(5, 4)).sum().backward()
    opt.step()
    tensors, meta = pack_state({"clients.0.w": lin.weight.detach().bfloat16()}, {"G": opt.state_dict()})
    m = Wire("host:0").pack("state", "driver", 0, tensors, meta)
    model, opts = unpack_state(m.tensors(), m.meta)
    assert model["clients.0.w"].dtype == torch.bfloat16
    torch.testing.assert_close(model["clients.0.w"], lin.weight.detach().bfloat16())
    fresh = torch.optim.Adam(lin.parameters())
    fresh.load_state_dict(opts["G"])
    for k, v in opt.state_dict()["state"][0].items():
        torch.testing.assert_close(fresh.state_dict()["state"][0][k], v)


EVERY_ENGINE = [("loop", []), ("batched", ["compute.clients=batched"]),
                ("ray", ["runtime.engine=ray", "runtime.clients_per_actor=2"])]


def _run_toy_methods(tmp_path, classes, overrides: list[str], variants) -> dict[str, list[dict]]:
    """Train ``overrides`` plus each variant's (name, extra overrides) with test-defined method
    classes registered here and in Ray's workers (which cannot import the tests folder); the
    metrics rows by variant name."""
    import toy_methods
    from ray import cloudpickle

    from huscf.methods import register, unregister

    cloudpickle.register_pickle_by_value(toy_methods)
    for cls in classes:
        register(cls)
    try:
        runs = {}
        for name, extra in variants:
            Trainer.new(build_config({}, [*overrides, *extra]), tmp_path / name, quiet=True).fit()
            runs[name] = read_metrics(tmp_path / name)
        return runs
    finally:
        for cls in classes:
            unregister(cls.name)
        cloudpickle.unregister_pickle_by_value(toy_methods)


def test_a_toy_method_with_a_new_hook_runs_the_same_on_every_engine(local_ray, tmp_path):
    """Issue 27: a method defined outside huscf (tests/toy_methods.py) gives every client a peer's
    synthetic samples before each epoch (``Method.before_epoch`` + ``Engine.give``). It runs on
    the loop, the batched and the Ray engine with no code of its own in engines/ or runtime/, and
    all three compute the same run (float64: tests/numerics.py rule 1, per-client losses as
    metrics.jsonl rounds them)."""
    import toy_methods

    # 32 samples per client (2 batches) and 32 given: 4 iterations an epoch, uncapped
    runs = _run_toy_methods(tmp_path, [toy_methods.GivesPeerFakes, toy_methods.GivesNothing],
                            SMALL + FP64 + ["method=toy-given", "data.limit_per_domain=64",
                                            "train.max_iters_per_epoch=null"],
                            EVERY_ENGINE + [("plain", ["method=toy-plain"])])
    for name in ("batched", "ray"):
        for a, b in zip(runs["loop"], runs[name]):
            for key in ("loss_d_per_client", "loss_g_per_client"):
                assert_close64(np.array(b[key]), np.array(a[key]), extra=RECORD_ROUNDING, msg=f"{name} {key}")
    assert [r["iterations"] for name in ("loop", "batched", "ray") for r in runs[name]] == [4] * 6
    assert [r["iterations"] for r in runs["plain"]] == [2, 2]
    # the given samples were trained on: without them the same run computes other losses
    assert np.abs(np.array(runs["plain"][0]["loss_d_per_client"]) - runs["loop"][0]["loss_d_per_client"]).max() > 1e-3
    # on Ray they travelled from the driver to each client as "given" messages, in the audit
    rows = [json.loads(line) for line in (tmp_path / "ray" / "audit.jsonl").read_text().splitlines()]
    given = [r for r in rows if r["kind"] == "given"]
    assert {(r["src"], r["dst"], r["name"]) for r in given} == {
        ("driver", f"client:{i}", n) for i in range(4) for n in ("x", "y")}
    assert sorted({tuple(r["shape"]) for r in given}) == [(toy_methods.GIVEN,), (toy_methods.GIVEN, 1, 28, 28)]
    assert not summarise(tmp_path / "ray")["violations"]
    from huscf.runtime.audit import format_summary

    assert "clients were given samples with their labels" in format_summary(summarise(tmp_path / "ray"))


def test_a_method_that_synchronises_every_k_steps_runs_on_every_engine(local_ray, tmp_path):
    """``Method.synchronises`` (issue 27: when a method synchronises): FedAvg after every second
    iteration leaves all clients equal at the end of a 4-iteration epoch on the loop, the batched
    and the Ray engine, records the syncs, and computes the same run on all three (float64); the
    same method without syncs ends the epoch with every client different."""
    import toy_methods

    toy_methods.SyncsEveryTwo.equal_after_epoch.clear()
    runs = _run_toy_methods(tmp_path, [toy_methods.SyncsEveryTwo, toy_methods.SyncsNever],
                            SMALL + FP64 + ["method=toy-sync", "train.rounds=1", "data.limit_per_domain=128",
                                            "train.max_iters_per_epoch=null"],
                            EVERY_ENGINE + [("never", ["method=toy-nosync"])])
    assert toy_methods.SyncsEveryTwo.equal_after_epoch == [True, True, True, False]
    assert [runs[n][0]["iterations"] for n in runs] == [4] * 4
    assert [runs[n][0]["federation"].get("syncs_before_round_end") for n in runs] == [2, 2, 2, None]
    for name in ("batched", "ray"):
        for key in ("loss_d_per_client", "loss_g_per_client"):
            assert_close64(np.array(runs[name][0][key]), np.array(runs["loop"][0][key]), extra=RECORD_ROUNDING,
                           msg=f"{name} {key}")


def test_fedgan_equal_steps_and_syncs_are_the_same_on_ray(local_ray, tmp_path):
    """FedGAN's equal steps (``Engine.equal_steps``: a client past its last batch starts over) and
    its syncs every K steps compute the same run on Ray as in one process (float64), on unequal
    partitions where the small clients start over."""
    runs = {}
    for name, extra in [("loop", []), ("ray", ["runtime.engine=ray", "runtime.clients_per_actor=2"])]:
        cfg = build_config({}, SMALL + FP64 + ["method=fedgan", "train.rounds=1", "data.scenario=noniid",
                                               "data.limit_per_domain=240", "train.max_iters_per_epoch=null",
                                               "baselines.fedgan_sync_every=2", "data.clients_per_domain=3", *extra])
        Trainer.new(cfg, tmp_path / name, quiet=True).fit()
        runs[name] = read_metrics(tmp_path / name)[0]
    assert runs["ray"]["iterations_per_client"] == [5] * 6  # 80 and 53 samples: 5 and 3 batches
    assert [runs[n]["federation"]["syncs_before_round_end"] for n in runs] == [2, 2]
    for key in ("loss_d_per_client", "loss_g_per_client"):
        assert_close64(np.array(runs["ray"][key]), np.array(runs["loop"][key]), extra=RECORD_ROUNDING, msg=key)


def test_bench_claims_cells_run_as_ray_tasks_and_match_local_runs(local_ray, tmp_path):
    """benchmarks/bench_claims.py --address: each cell a Ray task pinned to its CPUs; its summary
    equals the same cell run here with the same thread count, and a second call reads it back."""
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("bench_claims")
    tiny = bench.Setting("tiny", "default", ("data.clients_per_domain=2", "data.limit_per_domain=400",
                                             "train.rounds=1", "train.local_epochs=1", "train.max_iters_per_epoch=2",
                                             "model.width=0.125", "output.samples_every=0", "train.threads=1"),
                         (), "mnist")
    cells = bench.make_cells("report", [tiny], ["huscf", "fedgan"], [600], "cpu", {},
                             {"samples": 50, "tstr_samples": 100, "tstr_min_steps": 5})
    lines: list[str] = []
    on_ray = bench.run_cells(cells, tmp_path / "ray", jobs="1", address="auto", cpus=1, gpus=0, data_dir=None,
                             say=lines.append)
    here = bench.run_cells(cells, tmp_path / "here", jobs="1", address=None, cpus=1, gpus=0, data_dir=None,
                           say=lines.append)
    assert set(on_ray) == set(here) == {c.key for c in cells}
    for key in here:
        assert {k: v for k, v in on_ray[key].items() if k != "train_seconds"} == \
            {k: v for k, v in here[key].items() if k != "train_seconds"}
        assert (tmp_path / "ray" / key / "cell.json").is_file()
    again: list[str] = []
    assert bench.run_cells(cells, tmp_path / "ray", jobs="1", address="auto", cpus=1, gpus=0, data_dir=None,
                           say=again.append) == on_ray
    assert again == [f"all 2 cells read from {tmp_path / 'ray'} (finished before)"]
