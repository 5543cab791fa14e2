"""The HTTP gateway: API keys, the REST and SSE API, the web console (see server.py)."""
