"""Exceptions the engine raises for bad input.

Every parameter error is a ``ValueError`` subclass whose message names the field and the limit, so
callers (the FastChat worker, the LiteLLM provider) can map it to an HTTP 4xx without parsing text.
"""


class InvalidParameterError(ValueError):
    """A request or engine parameter is out of its range; ``field`` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class PromptTooLongError(InvalidParameterError):
    """The prompt (plus at least one new token) does not fit the model's context window."""

    def __init__(self, num_prompt_tokens: int, max_model_len: int):
        self.num_prompt_tokens = num_prompt_tokens
        self.max_model_len = max_model_len
        super().__init__(
            "prompt",
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{num_prompt_tokens} tokens (at least one token must be left for the completion)",
        )


class DuplicateRequestError(InvalidParameterError):
    def __init__(self, request_id: str):
        super().__init__("request_id", f"request {request_id!r} is already running; ids must be unique")


class UnsupportedModelError(ValueError):
    """The model directory is missing, or its architecture is not one this engine implements."""


class EngineDeadError(RuntimeError):
    """The step loop crashed; every pending request is failed with this error."""
