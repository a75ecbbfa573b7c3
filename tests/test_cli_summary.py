import json

from medsyn.cli import main


def test_summary_json(capsys):
    assert main(["summary", "base-700m", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 650e6 <= out["params"] <= 750e6
    assert 0 < out["flops"] <= 4e12
    assert [a["resolution"] for a in out["attention_levels"]] == [[8, 8, 8]]


def test_summary_table_and_size(capsys):
    assert main(["summary", "sr-light", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "1x8x64x64x64" in out and "bottleneck" in out


def test_summary_errors_are_one_line(capsys):
    assert main(["summary", "base-7b"]) == 2
    err = capsys.readouterr().err
    assert "unknown model preset 'base-7b'" in err and "Traceback" not in err
    assert main(["summary", "base-tiny", "--size", "0"]) == 2
    assert "--size" in capsys.readouterr().err
