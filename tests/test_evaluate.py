"""``huscf evaluate``: which generators, what it writes, and its bad-input handling."""

import csv
import json

import pytest
import torch

from huscf.cli import main
from huscf.config import build_config
from huscf.errors import HuscfError
from huscf.metrics.evaluate import cluster_generators, evaluate_run
from huscf.rundir import EvalSettings
from huscf.trainer import Trainer

TINY = ["data.clients_per_domain=2", "model.width=0.125", "train.rounds=3", "train.local_epochs=1",
        "train.batch_size=32", "train.max_iters_per_epoch=2", "federation.warmup_rounds=1",
        "output.samples_per_class=2", "cuts.method=random"]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture()
def tiny_run(tmp_path, monkeypatch, cache_env):
    monkeypatch.setenv("HUSCF_CACHE", str(cache_env))
    run = tmp_path / "run"
    Trainer.new(build_config({}, TINY), run, quiet=True).fit()
    return run


def test_cluster_generators_score_every_domain_of_every_cluster():
    gens = cluster_generators([0, 0, 0, 1, 1], ["a", "b", "b", "a", "a"], 4)
    assert [(g.cluster, g.client, g.domain, g.members) for g in gens] == [
        (0, 0, "a", [0, 1, 2]), (0, 1, "b", [0, 1, 2]), (1, 3, "a", [3, 4])]
    assert cluster_generators([0, 1], ["a", "b"], 1, client=1)[0].domain == "b"
    with pytest.raises(HuscfError, match="--client 5"):
        cluster_generators([0, 1], ["a", "b"], 1, client=5)


def test_evaluate_writes_json_csv_and_grids(tiny_run):
    evaluate_run(tiny_run, EvalSettings(samples=200, tstr_samples=300, tstr_epochs=1, tstr_min_steps=60), quiet=True)
    ev = json.loads((tiny_run / "eval.json").read_text())
    rows = json.loads((tiny_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert ev["settings"]["rounds"] == [1, 2, 3]
    assert {p["round"] for p in ev["per_round"]} == {1, 2, 3}
    assert len(ev["final"]) == len(set(rows["clusters"]))
    for e in ev["final"]:
        assert 1.0 <= e["generation_score"] <= 10.0 and e["fid"] >= 0
        assert 0 <= e["tstr"]["accuracy"] <= 1 and e["real_ceiling"]["train_images"] == 300
        assert e["real_ceiling"]["accuracy"] > e["tstr"]["accuracy"]  # 3 tiny rounds cannot match real data
    assert set(ev["classifiers"]) == {"digits", "digits_inverted"}
    assert ev["inception_fid"]["available"] in (True, False) and ev["inception_fid"]["reason"]
    table = list(csv.DictReader((tiny_run / "eval.csv").open()))
    assert len(table) == len(ev["final"]) and float(table[0]["tstr_accuracy"]) == ev["final"][0]["tstr"]["accuracy"]
    for d, path in ev["samples"].items():
        assert (tiny_run / path).stat().st_size > 0
    assert not (tiny_run / ".eval.tmp").exists()


def test_evaluate_runs_on_the_runs_thread_policy(tmp_path, monkeypatch, cache_env):
    """A run that asked for one thread is evaluated on one, whatever torch had before."""
    import huscf.metrics.evaluate as evaluate

    monkeypatch.setenv("HUSCF_CACHE", str(cache_env))
    run = tmp_path / "run"
    Trainer.new(build_config({}, [*TINY, "train.rounds=1", "train.threads=1"]), run, quiet=True).fit()
    seen, before, fid = [], torch.get_num_threads(), evaluate.classifier_fid
    monkeypatch.setattr(evaluate, "classifier_fid",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or fid(*a, **k))
    torch.set_num_threads(2)
    try:
        evaluate_run(run, EvalSettings(samples=50, tstr_samples=0), quiet=True)
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}, seen


def test_evaluate_one_client_and_selected_rounds(tiny_run, capsys):
    assert main(["evaluate", str(tiny_run), "--rounds", "2,3", "--client", "3", "--samples", "100",
                 "--tstr-samples", "0", "--quiet"]) == 0
    ev = json.loads((tiny_run / "eval.json").read_text())
    assert [(p["round"], p["client"]) for p in ev["per_round"]] == [(2, 3), (3, 3)]
    assert ev["final"][0]["tstr"] is None and ev["final"][0]["domain"] == "digits_inverted"


def test_evaluate_bad_input(tiny_run, tmp_path, capsys):
    def fails(argv, pattern):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and pattern in err, err

    fails(["evaluate", str(tmp_path / "nothing")], "not a huscf run directory")
    fails(["evaluate", str(tiny_run), "--rounds", "9"], "no checkpoint for round(s) [9]")
    fails(["evaluate", str(tiny_run), "--rounds", "every:0"], "--rounds every:N needs a whole number N >= 1")
    fails(["evaluate", str(tiny_run), "--fid-reference", "heldout", "--quiet"],
          "--fid-reference heldout needs a run with data.limit_per_domain set")
    config = (tiny_run / "config.yaml").read_text()
    (tiny_run / "config.yaml").write_text(config.replace("width: 0.125", "width: 0.25"))
    fails(["evaluate", str(tiny_run), "--quiet", "--tstr-samples", "0", "--samples", "10"],
          "checkpoint in")  # which round's checkpoint, and below why
    fails(["evaluate", str(tiny_run), "--quiet", "--tstr-samples", "0", "--samples", "10"],
          "does not fit the model of this run's config ('clients.0.nets.G.0.fc.weight' is (")
    (tiny_run / "config.yaml").write_text(config)
    clients = (tiny_run / "clients.json").read_text()
    (tiny_run / "clients.json").write_text(clients[: len(clients) // 2])
    fails(["evaluate", str(tiny_run)], "clients.json: damaged or not written by huscf train")
    (tiny_run / "clients.json").write_text(clients)
    last = sorted((tiny_run / "checkpoints").glob("*.pt"))[-1]
    last.write_bytes(last.read_bytes()[:500])
    fails(["evaluate", str(tiny_run), "--quiet", "--rounds", "last", "--tstr-samples", "0", "--samples", "10"],
          "round_0003.pt: its SHA-256 does not match")
    for ckpt in (tiny_run / "checkpoints").iterdir():
        ckpt.rename(tmp_path / ckpt.name)
    fails(["evaluate", str(tiny_run), "--quiet"], "no finished round with a checkpoint")
    assert not (tiny_run / "eval.json").exists()


def test_heldout_fid_compares_with_training_images_the_run_did_not_use(tmp_path, monkeypatch, cache_env):
    """The same generator's FID against the test split and against held-out training images differ
    (other images), the setting is recorded, and a limit that leaves too few images is refused."""
    monkeypatch.setenv("HUSCF_CACHE", str(cache_env))
    run = tmp_path / "run"
    Trainer.new(build_config({}, [*TINY, "train.rounds=1", "data.limit_per_domain=300"]), run, quiet=True).fit()
    fids = {}
    for ref in ("test", "heldout"):
        evaluate_run(run, EvalSettings(samples=100, tstr_samples=0, fid_reference=ref), quiet=True)
        ev = json.loads((run / "eval.json").read_text())
        assert ev["settings"]["fid_reference"] == ref
        fids[ref] = [e["fid"] for e in ev["final"]]
    assert all(a != b for a, b in zip(fids["test"], fids["heldout"]))
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("limit_per_domain: 300", "limit_per_domain: 1400"))
    with pytest.raises(HuscfError, match="fewer than 500: lower the limit"):
        evaluate_run(run, EvalSettings(samples=100, tstr_samples=0, fid_reference="heldout"), quiet=True)


def test_non_finite_weights_are_refused_and_nothing_is_written(tiny_run, capsys):
    path = tiny_run / "checkpoints" / "round_0003.pt"
    state = torch.load(path, weights_only=False)
    for k, v in state["engine"]["model"].items():
        if k.startswith("clients.") and ".nets.G.0." in k and v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(state, path)
    (tiny_run / "checkpoints" / "round_0003.pt.json").unlink()  # as a run from before checksums had it
    assert main(["evaluate", str(tiny_run), "--rounds", "last", "--samples", "50", "--tstr-samples", "0",
                 "--quiet"]) == 2
    assert "round_0003.pt: not signed" in capsys.readouterr().err  # refused unless the user allows it
    assert main(["evaluate", str(tiny_run), "--rounds", "last", "--samples", "50", "--tstr-samples", "0",
                 "--quiet", "--allow-unsigned"]) == 2
    err = capsys.readouterr().err
    assert "round 3's checkpoint" in err and "holds values that are not finite" in err
    assert not (tiny_run / "eval.json").exists() and not (tiny_run / "eval_samples").exists()


def test_a_generator_that_emits_nan_from_finite_weights_is_refused():
    """A generator with finite weights can still emit NaN: sampling checks what it emits, too."""
    from huscf.metrics.evaluate import sample_generator
    from huscf.models import build_architecture

    arch = build_architecture("cgan28", 0.125, 10)
    class Sqrt(torch.nn.Module):  # no weights: the square root of a negative number is NaN
        def forward(self, x):
            return torch.sqrt(x - 2)

    g = arch.generator()
    g.blocks[-1] = torch.nn.Sequential(g.blocks[-1], Sqrt())  # tanh's output minus 2 is negative
    assert all(torch.isfinite(p).all() for p in g.parameters())
    with pytest.raises(HuscfError, match="client 3's generator emitted non-finite values"):
        sample_generator(g, 10, arch.z_dim, 20, seed=0, what="client 3's generator")


def test_training_records_the_generation_score_when_asked(tmp_path, monkeypatch, cache_env):
    monkeypatch.setenv("HUSCF_CACHE", str(cache_env))
    run = tmp_path / "run"
    Trainer.new(build_config({}, TINY + ["output.eval_every=2", "output.eval_samples=100"]), run, quiet=True).fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "generation_score" not in rows[0] and "generation_score" not in rows[2]
    assert set(rows[1]["generation_score"]) <= {"digits", "digits_inverted"}
    assert all(1.0 <= v <= 10.0 for v in rows[1]["generation_score"].values())


def test_cluster_generators_every_client():
    gens = cluster_generators([0, 0, -1, 1], ["a", "b", "b", "a"], 4, every_client=True)
    assert [(g.cluster, g.client, g.domain, g.members) for g in gens] == [
        (0, 0, "a", [0, 1]), (0, 1, "b", [0, 1]), (1, 3, "a", [3])]  # client 2 took no part in round 4


@pytest.mark.parametrize("method, distinct", [("fedgan", 2), ("local", 4)])
def test_every_client_is_scored_on_all_classes_and_identical_generators_once(
        tmp_path, monkeypatch, cache_env, method, distinct):
    """FedGAN's four clients share one model (one TSTR per domain); local-only's are all different."""
    monkeypatch.setenv("HUSCF_CACHE", str(cache_env))
    run = tmp_path / "run"
    Trainer.new(build_config({}, TINY + [f"method={method}"]), run, quiet=True).fit()
    import huscf.metrics.evaluate as evaluate

    calls = {"tstr": [], "ceiling": 0}
    real_tstr, real_ceiling = evaluate.tstr, evaluate.real_ceiling

    def counting_tstr(xs, ys, *args, **kwargs):
        calls["tstr"].append(sorted(ys.unique().tolist()))
        return real_tstr(xs, ys, *args, **kwargs)

    def counting_ceiling(*args, **kwargs):
        calls["ceiling"] += 1
        return real_ceiling(*args, **kwargs)

    monkeypatch.setattr(evaluate, "tstr", counting_tstr)
    monkeypatch.setattr(evaluate, "real_ceiling", counting_ceiling)
    evaluate_run(run, EvalSettings(samples=100, tstr_samples=300, tstr_epochs=1, tstr_min_steps=20, every_client=True),
                 rounds="last", quiet=True)
    ev = json.loads((run / "eval.json").read_text())
    assert [e["client"] for e in ev["final"]] == [0, 1, 2, 3] and ev["settings"]["every_client"]
    assert len(calls["tstr"]) == distinct and calls["ceiling"] == 2  # one real ceiling per domain
    assert all(classes == list(range(10)) for classes in calls["tstr"])  # every class asked for
    by_domain = {}
    for e in ev["final"]:
        by_domain.setdefault(e["domain"], []).append(e["tstr"]["accuracy"])
    if method == "fedgan":  # identical generators: identical, shared scores
        assert all(len(set(v)) == 1 for v in by_domain.values())
