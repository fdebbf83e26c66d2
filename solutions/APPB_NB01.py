"""Solutions of APPB_NB01's exercises (Appendix B)."""

import math


def accuracy_stderr(items, predictions):
    """(share of correct predictions, sample standard deviation of the 0/1 scores / sqrt(n))."""
    correct = [float(p == item["label"]) for item, p in zip(items, predictions)]
    n = len(correct)
    mean = sum(correct) / n
    variance = sum((c - mean) ** 2 for c in correct) / (n - 1)
    return mean, math.sqrt(variance) / math.sqrt(n)


def mcnemar(only_a, only_b):
    """Two-sided exact McNemar p-value from the two counts of disagreements."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
