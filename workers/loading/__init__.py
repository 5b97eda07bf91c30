"""Checkpoint readers (safetensors folders, GGUF files, CTranslate2 Whisper folders) and the weight-mapping loop."""
