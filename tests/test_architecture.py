"""The package's shape: imports run one way, no cycles, no private name crosses a package, and a
method is one registered class (a toy one trains through the trainer, config and CLI)."""

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import numpy as np
import pytest
from conftest import REPO_ROOT, read_metrics

from huscf.cli import build_parser
from huscf.config import build_config
from huscf.errors import HuscfError
from huscf.federation.strategies import Aggregation, RoundState
from huscf.methods import Method, get_method, method_names, register, unregister
from huscf.trainer import Trainer

PACKAGE = REPO_ROOT / "huscf"


def test_layers_contract_is_kept():
    """pyproject.toml's import-linter contract (the layers README 'Layout' describes)."""
    out = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                          "lint_imports_command()"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter[0]
                counter[0] += 1
                stack.append(node)
                on_stack.add(node)
            succ = edges.get(node, [])
            if i < len(succ):
                work.append((node, i + 1))
                nxt = succ[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


def test_no_import_cycle_between_modules():
    graph = grimp.build_graph("huscf")
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    """The check above can fail: a two-module loop and a three-module loop are both found."""
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.a"), ("p.c", "p.d"), ("p.d", "p.e"), ("p.e", "p.c"), ("p.e", "p.f")):
        graph.add_import(importer=a, imported=b)
    assert sorted(_cycles(graph)) == [["p.a", "p.b"], ["p.c", "p.d", "p.e"]]


def _package_of(module: str) -> str:
    """huscf.federation.weights -> huscf.federation; huscf.cli -> huscf.cli (a top-level module is its own)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _private_imports(path: Path, module: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("huscf") and node.level == 0:
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and _package_of(node.module) != _package_of(module):
                    found.append(f"{module} imports {alias.name} from {node.module}")
    return found


def test_no_private_name_is_imported_across_packages():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
        bad += _private_imports(path, module)
    assert bad == []


def test_the_private_import_check_can_fail(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from huscf.engines.simulation import _hidden\nfrom huscf.runtime.actors import _leaf\n")
    assert _private_imports(src, "huscf.runtime.driver") == [
        "huscf.runtime.driver imports _hidden from huscf.engines.simulation"]


# -- a method is one class -----------------------------------------------------------------------------
class _HalfWay:
    """A toy round end: every client moves to the size-weighted mean (one group), and the record
    says so."""

    name = "halfway"
    uses_client_params = False

    def aggregate(self, state: RoundState) -> Aggregation:
        w = np.asarray(state.sizes, dtype=float)
        w = w / w.sum()
        return Aggregation(np.zeros(len(w), dtype=int), w, w, {"phase": "toy", "k": 1})


class ToyMethod(Method):
    name = "toy-fedavg"
    title = "a toy method registered by a test"
    shares = "whole G and D weights"
    epochs_seen: list = []

    def strategy(self, cfg):
        return _HalfWay()

    def after_epoch(self, engine, cfg, round_no, epoch):
        ToyMethod.epochs_seen.append((round_no, epoch))


@pytest.fixture
def toy():
    register(ToyMethod)
    ToyMethod.epochs_seen = []
    yield ToyMethod
    unregister(ToyMethod.name)


def test_a_registered_method_trains_through_config_trainer_and_cli(toy, tmp_path):
    assert "toy-fedavg" in method_names() and isinstance(get_method("toy-fedavg"), ToyMethod)
    assert "toy-fedavg" in _compare_help()  # the CLI help reads the registry
    cfg = build_config({}, ["method=toy-fedavg", "data.clients_per_domain=2", "model.width=0.125",
                            "train.rounds=1", "train.local_epochs=2", "train.batch_size=16",
                            "train.max_iters_per_epoch=2", "output.samples_every=0"])
    t = Trainer.new(cfg, tmp_path / "run", quiet=True)
    assert all(c.cuts.hg == 3 and c.cuts.hd == 3 for c in t.model.clients)  # not split: whole networks
    t.fit()
    (row,) = read_metrics(tmp_path / "run")
    assert row["method"] == "toy-fedavg" and row["federation"] == {"phase": "toy", "k": 1}
    assert row["clusters"] == [0, 0, 0, 0]
    assert ToyMethod.epochs_seen == [(1, 0), (1, 1)]
    first = t.model.clients[0].state_dict()
    for c in t.model.clients[1:]:  # one group: every client now holds the same averaged weights
        for k, v in c.state_dict().items():
            assert np.array_equal(v.numpy(), first[k].numpy()), k


def _compare_help() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["compare"].format_help()


def test_an_unregistered_method_is_one_config_error(toy):
    unregister(ToyMethod.name)
    with pytest.raises(HuscfError, match=r"config key 'method': got 'toy-fedavg', must be one of huscf, fedgan"):
        build_config({}, ["method=toy-fedavg"])


def test_registering_checks_the_class():
    class Nameless(Method):
        title = "no name"
        shares = "nothing"

    with pytest.raises(TypeError, match="needs a non-empty string 'name'"):
        register(Nameless)

    class Clash(Method):
        name = "huscf"
        title = "a second huscf"
        shares = "nothing"

    with pytest.raises(ValueError, match="registered already"):
        register(Clash)


def test_the_configs_choices_are_the_registries_names(monkeypatch):
    """Issue 27: a key whose values a registry holds (architectures, cut searches, strategies,
    scenarios, methods) takes exactly that registry's names: adding an entry makes it a valid
    value with no edit to config.py, and a typo names the registry's choices in one line."""
    from huscf.cuts.search import SOLVERS
    from huscf.data.partition import SCENARIOS
    from huscf.federation.strategies import STRATEGIES, FedAvg, make_strategy
    from huscf.models.cgan import ARCHITECTURES

    cases = [("model.arch", ARCHITECTURES, "cgan28-toy", ARCHITECTURES["cgan28"]),
             ("cuts.method", SOLVERS, "toy-search", SOLVERS["ga"]),
             ("federation.strategy", STRATEGIES, "toy-strategy", lambda fed: FedAvg()),
             ("data.scenario", SCENARIOS, "toy-skew", SCENARIOS["noniid"])]
    for key, registry, name, entry in cases:
        with pytest.raises(HuscfError, match=rf"^config key '{key}': got '{name}', must be one of .*\b"
                                             rf"{list(registry)[0]}\b") as bad:
            build_config({}, [f"{key}={name}"])
        assert "\n" not in str(bad.value) and name not in str(bad.value).split("must be one of")[1]
        monkeypatch.setitem(registry, name, entry)
        cfg = build_config({}, [f"{key}={name}"])
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == name
    assert isinstance(make_strategy(build_config({}, ["federation.strategy=toy-strategy"]).federation), FedAvg)


def test_data_domains_take_the_dataset_registrys_names(monkeypatch):
    """Issue 27: each name in data.domains is checked against ``DOMAINS`` when the config is read, not
    when the data loads: a typo is one line naming the known domains; a new entry is valid at once."""
    from huscf.data import sources

    with pytest.raises(HuscfError, match=r"^config key 'data\.domains\.1': got 'nosuch', must be one of mnist, "
                                         r"fashion_mnist, .*\bdigits_rotated$") as bad:
        build_config({}, ["data.domains=[mnist, nosuch]"])
    assert "\n" not in str(bad.value)
    monkeypatch.setitem(sources.DOMAINS, "nosuch", sources.DOMAINS["digits"])
    assert build_config({}, ["data.domains=[mnist, nosuch]"]).data.domains == ["mnist", "nosuch"]
