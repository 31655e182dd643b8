"""The embedding service: OpenAI-format `POST /v1/embeddings` (+ search) on Ray Serve.

api.py holds the HTTP contract (checks and responses, no Ray), engine.py the batch forward pass,
app.py the Serve deployment; `python -m pipelines.serve` runs it."""
