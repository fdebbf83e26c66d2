"""Solutions of CH06_NB01's exercises."""

import math


def uniform_map(n_student, n_teacher):
    """Student block i imitates teacher block round((i + 1) * T / S) - 1."""
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]


def recovered(base, pruned, recovered_ppl):
    """Share of the lost log-likelihood won back; NaN when pruning lost nothing."""
    lost = math.log(pruned) - math.log(base)
    if lost <= 0:
        return float("nan")
    return (math.log(pruned) - math.log(recovered_ppl)) / lost
