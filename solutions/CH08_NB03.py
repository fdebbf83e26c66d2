"""Solutions of CH08_NB03's exercises."""


def skipped_per_token(skipped, decoded):
    """Mean skipped attentions per decoded token: each prompt weighs as many times as the tokens decoded after it."""
    return sum(s * d for s, d in zip(skipped, decoded)) / sum(decoded)


def expected_cache_ratio(skipped, prompt_tokens, n_blocks):
    """Share of the base cache kept: each prompt keeps 1 - skipped / n_blocks of a cache proportional to its tokens."""
    kept = sum(t * (1 - s / n_blocks) for s, t in zip(skipped, prompt_tokens))
    return kept / sum(prompt_tokens)
