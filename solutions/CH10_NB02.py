"""Solutions of CH10_NB02's exercises."""


def largest_entry(stream):
    """(row, token, dimension) of the largest |value| of a [rows, tokens, hidden] residual stream."""
    rows, tokens, hidden = stream.shape
    flat = int(stream.abs().argmax())
    row, rest = divmod(flat, tokens * hidden)
    token, dimension = divmod(rest, hidden)
    return row, token, dimension


def peak_ratios(stream):
    """Per row: the largest |value| divided by the median |value|."""
    mags = stream.abs().reshape(stream.shape[0], -1)
    return (mags.max(dim=1).values / mags.median(dim=1).values).tolist()
