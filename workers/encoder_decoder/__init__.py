"""Encoder-decoder (Whisper) support in the model runner: log-mel features, the encoder pass per request and
its cross-attention slots, Whisper's token suppression and timestamp rules."""
