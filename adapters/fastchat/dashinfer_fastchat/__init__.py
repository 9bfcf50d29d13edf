"""dashinfer-core behind FastChat: `python -m dashinfer_fastchat.worker` (a model worker),
`python -m dashinfer_fastchat.openai_api_server` (FastChat's server with streaming fixed for
pydantic 2, response_format and the guided fields forwarded, unsupported fields refused) and
`python -m dashinfer_fastchat.serve` (the whole stack on 127.0.0.1)."""
