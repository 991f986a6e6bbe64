"""``huscf cuts``: text and JSON output."""

import argparse
import json

from huscf.cuts.cli import add_parser, run


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["cuts", *argv])


def test_json_output(capsys):
    assert run(parse("--profiles", "paper", "--clients", "9", "--json", "--batch", "16", "--method", "ga")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "ga" and len(out["clients"]) == 9 and out["solve_seconds"] >= 0
    assert set(out["clients"][0]["cuts"]) == {"hg", "tg", "hd", "td"}
    lat = out["latency"]
    assert {"total_s", "server_s", "objective", "stages", "bytes_per_client"} <= set(lat)
    assert abs(sum(lat["stages"].values()) - lat["total_s"]) < 1e-9


def test_text_output(capsys):
    assert run(parse("--clients", "8", "--assignment", "shuffle", "--arch", "dcgan32", "--width", "0.5")) == 0
    out = capsys.readouterr().out
    assert "device1" in out and "g_fwd_head" in out and "objective" in out
