"""Text generation: /v1/completions, /v1/chat/completions and the Responses API, with sampling, structured
outputs, logprobs, beam search and tool calling."""
