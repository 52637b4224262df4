"""mlx-lm's own tools run a converted DLA model through the folder's ``model_file`` (``--trust-remote-code``):
``mlx_lm generate``, ``cache_prompt`` then ``generate`` from the cache file, and ``mlx_lm server`` answering
completions requests, streamed and not, with the text that `dla_mlx.load` + `mlx_lm.generate` give."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlx_lm import generate

from dla_mlx.convert import MODEL_FILE, load, torch_to_mlx
from dla_shared.hub import DEFAULT_MODEL

PROMPT = "import os\n\n\ndef main("


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlx") / "model"
    torch_to_mlx(DEFAULT_MODEL, out)
    return out


@pytest.fixture(scope="module")
def expected(folder):
    """Greedy text from the package's own loader (no trust_remote_code)."""
    model, tokenizer = load(folder)
    return lambda n: generate(model, tokenizer, PROMPT, max_tokens=n)


def mlx_lm(*args, check=True):
    return subprocess.run([sys.executable, "-m", "mlx_lm", *args], capture_output=True, text=True, timeout=300,
                          check=check, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def test_the_folder_names_its_model_file(folder):
    assert json.loads((folder / "config.json").read_text())["model_file"] == MODEL_FILE
    assert (folder / MODEL_FILE).exists()


def test_mlx_lm_generate_runs_it(folder, expected):
    run = mlx_lm("generate", "--model", str(folder), "--prompt", PROMPT, "--max-tokens", "8", "--trust-remote-code")
    assert expected(8) in run.stdout and "Generation: 8 tokens" in run.stdout
    refused = mlx_lm("generate", "--model", str(folder), "--prompt", PROMPT, check=False)
    assert refused.returncode != 0 and "trust_remote_code" in refused.stderr


def test_mlx_lm_cache_prompt_then_generate(folder, tmp_path):
    cache = tmp_path / "prompt.safetensors"
    mlx_lm("cache_prompt", "--model", str(folder), "--prompt", PROMPT, "--prompt-cache-file", str(cache),
           "--trust-remote-code")
    run = mlx_lm("generate", "--model", str(folder), "--prompt-cache-file", str(cache), "--prompt", "x",
                 "--max-tokens", "4", "--trust-remote-code")
    assert "Generation: 4 tokens" in run.stdout


def test_mlx_lm_server_answers_completions(folder, expected):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), "--trust-remote-code",
                               "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1/completions"

    def post(body):
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.read().decode()

    try:
        for _ in range(120):  # the server starts in a few seconds
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.5)
        whole = json.loads(post({"prompt": PROMPT, "max_tokens": 6, "temperature": 0}))
        assert whole["choices"][0]["text"] == expected(6)
        events = [json.loads(line[6:]) for line in post({"prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                                         "stream": True}).splitlines()
                  if line.startswith("data: {")]
        assert "".join(e["choices"][0]["text"] for e in events) == expected(6)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_model_file_without_dla_says_what_to_install(folder):
    code = (f"import sys; sys.modules['dla_mlx'] = None; import runpy; runpy.run_path({str(folder / MODEL_FILE)!r})")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "install the `dla` package" in run.stderr
