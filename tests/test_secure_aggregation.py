"""Secure aggregation (federation/secure.py): masked sums equal plain averaging, reveal nothing
one at a time, survive members that drop out, and refuse the methods they cannot serve."""

import numpy as np
import pytest
import torch

from conftest import read_metrics

from huscf.config import build_config
from huscf.errors import HuscfError
from huscf.federation.averaging import apply_aggregation
from huscf.federation.secure import (
    MaskingClient, block_vector, decode, encode, open_sums, plan_sums, secure_average,
)
from huscf.federation.strategies import Aggregation
from huscf.methods import build_strategy
from huscf.models import build_architecture
from huscf.split.plan import Cuts
from huscf.split.segments import SplitGAN
from huscf.trainer import Trainer
from numerics import assert_close64, fixed_point_bound

# heterogeneous cuts: every middle block of G and D is held by the server and by 2-4 clients
CUTS = [Cuts(0, 0, 0, 0), Cuts(1, 0, 1, 0), Cuts(1, 1, 2, 0), Cuts(2, 0, 1, 1), Cuts(2, 1, 2, 1)]


def _model(cuts=CUTS, seed=0):
    """Every client's and the server's copies made different (as after a round of training); in
    float64, so that plain and secure averages differ by the fixed point's rounding alone
    (tests/numerics.py rules 1 and 4)."""
    torch.manual_seed(seed)
    arch = build_architecture("cgan28", width=0.125)
    m = SplitGAN(arch.generator(), arch.discriminator(), cuts)
    with torch.no_grad():
        for v in m.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn_like(v) * 0.1)
    return m.double()


# the most a masked sum's fixed point moves an average: one rounding per holder (at most 5 here)
FIXED = fixed_point_bound(len(CUTS))


def _floats(m):
    return {k: v for k, v in m.state_dict().items() if v.is_floating_point()}


def _assert_same_clients(a, b, clients=None):
    fa, fb = _floats(a), _floats(b)
    for k in fa:
        if k.startswith("clients.") and (clients is None or int(k.split(".")[1]) in clients):
            assert_close64(fa[k], fb[k], extra=FIXED, msg=k)


def test_fedavg_equals_plain_averaging_with_heterogeneous_cuts():
    plain, secure = _model(), _model()
    w = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    agg = Aggregation(np.zeros(5, dtype=int), w, w)
    apply_aggregation(plain, agg)
    record = secure_average(secure, agg, list(range(5)), round_idx=3)
    fa, fb = _floats(plain), _floats(secure)
    for k in fa:  # every client block and every server block
        assert_close64(fa[k], fb[k], extra=FIXED, msg=k)
    assert record["opened"] == record["sums"] > 0 and record["closed"] == []
    assert not torch.equal(fa["server.nets.D.1.0.weight"], _floats(_model())["server.nets.D.1.0.weight"])


def test_clusters_average_their_holders_and_the_server_mixes_cluster_averages():
    plain, secure = _model(), _model()
    before = _model()
    groups = np.array([0, 0, 1, 1, 1])
    cw = np.array([0.4, 0.6, 0.2, 0.5, 0.3])
    gw = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    agg = Aggregation(groups, cw, gw)
    apply_aggregation(plain, agg)
    secure_average(secure, agg, list(range(5)), round_idx=0)
    _assert_same_clients(plain, secure)  # a cluster's holders get exactly the plain cluster average
    # the server's copy of D block 1 (held by clients 1 and 3 in cluster 0 / 1, client 2 and 4 hold
    # D blocks 1-2): each cluster's holder average with the cluster's summed global weight
    for net, b in (("D", 1), ("G", 1)):
        holders = [i for i in range(5) if before.clients[i].holds(net, b)]
        ref = block_vector(before.server.nets[net][str(b)])
        total = 0.0
        for g in (0, 1):
            pos = [i for i in holders if groups[i] == g]
            if len(pos) < 2:
                continue  # a lone holder's copy stays private: its share goes to the server's copy
            avg = sum(cw[i] * block_vector(before.clients[i].nets[net][str(b)]) for i in pos) / cw[pos].sum()
            ref = ref + gw[pos].sum() * (avg - block_vector(before.server.nets[net][str(b)]))
            total += 1
        assert total > 0
        assert_close64(block_vector(secure.server.nets[net][str(b)]), ref, extra=FIXED, msg=f"{net} block {b}")


def test_a_lone_holder_sends_nothing_and_keeps_its_copy():
    m = _model()
    before = _model()
    agg = Aggregation(np.arange(5), np.ones(5), np.full(5, 0.2))  # every client its own cluster
    plan = plan_sums(m, agg, list(range(5)), 0)
    assert plan.sums == ()  # nothing to open: every average would be one client's copy
    secure_average(m, agg, list(range(5)), 0)
    for k, v in _floats(m).items():
        torch.testing.assert_close(v, _floats(before)[k], rtol=0, atol=0, msg=k)
    # one cluster, but G block 2 is held by client 3 alone: its copy stays private, its global
    # weight goes to the server's own copy (plain averaging would mix client 3's copy in)
    lone = [Cuts(0, 0, 0, 0), Cuts(1, 0, 1, 0), Cuts(2, 0, 1, 0)]
    m, before = _model(lone), _model(lone)
    w = np.full(3, 1 / 3)
    secure_average(m, Aggregation(np.zeros(3, dtype=int), w, w), [0, 1, 2], 0)
    for name, v in m.server.nets["G"]["2"].state_dict().items():
        torch.testing.assert_close(v, before.server.nets["G"]["2"].state_dict()[name], rtol=0, atol=0)
    assert not torch.equal(m.server.nets["G"]["1"].state_dict()["0.weight"],
                           before.server.nets["G"]["1"].state_dict()["0.weight"])  # held by 1 and 2: mixed


def test_one_masked_vector_is_noise_and_the_masks_cancel_in_the_sum():
    m = _model()
    w = np.full(5, 0.2)
    plan = plan_sums(m, Aggregation(np.zeros(5, dtype=int), w, w), list(range(5)), 7)
    parties = {i: MaskingClient(i) for i in range(5)}
    directory = {i: p.public_key() for i, p in parties.items()}
    masked = {i: p.masked(plan, m.clients[i], directory) for i, p in parties.items()}
    k = next(k for k, s in enumerate(plan.sums) if s.net == "D" and s.block == 0)  # every client's D head
    s = plan.sums[k]
    plain = {i: encode(s.weights[s.members.index(i)] * block_vector(m.clients[i].nets["D"]["0"]), i, "")
             for i in s.members}
    for i in s.members:
        x = masked[i][k]
        assert (x != plain[i]).mean() > 0.99
        # fixed-point weights are small integers; the masked words spread over all of Z_{2^64}
        assert np.abs(decode(plain[i])).max() < 1 and np.abs(decode(x)).max() > 1e8
    total = sum(masked[i][k] for i in s.members[1:]) + masked[s.members[0]][k]
    np.testing.assert_array_equal(total, sum(plain[i] for i in s.members[1:]) + plain[s.members[0]])
    # a new key pair per round end: the same weights give different masked words
    again = MaskingClient(0).masked(plan, m.clients[0], directory | {0: MaskingClient(0).public_key()})
    assert (again[k] != masked[0][k]).mean() > 0.99


def test_dropouts_leave_sums_the_survivors_can_open():
    m, plain = _model(), _model()
    before = _model()
    w = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    agg = Aggregation(np.zeros(5, dtype=int), w, w)
    record = secure_average(m, agg, list(range(5)), 0, drop=frozenset({2}))
    # the survivors get plain averaging over the survivors; the dropped client keeps its weights
    survivors = [0, 1, 3, 4]
    apply_aggregation(plain, Aggregation(np.zeros(4, dtype=int), w[survivors] / w[survivors].sum(),
                                         w[survivors]), survivors)
    _assert_same_clients(plain, m, survivors)
    for k, v in _floats(m).items():
        if k.startswith("clients.2."):
            torch.testing.assert_close(v, _floats(before)[k], rtol=0, atol=0, msg=k)
    assert record["opened"] > 0
    # a sum whose only other member dropped stays closed: its survivor's copy is never opened
    two = _model([Cuts(1, 0, 1, 0), Cuts(1, 0, 1, 0), Cuts(0, 0, 0, 0)])
    kept = _model([Cuts(1, 0, 1, 0), Cuts(1, 0, 1, 0), Cuts(0, 0, 0, 0)])
    w3 = np.full(3, 1 / 3)
    record = secure_average(two, Aggregation(np.zeros(3, dtype=int), w3, w3), [0, 1, 2], 0, drop=frozenset({1}))
    assert record["closed"]  # e.g. G block 1, held by clients 0 and 1 only
    torch.testing.assert_close(two.clients[0].nets["G"]["1"].state_dict(), kept.clients[0].nets["G"]["1"].state_dict())


def test_a_survivor_does_not_reveal_a_seed_that_would_open_its_own_copy():
    m = _model([Cuts(1, 0, 1, 0), Cuts(1, 0, 1, 0), Cuts(0, 0, 0, 0)])
    w = np.full(3, 1 / 3)
    plan = plan_sums(m, Aggregation(np.zeros(3, dtype=int), w, w), [0, 1, 2], 0)
    parties = {i: MaskingClient(i) for i in range(3)}
    directory = {i: p.public_key() for i, p in parties.items()}
    only_two = {k for k, s in enumerate(plan.sums) if s.members == (0, 1)}
    shared = {k for k, s in enumerate(plan.sums) if s.members == (0, 1, 2)}
    assert only_two and shared
    revealed = parties[0].reveal(plan, {1}, directory)
    assert set(revealed) == shared and all(set(v) == {1} for v in revealed.values())
    # the server cannot open a sum it was not given every seed for
    masked = {i: parties[i].masked(plan, m.clients[i], directory) for i in (0, 2)}
    opened = open_sums(plan, masked, {0: revealed})
    assert {o.index for o in opened} == set()  # client 2 revealed nothing: every sum with 1 stays shut
    opened = open_sums(plan, masked, {0: revealed, 2: parties[2].reveal(plan, {1}, directory)})
    assert {o.index for o in opened} == shared


def test_a_sum_that_could_wrap_is_refused_before_masking():
    """Weights sum to 1, so a sum of copies below 2^30 stays below 2^30, inside the fixed point's
    2^31. Checking each weighted term alone let five terms of 2^29 (copies of 5 * 2^29) wrap."""
    m = _model()
    w = np.full(5, 0.2)
    plan = plan_sums(m, Aggregation(np.zeros(5, dtype=int), w, w), list(range(5)), 0)
    directory = {i: MaskingClient(i).public_key() for i in range(5)}
    with torch.no_grad():
        next(m.clients[0].nets["D"]["0"].parameters()).view(-1)[0] = 5 * 2.0 ** 29
    with pytest.raises(HuscfError, match="client 0's D block 0 has values that are not finite or above 1e"):
        MaskingClient(0).masked(plan, m.clients[0], directory)


def test_masks_are_the_chacha20_keystream():
    """RFC 8439, 2.4.2: the keystream of its key and nonce, block counter 1, begins with these
    bytes. The masks are ChaCha20 (``cryptography``), keyed per pair, sum and round."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    from huscf.federation.secure import _stream

    key = bytes(range(32))
    nonce = (1).to_bytes(4, "little") + bytes.fromhex("000000000000004a00000000")
    plain = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
             b"sunscreen would be it.")
    cipher = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(plain)
    assert cipher[:16].hex() == "6e2e359a2568f98041ba0728dd0d6981"
    words = _stream(key, 4)
    assert words.dtype == np.uint64 and len(set(words.tolist())) == 4
    np.testing.assert_array_equal(words, np.frombuffer(Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None)
                                                       .encryptor().update(bytes(32)), dtype="<u8"))
    assert not np.array_equal(_stream(bytes(32), 4), _stream(bytes(31) + b"\x01", 4))


def _own_word(m, plan, k, client):
    """Client ``client``'s unmasked fixed-point word for sum ``k``: what no server should learn."""
    s = plan.sums[k]
    return encode(s.weights[s.members.index(client)] * block_vector(m.clients[client].nets[s.net][str(s.block)]),
                  client, "")


def _unmask(word, client, k, plan, seeds: dict[int, bytes]):
    """``word`` of ``client`` with the pair masks of ``seeds`` (peer: per-sum seed) taken out."""
    from huscf.federation.secure import _stream

    for j, seed in seeds.items():
        mask = _stream(seed, word.size)
        word = word - mask if client < j else word + mask
    return word


class TestALyingServerOpensOneClientToday:
    """Secure aggregation here holds against a server that follows the protocol only (issue 30,
    item 3, docs/security.md "A server that lies"). Each test runs one of the three attacks of
    the issue and checks that it recovers one client's exact weighted copy: the exposure the docs
    state, pinned so that a change to it is seen. When the protocol of item 3 lands, each becomes
    a test that the attack fails with a clear error."""

    def _setup(self):
        m = _model()
        w = np.full(5, 0.2)
        plan = plan_sums(m, Aggregation(np.zeros(5, dtype=int), w, w), list(range(5)), 3)
        parties = {i: MaskingClient(i) for i in range(5)}
        directory = {i: p.public_key() for i, p in parties.items()}
        k = next(k for k, s in enumerate(plan.sums) if s.net == "D" and s.block == 0)  # every client's D head
        return m, plan, parties, directory, k

    def test_declaring_a_delivered_client_dropped(self):
        m, plan, parties, directory, k = self._setup()
        masked = {i: p.masked(plan, m.clients[i], directory) for i, p in parties.items()}  # client 0 delivered
        revealed = {i: parties[i].reveal(plan, {0}, directory) for i in range(1, 5)}  # "client 0 dropped"
        seeds = {i: bytes.fromhex(revealed[i][k][0]) for i in range(1, 5)}
        np.testing.assert_array_equal(_unmask(masked[0][k], 0, k, plan, seeds), _own_word(m, plan, k, 0))

    def test_handing_out_its_own_public_keys(self):
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        from huscf.federation.secure import _sum_seed

        m, plan, parties, directory, k = self._setup()
        fake = {j: X25519PrivateKey.generate() for j in range(1, 5)}  # keys are not authenticated
        told_0 = directory | {j: key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
                              for j, key in fake.items()}
        word = parties[0].masked(plan, m.clients[0], told_0)[k]
        victim = X25519PublicKey.from_public_bytes(bytes.fromhex(directory[0]))
        seeds = {}
        for j, key in fake.items():
            secret = HKDF(hashes.SHA256(), 32, salt=None, info=f"huscf secure aggregation 0-{j}".encode()).derive(
                key.exchange(victim))
            seeds[j] = _sum_seed(secret, plan.round, k)
        np.testing.assert_array_equal(_unmask(word, 0, k, plan, seeds), _own_word(m, plan, k, 0))

    def test_a_plan_that_isolates_one_client(self):
        from huscf.federation.secure import BlockSum, SecurePlan

        m, plan, parties, directory, k = self._setup()
        s = plan.sums[k]
        # the same block twice: all five, and all but client 0. Clients check only that each sum's
        # weights are a convex combination (the range argument): the unnormalised copy is refused
        unnormalised = SecurePlan(plan.round, (s, BlockSum(s.net, s.block, s.members[1:], s.weights[1:],
                                                           s.server_weights[1:])))
        with pytest.raises(HuscfError, match="client 1 refuses the sum of D block 0: its weights .* not a convex"):
            parties[1].masked(unnormalised, m.clients[1], directory)
        but_0 = BlockSum(s.net, s.block, s.members[1:], (0.25,) * 4, s.server_weights[1:])
        lying = SecurePlan(plan.round, (s, but_0))
        masked = {i: p.masked(lying, m.clients[i], directory) for i, p in parties.items()}
        both = open_sums(lying, masked)
        assert [o.index for o in both] == [0, 1]
        # sum 0 opens 0.2 * (theta_0 + ... + theta_4), sum 1 0.25 * (theta_1 + ... + theta_4).
        # Fixed point rounds each word by at most 2^-33: 5 (5 + 0.8 * 4) 2^-33 < 1e-8 on theta_0
        theta_0 = 5 * (both[0].mean - 0.8 * both[1].mean)
        np.testing.assert_allclose(theta_0, block_vector(m.clients[0].nets["D"]["0"]), rtol=0, atol=1e-8)
        # or weights (1, 0, 0, 0, 0): the "average" is client 0's copy
        alone = SecurePlan(plan.round, (BlockSum(s.net, s.block, s.members, (1.0, 0.0, 0.0, 0.0, 0.0),
                                                 s.server_weights),))
        opened = open_sums(alone, {i: p.masked(alone, m.clients[i], directory) for i, p in parties.items()})
        np.testing.assert_allclose(opened[0].mean, block_vector(m.clients[0].nets["D"]["0"]), rtol=0, atol=2 ** -32)


def test_methods_whose_server_reads_whole_models_are_refused_in_one_line():
    # HFL-GAN's edges run every client's generator (PFL-GAN averages no weights: nothing to hide)
    cfg = build_config({}, ["method=hflgan", "federation.secure_aggregation=true"])
    with pytest.raises(HuscfError, match="secure_aggregation"):
        build_strategy(cfg)
    m = _model()
    with pytest.raises(HuscfError, match="personalised"):
        plan_sums(m, Aggregation(np.arange(5), np.ones(5), np.full(5, 0.2), mixing=np.eye(5)), list(range(5)), 0)
    with pytest.raises(HuscfError, match="not finite"):
        encode(np.array([np.nan]), 3, "D block 1")


@pytest.mark.parametrize("clients", ["loop", "batched"])
def test_training_with_secure_aggregation_matches_plain_fedavg(tmp_path, clients):
    """One-cluster federation (FedAvg) trains the same model with or without secure aggregation
    (heterogeneous cuts, every locally held middle block held by two clients or more)."""
    # one round: after it the two models differ by float rounding only; a second round would let
    # Adam's early near-sign steps (lr 2e-4) turn those 1e-7 differences into 1e-4 ones
    tiny = ["output.keep_full_checkpoints=1", "data.clients_per_domain=2", "model.width=0.125", "train.rounds=1",
            "train.local_epochs=1", "train.batch_size=32", "train.max_iters_per_epoch=2", "output.samples_per_class=2",
            "cuts.method=fixed", "cuts.fixed=[[1,0,1,0],[1,0,1,0],[1,1,1,1],[1,1,1,1]]",  # no lone holder
            "federation.strategy=fedavg", "output.samples_every=0", f"compute.clients={clients}",
            "compute.precision=fp64"]  # training is the same code on both sides; the averages differ by rule 4
    plain = Trainer.new(build_config({}, tiny), tmp_path / "plain", quiet=True)
    plain.fit()
    secure = Trainer.new(build_config({}, tiny + ["federation.secure_aggregation=true"]), tmp_path / "secure",
                         quiet=True)
    secure.fit()
    a, b = plain.engine.model.state_dict(), secure.engine.model.state_dict()
    for k in a:
        if a[k].is_floating_point():
            assert_close64(a[k], b[k], extra=fixed_point_bound(4), msg=k)
        else:
            assert torch.equal(a[k], b[k]), k

    rows = read_metrics(tmp_path / "secure")
    assert all(r["federation"]["secure_aggregation"]["opened"] > 0 for r in rows)
    assert "secure_aggregation" not in read_metrics(tmp_path / "plain")[0]["federation"]

