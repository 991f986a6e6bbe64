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
from huscf.federation.baselines import EdgeHierarchy
from huscf.federation.strategies import RoundState
from huscf.federation.synthetic import mmd2, peer_weights
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
        swap = rows[-1]["federation"]["swaps"]["0"]  # the epoch's swap, logged by its hook
        assert sorted(swap) == list(range(len(t.model.clients))) and all(i != j for i, j in enumerate(swap))
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


def test_edges_average_generators_per_edge_and_discriminators_over_edges(tmp_path):
    """HFL-GAN's round end on known samples: two groups of generators give two edges; G is averaged
    within an edge (one generator per edge), D over the edges' averages with one vote per edge."""
    rng = np.random.default_rng(0)
    samples = np.concatenate([rng.normal(1, 0.3, (3, 32, 8)), rng.normal(-1, 0.3, (3, 32, 8))])
    state = RoundState(round=3, sizes=np.array([10, 20, 30, 10, 10, 40]), features=None, client_samples=samples)
    agg = EdgeHierarchy(edges=2).aggregate(state)
    assert agg.info["edges"] in ([0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0])
    g, d = agg.mixing["G"], agg.mixing["D"]
    np.testing.assert_allclose(g[0], [1 / 6, 2 / 6, 3 / 6, 0, 0, 0])  # client 0's edge, by data size
    np.testing.assert_allclose(g[5], [0, 0, 0, 1 / 6, 1 / 6, 4 / 6])
    np.testing.assert_allclose(d, np.tile([1 / 12, 2 / 12, 3 / 12, 1 / 12, 1 / 12, 4 / 12], (6, 1)))
    one = EdgeHierarchy(edges=1).aggregate(state)  # one edge: FedAvg for every net
    np.testing.assert_allclose(one.mixing["G"], np.tile([1 / 12, 2 / 12, 3 / 12, 1 / 12, 1 / 12, 4 / 12], (6, 1)))


def test_peer_weights_follow_the_mmd_between_generators_samples():
    rng = np.random.default_rng(1)
    samples = [rng.normal(m, 1, (64, 10)) for m in (0, 0, 0, 3, 3, 3)]
    d2 = mmd2(samples)
    assert d2[0, 1] < 0.05 < 0.5 < d2[0, 3] and np.allclose(d2, d2.T) and not d2.diagonal().any()
    w = peer_weights(d2, 0.1)
    np.testing.assert_allclose(w.sum(1), 1)
    assert not w.diagonal().any() and w[0, 1:3].sum() > 0.99 and w[4, 3:6].sum() > 0.99
    np.testing.assert_allclose(peer_weights(np.zeros((3, 3)), 0.1), (1 - np.eye(3)) / 2)  # all alike: uniform


SKEWED = ["data.scenario=noniid", "data.clients_per_domain=3", "train.max_iters_per_epoch=8",
          "train.rounds=2", "train.local_epochs=2"]


def test_pflgan_gives_each_client_synthetic_data_mostly_from_its_own_domain(tmp_path):
    """PFL-GAN is not local-only: from round 2 each client trains on its data plus peers' synthetic
    samples (given to the engine, with labels), and the similarity learnt from the generators'
    samples puts most of a client's weight on the peers of its own domain (two label-skewed domains)."""
    t = _trainer(tmp_path, "pflgan", *SKEWED)
    assert t.engine.equal_steps  # generators compared after equally many steps (docs/results.md)
    given = []
    give = t.engine.give
    t.engine.give = lambda data: given.append({i: len(y) for i, (x, y) in data.items()}) or give(data)
    t.fit()
    fed = read_metrics(tmp_path / "pflgan")[1]["federation"]
    n, sizes = len(t.model.clients), [len(d) for d in t.setup.data]
    # every epoch of round 2, half as many samples as the client's own
    assert given == [given[0]] * 2 and given[0] == {i: round(0.5 * sizes[i]) for i in range(n)}
    w, domains = np.array(fed["peer_weights"]), np.array(t.true_domains)
    same = (domains[:, None] == domains[None, :]) & ~np.eye(n, dtype=bool)
    assert (w * same).sum(1).min() > 0.5, w.round(3)
    assert np.array(fed["given"]).sum(1).tolist() == [given[0][i] for i in range(n)]


def test_hflgan_edges_follow_the_domains_and_each_edge_keeps_its_generator(tmp_path):
    """HFL-GAN is not FedAvg: on two label-skewed domains the edges are the domains, and the run ends
    with one generator per edge (equal within an edge, different across) and one discriminator."""
    t = _trainer(tmp_path, "hflgan", *SKEWED)
    assert t.engine.equal_steps
    t.fit()
    rows = read_metrics(tmp_path / "hflgan")
    assert all(r["ari_vs_domains"] == 1.0 for r in rows), [r["federation"]["edges"] for r in rows]
    edges = rows[-1]["federation"]["edges"]
    g = [torch.cat([p.flatten() for p in c.nets["G"].parameters()]) for c in t.model.clients]
    d = [torch.cat([p.flatten() for p in c.nets["D"].parameters()]) for c in t.model.clients]
    for i in range(len(g)):
        for j in range(len(g)):
            assert torch.allclose(g[i], g[j]) == (edges[i] == edges[j])
            assert torch.allclose(d[i], d[j])


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
      "--out", "{tmp}/r"], "needs at least 2 clients"),
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


def test_mdgan_gives_each_worker_two_distinct_batches_with_server_drawn_labels(tmp_path):
    """Hardy et al. 2019 (Alg. 1, section IV-B1): every iteration the server draws k = max(2,
    ceil(log2 N)) batches with their labels; worker i's discriminator step takes batch (i + 1) mod k
    and its feedback batch i mod k (two distinct ones), and no real label conditions a fake."""
    t = _trainer(tmp_path, "mdgan", "train.rounds=1")
    n, k = len(t.model.clients), 3  # 6 workers: ceil(log2 6) = 3
    gen, dis, calls = t.model.generate, t.model.discriminate, {"G": [], "D": []}

    def spy_generate(i, z, y):
        calls["G"].append((i, z.clone(), y.clone()))
        return gen(i, z, y)

    def spy_discriminate(i, x, y, server_input=None):
        calls["D"].append((i, y.clone()))
        return dis(i, x, y, server_input)

    t.model.generate, t.model.discriminate = spy_generate, spy_discriminate
    real_labels = torch.zeros(16, dtype=torch.long)  # a fake conditioned on the real batch would be all 0
    batch = {i: (d.x[:16], real_labels) for i, d in enumerate(t.engine.data)}
    t.engine.iteration(batch, torch.Generator().manual_seed(0))
    step2, step3 = calls["G"][:n], calls["G"][n:]  # each worker's D-step fakes, then its feedback fakes
    assert [c[0] for c in calls["G"]] == list(range(n)) * 2
    batches = {(z.sum().item(), tuple(y.tolist())) for _, z, y in step2 + step3}
    assert len(batches) == k
    for i in range(n):
        assert not torch.equal(step2[i][1], step3[i][1])  # two distinct batches
        assert torch.equal(step2[i][1], step3[(i + 1) % n][1]) and torch.equal(step2[i][2], step3[(i + 1) % n][2])
        assert (step2[i][2] != 0).any() and (step3[i][2] != 0).any()  # labels drawn by the server
    # D's fake passes are conditioned on the fakes' labels, its real pass on the real ones
    fake_d, real_d = calls["D"][0:2 * n:2], calls["D"][1:2 * n:2]
    assert all(torch.equal(y, step2[i][2]) for i, y in fake_d) and all(not y.any() for _, y in real_d)
    assert all(torch.equal(y, step3[i][2]) for i, y in calls["D"][2 * n:])


def test_mdgan_batches_and_swap_interval_are_config_keys(tmp_path):
    t = _trainer(tmp_path, "mdgan", "train.rounds=1", "baselines.mdgan_batches=5", "baselines.mdgan_swap_every=2",
                 "train.local_epochs=3")
    assert t.engine.fake_inputs.k == 5
    moved = []
    t.engine.exchange = lambda net, perm, **kw: moved.append(net)
    for e in range(3):
        t.method.after_epoch(t.engine, t.cfg, 1, e)
    assert moved == ["D"]  # after the 2nd epoch only
    with pytest.raises(Exception, match="mdgan_batches"):
        build_config({}, ["baselines.mdgan_batches=1"])


@pytest.mark.parametrize("method", ["hflgan", "pflgan"])
def test_similarity_methods_take_equal_steps_unless_told_not_to(tmp_path, method):
    assert _trainer(tmp_path / "a", method, "train.rounds=1").engine.equal_steps
    assert not _trainer(tmp_path / "b", method, "train.rounds=1",
                        "baselines.similarity_equal_steps=false").engine.equal_steps
