"""The OpenAI-compatible HTTP surface that a replica's driver and rallyd's gateway both serve.

``schema`` validates request bodies (every error names the field), ``responses`` shapes answers,
chunks and errors as OpenAI does, ``text`` turns committed tokens into text deltas with stop
strings, and ``server`` builds the ASGI app (errors, API key, body limit) and runs it under uvicorn.
"""

from pathlib import Path

API_KEY_ENV = "RALLYPOINT_API_KEY"  # how rallyd hands its [gateway] api_key to the replicas' APIs


def bearer(api_key: str | None) -> dict[str, str] | None:
    """The header that carries ``api_key`` to an API that requires it (None: no header)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else None


def served_model_name(model_dir: str | Path) -> str:
    """The name a deployment serves its checkpoint under (``/v1/models``): the directory's name."""
    return Path(model_dir).resolve().name or "rallypoint"
