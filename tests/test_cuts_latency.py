"""The latency model, hand-checked on a two-client example, and the profiles / assignment."""

import math
from dataclasses import replace

import pytest

from huscf.cuts import LatencyModel, assign_devices, evaluate_latency, load_profiles
from huscf.cuts.devices import DeviceProfile, ServerProfile
from huscf.cuts.profile import ArchProfile, NetProfile
from huscf.split.plan import Cuts


def test_two_clients_by_hand():
    g = NetProfile(fwd_flops=(1e6, 2e6, 3e6, 4e6), bwd_flops=(2e6, 4e6, 6e6, 8e6), out_bytes=(100, 200, 300, 400))
    d = NetProfile(fwd_flops=(1e5, 2e5, 3e5), bwd_flops=(2e5, 4e5, 6e5), out_bytes=(50, 60, 70))
    a = DeviceProfile("a", cpu_mhz=1, flops_per_cycle=1, data_rate=100)  # 1e6 FLOP/s, 100 B/s
    b = DeviceProfile("b", cpu_mhz=2, flops_per_cycle=1, data_rate=200)  # 2e6 FLOP/s, 200 B/s
    server = ServerProfile(computational_frequency_ghz=0.001, flops_per_cycle=10, transmission_rate_bps=1000)
    model = LatencyModel(ArchProfile(g, d, batch_size=1), [a, b], server, alpha=1.0, gamma=0.5)
    rep = model.report([Cuts(1, 0, 0, 0), Cuts(0, 0, 0, 0)])
    expected = {
        # G, one pass. a: head g0+g1, server g2, tail g3. b: head g0, server g1+g2, tail g3.
        "g_fwd_head": max(3 + 200 / 100, 0.5 + 100 / 200),  # 5
        "g_fwd_server": 3e6 / 1e7 + 5e6 / 1e7,  # 0.8
        "g_fwd_tail": max(300 / 1000 + 4, 300 / 1000 + 2),  # 4.3
        "g_bwd_tail": max(8 + 300 / 100, 4 + 300 / 200),  # 11
        "g_bwd_server": 6e6 / 1e7 + 10e6 / 1e7,  # 1.6
        "g_bwd_head": max(200 / 1000 + 6, 100 / 1000 + 1),  # 6.2
        # D, three passes, both clients head d0, server d1, tail d2
        "d_fwd_head": 3 * max(0.1 + 0.5, 0.05 + 0.25),
        "d_fwd_server": 3 * 2 * 0.02,
        "d_fwd_tail": 3 * max(0.06 + 0.3, 0.06 + 0.15),
        "d_bwd_tail": 3 * max(0.6 + 0.6, 0.3 + 0.3),
        "d_bwd_server": 3 * 2 * 0.04,
        "d_bwd_head": 3 * max(0.05 + 0.2, 0.05 + 0.1),
    }
    assert rep.stages == pytest.approx(expected)
    assert rep.total_s == pytest.approx(36.49)
    assert rep.server_s == pytest.approx(2.76)
    assert rep.objective == pytest.approx(33.73 + 0.5 * 2.76)
    assert rep.bytes_per_client == [2 * (200 + 300) + 6 * (50 + 60), 2 * (100 + 300) + 6 * (50 + 60)]
    assert rep.to_dict()["stages"] == rep.stages


def test_paper_profiles_and_assignment():
    server, devices = load_profiles("paper")
    assert server.flops_per_s == 42e9 * 16 and server.rate == 1e9
    assert [(d.cpu_mhz, d.flops_per_cycle, d.data_rate) for d in devices] == [
        (480, 1, 50e6), (6000, 8, 150e6), (15600, 8, 1e9), (5720, 8, 300e6), (4000, 4, 50e6),
        (9000, 4, 100e6), (12000, 10, 800e6)]
    rr = assign_devices(devices, 10)
    assert [d.name for d in rr[:8]] == [f"device{i}" for i in (1, 2, 3, 4, 5, 6, 7, 1)]
    sh = assign_devices(devices, 10, "shuffle", seed=1)
    assert sorted(d.name for d in sh) == sorted(d.name for d in rr) and sh == assign_devices(devices, 10, "shuffle", seed=1)
    assert [d.name for d in assign_devices(devices, 3, [2, "device7", 0])] == ["device3", "device7", "device1"]


def test_evaluate_latency_on_real_arch():
    server, devices = load_profiles("paper")
    rep = evaluate_latency("dcgan32", 16, [Cuts(0, 0, 0, 0), Cuts(1, 2, 3, 0)], devices[:2], server)
    assert math.isclose(rep.total_s, sum(rep.stages.values())) and rep.objective > 0
    assert all(b > 0 for b in rep.bytes_per_client)


def _toy_fleet(n=2):
    """Two blocks per net: G 10+20 / 1+2 FLOPs (fwd / bwd), D 100 / 10; weights 4+6 (G), 8 bytes (D)
    per block; devices of 10 and 5 FLOP/s, uploading at 2 and 1 bytes/s; the server at 100 FLOP/s,
    sending at 4 bytes/s."""
    from huscf.cuts.fleet import Fleet
    from huscf.cuts.profile import ArchProfile, NetProfile

    g = NetProfile((10, 20), (1, 2), (16, 64))
    d = NetProfile((100, 0), (10, 0), (4, 1))
    speeds = [(10, 2), (5, 1)][:n]
    devices = tuple(DeviceProfile(f"d{i}", mhz, 1e-6, rate) for i, (mhz, rate) in enumerate(speeds))
    return Fleet(ArchProfile(g, d, batch_size=2), devices, ServerProfile(1e-7, 1, 4), {"G": (4, 6), "D": (8, 0)})


def test_every_methods_latency_follows_its_formula():
    """docs/latency.md, "Every method", by hand on a toy fleet (issue 28)."""
    from huscf.methods import get_method

    fleet = _toy_fleet()
    compute = 1 * (30 + 3) + 3 * (110)  # G once, D three times, forward and backward
    whole = fleet.whole_networks()
    assert whole.total_s == pytest.approx(compute / 5)  # the slower device
    # a sync: 18 bytes up at 2 and 1 bytes/s (the slower ends it), then 18 bytes down at 4 bytes/s
    assert whole.sync_s == pytest.approx(18 / 1 + 18 / 4) and whole.sync_bytes == [36, 36]
    assert whole.round_s(iterations=10, syncs=3, epochs=2) == pytest.approx(10 * compute / 5 + 3 * (18 + 4.5))
    assert fleet.whole_networks(synchronises=False).sync_s == 0
    assert get_method("local").latency(fleet, [], None).round_s(10, 3, 2) == pytest.approx(10 * compute / 5)
    hfl = get_method("hflgan").latency(fleet, [], None)
    assert hfl.sync_s == pytest.approx(whole.sync_s + 2 * 8 / 4)  # the edge's D (8 bytes) to the global server
    pfl = get_method("pflgan").latency(replace(fleet, sizes=(10, 30)), [], None)
    # a round's start: 64 probe samples and half the client's size in peers' samples, each an image
    # (64 / 2 = 32 bytes) and its int64 label, up at the client's rate and down at the server's
    per_sample = 64 / 2 + 8
    assert pfl.sync_s == pytest.approx(max((64 + 5) * per_sample / 2, (64 + 15) * per_sample / 1)
                                       + (64 + 15) * per_sample / 4)
    assert pfl.total_s == whole.total_s and pfl.sync_bytes == [2 * (64 + 5) * per_sample, 2 * (64 + 15) * per_sample]
    md = get_method("mdgan").latency(fleet, [], None)
    server = 2 * 33 / 100  # G forward and backward on k = max(2, ceil(log2 2)) = 2 batches
    # client 1: two fake batches with their labels down (2 x (64 + 16) bytes at 4/s), D x3 (330 FLOPs
    # at 5/s), the feedback (64 bytes) up at 1/s
    assert md.total_s == pytest.approx(server + 40 + 66 + 64) and md.sync_s == 0
    assert md.epoch_s == pytest.approx(8 / 1 + 8 / 4)  # each D to a peer after an epoch
    assert md.bytes_per_client == [3 * 64 + 2 * 16] * 2


def test_huscf_latency_is_the_split_model_plus_its_segments_round_end():
    from huscf.cuts.fleet import build_fleet
    from huscf.methods import get_method
    from huscf.models import build_architecture

    server, profiles = load_profiles()
    devices = profiles[:2]
    arch = build_architecture("cgan28", 0.25)
    cuts = [Cuts(0, 0, 0, 0), Cuts(1, 1, 2, 0)]
    fleet = build_fleet(arch, 16, devices, server)

    class Cfg:
        class devices:
            client_time_weight, server_time_weight = 1.0, 0.5

    lat = get_method("huscf").latency(fleet, cuts, Cfg)
    rep = evaluate_latency(arch, 16, cuts, devices, server)
    assert lat.total_s == pytest.approx(rep.total_s) and lat.bytes_per_client == rep.bytes_per_client
    held = [sum(p.numel() * 4 for b in (0, 4) for p in arch.generator().blocks[b].parameters())
            + sum(p.numel() * 4 for b in (0, 4) for p in arch.discriminator().blocks[b].parameters())]
    assert fleet.segment_bytes(cuts)[0] == held[0]  # cuts (0,0,0,0): G's and D's first and last blocks
    assert fleet.segment_bytes(cuts)[1] > held[0]
