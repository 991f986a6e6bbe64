"""Baselines: each trains through the same config, reads only its own clients' data, and compares."""

import json

import numpy as np
import pytest
import torch
from conftest import read_metrics

from huscf.cli import main
from huscf.compare import compare
from huscf.config import build_config
from huscf.federation.averaging import apply_aggregation
from huscf.federation.baselines import HierarchicalFedAvg, PersonalizedSimilarity
from huscf.federation.strategies import RoundState
from huscf.trainer import Trainer

TINY = ["data.clients_per_domain=3", "model.width=0.125", "train.local_epochs=1", "train.batch_size=16",
        "train.max_iters_per_epoch=2", "federation.warmup_rounds=1", "output.samples_every=0",
        "cuts.method=random"]
BASELINES = ["fedgan", "mdgan", "hflgan", "pflgan", "local", "centralized"]


def _trainer(tmp_path, method, *extra):
    return Trainer.new(build_config({}, [*TINY, f"method={method}", *extra]), tmp_path / method, quiet=True)


@pytest.mark.parametrize("method", BASELINES)
def test_each_baseline_trains_and_its_models_change(tmp_path, method):
    t = _trainer(tmp_path, method, "train.rounds=2")
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    after = t.model.state_dict()
    changed = [k for k in before if k.startswith("clients.") and not torch.equal(before[k], after[k])]
    assert changed, "no client weight moved"
    for i in range(len(t.model.clients)):  # every client holds (and trained) whole networks
        assert any(k.startswith(f"clients.{i}.nets.G.") for k in changed)
        assert any(k.startswith(f"clients.{i}.nets.D.") for k in changed)
    assert all(c.cuts.hg == 3 and c.cuts.hd == 3 for c in t.model.clients)  # nothing runs on a server
    rows = read_metrics(tmp_path / method)
    assert [r["method"] for r in rows] == [method, method]
    # every method's simulated latency (issue 28): its iterations, and its syncs and epoch ends
    assert all(r["latency_s_per_iteration"] > 0 and r["latency_s_round"] >= 2 * r["latency_s_per_iteration"]
               for r in rows)
    assert all(np.isfinite(r["loss_d"]) and np.isfinite(r["loss_g"]) for r in rows)
    if method == "centralized":
        assert len(t.model.clients) == 2 and sorted(len(d) for d in t.setup.data) == [1437, 1437]
    if method == "mdgan":  # one generator for everyone, discriminators still one per client
        g = [dict(c.nets["G"].named_parameters()) for c in t.model.clients]
        assert all(g[0][k] is gi[k] for gi in g for k in g[0])
        assert not torch.equal(after["clients.0.nets.D.0.conv.0.weight"], after["clients.1.nets.D.0.conv.0.weight"])


@pytest.mark.parametrize("method", ["huscf", *BASELINES])
def test_no_method_reads_another_clients_data(tmp_path, method):
    t = _trainer(tmp_path, method, "train.rounds=1")
    markers = [-0.95 + 0.05 * i for i in range(len(t.engine.data))]
    for d, m in zip(t.engine.data, markers):
        d.x.fill_(m)  # client i's real images are all the value markers[i]
    seen = {i: set() for i in range(len(markers))}

    def hook(i):
        def record(_module, args):
            values = set(torch.unique(args[0]).tolist())
            seen[i].update(v for v in values if any(abs(v - m) < 1e-6 for m in markers))
        return record

    for i, c in enumerate(t.model.clients):
        c.nets["D"]["0"].register_forward_pre_hook(hook(i))
    t.engine.run_epoch(0, 0)
    for i, m in enumerate(markers):
        assert seen[i] and all(abs(v - m) < 1e-6 for v in seen[i]), (i, seen[i])


def test_centralised_beats_local_only_on_a_tiny_run(tmp_path):
    acc = {}
    for method in ("local", "centralized"):
        t = Trainer.new(build_config({}, ["model.width=0.25", "train.rounds=3", "train.local_epochs=1",
                                          "output.samples_every=0", f"method={method}"]), tmp_path / method,
                        quiet=True)
        t.fit()
        acc[method] = np.mean(list(read_metrics(tmp_path / method)[-1]["label_accuracy"].values()))
    assert acc["centralized"] > acc["local"] + 0.1, acc


def test_mdgan_swaps_discriminators_between_clients(tmp_path):
    t = _trainer(tmp_path, "mdgan", "train.rounds=1")
    for i, c in enumerate(t.model.clients):
        for p in c.nets["D"].parameters():
            p.data.fill_(float(i))
    t.engine.exchange("D", [1, 2, 0, 4, 5, 3])
    got = [next(c.nets["D"].parameters()).flatten()[0].item() for c in t.model.clients]
    assert got == [1, 2, 0, 4, 5, 3]


def test_hierarchical_and_personalised_aggregation():
    rng = np.random.default_rng(0)
    params = np.concatenate([rng.normal(0, 1, (3, 20)) * 0.01 + 1, rng.normal(0, 1, (3, 20)) * 0.01 - 1])
    state = RoundState(round=3, sizes=np.array([10, 20, 30, 10, 10, 40]), features=None, client_params=params)
    hfl = HierarchicalFedAvg().aggregate(state)
    assert hfl.info["edges"] in ([0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0])
    # each edge gets half of the global vote, split inside the edge by data size
    np.testing.assert_allclose(hfl.global_weights, [1 / 12, 2 / 12, 3 / 12, 1 / 12, 1 / 12, 4 / 12])
    pfl = PersonalizedSimilarity(0.1).aggregate(state)
    np.testing.assert_allclose(pfl.mixing.sum(1), 1)
    assert pfl.mixing[0, :3].sum() > 0.99 and pfl.mixing[5, 3:].sum() > 0.99  # like mixes with like


def test_personalised_mixing_is_applied_per_client(tmp_path):
    t = _trainer(tmp_path, "pflgan", "train.rounds=1")
    for i, c in enumerate(t.model.clients):
        for p in c.parameters():
            p.data.fill_(float(i))
    n = len(t.model.clients)
    mixing = np.eye(n) * 0.5 + 0.5 / n
    from huscf.federation.strategies import Aggregation
    apply_aggregation(t.model, Aggregation(np.arange(n), np.ones(n), np.ones(n) / n, mixing=mixing))
    expected = mixing @ np.arange(n)
    for i, c in enumerate(t.model.clients):
        assert all(torch.allclose(p, torch.full_like(p, expected[i])) for p in c.parameters())


def test_compare_resumes_and_tabulates(tmp_path):
    out = tmp_path / "cmp"
    args = dict(overrides=[*TINY, "train.rounds=1"], samples=50, tstr_samples=0, quiet=True)
    compare(None, ["fedgan", "huscf-homocuts"], out, **args)
    table = (out / "compare.md").read_text()
    assert "| fedgan | digits |" in table and "| huscf-homocuts | digits_inverted |" in table
    cuts = json.loads((out / "huscf-homocuts" / "clients.json").read_text())["clients"]
    assert {tuple(c["cuts"]) for c in cuts} == {(1, 0, 1, 0)}
    stamp = (out / "fedgan" / "eval.json").stat().st_mtime_ns
    compare(None, ["fedgan", "huscf-homocuts"], out, **args)  # everything done: nothing is redone
    assert (out / "fedgan" / "eval.json").stat().st_mtime_ns == stamp
    rows = (out / "compare.csv").read_text().splitlines()
    assert rows[0].startswith("method,domain") and len(rows) == 5
    latency = [dict(zip(rows[0].split(","), r.split(",")))["latency_s_iteration"] for r in rows[1:]]
    assert all(float(v) > 0 for v in latency)  # a latency for every method
    assert "latency_s_iteration" in table
    assert (out / "compare_scores.png").stat().st_size > 0
    # other evaluation settings: evaluated again (every client's generator), not trained again
    ckpt = (out / "fedgan" / "checkpoints" / "round_0001.pt").stat().st_mtime_ns
    compare(None, ["fedgan"], out, **args, every_client=True)
    ev = json.loads((out / "fedgan" / "eval.json").read_text())
    n = len(json.loads((out / "fedgan" / "clients.json").read_text())["clients"])
    assert ev["settings"]["every_client"] and [e["client"] for e in ev["final"]] == list(range(n))
    assert (out / "fedgan" / "checkpoints" / "round_0001.pt").stat().st_mtime_ns == ckpt
    assert f"| fedgan | digits | {n // 2} |" in (out / "compare.md").read_text()  # every client's generator


def test_parallel_compare_equals_one_method_at_a_time(tmp_path, capsys):
    """--jobs 2 trains two methods at once, one thread each; every checkpoint tensor and every
    table value equals a one-at-a-time compare with one thread (issue 31)."""
    from huscf.rundir import RunDir

    args = dict(samples=50, tstr_samples=0)
    compare(None, ["fedgan", "huscf-homocuts"], tmp_path / "seq", [*TINY, "train.rounds=1", "train.threads=1"],
            jobs=1, quiet=True, **args)
    compare(None, ["fedgan", "huscf-homocuts"], tmp_path / "par", [*TINY, "train.rounds=1"], jobs=2, **args)
    assert "2 methods, 2 at a time, 1 torch thread each" in capsys.readouterr().err
    for name in ["fedgan", "huscf-homocuts"]:
        seq, par = (RunDir(tmp_path / mode / name) for mode in ("seq", "par"))
        assert [r.threads for r in par.read_rounds()] == [[1] * len(par.read_rounds()[0].threads)]
        a, b = (torch.load(run.path / "checkpoints" / "round_0001.pt", weights_only=False) for run in (seq, par))
        flat_a, flat_b = _tensors(a), _tensors(b)
        assert flat_a.keys() == flat_b.keys() and len(flat_a) > 10
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), name
    tables = [[row.rsplit(",", 1)[0] for row in (tmp_path / mode / "compare.csv").read_text().splitlines()]
              for mode in ("seq", "par")]  # every column but the last, train_seconds
    assert tables[0] == tables[1] and len(tables[0]) == 5


def _tensors(obj, prefix="") -> dict:
    """Every tensor of a nested checkpoint, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def test_a_bad_jobs_count_is_one_line(tmp_path, capsys):
    assert main(["compare", "--methods", "fedgan", "--jobs", "0", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--jobs" in err and "positive count or 'auto'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv, needle", [
    (["train", "--set", "method=mdgann"], "config key 'method'"),
    (["compare", "--methods", "fedgan", "nope", "--out", "{tmp}/c"], "unknown method 'nope'"),
    (["train", "--set", "method=hflgan", "--set", "data.clients_per_domain=1", "--set", "data.domains=[digits]",
      "--out", "{tmp}/r"], "needs at least 3 clients"),
])
def test_bad_method_input_is_one_line(tmp_path, capsys, argv, needle):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_fedgan_averages_every_k_steps_and_every_agent_takes_every_step(tmp_path):
    """Issue 28: FedGAN (Rasouli et al. 2020) averages G and D over all agents every K local steps,
    every agent taking the same number of steps. On unequal partitions (80, 53, ... samples: 5 and
    3 batches) what it degenerated into (one average a round, small clients sitting out once their
    data is used up) fails both checks."""
    t = _trainer(tmp_path, "fedgan", "train.rounds=1", "train.max_iters_per_epoch=null", "data.scenario=noniid",
                 "data.limit_per_domain=240", "baselines.fedgan_sync_every=2")
    n = len(t.model.clients)
    assert sorted({len(d) // 16 for d in t.engine.data}) == [3, 5]
    takers, equal_after_sync = [], []
    iteration, federate = t.engine.iteration, t.engine.federate

    def spy_iteration(batch, *args, **kwargs):
        takers.append(sorted(batch))
        return iteration(batch, *args, **kwargs)

    def spy_federate(*args, **kwargs):
        out = federate(*args, **kwargs)
        first = t.model.clients[0].state_dict()
        equal_after_sync.append(all(torch.equal(v, c.state_dict()[k])
                                    for c in t.model.clients for k, v in first.items()))
        return out

    t.engine.iteration, t.engine.federate = spy_iteration, spy_federate
    t.fit()
    assert takers == [list(range(n))] * 5  # every agent in every one of the epoch's 5 steps
    assert equal_after_sync == [True, True, True]  # after steps 2 and 4, and at the round end
    assert read_metrics(tmp_path / "fedgan")[0]["federation"]["syncs_before_round_end"] == 2


def test_mdgan_sends_discriminator_parameters_only_and_averages_the_feedback(tmp_path):
    """Hardy et al. 2019 (Alg. 1): a swap sends D's parameters only (each client keeps its own Adam
    state), and the server's generator steps on the mean of its workers' feedback, not the sum."""
    t = _trainer(tmp_path, "mdgan", "train.rounds=1", "train.max_iters_per_epoch=1")
    n = len(t.model.clients)
    g_params = list(t.model.client_parameters(0, "G"))
    summed, stepped = [], []
    backward, g_opt = t.engine.backward, t.engine.server_opts["G"]

    def spy_backward(i, loss, what, where):
        out = backward(i, loss, what, where)
        if what == "generator" and i == max(t.engine._clients):  # every client's feedback is in
            summed.append([p.grad.clone() for p in g_params])
        return out

    def spy_step(original=g_opt.step):
        stepped.append([p.grad.clone() for p in g_params])
        return original()

    t.engine.backward, g_opt.step = spy_backward, spy_step
    t.method.after_epoch = lambda *a: None  # the swap is checked below, on a known state
    t.fit()
    for s, m in zip(summed[0], stepped[0]):
        torch.testing.assert_close(m, s / n, rtol=0, atol=0)  # the division is exact in IEEE: same bits
    own_states = [{k: v.clone() for k, v in o["D"].state_dict()["state"][0].items()} for o in t.engine.client_opts]
    t.engine.exchange("D", [1, 2, 0, 4, 5, 3], optimiser_state=False)
    for i, o in enumerate(t.engine.client_opts):  # the receiving client's Adam state stays its own
        for k, v in o["D"].state_dict()["state"][0].items():
            assert torch.equal(v, own_states[i][k])
