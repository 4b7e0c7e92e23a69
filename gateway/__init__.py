"""The canary gateway: an OpenAI-compatible gateway that routes each request by policy between variants."""
