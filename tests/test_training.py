"""End-to-end behaviour of the training loop on the offline digits domains."""

import json

import numpy as np
import pytest
import torch

from huscf.config import build_config
from huscf.errors import HuscfError
from huscf.rundir.files import RunDir
from huscf.runsetup import build_setup
from huscf.split.seam import SeamRecorder
from huscf.trainer import Trainer

TINY = [
    "output.keep_full_checkpoints=1",
    "data.clients_per_domain=2", "model.width=0.125", "train.rounds=3", "train.local_epochs=1",
    "train.batch_size=32", "train.max_iters_per_epoch=2", "federation.warmup_rounds=1",
    "output.samples_per_class=2", "cuts.method=random",
]


def _cfg(*extra):
    return build_config({}, TINY + list(extra))


def test_run_directory_contents(tmp_path):
    run = Trainer.new(_cfg(), tmp_path / "run", quiet=True).fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert len(r["clusters"]) == 4 and len(r["cluster_weights"]) == 4
        assert np.isfinite(r["loss_d"]) and np.isfinite(r["loss_g"])
        assert r["latency_s_per_iteration"] > 0 and len(r["bytes_round_per_client"]) == 4
        assert set(r["label_accuracy"]) == {"digits", "digits_inverted"}
        assert sum(r["global_weights"]) == pytest.approx(1, abs=1e-4)
    assert rows[0]["federation"]["phase"] == "warmup" and rows[1]["federation"]["phase"] == "clustered"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        name for i in (1, 2, 3) for name in (f"round_000{i}.pt", f"round_000{i}.pt.json")]  # each with its SHA-256
    assert (run / "samples" / "round_0001_cluster_0.png").stat().st_size > 0
    assert (run / "config.yaml").exists()
    clients = json.loads((run / "clients.json").read_text())["clients"]
    assert [c["domain"] for c in clients] == ["digits", "digits", "digits_inverted", "digits_inverted"]


def test_resume_equals_uninterrupted(tmp_path):
    full = Trainer.new(_cfg(), tmp_path / "full", quiet=True)
    full.fit()
    # a "killed" run: same config, stopped after round 2 (its round-3 files never written)
    part_dir = tmp_path / "part"
    part = Trainer.new(_cfg("train.rounds=2"), part_dir, quiet=True)
    part.fit()
    # the full run's round-2 checkpoint was slimmed (deduplicated weights only): still exact
    slim = RunDir(tmp_path / "full").load_model_state(2)
    assert torch.load(tmp_path / "full" / "checkpoints" / "round_0001.pt", weights_only=False)["slim"]
    assert slim.keys() == part.model.state_dict().keys()
    for k, v in part.model.state_dict().items():
        torch.testing.assert_close(slim[k], v, rtol=0, atol=0, msg=k)
    (part_dir / "config.yaml").write_text((tmp_path / "full" / "config.yaml").read_text())
    with (part_dir / "metrics.jsonl").open("a") as f:
        f.write('{"round": 3, "cut sho')  # a line cut short by the kill
    resumed = Trainer.resume(part_dir, quiet=True)
    assert resumed.start_round == 3
    resumed.fit()
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    rows_full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    rows_res = (part_dir / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "train_seconds"} for r in rows]  # noqa: E731
    assert strip(rows_res) == strip(rows_full)


def test_nothing_but_cut_activations_and_gradients_cross_the_seam(tmp_path):
    cfg = _cfg("train.rounds=1")
    t = Trainer(cfg, tmp_path, quiet=True)
    t.model.seam.recorder = SeamRecorder(capture=True)
    eng = t.engine
    batch = {i: (d.x[:8], d.y[:8]) for i, d in enumerate(t.setup.data)}
    real = torch.cat([x for x, _ in batch.values()])
    made = []
    generate = t.model.generate
    t.model.generate = lambda i, z, y: made.append(generate(i, z, y)) or made[-1]
    eng.iteration(batch, torch.Generator().manual_seed(0))
    eng.iteration(batch, torch.Generator().manual_seed(1))
    fakes = torch.cat(made).detach()
    crossings = t.model.seam.recorder.crossings
    g, d = t.setup.arch.generator(), t.setup.arch.discriminator()
    shapes = {"G": [], "D": []}
    h = t.setup.arch.generator_inputs(8)
    for b in g.blocks:
        h = b(*h) if isinstance(h, tuple) else b(h)
        shapes["G"].append(tuple(h.shape))
    h = t.setup.arch.discriminator_inputs(8)
    for b in d.blocks:
        h = b(*h) if isinstance(h, tuple) else b(h)
        shapes["D"].append(tuple(h.shape))
    image_shape = (8, *t.setup.arch.image_shape)
    assert crossings, "the recorder saw nothing"
    per_client = {}
    for c in crossings:
        assert c.kind in ("activation", "gradient")
        assert c.tensor.is_floating_point(), "an integer tensor (a label?) crossed"
        assert c.shape == shapes[c.net][c.block], (c.net, c.block, c.shape)
        assert c.shape != image_shape and c.shape[1:] != (1,), "an image or a D output crossed"
        flat = c.tensor.reshape(8, -1)
        for imgs in (real, fakes):
            for k in range(0, len(imgs), 8):
                other = imgs[k:k + 8].reshape(8, -1)
                assert flat.shape != other.shape or not torch.allclose(flat, other)
        per_client.setdefault(c.client, set()).add((c.kind, c.direction, c.net))
        # the block index says where the cut is: within the client's own head/tail boundary
        cuts = t.setup.cuts[c.client]
        head = cuts.hg if c.net == "G" else cuts.hd
        tail = cuts.tg if c.net == "G" else cuts.td
        m = len(shapes[c.net]) - 2
        assert c.block in (head, m - tail)
    for kinds in per_client.values():
        assert len(kinds) == 8  # both nets, both directions, activations and gradients


@pytest.mark.parametrize("labels", ["head", "tail"])
def test_labels_in_the_tail_keep_the_label_out_of_what_the_heads_send(tmp_path, labels):
    """model.labels: tail: the generator head's and the discriminator head's rows of the real batch
    do not change when the labels do (they carry none), where the default's do (the test can fail).
    The fakes' D rows may: a fake is an image the generator made for its label."""
    t = Trainer(_cfg("train.rounds=1", f"model.labels={labels}"), tmp_path, quiet=True)
    seen = {}
    for name, shift in (("y", 0), ("other", 3)):
        t.model.seam.recorder = SeamRecorder(capture=True)
        batch = {i: (d.x[:8], (d.y[:8] + shift) % 10) for i, d in enumerate(t.setup.data)}
        with torch.no_grad():
            for i, (x, y) in batch.items():
                t.model.generate(i, torch.zeros(8, 100), y)
                t.model.discriminate(i, x, y)
        seen[name] = [c.tensor for c in t.model.seam.recorder.crossings if c.direction == "client->server"]
    assert len(seen["y"]) == 2 * len(batch)  # G and D of every client
    same = [torch.equal(a, b) for a, b in zip(seen["y"], seen["other"])]
    assert all(same) if labels == "tail" else not any(same)


def test_a_run_with_labels_in_the_tail_trains_resumes_and_samples_per_class(tmp_path):
    """The tail-conditioned networks train through the trainer and resume exactly, and their samples
    depend on the label (the G tail's per-class scales moved off their zero start)."""
    full = Trainer.new(_cfg("model.labels=tail"), tmp_path / "full", quiet=True)
    full.fit()
    part = Trainer.new(_cfg("model.labels=tail", "train.rounds=2"), tmp_path / "part", quiet=True)
    part.fit()
    (tmp_path / "part" / "config.yaml").write_text((tmp_path / "full" / "config.yaml").read_text())
    resumed = Trainer.resume(tmp_path / "part", quiet=True)
    resumed.fit()
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    g = full.model.assemble(0, "G")
    z = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(g(z, torch.zeros(4, dtype=torch.long)), g(z, torch.ones(4, dtype=torch.long)))


def test_bad_label_place_is_one_line():
    with pytest.raises(HuscfError, match="model.labels") as err:
        build_config({}, ["model.labels=middle"])
    assert "\n" not in str(err.value)


def test_short_run_improves_label_accuracy(tmp_path):
    cfg = build_config({}, ["data.clients_per_domain=2", "model.width=0.25", "train.rounds=4",
                            "train.local_epochs=2", "train.batch_size=32", "federation.warmup_rounds=1",
                            "output.samples_every=0", "cuts.method=random", "data.domains=[digits]"])
    t = Trainer.new(cfg, tmp_path / "r", quiet=True)
    before = t._label_accuracy(0)["digits"]
    t.fit()
    after = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])["label_accuracy"]["digits"]
    assert before < 0.25  # about chance for an untrained generator
    assert after > before + 0.25, (before, after)


def test_nan_loss_stops_with_one_line_and_keeps_finished_rounds(tmp_path):
    t = Trainer.new(_cfg(), tmp_path / "run", quiet=True)
    orig = t.engine.run_epoch

    def poisoned(round_idx, epoch, *args, **kwargs):
        if round_idx == 1:
            with torch.no_grad():
                for p in t.model.server.parameters():
                    p.fill_(float("nan"))
        return orig(round_idx, epoch, *args, **kwargs)

    t.engine.run_epoch = poisoned
    with pytest.raises(HuscfError, match=r"loss is not finite .* at round 2, epoch 1, iteration 1"):
        t.fit()
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and (tmp_path / "run" / "checkpoints" / "round_0001.pt").exists()


def test_non_finite_weights_after_the_round_end_stop_with_one_line(tmp_path):
    t = Trainer.new(_cfg(), tmp_path / "run", quiet=True)
    orig = t.engine.federate

    def poisoned(strategy, sizes, round_idx, *args):
        agg = orig(strategy, sizes, round_idx, *args)
        if round_idx == 1:  # the second round's averaging produced a NaN in client 2's discriminator
            with torch.no_grad():
                next(t.model.clients[2].nets["D"].parameters()).view(-1)[0] = float("nan")
        return agg

    t.engine.federate = poisoned
    with pytest.raises(HuscfError, match=r"round 2: client 2's discriminator weights are not finite .*"
                                         r"the checkpoint of round 1 is kept"):
        t.fit()
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and not (tmp_path / "run" / "checkpoints" / "round_0002.pt").exists()


def test_fixed_cuts_are_validated(tmp_path):
    with pytest.raises(HuscfError, match="client 0: generator cuts head=2 \\+ tail=1 leave the server no block"):
        build_setup(_cfg("cuts.method=fixed", "cuts.fixed=[2,1,0,0]"))
    with pytest.raises(HuscfError, match="3 cut lists for 4 clients"):
        build_setup(_cfg("cuts.method=fixed", "cuts.fixed=[[0,0,0,0],[0,0,0,0],[0,0,0,0]]"))


def test_a_client_with_one_sample_is_refused():
    with pytest.raises(HuscfError, match=r"client \d+ \(digits\) has 1 training sample"):
        build_setup(_cfg("data.domains=[digits]", "data.limit_per_domain=3"))


def test_checkpoints_are_written_in_the_background_from_a_copy(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.create()
    w = torch.zeros(3)
    model = {"w": w, "t": torch.arange(6.0).view(2, 3).t(), "n": torch.tensor([1, 2]), "s": torch.tensor(3.5)}
    run.save_checkpoint(1, {"round": 1, "engine": {"model": model, "opts": [{"step": torch.tensor(2.0)}]}})
    w.fill_(7.0)  # training goes on changing the live tensors while the writer runs
    run.flush()
    saved = run.load_model_state(1)
    assert torch.equal(saved["w"], torch.zeros(3))
    for key in ("t", "n", "s"):  # mixed dtypes, a transposed view and a scalar keep values, shapes, dtypes
        assert saved[key].dtype == model[key].dtype and torch.equal(saved[key], model[key]), key
    full = torch.load(run.checkpoints / "round_0001.pt", weights_only=False)
    assert full["engine"]["opts"][0]["step"] == 2.0

    def disk_full(self, state, path, slim):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RunDir, "_atomic_save", disk_full)
    run.save_checkpoint(2, {"round": 2, "engine": {"model": {"w": w}}})
    with pytest.raises(HuscfError, match="could not write a checkpoint .*No space left"):
        run.flush()
