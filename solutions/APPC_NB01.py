"""Solutions of APPC_NB01's exercises (Appendix C)."""


def decode_cost_per_token(first, second, new_tokens, batch):
    """(second call - first call) / the later tokens of every sequence."""
    return (second - first) / ((new_tokens - 1) * batch)


def kwh_per_million_tokens(joules_per_token):
    """J per token x 1e6 tokens / 3.6e6 J per kWh."""
    return joules_per_token * 1e6 / 3.6e6
