"""Speech to text: /v1/audio/transcriptions, /v1/audio/translations and the /v1/realtime WebSocket (Whisper)."""
