"""Rank 0's sampling: the sampler, logits processors, structured-output masks and prompt logprobs."""
