"""placeholder, filled in by the LiteLLM provider work."""
