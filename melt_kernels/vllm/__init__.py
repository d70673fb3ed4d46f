"""vLLM plugin: serves MELT (model_type "melt") and Ouro (model_type "ouro") checkpoints.

Installed beside vLLM, the package's ``vllm.general_plugins`` entry point
runs :func:`register` in every engine process, so ``vllm serve DIR`` and
``LLM(model=DIR)`` need neither ``trust_remote_code`` nor anything in the
user's script.  The models: :mod:`melt_kernels.vllm.model`; their configs,
checks and prefill policy: :mod:`melt_kernels.vllm.config`.
"""

ARCHITECTURES = {
    "MeltForCausalLM": "melt_kernels.vllm.model:MeltForCausalLM",
    "OuroForCausalLM": "melt_kernels.vllm.model:OuroForCausalLM",
}


def register() -> None:
    """Registers the two architectures, their config hooks and model_type "ouro" with AutoConfig (idempotent;
    vLLM may call it several times per process)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from melt_kernels.vllm.config import MeltServing, OuroConfig, OuroServing

    AutoConfig.register(OuroConfig.model_type, OuroConfig, exist_ok=True)
    for architecture, model in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, model)
    MODELS_CONFIG_MAP["MeltForCausalLM"] = MeltServing
    MODELS_CONFIG_MAP["OuroForCausalLM"] = OuroServing
