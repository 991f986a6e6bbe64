"""benchmarks/bench_leakage.py: its view is what crosses the seam (activations, and the gradients
a client returns), its attacks work where they must (exact labels from known noise and weights, a
separable probe, the PSNR formula), and one
tiny row runs end to end, resumes, and carries the issue's JSON keys."""

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from huscf.config import build_config
from huscf.split.seam import SeamRecorder
from huscf.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = importlib.import_module("bench_leakage")

TINY = ["model.width=0.125", "train.rounds=1", "train.local_epochs=1", "train.max_iters_per_epoch=2",
        "federation.warmup_rounds=1", "data.clients_per_domain=2", "output.samples_every=0", "train.threads=1"]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    cfg = build_config({}, [*TINY, "cuts.method=fixed", "cuts.fixed=[0,0,0,0]"])
    return Trainer(cfg, tmp_path_factory.mktemp("leak") / "run", quiet=True)


def test_the_view_is_exactly_what_crosses_the_seam(trainer):
    model, data = trainer.model, trainer.setup.data
    view = bench.server_view(model, data, 16, trainer.setup.arch.z_dim, seed=3)
    assert len(view) == len(data)
    v, (s, e) = view[1], view[1]["batches"][0]
    model.seam.recorder = SeamRecorder(capture=True)
    try:
        with torch.no_grad():
            model.discriminate(1, v["x"][s:e], v["y"][s:e])
            model.generate(1, v["z"][s:e], v["y"][s:e])
    finally:
        crossings, model.seam.recorder = model.seam.recorder.crossings, None
    sent = {c.net: c.tensor for c in crossings if c.direction == "client->server"}
    torch.testing.assert_close(v["d_real"][s:e], sent["D"], rtol=0, atol=0)
    torch.testing.assert_close(v["g"][s:e], sent["G"], rtol=0, atol=0)
    assert v["g"].shape[0] == v["d_real"].shape[0] == v["d_fake"].shape[0] == len(v["y"])


def _check_d_gradients(model, x, y, z, direction):
    """The discriminator step's returned gradients of a tail that is one linear map of the server's
    output h: (sigmoid(logit) - target) direction(y) / B per row, direction(y) the map's weights
    (one row per sample); returns the gradients."""
    grads = bench.returned_gradients(model, 1, x, y, z)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind
    w = direction(y)
    with torch.no_grad():
        fake = model.generate(1, z, y)
        for key, inputs, target in (("grad_d_real", x, 1.0), ("grad_d_fake", fake, 0.0)):
            logit = model.discriminate(1, inputs, y).view(-1)
            want = (torch.sigmoid(logit) - target)[:, None] * w / len(y)
            # float32: sigmoid and its difference from the target within 2 units of roundoff of 1,
            # then the weights' sum (one rounding), one product and one division, each rounded once
            eps = 2.0 ** -23
            atol = 3 * eps * float(w.abs().max()) / len(y)
            torch.testing.assert_close(grads[key].flatten(1), want, rtol=5 * eps, atol=atol)
    return grads


def test_the_returned_gradients_are_the_losses_gradients_at_the_seam(trainer):
    """At cut [0,0,0,0] the D tail is one linear layer w on the server's output h, so the gradient a
    client returns for a row is (sigmoid(logit) - target) w / B: checked for the real rows (target
    1) and the fakes of the discriminator step (target 0), and the generator step's two exist."""
    model, (x, y) = trainer.model, (trainer.setup.data[1].x[:16], trainer.setup.data[1].y[:16])
    z = torch.randn(16, trainer.setup.arch.z_dim, generator=torch.Generator().manual_seed(5))
    linear = model.clients[1].nets["D"][str(model.num_blocks["D"] - 1)][1]
    grads = _check_d_gradients(model, x, y, z, lambda y: linear.weight.detach().view(1, -1).expand(len(y), -1))
    assert grads["grad_d_gen"].shape == grads["grad_d_real"].shape and grads["grad_g"].dim() == 4
    assert float(grads["grad_g"].abs().max()) > 0


def test_a_projection_tail_returns_its_rows_class_in_every_gradient(tmp_path):
    """``model.labels: tail`` at cut [0,0,0,0]: the D tail's logit is (w + e_y) . h, so the gradient
    a client returns for a row is (sigmoid(logit) - target) (w + e_y) / B, a vector per class: the
    label leaves in the gradients once it is out of the activations (docs/security.md)."""
    cfg = build_config({}, [*TINY, "cuts.method=fixed", "cuts.fixed=[0,0,0,0]", "model.labels=tail"])
    t = Trainer(cfg, tmp_path / "run", quiet=True)
    model, (x, y) = t.model, (t.setup.data[1].x[:16], t.setup.data[1].y[:16])
    z = torch.randn(16, t.setup.arch.z_dim, generator=torch.Generator().manual_seed(5))
    tail = model.clients[1].nets["D"][str(model.num_blocks["D"] - 1)]
    w = tail.linear.weight.detach().view(1, -1)
    _check_d_gradients(model, x, y, z, lambda y: w + tail.embed.weight.detach()[y])
    assert len(set(y.tolist())) > 1


def test_known_noise_and_weights_give_the_exact_labels_from_wrong_guesses(trainer):
    model, arch = trainer.model, trainer.setup.arch
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, arch.num_classes, (12,), generator=gen)
    z = torch.randn(12, arch.z_dim, generator=gen)
    with torch.no_grad():
        sent = model.clients[0].run_head("G", (z, y))
    wrong = (y.numpy() + 1) % arch.num_classes  # every first guess wrong
    found = bench.exact_labels(model.clients[0], z, sent, wrong, arch.num_classes)
    assert np.array_equal(found, y.numpy())


def test_the_probe_reads_separable_labels_and_not_random_ones():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 600)
    # the true class's coordinate 6 above the others, noise N(0, 1): a row is misread with
    # probability about 9 P(N(0, 2) > 6) = 1e-4, so the probe's test accuracy is near 1
    separable = np.eye(10)[y] * 6 + rng.normal(size=(600, 10))
    assert bench.probe_accuracy(separable, y, seed=0) > 0.95
    assert bench.probe_accuracy(rng.normal(size=(600, 10)), y, seed=0) < 0.25  # chance is 0.10


def test_the_unlabelled_split_finds_the_sign_and_nothing_in_noise():
    """Rows c_i w with c_i < 0 for real and > 0 for fake (the linear tail's gradients) split exactly,
    in any order and with the sides named either way; rows that are noise split at about chance
    (4,000 rows: the agreement's sd is 0.008, so 0.5 + 0.05 is 6 sd above it)."""
    rng = np.random.default_rng(1)
    truth = rng.random(4000) < 0.5
    c = np.where(truth, -1.0, 1.0) * rng.uniform(0.01, 1.0, 4000)
    w = rng.normal(size=64)
    assert bench.unlabelled_split_accuracy(c[:, None] * w, truth) == 1.0
    assert bench.unlabelled_split_accuracy(-c[:, None] * w, truth) == 1.0
    assert bench.unlabelled_split_accuracy(rng.normal(size=(4000, 64)), truth) < 0.55


def test_psnr_of_known_errors():
    a = torch.zeros(3, 1, 4, 4)
    assert bench.psnr_db(a, a + 0.2) == pytest.approx(20.0, abs=1e-4)  # 10 log10(4 / 0.04)
    assert bench.psnr_db(a, a + 2.0) == pytest.approx(0.0, abs=1e-4)  # the whole range wrong


def test_a_tiny_row_runs_resumes_and_has_the_issue_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "INVERT_STEPS", 5)
    monkeypatch.setattr(bench, "ROWS_PER_CLIENT", 48)
    ev = {"samples": 20, "tstr_samples": 0}
    row = bench.run_row("shallow", "none", tmp_path, TINY, ev, say=lambda m: None)
    assert {"cut", "defence", "label_acc", "real_fake_acc", "psnr_db", "tstr_acc", "fid"} <= set(row)
    assert row["cut"] == "0,0,0,0" and row["defence"] == "none" and math.isnan(row["tstr_acc"])
    views = ("g", "d_real", "d_fake", *bench.GRADIENT_VIEWS)
    assert 0.0 <= row["label_acc"] <= 1.0 and row["label_acc"] == max(row[f"label_acc_{k}"] for k in views)
    assert row["real_fake_acc"] == max(row["real_fake_acc_activations"], row["real_fake_acc_grad"])
    assert row["exact_labels"] == 1.0  # the shallow cut gives every label away
    assert all(0.0 <= row[f"label_acc_{k}"] <= 1.0 for k in ("d_real_no_label", "pixels"))
    again = bench.run_row("shallow", "none", tmp_path, TINY, ev, say=lambda m: None)  # read back, not retrained
    same = [k for k in row if k not in ("seconds", "tstr_acc")]  # tstr_acc is NaN (no TSTR asked), never equal
    assert {k: again[k] for k in same} == {k: row[k] for k in same} and math.isnan(again["tstr_acc"])


def test_under_hidden_ends_the_attacks_know_only_the_initial_ends(trainer, tmp_path):
    """federation.hide_ends: the server knows each client's first and last blocks only as they
    started (the seed is in the config), which a second untrained run of the config reproduces."""
    import copy

    again = Trainer(trainer.cfg, tmp_path / "again", quiet=True).model
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, trainer.model.state_dict()[k], rtol=0, atol=0, msg=k)
    trained = copy.deepcopy(trainer.model)
    with torch.no_grad():
        for v in trained.state_dict().values():
            if v.is_floating_point():
                v.add_(1.0)
    known = bench.known_segments(trained, again)
    for i, seg in enumerate(known):
        for net in ("G", "D"):
            ends = {"0", str(trained.num_blocks[net] - 1)}
            for b, block in seg.nets[net].items():
                src = again if b in ends else trained
                torch.testing.assert_close(block.state_dict(), src.clients[i].nets[net][b].state_dict(), rtol=0, atol=0)
    # the trained model is left as it was
    assert not torch.equal(next(iter(trained.clients[0].nets["D"]["0"].parameters())),
                           next(iter(known[0].nets["D"]["0"].parameters())))
