"""Execution options change speed and memory, never the method: each is checked against the loop."""

import copy
import random

import pytest
import torch

from huscf.cli import main
from huscf.engine.batched import BatchedEngine
from huscf.engine.execution import Execution
from huscf.engine.simulation import ClientData, SimulationEngine
from huscf.errors import HuscfError
from huscf.models import build_architecture
from huscf.split.plan import all_cuts
from huscf.split.seam import SeamRecorder
from huscf.split.segments import SplitGAN

B = 8


def _setup(n=6, seed=0):
    arch = build_architecture("cgan28", 0.125)
    rng = random.Random(seed)
    cuts = [rng.choice(all_cuts(3, 3)) for _ in range(n)]
    assert len(set(cuts)) > 2, "the test needs heterogeneous cuts"
    torch.manual_seed(seed)
    model = SplitGAN(arch.generator(), arch.discriminator(), cuts)
    gen = torch.Generator().manual_seed(seed)
    data = [ClientData(torch.rand(2 * B, 1, 28, 28, generator=gen) * 2 - 1,
                       torch.randint(0, 10, (2 * B,), generator=gen), "x") for _ in range(n)]
    return model, data


def _run(execution: Execution, iterations=3, model_and_data=None):
    """A few iterations (client 2 sits one out); returns losses per iteration, the model, features."""
    model, data = model_and_data or _setup()
    model = copy.deepcopy(model)
    cls = BatchedEngine if execution.batch_clients else SimulationEngine
    eng = cls(model, data, B, 2e-4, (0.5, 0.999), 100, 0, None, execution)
    eng.feature_depth = 2
    noise = torch.Generator().manual_seed(0)
    losses = []
    for t in range(iterations):
        batch = {i: (d.x[:B], d.y[:B]) for i, d in enumerate(eng.data) if not (t == 1 and i == 2)}
        losses.append(eng.iteration(batch, noise, collect_features=True))
    return losses, model, eng.features.mean_and_noise()[0]


def _outputs(model):
    """Every client's generator output and its D logits on it (invariant to the pre-BatchNorm
    conv biases, whose true gradient is zero and whose Adam steps are rounding noise)."""
    gen = torch.Generator().manual_seed(5)
    z, y = torch.randn(B, 100, generator=gen), torch.randint(0, 10, (B,), generator=gen)
    with torch.no_grad():
        fakes = [model.generate(i, z, y).float() for i in range(len(model.clients))]
        return torch.stack(fakes), torch.stack([model.discriminate(i, f, y).float() for i, f in enumerate(fakes)])


def _assert_losses_close(a, b, tol):
    assert [sorted(x) for x in a] == [sorted(x) for x in b]
    for la, lb in zip(a, b):
        for i in la:
            assert la[i] == pytest.approx(lb[i], rel=tol, abs=tol), (i, la[i], lb[i])


@pytest.mark.parametrize("execution", [
    Execution(batch_clients=True),
    Execution(batch_clients=True, client_chunk=4, recompute_generator=True),
    Execution(recompute_generator=True),
    Execution(channels_last=True),
])
def test_execution_options_reproduce_the_per_client_loop(execution):
    ref_losses, ref_model, ref_feats = _run(Execution())
    losses, model, feats = _run(execution)
    _assert_losses_close(losses, ref_losses, 1e-4)
    assert abs(feats - ref_feats).max() < 1e-4
    for a, b in zip(_outputs(model), _outputs(ref_model)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_generator_recompute_is_bit_exact_in_the_loop():
    a, ma, _ = _run(Execution())
    b, mb, _ = _run(Execution(recompute_generator=True))
    assert a == b
    for k, v in ma.state_dict().items():
        torch.testing.assert_close(mb.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_bf16_trains_close_to_fp32():
    ref_losses, ref_model, _ = _run(Execution(), iterations=1)
    losses, model, _ = _run(Execution(precision="bf16", channels_last=True), iterations=1)
    _assert_losses_close(losses, ref_losses, 0.03)  # bf16 has 8 bits of mantissa
    moved = [(p - q).abs().max().item() for p, q in zip(model.parameters(), _setup()[0].parameters())]
    assert max(moved) > 0 and all(p.dtype == torch.float32 for p in model.parameters())


def test_batched_engine_sends_the_same_crossings_as_the_loop():
    def crossings(execution):
        model, data = _setup()
        model.seam.recorder = SeamRecorder()
        _, trained, _ = _run(execution, iterations=1, model_and_data=(model, data))
        return sorted((c.kind, c.direction, c.client, c.net, c.block, c.shape, c.dtype)
                      for c in trained.seam.recorder.crossings)

    loop = crossings(Execution())
    assert loop and crossings(Execution(batch_clients=True, client_chunk=4)) == loop


def test_auto_choices():
    cpu = Execution.resolve("cpu", num_clients=80)
    assert (cpu.batch_clients, cpu.channels_last, cpu.recompute_generator) == (False, True, True)
    assert not Execution.resolve("cpu", num_clients=8).recompute_generator
    assert Execution.resolve("cpu", clients="batched", client_chunk=4, num_clients=8).recompute_generator
    with pytest.raises(HuscfError, match="precision"):
        Execution(precision="fp16")


def test_cuda_without_a_gpu_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--set", "compute.device=cuda", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("huscf: error:") and "cuda" in err and len(err.splitlines()) == 1


def test_bad_compute_value_is_one_line(capsys, tmp_path):
    assert main(["train", "--set", "compute.precision=fp8", "--out", str(tmp_path / "run")]) == 2
    assert "compute.precision" in capsys.readouterr().err


def test_batched_clients_train_and_resume_exactly_through_the_trainer(tmp_path):
    from huscf.config import build_config
    from huscf.engine.trainer import Trainer, read_metrics

    tiny = ["data.clients_per_domain=2", "model.width=0.125", "train.local_epochs=1", "train.batch_size=16",
            "train.max_iters_per_epoch=2", "federation.warmup_rounds=1", "output.samples_every=0",
            "cuts.method=random", "compute.clients=batched", "compute.client_chunk=3"]
    full = Trainer.new(build_config({}, tiny + ["train.rounds=2"]), tmp_path / "full", quiet=True)
    assert full.execution.batch_clients and full.execution.recompute_generator
    full.fit()
    Trainer.new(build_config({}, tiny + ["train.rounds=1"]), tmp_path / "part", quiet=True).fit()
    resumed = Trainer.resume(tmp_path / "part", ["train.rounds=2"], quiet=True)
    resumed.fit()
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert [r["loss_d"] for r in read_metrics(tmp_path / "part")] == [r["loss_d"] for r in read_metrics(tmp_path / "full")]
