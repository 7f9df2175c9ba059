"""Schemathesis, with every one of its checks, against a live server: 0 failures.

A one-replica app of the default SmolLM2 folder with a 64-token context is deployed on the session's
Ray (tests/ray_fixtures.py) under ``/fuzz``. The test fetches the served ``/openapi.json`` itself, with
the request deadline below (under load a fresh app's first answer took over 10 s, schemathesis's own limit
for loading a schema), and ``schemathesis run`` (its CLI, in a subprocess) loads that document and runs
its coverage and fuzzing phases, positive and negative data, over
``MAX_EXAMPLES`` examples per operation, with ``--checks all``: no 5xx, statuses, content types, headers
(``Retry-After``, ``Allow`` on 405), bodies and each SSE event against the document, schema-valid
requests accepted, schema-violating ones refused, unsupported methods answered 405. No check depends on
the machine's speed: schemathesis's response-time check (on under ``--checks all`` from 4.32, at 10 s) gets
``REQUEST_TIMEOUT_S`` (a 35-token chat answer with logprobs took 39 s beside other jobs at load 15), and a
request only counts as lost after that deadline, far above any answer's time (the longest is 63 tokens).

The context bounds every answer: the document states ``max_tokens <= max_model_len - 1`` and the
token-id prompt's bounds (server/openapi_limits.py), which the server enforces; the two rules JSON
Schema cannot state (prompt tokens + max_tokens within the context, ``min_tokens <= max_tokens``) are
applied to the positive cases by tests/openapi_fuzz_hooks.py, counting the prompt with transformers'
tokenizer. The run must also have generated cases for all five operations, so a run that tested
nothing cannot pass.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request

import pytest

APP = "ts-fuzz"
PREFIX = "/fuzz"
MAX_MODEL_LEN = 64
FUZZ_ARGS = dict(replicas=1, max_num_seqs=4, max_waiting_requests=8, num_blocks=64, num_threads=1,
                 worker_cpus=0.5, max_model_len=MAX_MODEL_LEN, metrics_interval_s=0.25)
MAX_EXAMPLES = 20
REQUEST_TIMEOUT_S = 600
SEED = 14
OPERATIONS = 5                       # /health, /metrics, /v1/models, /v1/completions, /v1/chat/completions


@pytest.fixture(scope="module")
def fuzz_server(ray_session, smollm_folder):
    ray, port = ray_session
    from ray import serve

    from tierserve.server.app import build_app, delete_app

    serve.run(build_app(FUZZ_ARGS), name=APP, route_prefix=PREFIX)  # the default model: smollm_folder
    yield f"http://127.0.0.1:{port}{PREFIX}"
    delete_app(APP)


def test_schemathesis_all_checks_find_nothing(fuzz_server, smollm_folder, tmp_path):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, SCHEMATHESIS_HOOKS="openapi_fuzz_hooks", TS_FUZZ_MODEL=smollm_folder,
               TS_FUZZ_MAX_MODEL_LEN=str(MAX_MODEL_LEN),
               PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    schema = tmp_path / "openapi.json"
    with urllib.request.urlopen(f"{fuzz_server}/openapi.json", timeout=REQUEST_TIMEOUT_S) as resp:
        assert resp.status == 200 and resp.headers["content-type"].startswith("application/json")
        schema.write_bytes(resp.read())
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", str(schema), "--url", fuzz_server,
           "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED),
           "--workers", "1", "--request-timeout", str(REQUEST_TIMEOUT_S), "--generation-database", "none",
           # schemathesis 4.32 applies a 10 s response-time check under --checks all: bound it by the same deadline
           "--max-response-time", str(REQUEST_TIMEOUT_S),
           "--no-color", "--output-sanitize", "false"]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-12000:]
    tested = re.search(r"Tested:\s+(\d+)", out)
    generated = re.search(r"(\d+) generated", out)
    assert tested and int(tested.group(1)) == OPERATIONS, out[-4000:]
    # coverage cases alone are well over a hundred for the two generate operations
    assert generated and int(generated.group(1)) >= 100, out[-4000:]
    assert "No issues found" in out or "passed" in out, out[-4000:]
