"""Secure aggregation (federation/secure.py): masked sums equal plain averaging, reveal nothing
one at a time, survive members that drop out, and refuse the methods they cannot serve."""

import numpy as np
import pytest
import torch

from conftest import read_metrics

from huscf.config import build_config
from huscf.errors import HuscfError
from huscf.federation.averaging import apply_aggregation
from huscf.federation.secagg import Enrollment, SecAggClient, SecAggServer, secure_average
from huscf.federation.secure import (
    BlockSum, Policy, SecurePlan, apply_opened, block_vector, decode, encode, mask_stream, pair_seed, plan_sums,
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


class _Round:
    """One secure round end of ``plan`` run step by step, every client honest, the server's side
    in the test's hands: ``keys``, ``inbox`` (after ``share``), ``words`` (after ``mask``)."""

    def __init__(self, m, plan, policy=Policy(), members=None):
        self.m, self.plan, self.policy = m, plan, policy
        self.members = members or sorted({i for s in plan.sums for i in s.members})
        self.enrollment = Enrollment.of(self.members)
        self.parties = {i: SecAggClient(i, self.enrollment.identities[i], self.enrollment.roster, plan.round, policy)
                        for i in self.members}
        self.keys = {i: p.advertise() for i, p in self.parties.items()}

    def share(self, keys=None):
        boxes = {i: p.share_keys(self.plan, keys or self.keys) for i, p in self.parties.items()}
        self.inbox = {v: {u: b[v] for u, b in boxes.items() if v in b} for v in self.members}
        return self

    def mask(self):
        self.words = {i: p.masked(self.m.clients[i], self.inbox[i]) for i, p in self.parties.items()}
        return self

    def sign(self, survivors):
        return {i: self.parties[i].sign_survivors(survivors) for i in survivors}


def _plan(m, n=5, round_idx=0, groups=None):
    w = np.full(n, 1 / n)
    return plan_sums(m, Aggregation(np.zeros(n, dtype=int) if groups is None else groups, w, w), list(range(n)),
                     round_idx)


def _head_sum(plan):
    """The index of the sum of every client's D head."""
    return next(k for k, s in enumerate(plan.sums) if s.net == "D" and s.block == 0)


def _own_word(m, plan, k, client):
    """Client ``client``'s unmasked fixed-point word for sum ``k``: what no server should learn."""
    s = plan.sums[k]
    return encode(s.weights[s.members.index(client)] * block_vector(m.clients[client].nets[s.net][str(s.block)]),
                  client, "")


def test_one_masked_vector_is_noise_and_the_masks_cancel_in_the_sum():
    m = _model()
    plan = _plan(m, round_idx=7)
    r = _Round(m, plan).share().mask()
    k = _head_sum(plan)
    s = plan.sums[k]
    for i in s.members:
        x = r.words[i][k]
        assert (x != _own_word(m, plan, k, i)).mean() > 0.99
        # fixed-point weights are small integers; the masked words spread over all of Z_{2^64}
        assert np.abs(decode(x)).max() > 1e8
    # the pair masks cancel in the sum; what is left is the words plus every member's self mask
    server = SecAggServer(plan, Policy())
    server.advertised(r.keys)
    server.route({i: {} for i in s.members})
    for i in s.members:
        server.receive_masked(i, r.words[i])
    assert server.survivors() == list(s.members)
    total = np.sum([r.words[i][k] for i in s.members], axis=0, dtype=np.uint64)
    assert (total != np.sum([_own_word(m, plan, k, i) for i in s.members], axis=0, dtype=np.uint64)).mean() > 0.99
    signatures = r.sign(server.u3)
    opened = server.open({i: r.parties[i].unmask(signatures) for i in s.members})
    assert {o.index for o in opened} == set(range(len(plan.sums)))
    np.testing.assert_array_equal(np.rint(next(o for o in opened if o.index == k).mean * 2.0 ** 32),
                                  np.rint(decode(np.sum([_own_word(m, plan, k, i) for i in s.members], axis=0,
                                                        dtype=np.uint64)) * 2.0 ** 32))
    # fresh keys and self masks per round end: the same weights give different masked words
    again = _Round(m, plan).share().mask()
    assert (again.words[0][k] != r.words[0][k]).mean() > 0.99


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
    # a sum stays closed exactly when fewer than two of its members survive (G block 2: clients 2, 4)
    closed_ok = {k for k, s in enumerate(plan_sums(before, agg, list(range(5)), 0).sums)
                 if len(set(s.members) - {2}) < 2}
    assert record["opened"] > 0 and set(record["closed"]) == closed_ok
    # two of five drop (below the key threshold of 3 of 5): the sums of the three survivors open
    m, plain = _model(), _model()
    record = secure_average(m, agg, list(range(5)), 0, drop=frozenset({1, 3}))
    apply_aggregation(plain, Aggregation(np.zeros(3, dtype=int), w[[0, 2, 4]] / w[[0, 2, 4]].sum(), w[[0, 2, 4]]),
                      [0, 2, 4])
    # every client's D head (3 of 5 survive; each self mask has 4 holders, 2 needed) opens ...
    for i in (0, 2, 4):
        assert_close64(block_vector(m.clients[i].nets["D"]["0"]), block_vector(plain.clients[i].nets["D"]["0"]),
                       extra=FIXED, msg=f"client {i}")
    # ... G block 1 (held by 1-4) keeps 2 and 4: a self mask of theirs has 3 holders, 2 needed, 1 left
    sums = plan_sums(before, agg, list(range(5)), 0).sums
    g1 = next(k for k, s in enumerate(sums) if (s.net, s.block) == ("G", 1))
    assert sums[g1].members == (1, 2, 3, 4) and g1 in record["closed"]
    # three of five drop: two survivors cannot rebuild the dropouts' keys, every sum stays closed
    m = _model()
    record = secure_average(m, agg, list(range(5)), 0, drop=frozenset({1, 2, 3}))
    assert record["opened"] == 0
    for k, v in _floats(m).items():
        torch.testing.assert_close(v, _floats(before)[k], rtol=0, atol=0, msg=k)


def test_a_lone_survivor_keeps_its_copy_closed():
    """Sum (0, 1) of G block 1 loses client 1: the survivors rebuild client 1's key, which removes
    the pair mask, but client 0's self mask has no holder left but 1, so its copy stays closed."""
    cuts = [Cuts(1, 0, 1, 0), Cuts(1, 0, 1, 0), Cuts(0, 0, 0, 0)]
    m, kept = _model(cuts), _model(cuts)
    plan = _plan(m, 3)
    only_two = {k for k, s in enumerate(plan.sums) if s.members == (0, 1)}
    shared = {k for k, s in enumerate(plan.sums) if s.members == (0, 1, 2)}
    assert only_two and shared
    r = _Round(m, plan).share().mask()
    server = SecAggServer(plan, Policy())
    server.advertised(r.keys)
    server.route({i: {} for i in range(3)})
    for i in (0, 2):
        server.receive_masked(i, r.words[i])
    assert server.survivors() == [0, 2]
    signatures = r.sign([0, 2])
    answers = {i: r.parties[i].unmask(signatures) for i in (0, 2)}
    assert set(answers[0]["keys"]) == {1} and set(answers[2]["keys"]) == {1}  # 1 dropped: its key share
    assert all(k in shared for v in answers[2]["masks"].values() for k in v)  # no self-mask share of (0, 1)
    opened = server.open(answers)
    assert {o.index for o in opened} == shared
    record = secure_average(m, Aggregation(np.zeros(3, dtype=int), np.full(3, 1 / 3), np.full(3, 1 / 3)), [0, 1, 2],
                            0, drop=frozenset({1}))
    assert set(record["closed"]) == only_two
    torch.testing.assert_close(m.clients[0].nets["G"]["1"].state_dict(), kept.clients[0].nets["G"]["1"].state_dict())


def test_a_sum_that_could_wrap_is_refused_before_masking():
    """Weights sum to 1, so a sum of copies below 2^30 stays below 2^30, inside the fixed point's
    2^31. Checking each weighted term alone let five terms of 2^29 (copies of 5 * 2^29) wrap."""
    m = _model()
    r = _Round(m, _plan(m)).share()
    with torch.no_grad():
        next(m.clients[0].nets["D"]["0"].parameters()).view(-1)[0] = 5 * 2.0 ** 29
    with pytest.raises(HuscfError, match="client 0's D block 0 has values that are not finite or above 1e"):
        r.parties[0].masked(m.clients[0], r.inbox[0])


def test_masks_are_the_chacha20_keystream():
    """RFC 8439, 2.4.2: the keystream of its key and nonce, block counter 1, begins with these
    bytes. The masks are ChaCha20 (``cryptography``), keyed per pair or client, sum and round."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    key = bytes(range(32))
    nonce = (1).to_bytes(4, "little") + bytes.fromhex("000000000000004a00000000")
    plain = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
             b"sunscreen would be it.")
    cipher = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(plain)
    assert cipher[:16].hex() == "6e2e359a2568f98041ba0728dd0d6981"
    words = mask_stream(key, 4)
    assert words.dtype == np.uint64 and len(set(words.tolist())) == 4
    np.testing.assert_array_equal(words, np.frombuffer(Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None)
                                                       .encryptor().update(bytes(32)), dtype="<u8"))
    assert not np.array_equal(mask_stream(bytes(32), 4), mask_stream(bytes(31) + b"\x01", 4))


def test_shamir_shares_rebuild_a_secret_from_the_threshold_and_not_below():
    from huscf.federation.secagg import _combine, _split, key_threshold, mask_threshold

    assert [key_threshold(n) for n in (2, 3, 4, 5, 10)] == [2, 2, 3, 3, 6]
    assert [mask_threshold(h) for h in (1, 2, 3, 4, 9)] == [1, 1, 2, 2, 5]
    secret = bytes(range(32))
    shares = dict(enumerate(_split(secret, 3, 5), start=1))
    assert all(len(v) == 32 for v in shares.values())
    assert _combine({i: shares[i] for i in (1, 3, 5)}, 3) == secret == _combine({i: shares[i] for i in (2, 4, 5)}, 3)
    assert _combine(shares, 3) == secret  # more than the threshold: the first three are used
    assert _combine({i: shares[i] for i in (1, 2)}, 3) != secret  # two of a 3-of-5: another polynomial


class TestALyingServerIsRefused:
    """Issue 30, item 3: the three ways a server that lies opened one client's copy (docs/security.md
    "A server that lies"), each now refused in one line or left with nothing to open."""

    def _delivered(self):
        m = _model()
        plan = _plan(m, round_idx=3)
        return m, plan, _Round(m, plan).share().mask(), _head_sum(plan)

    def test_declaring_a_delivered_client_dropped(self):
        m, plan, r, k = self._delivered()  # client 0 delivered; the server says it dropped
        signatures = r.sign([1, 2, 3, 4])
        answers = {i: r.parties[i].unmask(signatures) for i in range(1, 5)}
        assert all(0 in a["keys"] and 0 not in a["masks"] for a in answers.values())
        from huscf.federation.secagg import _agree, _combine

        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        s_0 = X25519PrivateKey.from_private_bytes(_combine({i + 1: bytes.fromhex(answers[i]["keys"][0])
                                                            for i in range(1, 5)}, 3))
        word = r.words[0][k]
        for j in range(1, 5):  # every pair mask of client 0 comes out ...
            pair = _agree(s_0, r.keys[j]["s_pk"], "masks", 0, j)
            word = word - mask_stream(pair_seed(pair, plan.round, k), word.size)
        assert (word != _own_word(m, plan, k, 0)).mean() > 0.99  # ... its self mask stays
        # and no client answers a second time, which could hand over client 0's self-mask shares
        with pytest.raises(HuscfError, match="client 1 refuses to unmask in round 4: each step .* runs once"):
            r.parties[1].unmask(signatures)
        with pytest.raises(HuscfError, match="client 1 refuses to sign the survivors in round 4: each step"):
            r.parties[1].sign_survivors([0, 1, 2, 3, 4])

    def test_showing_clients_different_survivor_lists(self):
        m, plan, r, k = self._delivered()
        # clients 1 and 2 are told 0 dropped (they would reveal its key share), 3 and 4 that it
        # survived (they would reveal its self-mask shares): neither list gets a majority of 5
        told_dropped = {i: r.parties[i].sign_survivors([1, 2, 3, 4]) for i in (1, 2)}
        told_alive = {i: r.parties[i].sign_survivors([0, 1, 2, 3, 4]) for i in (3, 4)}
        with pytest.raises(HuscfError, match="client 1 refuses to unmask: 2 survivors signed .* needs 3"):
            r.parties[1].unmask({i: told_dropped[i] for i in (1, 2)})
        forged = {i: told_dropped[i] for i in (1, 2)} | {3: told_alive[3]}  # 3 signed another list
        with pytest.raises(HuscfError, match="client 2 refuses the survivor list .* from client 3: the signature "
                                             "does not verify"):
            r.parties[2].unmask(forged)

    def test_handing_out_its_own_public_keys(self):
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        from huscf.federation.secagg import _public

        m = _model()
        plan = _plan(m, round_idx=3)
        r = _Round(m, plan)
        forged = dict(r.keys)
        forged[1] = forged[1] | {"s_pk": _public(X25519PrivateKey.generate())}  # the server's own key for 1
        with pytest.raises(HuscfError, match="client 0 refuses round keys from client 1: the signature does not "
                                             "verify against its enrolled identity key"):
            r.parties[0].share_keys(plan, forged)
        from huscf.federation.secagg import Identity

        server_identity = Identity(1)  # a key pair the server made, signing as client 1
        c, s_pk = _public(X25519PrivateKey.generate()), _public(X25519PrivateKey.generate())
        forged[1] = {"c_pk": c, "s_pk": s_pk, "sig": server_identity.sign("keys", 3, 1, c, s_pk)}
        with pytest.raises(HuscfError, match="client 2 refuses round keys from client 1: the signature"):
            r.parties[2].share_keys(plan, forged)

    def test_a_plan_that_isolates_one_client(self):
        m = _model()
        plan = _plan(m, round_idx=3)
        k = _head_sum(plan)
        s = plan.sums[k]
        # the same block twice: all five, and all but client 0 (their difference is client 0)
        twice = SecurePlan(plan.round, (s, BlockSum(s.net, s.block, s.members[1:], (0.25,) * 4,
                                                    s.server_weights[1:])))
        with pytest.raises(HuscfError, match="client 1 refuses the sum of D block 0: it is in two sums of that block"):
            _Round(m, twice).share()
        # weights (1, 0, 0, 0, 0): the "average" is client 0's copy
        alone = SecurePlan(plan.round, (BlockSum(s.net, s.block, s.members, (1.0, 0.0, 0.0, 0.0, 0.0),
                                                 s.server_weights),))
        with pytest.raises(HuscfError, match=r"client 0 refuses the sum of D block 0: its weights .* more than 100 "
                                             r"times"):
            _Round(m, alone).share()
        # weights at the policy's bound pass; one client alone in a sum is refused
        edge = SecurePlan(plan.round, (BlockSum(s.net, s.block, s.members[:2], (100 / 101, 1 / 101),
                                                s.server_weights[:2]),))
        _Round(m, edge).share()
        single = SecurePlan(plan.round, (BlockSum(s.net, s.block, s.members[:1], (1.0,), s.server_weights[:1]),))
        with pytest.raises(HuscfError, match="client 0 refuses the sum of D block 0: 1 members, it needs 2"):
            _Round(m, single, members=[0, 1]).share()
        with pytest.raises(HuscfError, match="client 0 refuses the sum of D block 0: 2 members, it needs 3"):
            _Round(m, edge, Policy(min_members=3)).share()

    def test_shares_altered_on_the_way_and_steps_out_of_order(self):
        m = _model()
        plan = _plan(m)
        r = _Round(m, plan).share()
        box = bytearray(bytes.fromhex(r.inbox[0][1]))
        box[-1] ^= 1
        with pytest.raises(HuscfError, match="client 0 cannot open the shares of client 1"):
            r.parties[0].masked(m.clients[0], r.inbox[0] | {1: box.hex()})
        with pytest.raises(HuscfError, match="client 1 refuses to advertise keys in round 1: each step"):
            r.parties[1].advertise()


def test_the_plan_keeps_weights_within_the_ratio_every_client_checks():
    m = _model()
    w = np.array([1.0, 1e-6, 0.5, 0.5, 0.5])
    plan = plan_sums(m, Aggregation(np.zeros(5, dtype=int), w, w), list(range(5)), 0, Policy(max_weight_ratio=10))
    for s in plan.sums:
        ratio = max(s.weights) / min(s.weights)
        assert (ratio == pytest.approx(10) if 1 in s.members else ratio == pytest.approx(1))
        assert sum(s.weights) == pytest.approx(1)
    _Round(m, plan, Policy(max_weight_ratio=10)).share()  # every client accepts it
    with pytest.raises(HuscfError, match="min_members >= 2"):
        Policy(min_members=1)


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



def test_hidden_ends_average_like_plain_and_the_server_opens_only_noise():
    """federation.hide_ends: the first and last block of each net are opened by their sums'
    members; the server's sum of them is noise, its copies untouched; the clients get the plain
    average all the same."""
    plain, m, before = _model(), _model(), _model()
    w = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    agg = Aggregation(np.zeros(5, dtype=int), w, w)
    apply_aggregation(plain, agg)
    hide = Policy(hide_ends=True)
    record = secure_average(m, agg, list(range(5)), 0, hide)
    _assert_same_clients(plain, m)
    plan = plan_sums(before, agg, list(range(5)), 0, hide)
    ends = {k for k, s in enumerate(plan.sums) if s.block in (0, before.num_blocks[s.net] - 1)}
    assert {k for k, s in enumerate(plan.sums) if s.hidden} == ends and len(ends) == 4  # G and D, head and tail
    assert record["hidden"] == 4 and record["opened"] == record["sums"]
    # what the server itself holds after opening: words for the ends, averages for the middle blocks
    r = _Round(before, plan, hide).share().mask()
    server = SecAggServer(plan, hide)
    server.advertised(r.keys)
    server.route({i: {} for i in range(5)})
    for i in range(5):
        server.receive_masked(i, r.words[i])
    signatures = r.sign(server.survivors())
    opened = server.open({i: r.parties[i].unmask(signatures) for i in range(5)})
    for o in opened:
        if o.index in ends:
            assert o.mean is None and np.abs(decode(o.words)).max() > 1e8  # uniform words, not an average
            s = plan.sums[o.index]
            ours = block_vector(m.clients[2].nets[s.net][str(s.block)])  # what secure_average wrote
            np.testing.assert_allclose(r.parties[2].open_hidden(o.index, o.members, o.words), ours, rtol=0,
                                       atol=2.0 ** -30)
        else:
            assert o.mean is not None
    server_side = _model()  # the server's copies: apply_opened writes only what it could read
    apply_opened(server_side, plan, opened)
    for k in ends:
        s = plan.sums[k]
        for i in s.members:
            np.testing.assert_array_equal(block_vector(server_side.clients[i].nets[s.net][str(s.block)]),
                                          block_vector(before.clients[i].nets[s.net][str(s.block)]))
    with pytest.raises(HuscfError, match="client 0 cannot open sum 1: it is not a hidden sum of its own"):
        shown = next(o for o in opened if o.index not in ends)
        r.parties[0].open_hidden(shown.index, shown.members, shown.words)


def test_with_hidden_ends_a_client_refuses_to_send_an_end_the_server_would_open():
    m = _model()
    plan = _plan(m)  # planned without hiding
    r = _Round(m, plan, Policy(hide_ends=True)).share()
    with pytest.raises(HuscfError, match="client 0 refuses to send [GD] block [04] in a sum the server opens"):
        r.parties[0].masked(m.clients[0], r.inbox[0])
    with pytest.raises(HuscfError, match="federation.hide_ends .* federation.secure_aggregation=true too"):
        build_config({}, ["federation.hide_ends=true"])


def test_hidden_ends_start_from_a_secret_the_server_does_not_hold(tmp_path, monkeypatch):
    """federation.hide_ends draws every net's first and last block from a seed derived from the
    signing key (kept off the run and the server): equal for every client, the middle blocks as the
    public seed makes them, the same on this machine for the same config, other under another key."""
    tiny = ["model.width=0.125", "data.clients_per_domain=2", "federation.secure_aggregation=true"]
    public = Trainer(build_config({}, tiny), tmp_path / "public", quiet=True).model
    hidden = Trainer(build_config({}, tiny + ["federation.hide_ends=true"]), tmp_path / "hidden", quiet=True).model
    again = Trainer(build_config({}, tiny + ["federation.hide_ends=true"]), tmp_path / "again", quiet=True).model
    for k, v in hidden.state_dict().items():
        torch.testing.assert_close(v, again.state_dict()[k], rtol=0, atol=0, msg=k)
        parts = k.split(".")
        if parts[0] == "clients" and v.is_floating_point() and v.numel() > 1:
            end = int(parts[4]) in (0, hidden.num_blocks[parts[3]] - 1)
            start = public.state_dict()[k]
            constant = bool((start == start.flatten()[0]).all())  # zero biases, running statistics: nothing drawn
            assert (not torch.equal(v, start)) == (end and not constant), k  # every random tensor of the ends anew ...
            if end:  # ... the same for every client
                torch.testing.assert_close(v, hidden.state_dict()[k.replace(f"clients.{parts[1]}.", "clients.0.", 1)],
                                           rtol=0, atol=0)
    monkeypatch.setenv("HUSCF_SIGNING_KEY", str(tmp_path / "other.key"))
    other = Trainer(build_config({}, tiny + ["federation.hide_ends=true"]), tmp_path / "other", quiet=True).model
    assert not torch.equal(next(other.clients[0].nets["D"]["0"].parameters()),
                           next(hidden.clients[0].nets["D"]["0"].parameters()))


def test_a_run_with_hidden_ends_resumes_exactly(tmp_path):
    """The ends' secret start is drawn once; a resumed run takes them from its checkpoint and
    trains on to what an uninterrupted run reaches (fresh protocol keys each round end change no
    average)."""
    tiny = ["output.keep_full_checkpoints=1", "data.clients_per_domain=2", "model.width=0.125", "train.rounds=3",
            "federation.warmup_rounds=1", "train.local_epochs=1", "train.batch_size=32", "train.max_iters_per_epoch=2",
            "output.samples_every=0", "federation.secure_aggregation=true", "federation.hide_ends=true",
            "train.threads=1"]
    full = Trainer.new(build_config({}, tiny), tmp_path / "full", quiet=True)
    full.fit()
    Trainer.new(build_config({}, tiny + ["train.rounds=2"]), tmp_path / "part", quiet=True).fit()
    resumed = Trainer.resume(tmp_path / "part", ["train.rounds=3"], quiet=True)
    assert resumed.start_round == 3
    resumed.fit()
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert [r["federation"]["secure_aggregation"] for r in read_metrics(tmp_path / "part")] == \
        [r["federation"]["secure_aggregation"] for r in read_metrics(tmp_path / "full")]
