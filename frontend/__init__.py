"""The HTTP frontend: OpenAI-compatible API in front of the engine core. Never imports torch.

Entry point: `frontend.server.run_frontend(model_config, frontend_config, engine_address, client_index)`.
App factory: `frontend.app.create_app(model_config, frontend_config, engine_client)`.
"""
