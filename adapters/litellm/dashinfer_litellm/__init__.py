"""dashinfer-core as a LiteLLM provider: the engine runs inside LiteLLM (SDK or proxy), no extra server.

SDK:
    import litellm, dashinfer_litellm
    dashinfer_litellm.register()
    litellm.completion(model="dashinfer/default", messages=[{"role": "user", "content": "Hi"}])

Proxy config.yaml:
    model_list:
      - model_name: smollm2
        litellm_params: {model: dashinfer/default}      # or dashinfer/<path to an HF model dir>
    litellm_settings:
      custom_provider_map:
        - {provider: dashinfer, custom_handler: dashinfer_litellm.handler}
"""
from .provider import DashInferLLM, engine_stats, handler, metrics, register

__all__ = ["DashInferLLM", "engine_stats", "handler", "metrics", "register"]
