"""Solutions of CH06_NB04's exercises."""

import math


def retention(teacher, student, lower_is_better):
    """Share of the teacher's score the student keeps (1 = the teacher's level)."""
    return teacher / student if lower_is_better else student / teacher


def texts_needed(sizes, retentions, target):
    """Least-squares line retention = a + b ln(size); the size at which it reaches target (inf if it never does)."""
    x = [math.log(s) for s in sizes]
    mx, my = sum(x) / len(x), sum(retentions) / len(retentions)
    b = sum((xi - mx) * (r - my) for xi, r in zip(x, retentions)) / sum((xi - mx) ** 2 for xi in x)
    if b <= 0:
        return math.inf
    a = my - b * mx
    return math.exp((target - a) / b)
