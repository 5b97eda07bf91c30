"""Routes that belong to no API family: /v1/models, /health, /version, /metrics, /tokenize, /detokenize."""
