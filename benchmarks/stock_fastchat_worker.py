"""FastChat's stock `fastchat.serve.model_worker` (HF transformers, one request at a time), made to start
under transformers 5 for a side-by-side run: its get_context_length() reads rope_scaling["factor"],
which transformers 5 configs no longer carry. Same flags as the stock worker, plus the ChatML template
dashinfer-core's worker derives from the tokenizer registered as 'dashinfer-chatml', so both workers
get identical prompts. Benchmarks only."""
from __future__ import annotations

import sys


def context_length(config) -> int:
    scaling = getattr(config, "rope_scaling", None) or {}
    factor = scaling.get("factor", 1) if isinstance(scaling, dict) else 1
    return int(factor * getattr(config, "max_position_embeddings", 2048))


def main() -> None:
    import uvicorn
    from fastchat.conversation import register_conv_template
    from transformers import AutoTokenizer

    import fastchat.serve.model_worker as model_worker
    import fastchat.utils
    from dashinfer_fastchat.conversation import chatml_from_tokenizer
    fastchat.utils.get_context_length = context_length
    model_worker.get_context_length = context_length
    model_path = sys.argv[sys.argv.index("--model-path") + 1]
    conv = chatml_from_tokenizer(AutoTokenizer.from_pretrained(model_path))
    if conv is not None:
        register_conv_template(conv, override=True)
    args, _ = model_worker.create_model_worker()
    uvicorn.run(model_worker.app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
