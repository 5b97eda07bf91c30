"""OpenAI's Responses API (/v1/responses): schemas, the translation to chat, the optional store, the router."""
