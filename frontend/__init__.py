"""The HTTP frontend: OpenAI-compatible API in front of the engine core. Never imports torch.

Entry point: `frontend.server.run_frontend(model_config, frontend_config, engine_address, client_index)`.
App factory: `frontend.app.create_app(model_config, frontend_config, engine_client)`.

The package root is the process and its plumbing (app, server, engine client, state, errors, metrics,
streaming, tokenizer, chat templates); each API family is a package holding its schemas (`protocol.py`), its
serving logic and its router: `generate/` (completions, chat, responses, tools), `pooling/` (embeddings,
classify, score, rerank), `speech/` (transcriptions, translations, realtime). `routes/` holds the routes that
belong to no family (models, health, version, metrics, tokenize).
"""
