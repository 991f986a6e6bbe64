"""privacy.seam_noise: what a client sends (activations and the gradients it returns) is clipped
and noised on every engine, the epsilon counts every release of a record's batch, and the
accountant's epsilon is a valid, tight bound."""

import math

import pytest
import torch
from conftest import read_metrics

from huscf.config import build_config
from huscf.errors import HuscfError
from huscf.split.noise import (
    ACTIVATIONS_PER_ITERATION,
    GRADIENTS_PER_ITERATION,
    SeamNoise,
    batches_per_epoch,
    epsilon,
    releases_per_record,
)
from huscf.split.seam import SeamRecorder
from huscf.trainer import Trainer

TINY = ["data.clients_per_domain=1", "model.width=0.125", "train.local_epochs=1", "train.max_iters_per_epoch=2",
        "output.samples_every=0", "federation.warmup_rounds=1", "train.batch_size=8"]
EPS32 = 2.0 ** -23


def _norm_tolerance(d: int) -> float:
    """Relative error of a float32 norm of ``d`` terms and of the scaling: a summation error of at
    most d unit roundoffs, doubled for the division and the multiply."""
    return 2 * d * EPS32


def test_rows_outside_the_norm_end_on_it_and_rows_inside_are_kept():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5)
    x[0] *= 1e-3  # well inside the norm
    d, clip = 100, 0.5
    out = SeamNoise(0.0, clip, seed=0)(x)
    norm = clip * math.sqrt(d)
    before, after = x.flatten(1).norm(dim=1), out.flatten(1).norm(dim=1)
    inside = before <= norm
    assert inside[0] and not inside[1:].all()
    assert torch.equal(out[inside], x[inside])  # scale exactly 1, noise exactly 0
    tol = _norm_tolerance(d)
    assert torch.all((after[~inside] - norm).abs() <= tol * norm)
    direction = (out[~inside].flatten(1) / after[~inside, None]) - (x[~inside].flatten(1) / before[~inside, None])
    assert direction.abs().max() <= 4 * tol  # the same direction, shortened


def test_the_noise_has_the_configured_scale_and_is_seeded():
    rows, d, sigma, clip = 4000, 50, 0.3, 1.0
    x = torch.zeros(rows, d)
    out = SeamNoise(sigma, clip, seed=7)(x)
    want, n = sigma * clip * math.sqrt(d), rows * d
    # sampling error of a mean and a standard deviation of n normal draws, six standard errors
    assert abs(float(out.mean())) <= 6 * want / math.sqrt(n)
    assert abs(float(out.std()) / want - 1) <= 6 / math.sqrt(2 * n)
    assert torch.equal(out, SeamNoise(sigma, clip, seed=7)(x))
    assert not torch.equal(out, SeamNoise(sigma, clip, seed=8)(x))
    # the batched engine's (clients, batch, ...) rows are the loop's rows, drawn in the same order
    stacked = torch.randn(3, 5, 2, 4, 4)
    torch.testing.assert_close(SeamNoise(sigma, 0.1, seed=1)(stacked, lead=2),
                               SeamNoise(sigma, 0.1, seed=1)(stacked.flatten(0, 1)).view_as(stacked), rtol=0, atol=0)


def test_a_returned_gradient_is_clipped_and_noised_as_the_batch_sums_gradient():
    """``gradient`` clips each row of rows x g (the summed loss's gradient) to grad_clip * sqrt(d),
    adds noise of multiplier times that norm, and divides by the rows again."""
    torch.manual_seed(0)
    rows, d, grad_clip = 8, 60, 0.01
    g = torch.randn(rows, 3, 4, 5) * 1e-3  # rows x g has per-element RMS 0.008: some rows inside
    g[0] *= 100  # far outside
    clipped = SeamNoise(0.0, 1.0, seed=0, grad_clip=grad_clip).gradient(g)
    norm = grad_clip * math.sqrt(d)
    before, after = (g * rows).flatten(1).norm(dim=1), (clipped * rows).flatten(1).norm(dim=1)
    inside = before <= norm
    assert inside.any() and not inside.all()
    torch.testing.assert_close(clipped[inside], g[inside], rtol=4 * EPS32, atol=0)  # (g * rows) / rows
    assert torch.all((after[~inside] - norm).abs() <= _norm_tolerance(d) * norm)
    torch.testing.assert_close(clipped, SeamNoise(0.3, 1.0, seed=0, grad_clip=grad_clip).clipped_gradient(g))
    # the noise: multiplier * norm / rows per element of the sent gradient (six standard errors)
    sigma, many = 0.5, torch.zeros(4000, d)
    out = SeamNoise(sigma, 1.0, seed=3, grad_clip=grad_clip).gradient(many)
    want, n = sigma * norm / 4000, many.numel()
    assert abs(float(out.std()) / want - 1) <= 6 / math.sqrt(2 * n)
    stacked = torch.randn(3, 5, 2, 3, 3) * 1e-3  # the batched engine's (clients, batch, ...): rows = batch
    torch.testing.assert_close(SeamNoise(sigma, 1.0, seed=1)(stacked, lead=2).shape, stacked.shape)
    torch.testing.assert_close(SeamNoise(0.0, 1.0, seed=1, grad_clip=grad_clip).gradient(stacked, lead=2)[1],
                               SeamNoise(0.0, 1.0, seed=1, grad_clip=grad_clip).gradient(stacked[1]), rtol=0, atol=0)


@pytest.mark.parametrize("clients", ["loop", "batched"])
def test_every_engine_sends_only_clipped_rows_and_counts_its_releases(tmp_path, clients):
    """With tiny clips every activation a client sends and every gradient it returns has a tiny
    norm; the gradients the server returns reach the client. With step 3 recomputing the fakes, a
    client sends exactly ACTIVATIONS_PER_ITERATION activations and GRADIENTS_PER_ITERATION
    gradients per iteration, the count the epsilon is built on."""
    clip, grad_clip, sigma, batch = 1e-3, 1e-7, 1e-6, 8
    cfg = build_config({}, [*TINY, "train.rounds=1", f"privacy.seam_clip={clip}", f"privacy.seam_noise={sigma}",
                            f"privacy.seam_grad_clip={grad_clip}", f"compute.clients={clients}",
                            "compute.recompute_generator=true"])
    t = Trainer(cfg, tmp_path, quiet=True)
    t.model.seam.recorder = SeamRecorder(capture=True)
    batch_data = {i: (d.x[:batch], d.y[:batch]) for i, d in enumerate(t.setup.data)}
    t.engine.iteration(batch_data, torch.Generator().manual_seed(0))
    crossings = t.model.seam.recorder.crossings
    counts = {}
    for kind, norm_clip, scale in (("activation", clip, 1), ("gradient", grad_clip, batch)):
        sent = [c for c in crossings if c.direction == "client->server" and c.kind == kind]
        assert sent, kind
        for c in sent:
            rows = c.tensor.flatten(1) * scale  # a gradient's rows are clipped as the batch sum's
            d = rows.shape[1]
            # the clip, plus the noise: sigma * clip * sqrt(d) per element, at most 10 sigma on d elements
            bound = norm_clip * math.sqrt(d) * (1 + _norm_tolerance(d) + 10 * sigma * math.sqrt(d))
            assert float(rows.norm(dim=1).max()) <= bound, (kind, c.net, c.block)
            counts.setdefault(kind, {}).setdefault(c.client, 0)
            counts[kind][c.client] += 1
    assert set(counts["activation"].values()) == {ACTIVATIONS_PER_ITERATION}, counts
    assert set(counts["gradient"].values()) == {GRADIENTS_PER_ITERATION}, counts
    returned = [c for c in crossings if c.kind == "gradient" and c.direction == "server->client"]
    assert returned and any(float(c.tensor.abs().max()) > 0 for c in returned)


def test_a_record_is_counted_in_every_batch_it_can_be_in():
    assert batches_per_epoch(10, [10, 3, 1], start_over=False) == 1
    assert batches_per_epoch(10, [10, 3], start_over=True) == 4  # batches 0, 3, 6, 9 of the 3-batch client
    assert batches_per_epoch(10, [10, 1], start_over=True) == 10  # one batch: every iteration
    assert releases_per_record(3, 2, 4) == 4 * releases_per_record(3, 2)


def test_a_run_records_the_epsilon_of_each_round_and_a_plain_run_none(tmp_path):
    sigma, delta = 0.5, 1e-5
    from huscf.rundir import RoundRecord

    t = Trainer.new(build_config({}, [*TINY, "train.rounds=2", f"privacy.seam_noise={sigma}"]), tmp_path / "noised",
                    quiet=True)
    t.fit()
    rows = read_metrics(tmp_path / "noised")
    want = [round(epsilon(sigma, releases_per_record(r, 1), delta, batch_size=8), 4) for r in (1, 2)]
    assert [r["seam_epsilon"] for r in rows] == want and want[0] < want[1]
    assert f"seam epsilon {want[1]:.4g}" in t._summary(RoundRecord.from_json(rows[1]))  # the progress line
    Trainer.new(build_config({}, [*TINY, "train.rounds=1"]), tmp_path / "plain", quiet=True).fit()
    assert "seam_epsilon" not in read_metrics(tmp_path / "plain")[0]


def test_a_resumed_noised_run_draws_the_noise_of_the_uninterrupted_one(tmp_path):
    noised = [*TINY, "privacy.seam_noise=0.5", "train.threads=1"]
    full = Trainer.new(build_config({}, [*noised, "train.rounds=2"]), tmp_path / "full", quiet=True)
    full.fit()
    Trainer.new(build_config({}, [*noised, "train.rounds=1"]), tmp_path / "part", quiet=True).fit()
    part = Trainer.resume(tmp_path / "part", ["train.rounds=2"], quiet=True)
    part.fit()
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(part.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    same = lambda rows: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]  # noqa: E731
    assert same(read_metrics(tmp_path / "part")) == same(read_metrics(tmp_path / "full"))


def test_the_accountants_epsilon_is_a_valid_and_tight_bound():
    """k Gaussian releases with noise multiplier z compose to one Gaussian mechanism with
    mu = sqrt(k) / z, whose exact delta(epsilon) is known (Balle and Wang 2018). The accountant's
    epsilon must meet delta there (a valid bound) and be at most 15% above the exact epsilon: the
    Renyi-DP conversion to (epsilon, delta) is 2-10% loose for these compositions. A release of a
    batch of B rows has sensitivity 2C sqrt(B), so z = sigma / (2 sqrt(B))."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def exact_delta(eps: float, mu: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2))

    delta = 1e-5
    for sigma, k, batch in ((1.0, 5, 1), (4.0, 60, 1), (20.0, 300, 1), (0.1, 300, 1), (40.0, 60, 16), (200.0, 540, 32)):
        eps = epsilon(sigma, k, delta, batch)
        mu = math.sqrt(k) / (sigma / (2 * math.sqrt(batch)))  # sensitivity 2C sqrt(B)
        exact = brentq(lambda e: exact_delta(e, mu) - delta, 0, mu * mu / 2 + mu * math.sqrt(2 * math.log(1 / delta)))
        assert exact_delta(eps, mu) <= delta and exact <= eps <= 1.15 * exact, (sigma, k, eps, exact)
    assert epsilon(1.0, 10, delta) < epsilon(1.0, 20, delta) and epsilon(2.0, 10, delta) < epsilon(1.0, 10, delta)
    assert epsilon(1.0, 10, delta, 4) == epsilon(0.5, 10, delta)


def test_bad_privacy_settings_are_one_line():
    for overrides, message in ((["method=fedgan", "privacy.seam_noise=0.1"], "nothing crosses"),
                               (["privacy.seam_noise=-1"], "privacy.seam_noise"),
                               (["privacy.seam_clip=0"], "privacy.seam_clip"),
                               (["privacy.seam_grad_clip=-0.1"], "privacy.seam_grad_clip"),
                               (["privacy.delta=1"], "privacy.delta"),
                               (["privacy.epsilon=3"], "unknown config key 'privacy.epsilon'")):
        with pytest.raises(HuscfError, match=message) as err:
            build_config({}, overrides)
        assert "\n" not in str(err.value)
