"""Images and video in chat messages: fetching media under the operator's rules, decoding and processing it."""
