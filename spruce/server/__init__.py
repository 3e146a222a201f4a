"""OpenAI-compatible HTTP server: `spruce serve` (serve.py), routes (app.py, serving.py), schemas
(protocol.py), Prometheus metrics under vLLM's names (metrics.py)."""
