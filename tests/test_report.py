"""`huscf report`: report.html / report.md from a real tiny run, with and without a synthetic eval.json."""

import json
import re
import shutil
from pathlib import Path

import pytest
from threadpoolctl import threadpool_limits

from huscf.config import build_config
from huscf.errors import HuscfError
from huscf.report.build import write_report
from huscf.trainer import Trainer

TINY = [
    "output.keep_full_checkpoints=1",
    "data.clients_per_domain=2", "model.width=0.125", "train.rounds=3", "train.local_epochs=1",
    "train.batch_size=32", "train.max_iters_per_epoch=2", "federation.warmup_rounds=1",
    "output.samples_per_class=2", "cuts.method=random",
]
SECTIONS = ["Run summary", "Final metrics", "Scores per round", "FID per round",
            "Per-class TSTR accuracy and confusion matrices", "Cluster assignment over rounds", "Losses per round",
            "Latency and communication", "Samples", "Configuration"]
TRAINING_SECTIONS = [s for s in SECTIONS if s not in ("FID per round", "Per-class TSTR accuracy and confusion matrices")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One real tiny run, copied by each test that writes into it. One BLAS/OpenMP thread: on a busy
    2-core machine the label probes' fit otherwise spins for a minute instead of taking a second."""
    with threadpool_limits(limits=1):
        return Trainer.new(build_config({}, TINY), tmp_path_factory.mktemp("report") / "run", quiet=True).fit()


@pytest.fixture
def run(trained, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


def _metrics(m: dict, acc: float) -> dict:
    return {"accuracy": acc, "precision": m["p"], "recall": m["r"], "f1": m["f1"], "fpr": m["fpr"],
            "per_class_accuracy": [acc] * 10, "confusion": [[50 if i == j else 1 for j in range(10)] for i in range(10)]}


def fake_eval(run: Path, domains=("digits", "digits_inverted")) -> dict:
    """A schema-correct eval.json for ``run`` with recognisable numbers; writes it and its sample grid."""
    (run / "eval_samples").mkdir(exist_ok=True)
    newest = sorted((run / "samples").glob("round_0003_*.png"))[0]
    samples = {}
    for k, d in enumerate(domains):
        shutil.copy(newest, run / "eval_samples" / f"domain{k}.png")
        samples[d] = f"eval_samples/domain{k}.png"
    per_round = [{"round": r, "cluster": k, "client": 2 * k, "domain": d, "generation_score": 0.2 * r + 0.01 * k,
                  "fid": 90.0 - 10 * r + k} for r in (1, 2, 3) for k, d in enumerate(domains)]
    final = [
        {"round": 3, "cluster": k, "client": 2 * k, "domain": d, "generation_score": 0.873 - 0.1 * k,
         "fid": 12.34 + k,
         "tstr": _metrics({"p": 0.712, "r": 0.701, "f1": 0.705, "fpr": 0.031}, 0.7007 + 0.1 * k),
         "real_ceiling": _metrics({"p": 0.95, "r": 0.95, "f1": 0.951, "fpr": 0.005}, 0.962)}
        for k, d in enumerate(domains)]
    ev = {"run_dir": str(run), "created": "2026-01-01T00:00:00", "settings": {
        "samples": 5000, "tstr_samples": 30000, "tstr_epochs": 3, "seed": 0, "rounds": [1, 2, 3]},
        "classifiers": {d: {"test_accuracy": 0.981, "data_hash": "abc"} for d in domains},
        "inception_fid": {"available": False, "reason": "no weights offline"},
        "generators": [{"round": 3, "cluster": k, "client": 2 * k, "domain": d, "members": [2 * k, 2 * k + 1]}
                       for k, d in enumerate(domains)],
        "per_round": per_round, "final": final, "samples": samples}
    (run / "eval.json").write_text(json.dumps(ev))
    return ev


def test_full_report(run):
    fake_eval(run)
    html_path, md_path = write_report(run)
    assert html_path == run / "report.html" and md_path == run / "report.md"
    page = html_path.read_text()
    for title in SECTIONS:
        assert f">{title}</h2>" in page, title
    assert page.count('src="data:image/png;base64,') >= 10
    assert 'src="http' not in page and "<script" not in page.lower() and "<link" not in page
    # the final table: one row per generator with eval.json's numbers, formatted
    rows = [r for r in re.findall(r"<tr>(.*?)</tr>", page) if "12.34" in r]
    assert len(rows) == 1
    row = re.findall(r"<td[^>]*>(.*?)</td>", rows[0])
    assert row == ["digits", "0", "0", "3", "0.873", "12.34", "0.701", "0.712", "0.701", "0.705", "0.031",
                   "0.962", "0.951", "0.981"]
    assert "13.34" in page and "0.773" in page  # the second generator
    assert "no weights offline" in page and "has no eval.json yet" not in page
    assert "HuSCF-GAN; what leaves a client: cut-layer activations" in page  # the method and what it shares

    md = md_path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) >= 10 and all(link.startswith("report_files/") for link in links)
    for link in links:
        assert (run / link).read_bytes().startswith(b"\x89PNG"), link
    assert sorted(p.name for p in (run / "report_files").iterdir()) == sorted(Path(x).name for x in links)
    assert "| digits | 0 | 0 | 3 | 0.873 | 12.34 | 0.701 |" in md
    assert "```yaml\nname: default" in md
    assert not list(run.glob(".report*"))  # no temporary leftovers


def test_report_without_eval_has_training_sections_and_hint(run):
    html_path, md_path = write_report(run)
    page, md = html_path.read_text(), md_path.read_text()
    for title in TRAINING_SECTIONS:
        assert f">{title}</h2>" in page, title
    assert "FID per round" not in page and "TSTR accuracy and" not in page
    assert f"huscf evaluate {run}" in page and f"huscf evaluate {run}" in md
    assert page.count("data:image/png;base64,") >= 7  # scores, clusters, ARI, losses, latency x2, bytes, samples
    assert "round 3 (the newest grids)" in page
    # rewriting replaces the previous report and its images
    fake_eval(run)
    write_report(run)
    assert "12.34" in (run / "report.html").read_text()
    links = re.findall(r"\]\((report_files/[^)]+)\)", (run / "report.md").read_text())
    assert sorted(p.name for p in (run / "report_files").iterdir()) == sorted(Path(x).name for x in links)


@pytest.mark.parametrize("missing", ["metrics.jsonl", "config.yaml"])
def test_missing_input_raises_and_writes_nothing(run, missing):
    (run / missing).unlink()
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(HuscfError, match=missing.replace(".", r"\.")) as err:
        write_report(run)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in run.iterdir()) == before


def test_not_a_run_directory(tmp_path):
    with pytest.raises(HuscfError, match="no config.yaml and no metrics.jsonl"):
        write_report(tmp_path)
    with pytest.raises(HuscfError, match="no such directory"):
        write_report(tmp_path / "nope")
    assert list(tmp_path.iterdir()) == []


def test_broken_eval_json_is_one_line_error(run):
    settings = '"settings": {"samples": 10, "tstr_samples": 0, "rounds": [3]}'
    (run / "eval.json").write_text('{' + settings + ', "final": [{"cluster": 0}]}')
    with pytest.raises(HuscfError, match=r"eval\.json: missing key 'final\[0\]\.round'"):
        write_report(run)
    (run / "eval.json").write_text('{"final": []}')
    with pytest.raises(HuscfError, match=r"eval\.json: missing key 'settings'"):
        write_report(run)
    (run / "eval.json").write_text('{"final": ')
    with pytest.raises(HuscfError, match=r"eval\.json") as err:
        write_report(run)
    assert "\n" not in str(err.value)
    assert not (run / "report.html").exists() and not (run / "report_files").exists()


def test_text_is_escaped(run):
    evil = "<script>alert(1)</script>"
    clients = json.loads((run / "clients.json").read_text())
    clients["clients"][0]["domain"] = evil
    (run / "clients.json").write_text(json.dumps(clients))
    fake_eval(run, domains=(evil, "digits_inverted"))
    html_path, md_path = write_report(run)
    page, md = html_path.read_text(), md_path.read_text()
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in md and "&lt;script&gt;" in md
    for link in re.findall(r"\]\((report_files/[^)]+)\)", md):
        assert (run / link).is_file() and "<" not in link
