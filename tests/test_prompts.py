"""`medsyn prompts`: seeded drawing under the co-occurrence constraint, templates, and the LLM backend
against a stub OpenAI-compatible server on 127.0.0.1."""

import argparse
import ast
import importlib.util
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medsyn.cli import run_cli
from medsyn.commands import prompts as prompts_command
from medsyn.prompting.llm import chat_url, findings_text
from medsyn.prompting.text import mentions

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-test-0123456789secret"
COOCCURRENCE = [("heart", "cardiomegaly", 5), ("heart", "pericardial effusion", 2), ("right upper lobe", "nodule", 4),
                ("right upper lobe", "emphysema", 3), ("pleural", "pleural effusion", 6), ("lung", "emphysema", 2),
                ("lung", "nodule", 1)]  # fmt: skip
ANATOMY = {"heart": 8, "right upper lobe": 7, "pleural": 9, "lung": 5, "trachea": 10}  # trachea: no pathology
PATHOLOGY = {"cardiomegaly": 5, "pericardial effusion": 2, "nodule": 5, "emphysema": 5, "pleural effusion": 6,
             "pneumothorax": 3}  # pneumothorax: no anatomy  # fmt: skip


@pytest.fixture
def vocab_dir(tmp_path):
    rows = lambda terms: [{"term": t, "count": c, "doc_freq": c} for t, c in terms.items()]  # noqa: E731
    data = {"format": "medsyn-vocab", "version": 1, "anatomy": rows(ANATOMY), "pathology": rows(PATHOLOGY),
            "cooccurrence": [{"anatomy": a, "pathology": p, "count": n} for a, p, n in COOCCURRENCE]}  # fmt: skip
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "vocab.json").write_text(json.dumps(data))
    return tmp_path / "vocab"


def _prompts(*argv) -> int:
    parser = argparse.ArgumentParser(prog="medsyn prompts")
    prompts_command.add_arguments(parser)
    return run_cli(prompts_command.run, "medsyn prompts", parser.parse_args([*argv, "--no-progress"]))


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_template_is_seeded_and_respects_cooccurrence(vocab_dir, tmp_path):
    common = ["--vocab", str(vocab_dir), "--n", "25", "--anatomy", "2", "--pathology", "2"]
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert _prompts(*common, "--seed", "7", "--out", str(a)) == 0
    assert _prompts(*common, "--seed", "7", "--out", str(b)) == 0
    assert _prompts(*common, "--seed", "8", "--out", str(c)) == 0
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
    pairs = {(x, y) for x, y, _ in COOCCURRENCE}
    records = _lines(a)
    assert len(records) == 25 and [r["seed"] for r in records] == list(range(7, 32))
    for r in records:
        anatomy, pathology = r["terms"]["anatomy"], r["terms"]["pathology"]
        assert len(anatomy) == 2 and len(pathology) == 2 and r["backend"] == "template"
        assert "trachea" not in anatomy and "pneumothorax" not in pathology
        assert all(any((x, p) in pairs for x in anatomy) for p in pathology)
        assert all(mentions(r["prompt"], t) for t in anatomy + pathology)
        assert not re.search(r"\b(no|not|without)\b", r["prompt"].lower())
    # sample.py reads the file: prompt and seed, other keys ignored
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "sample.py")
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    assert sample.read_prompts(a)[:2] == [(records[0]["prompt"], 7), (records[1]["prompt"], 8)]


def test_count_errors_are_one_line(vocab_dir, tmp_path, capsys):
    out = str(tmp_path / "p.jsonl")
    assert (
        _prompts("--vocab", str(vocab_dir), "--n", "2", "--anatomy", "0", "--pathology", "1", "--out", out)
        == 2
    )
    assert _prompts("--vocab", str(vocab_dir), "--n", "2", "--pathology", "9", "--out", out) == 2
    assert _prompts("--vocab", str(tmp_path), "--n", "2", "--out", out) == 2
    assert _prompts("--vocab", str(vocab_dir), "--n", "2", "--backend", "llm", "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and "Traceback" not in "\n".join(err)
    assert (
        "--anatomy >= 1" in err[0]
        and "--pathology 9" in err[1]
        and "vocab.json" in err[2]
        and "--url" in err[3]
    )


class _Stub(BaseHTTPRequestHandler):
    mode = "good"
    seen: list = []

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.seen.append((self.path, dict(self.headers), body))
        if _Stub.mode == "sleep":
            time.sleep(1.5)
        content = body["messages"][0]["content"]
        anatomy = ast.literal_eval(
            re.search(r"anatomy_list = (\[.*?\])", content).group(1)
        )  # the drawn terms come first
        pathology = ast.literal_eval(re.search(r"pathology_list = (\[.*?\])", content).group(1))
        text = (f"anatomy_list = {anatomy}\npathology_list = {pathology}\nFindings: Mild {pathology[0]}s near "
                f"the {anatomy[0]} and {' and '.join(anatomy[1:] + pathology[1:])} are present.")  # fmt: skip
        answer = {"choices": [{"message": {"role": "assistant", "content": text}}]}
        if _Stub.mode == "missing":
            answer["choices"][0]["message"]["content"] = "Findings: The chest looks fine."
        raw = {"notjson": b"<html>oops</html>", "nochoices": b'{"error": "busy"}'}.get(_Stub.mode)
        raw = raw if raw is not None else json.dumps(answer).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except OSError:  # the client gave up (timeout test)
            pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    _Stub.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _llm(vocab_dir, out, url, *extra):
    return _prompts("--vocab", str(vocab_dir), "--n", "3", "--backend", "llm", "--url", url, "--model", "tiny",
                    "--api-key-env", "MEDSYN_TEST_KEY", "--out", str(out), *extra)  # fmt: skip


def _no_secret(tmp_path, captured):
    assert SECRET not in captured.out + captured.err
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert SECRET not in file.read_text(errors="replace"), file


def test_llm_good_answer(vocab_dir, tmp_path, stub, monkeypatch, capsys):
    monkeypatch.setenv("MEDSYN_TEST_KEY", SECRET)
    out = tmp_path / "llm.jsonl"
    assert _llm(vocab_dir, out, stub + "/") == 0
    records = _lines(out)
    assert len(records) == 3 and all(r["backend"] == "llm" and r["model"] == "tiny" for r in records)
    assert records[0]["prompt"].startswith("Mild ") and "anatomy_list" not in records[0]["prompt"]
    path, headers, body = _Stub.seen[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == f"Bearer {SECRET}"
    assert body["model"] == "tiny" and "do not write any negative sentences" in body["messages"][0]["content"]
    assert json.loads((tmp_path / "llm.drops.json").read_text())["dropped"] == 0
    _no_secret(tmp_path, capsys.readouterr())


def test_llm_missing_term_is_retried_then_dropped(vocab_dir, tmp_path, stub, monkeypatch, capsys):
    monkeypatch.setenv("MEDSYN_TEST_KEY", SECRET)
    _Stub.mode = "missing"
    try:
        assert _llm(vocab_dir, tmp_path / "m.jsonl", stub, "--retries", "1") == 0
    finally:
        _Stub.mode = "good"
    assert len(_Stub.seen) == 6  # 3 prompts x (1 + 1 retry)
    assert (tmp_path / "m.jsonl").read_text() == ""
    summary = json.loads((tmp_path / "m.drops.json").read_text())
    assert summary["dropped"] == 3 and summary["written"] == 0 and summary["drops"][0]["missing"]
    captured = capsys.readouterr()
    assert "3 dropped" in captured.out
    _no_secret(tmp_path, captured)


@pytest.mark.parametrize(
    "mode, expected", [("sleep", "--timeout 0.3"), ("notjson", "not JSON"), ("nochoices", "no choices")]
)
def test_llm_bad_answers_are_one_line_errors(vocab_dir, tmp_path, stub, monkeypatch, capsys, mode, expected):
    monkeypatch.setenv("MEDSYN_TEST_KEY", SECRET)
    _Stub.mode = mode
    try:
        code = _llm(vocab_dir, tmp_path / "e.jsonl", stub, "--timeout", "0.3", "--retries", "1")
    finally:
        _Stub.mode = "good"
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expected in lines[0] and "2 attempts" in lines[0]
    assert "Traceback" not in captured.err and not (tmp_path / "e.jsonl").exists()
    _no_secret(tmp_path, captured)


def test_llm_refused_connection(vocab_dir, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    assert _llm(vocab_dir, tmp_path / "r.jsonl", f"http://127.0.0.1:{port}/v1") == 2
    err = capsys.readouterr().err
    assert (
        "cannot connect" in err and f"127.0.0.1:{port}/v1/chat/completions" in err and "Traceback" not in err
    )
    assert "attempts" not in err and len(err.strip().splitlines()) == 1  # refused: fails at once


def test_url_and_answer_parsing():
    assert chat_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_url("http://h/api/chat/completions") == "http://h/api/chat/completions"
    assert (
        findings_text("<think>hmm</think>anatomy_list = []\nFindings:\n Mild  effusion.\n")
        == "Mild effusion."
    )
    assert findings_text("Mild effusion in the pleural space.") == "Mild effusion in the pleural space."
