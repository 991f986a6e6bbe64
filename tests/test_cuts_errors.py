"""Bad input: a one-line HuscfError naming the device / client and the field."""

import argparse

import pytest
import yaml

from huscf.cuts import assign_devices, evaluate_latency, load_profiles, plan_cuts
from huscf.cuts.cli import add_parser, run
from huscf.errors import HuscfError
from huscf.split.plan import Cuts

GOOD = {"server": {"computational_frequency_ghz": 42, "cpu_cycles_per_flop": 16, "transmission_rate_bps": 1e9},
        "phone": {"cpu_mhz": 6000, "flops_per_cycle": 8, "data_rate": 150e6}}


def write(tmp_path, data):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def raises(fn, *words):
    with pytest.raises(HuscfError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("device,field,value", [
    ("phone", "data_rate", 0), ("phone", "cpu_mhz", -5), ("phone", "flops_per_cycle", "fast"),
    ("server", "transmission_rate_bps", 0), ("server", "computational_frequency_ghz", -1)])
def test_bad_values(tmp_path, device, field, value):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    data[device][field] = value
    raises(lambda: load_profiles(write(tmp_path, data)), device, field)


def test_missing_and_unknown_keys(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    del data["phone"]["data_rate"]
    raises(lambda: load_profiles(write(tmp_path, data)), "phone", "data_rate", "missing")
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    data["phone"]["cpu_ghz"] = 3
    raises(lambda: load_profiles(write(tmp_path, data)), "phone", "cpu_ghz")
    raises(lambda: load_profiles(write(tmp_path, {"phone": GOOD["phone"]})), "server")
    raises(lambda: load_profiles(write(tmp_path, {"server": GOOD["server"]})), "no device")
    raises(lambda: load_profiles(tmp_path / "absent.yaml"), "absent.yaml")
    assert load_profiles(write(tmp_path, GOOD))[1][0].name == "phone"


def test_bad_cuts_and_fleets():
    server, devices = load_profiles("paper")
    raises(lambda: evaluate_latency("cgan28", 8, [Cuts(0, 0, 0, 0), Cuts(3, 0, 0, 0)], devices[:2], server),
           "client 1", "device2", "generator")
    raises(lambda: evaluate_latency("cgan28", 8, [Cuts(0, 0, 1, 2)], devices[:1], server), "client 0", "discriminator")
    raises(lambda: evaluate_latency("cgan28", 8, [Cuts(0, 0, 0, 0)], devices[:2], server), "2 clients")
    raises(lambda: assign_devices(devices, 0), "number of clients")
    raises(lambda: assign_devices([], 3), "no device")
    raises(lambda: assign_devices(devices, 2, [0, "laptop"]), "client 1", "laptop")
    raises(lambda: assign_devices(devices, 2, [0]), "2 clients")
    raises(lambda: plan_cuts("cgan28", 8, [], server), "no clients")
    raises(lambda: plan_cuts("cgan28", 8, devices * 3, server, method="brute"), "brute force")
    raises(lambda: plan_cuts("cgan28", 8, devices, server, method="annealing"), "annealing")
    raises(lambda: plan_cuts("nope", 8, devices, server), "nope")
    raises(lambda: plan_cuts("cgan28", 0, devices, server), "batch")
    raises(lambda: plan_cuts("cgan28", 8, devices, server, alpha=-1), "alpha")


def test_cli_bad_input():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    raises(lambda: run(parser.parse_args(["cuts", "--clients", "0"])), "clients")


def test_unknown_solver_option():
    server, devices = load_profiles("paper")
    raises(lambda: plan_cuts("cgan28", 8, devices, server, method="milp", population=5), "milp", "population")
    raises(lambda: plan_cuts("cgan28", 8, devices, server, method="ga", population=1), "population")


def test_the_servers_flops_per_cycle_reads_the_authors_name_too(tmp_path):
    """The paper's profiles call the server's FLOPs per cycle cpu_cycles_per_flop (GOOD uses it)."""
    ours = yaml.safe_load(yaml.safe_dump(GOOD))
    ours["server"]["flops_per_cycle"] = ours["server"].pop("cpu_cycles_per_flop")
    a, b = tmp_path / "authors.yaml", tmp_path / "ours.yaml"
    a.write_text(yaml.safe_dump(GOOD))
    b.write_text(yaml.safe_dump(ours))
    assert load_profiles(str(a)) == load_profiles(str(b))
    assert load_profiles(str(b))[0].flops_per_s == 42e9 * 16
    both = yaml.safe_load(yaml.safe_dump(GOOD))
    both["server"]["flops_per_cycle"] = 16
    b.write_text(yaml.safe_dump(both))
    with pytest.raises(HuscfError, match="give flops_per_cycle or the authors' cpu_cycles_per_flop, not both"):
        load_profiles(str(b))
