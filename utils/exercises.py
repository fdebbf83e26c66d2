"""Checked exercises: the reader writes a small piece of code, one call says whether it is right.

    from utils import exercises
    exercises.check("CH08_NB01.kv_bytes", kv_bytes, model=model)

Every exercise has an id ``"<notebook>.<name>"``, a title, a hint and a *checker*. The checker receives the
reader's answer and the notebook's own objects (model, dataloader ...) and compares the answer with what
``utils`` computes or measures on the same objects, so the check holds in every profile. :func:`check` never
raises for an unfinished or wrong answer: it prints and returns a :class:`Feedback` that says what is right,
what is wrong, and gives the hint.

Reference solutions live outside the notebooks, in ``solutions/<notebook>.py`` (one function per exercise,
named like it). The tests run every check on its solution (it must pass) and on the starter, which raises
``NotImplementedError`` (it must fail with the hint, not crash).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .precision import device_of


@dataclass
class Feedback:
    """The verdict of :func:`check`: ``passed``, what the check found (``message``) and, unless passed, a hint.

    ``details`` holds what a check made and measured when the notebook needs it afterwards (CH06_NB03's challenge:
    the student your recipe trained, its perplexity, the steps and tokens it used); empty for most checks.
    """

    exercise: str
    passed: bool
    message: str
    hint: str = ""
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        head = f"[{self.exercise}] " + ("Correct. " if self.passed else "Not yet. ")
        return head + self.message + ("" if self.passed or not self.hint else f"\nHint: {self.hint}")

    def __bool__(self) -> bool:
        return self.passed

    def _ipython_display_(self) -> None:
        """Shown as a cell's result: nothing more, :func:`check` has printed the verdict already."""


@dataclass(frozen=True)
class Exercise:
    """One exercise: ``checker(answer, **context)`` returns ``(passed, message)``."""

    id: str
    title: str
    hint: str
    checker: Callable[..., tuple[bool, str]]
    context: tuple[str, ...] = ()

    @property
    def notebook(self) -> str:
        return self.id.split(".")[0]

    @property
    def name(self) -> str:
        return self.id.split(".", 1)[1]


#: Every exercise of the course, by id. Filled by the ``@exercise`` definitions below.
EXERCISES: dict[str, Exercise] = {}


def exercise(exercise_id: str, title: str, hint: str, context: tuple[str, ...] = ()):
    """Register the decorated checker as exercise ``exercise_id`` (``"<notebook>.<name>"``).

    A checker returns ``(passed, message)``, or ``(passed, message, details)`` when the notebook needs what the
    check made (:attr:`Feedback.details`).
    """
    if exercise_id.count(".") != 1:
        raise ValueError(f"An exercise id is '<notebook>.<name>', got {exercise_id!r}.")

    def register(checker: Callable[..., tuple[bool, str]]):
        if exercise_id in EXERCISES:
            raise ValueError(f"Exercise {exercise_id!r} is defined twice.")
        EXERCISES[exercise_id] = Exercise(exercise_id, title, hint, checker, tuple(context))
        return checker
    return register


def check(exercise_id: str, answer, *, quiet: bool = False, **context) -> Feedback:
    """Check the reader's ``answer`` to exercise ``exercise_id`` on the notebook's objects (``context``).

    Prints the verdict (unless ``quiet``) and returns it as a :class:`Feedback`, which is truthy when passed.
    An answer that still raises ``NotImplementedError`` is "not started"; one that raises anything else, or
    returns something of the wrong kind, is "not yet", with the error and the hint.

    Raises:
        ValueError: an unknown exercise id, or a context without the objects the exercise needs (both are
            mistakes in the notebook, not in the answer).
    """
    if exercise_id not in EXERCISES:
        raise ValueError(f"Unknown exercise {exercise_id!r}. Known: {', '.join(sorted(EXERCISES))}.")
    ex = EXERCISES[exercise_id]
    missing = [name for name in ex.context if name not in context]
    if missing:
        raise ValueError(f"exercises.check({exercise_id!r}, ...) needs {', '.join(missing)}= from the notebook.")
    details = {}
    try:
        passed, message, *more = ex.checker(answer, **context)
        details = dict(more[0]) if more else {}
    except NotImplementedError:
        passed, message = False, ("Not started: the cell above still raises NotImplementedError. Replace that line "
                                  "with your code and run both cells again.")
    except Exception as error:  # the reader's code failed: report it, do not crash the notebook
        passed, message = False, f"Your code raised {type(error).__name__}: {error}"
    feedback = Feedback(exercise_id, bool(passed), message, ex.hint, details)
    if not quiet:
        print(feedback)
    return feedback


def list_exercises(notebook: str | None = None) -> list[Exercise]:
    """The exercises of one notebook (its name, e.g. ``"CH08_NB01"``), or of the whole course."""
    return [ex for ex in EXERCISES.values() if notebook is None or ex.notebook == notebook]


# --- helpers of the checkers -----------------------------------------------------------------

def _as_number(got):
    """A one-element tensor as a float; anything else as it is."""
    return float(got) if isinstance(got, torch.Tensor) and got.numel() == 1 else got


def _is_number(got, *, integer: bool = False) -> bool:
    """Whether the reader returned a number (an int when ``integer``); ``True``/``False`` do not count."""
    if isinstance(got, bool):
        return False
    return isinstance(got, int) if integer else isinstance(got, (int, float))


def _close(got, expected, *, rel: float, abs_: float = 0.0) -> bool:
    return math.isclose(float(got), float(expected), rel_tol=rel, abs_tol=abs_)


def _as_floats(values, n: int, what: str) -> list[float] | str:
    """``values`` as n floats, or a sentence saying why it is not."""
    if isinstance(values, torch.Tensor):
        values = values.detach().flatten().tolist()
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        return f"{what} should be a list of {n} numbers, got {type(values).__name__}."
    if len(values) != n:
        return f"{what} should hold {n} numbers (one per block), got {len(values)}."
    return values


# --- CH04_NB01: depth pruning ----------------------------------------------------------------

@exercise("CH04_NB01.mlp_importance", "Score the MLP sublayer of every block: 1 - cos(MLP input, block output)",
          "Register a forward pre-hook on `structure.mlp_input_norm(block)`, the norm in front of the MLP "
          "(`post_attention_layernorm` in Llama and Qwen): its first argument is the stream entering the MLP. Add a "
          "forward hook on the block for its output (`structure.output_of(output)`). Take 1 - cosine per "
          "token, keep the real tokens (attention_mask == 1) and average over all of them, not per batch.",
          context=("model", "dataloader"))
def _check_mlp_importance(answer, *, model, dataloader):
    from .attention import sublayer_importance
    answered = answer(model, dataloader)  # first: an unfinished answer stops the check before the reference pass
    expected = sublayer_importance(model, dataloader, progress=False)["mlp"]
    got = _as_floats(answered, len(expected), "mlp_importance(model, dataloader)")
    if isinstance(got, str):
        return False, got
    wrong = [i for i, (g, e) in enumerate(zip(got, expected)) if not _close(g, e, rel=1e-3, abs_=1e-5)]
    if wrong:
        i = wrong[0]
        return False, (f"{len(wrong)} of {len(expected)} blocks differ from utils.sublayer_importance's MLP scores; "
                       f"block {i}: yours {got[i]:.5f}, expected {expected[i]:.5f}.")
    return True, (f"all {len(expected)} MLP scores match utils.sublayer_importance (lowest: block "
                  f"{min(range(len(got)), key=got.__getitem__)}).")


@exercise("CH04_NB01.choose_protected", "Pick the n least important blocks, never the protected ones",
          "Sort the block indices by score, skip the protected ones (the first and the last block by default) and "
          "keep the first n that remain. Return plain ints.",
          context=("scores", "n"))
def _check_choose_protected(answer, *, scores, n):
    scores = [float(s) for s in scores]
    last = len(scores) - 1
    got = answer(scores, n)
    try:
        got = sorted(int(i) for i in got)
    except (TypeError, ValueError):
        return False, f"choose_protected(scores, n) should return block indices, got {got!r}."
    if len(got) != n or len(set(got)) != n:
        return False, f"expected {n} different blocks, got {got}."
    if 0 in got or last in got:
        return False, f"{got} holds a protected block (0 or {last}): the first and the last block must stay."
    allowed = sorted(range(1, last), key=lambda i: scores[i])
    worst_kept = max(scores[i] for i in got)
    better = [i for i in allowed[:n] if i not in got and scores[i] < worst_kept]
    if better:
        return False, (f"block {better[0]} (score {scores[better[0]]:.4f}) is less important than one you chose "
                       f"(highest chosen score {worst_kept:.4f}).")
    return True, f"blocks {got}: the {n} lowest scores outside the first and last block."


# --- CH08_NB01: the KV cache -----------------------------------------------------------------

def _filled_cache_bytes(model, tokens: int, seed: int) -> int:
    """Bytes a fresh dynamic cache holds after a prefill of ``tokens`` random token ids (measured)."""
    from .kv_cache import cache_arg, cache_bytes, make_cache
    from .structure import text_config

    vocab = int(text_config(model).vocab_size)
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))
    cache = make_cache(model)
    with torch.no_grad():
        model(input_ids=ids.to(device_of(model)), use_cache=True, **{cache_arg(model): cache})
    return cache_bytes(cache)


@exercise("CH08_NB01.kv_bytes", "KV-cache bytes of a prompt, by formula, checked against a measured cache",
          "Every attention layer stores a key and a value (2) per token, per key/value head (num_key_value_heads, "
          "not num_attention_heads), each head_dim numbers of bytes_per_value bytes: "
          "2 x layers x kv_heads x head_dim x bytes x tokens. head_dim may be missing from the config: then it is "
          "hidden_size // num_attention_heads.",
          context=("model",))
def _check_kv_bytes(answer, *, model):
    from .structure import text_config

    config = text_config(model)
    bytes_per_value = next(model.parameters()).element_size()
    rows = []
    window = getattr(config, "sliding_window", None)  # sliding layers keep at most a window of tokens
    for tokens in ((7, 33) if not window else (min(7, window - 1), window - 1)):
        measured = _filled_cache_bytes(model, tokens, seed=tokens)
        got = answer(config, tokens, bytes_per_value)
        if not _is_number(got):
            return False, f"kv_bytes(config, tokens, bytes_per_value) should return a number, got {got!r}."
        if got != measured:
            ratio = got / measured if measured else float("nan")
            groups = int(config.num_attention_heads) / int(getattr(config, "num_key_value_heads", None)
                                                            or config.num_attention_heads)
            guess = ("; count key/value heads, not query heads" if groups > 1 and math.isclose(ratio, groups) else
                     "; did you count both the key and the value?" if math.isclose(ratio, 0.5) else "")
            return False, (f"for {tokens} tokens you give {got:,} bytes; the cache measured {measured:,} "
                           f"(yours is x{ratio:.2f}{guess}).")
        rows.append(f"{tokens} tokens: {measured:,} bytes")
    return True, "your formula equals the measured cache: " + "; ".join(rows) + "."


@exercise("CH08_NB01.tokens_that_fit", "How many tokens of cache fit in a memory budget?",
          "Divide the budget (in bytes: gigabytes x 1e9) by the bytes one token costs "
          "(utils.kv_bytes_per_token(model), or your kv_bytes for one token) and round down.",
          context=("model",))
def _check_tokens_that_fit(answer, *, model):
    from .kv_cache import kv_bytes_per_token

    per_token = kv_bytes_per_token(model)
    for gigabytes in (0.5, 2.0):
        expected = int(gigabytes * 1e9 // per_token)
        got = answer(model, gigabytes)
        if not _is_number(got, integer=True):
            return False, f"tokens_that_fit(model, {gigabytes}) should return a whole number of tokens, got {got!r}."
        if got != expected:
            return False, (f"for {gigabytes} GB you give {got:,} tokens; {per_token:,.0f} bytes a token fit "
                           f"{expected:,} times (rounded down).")
    return True, (f"{int(2e9 // per_token):,} tokens of cache fit in 2 GB for this model "
                  f"({per_token:,.0f} bytes a token).")


# --- CH10_NB02: the residual stream ------------------------------------------------------------

def _stream_of(model, tokenizer, prompt: str) -> torch.Tensor:
    from .activations import residual_stream
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt= must be a non-empty string: the text whose residual stream is searched.")
    return residual_stream(model, tokenizer, prompt)


@exercise("CH10_NB02.largest_entry", "Find the largest entry of a prompt's residual stream: row, token, dimension",
          "Take stream.abs(), find the position of its maximum over all three axes at once (argmax of the flattened "
          "tensor), then turn the flat index back into (row, token, dimension) with divmod by tokens x hidden and "
          "by hidden. Return three ints.",
          context=("model", "tokenizer", "prompt"))
def _check_largest_entry(answer, *, model, tokenizer, prompt):
    from .activations import find_massive
    stream = _stream_of(model, tokenizer, prompt)
    found = find_massive(stream)
    expected = (found["layer"], found["token"], found["dimension"])
    got = answer(stream)
    try:
        got = tuple(int(v) for v in got)
    except (TypeError, ValueError):
        return False, f"largest_entry(stream) should return (row, token, dimension), got {got!r}."
    if len(got) != 3:
        return False, f"largest_entry(stream) should return 3 numbers (row, token, dimension), got {len(got)}."
    if got != expected:
        value = float(stream[got].abs()) if all(0 <= g < n for g, n in zip(got, stream.shape)) else float("nan")
        return False, (f"you found {got} (|value| {value:.3g}); the largest |value| is {abs(found['value']):.3g} at "
                       f"{expected} (row, token, dimension).")
    return True, (f"row {expected[0]}, token {expected[1]}, dimension {expected[2]}: value {found['value']:.4g}, "
                  f"{found['ratio']:.3g} x the row's median (massive by Sun et al.'s test: {found['massive']}).")


@exercise("CH10_NB02.peak_ratios", "The peak-to-median ratio of every row of the stream",
          "For each row (one stream index): reshape its |values| to one vector, divide the maximum by the median "
          "(torch.median, not the mean: the mean is pulled up by the very entries we look for).",
          context=("model", "tokenizer", "prompt"))
def _check_peak_ratios(answer, *, model, tokenizer, prompt):
    from .activations import find_massive
    stream = _stream_of(model, tokenizer, prompt)
    expected = find_massive(stream)["per_layer"]["ratio"]
    got = _as_floats(answer(stream), len(expected), "peak_ratios(stream)")
    if isinstance(got, str):
        return False, got
    wrong = [i for i, (g, e) in enumerate(zip(got, expected)) if not _close(g, e, rel=1e-4)]
    if wrong:
        i = wrong[0]
        return False, (f"{len(wrong)} of {len(expected)} rows differ; row {i}: yours {got[i]:.4g}, expected "
                       f"{expected[i]:.4g} (max |value| / median |value| of that row).")
    top = max(range(len(got)), key=got.__getitem__)
    return True, f"all {len(got)} rows match; the highest ratio, {got[top]:.3g}, is at stream index {top}."


# --- CH07_NB02: LoRA ---------------------------------------------------------------------------

@exercise("CH07_NB02.lora_params", "Trainable parameters a LoRA adapter adds, from the config",
          "A LoRA on an in -> out Linear adds A (r x in) and B (out x r): r x (in + out). Per block, q_proj maps "
          "hidden -> heads x head_dim, k_proj and v_proj hidden -> kv_heads x head_dim, o_proj back to hidden; "
          "gate_proj and up_proj hidden -> intermediate_size, down_proj back. Sum over targets and blocks.",
          context=("config",))
def _check_lora_params(answer, *, config):
    from .lora import lora_parameter_count

    for rank, targets in ((1, ["q_proj", "v_proj"]), (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
                          (16, ["gate_proj", "up_proj", "down_proj"])):
        expected = lora_parameter_count(config, rank, targets)
        got = answer(config, rank, list(targets))
        if not _is_number(got, integer=True):
            return False, f"lora_params(config, {rank}, {targets}) should return an int, got {got!r}."
        if got != expected:
            return False, (f"rank {rank} on {targets}: you count {got:,}, lora.lora_parameter_count says "
                           f"{expected:,} (x{got / expected:.3f}).")
    return True, (f"all three settings match; rank 1 on q_proj and v_proj adds "
                  f"{lora_parameter_count(config, 1, ['q_proj', 'v_proj']):,} parameters to the whole model.")


@exercise("CH07_NB02.rank1_forward", "The output of a rank-1 LoRA layer, by hand",
          "With rank 1, A is one row a (in_features) and B one column b (out_features): the layer returns "
          "x @ W.T + bias + (alpha / 1) * (x @ a)[..., None] * b. Keep the base path unchanged.",
          context=("config",))
def _check_rank1_forward(answer, *, config):
    from .lora import LoRALinear

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(hidden, hidden // 2, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=g) / hidden ** 0.5)
        base.bias.copy_(torch.randn(base.bias.shape, generator=g))
    a, b = torch.randn(hidden, generator=g), torch.randn(hidden // 2, generator=g)
    x = torch.randn(2, 3, hidden, generator=g)
    alpha = 4.0
    layer = LoRALinear(base, r=1, alpha=alpha)
    with torch.no_grad():
        layer.lora_A.copy_(a[None, :])
        layer.lora_B.copy_(b[:, None])
        expected = layer(x)
        got = answer(x, base.weight.detach().clone(), base.bias.detach().clone(), a, b, alpha)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return False, f"rank1_forward(...) should return a tensor of shape {tuple(expected.shape)}, got {shape}."
    error = float((got - expected).abs().max())
    if error > 1e-4 * float(expected.abs().max()):
        base_only = float((got - base(x)).abs().max()) < 1e-5
        return False, (f"largest difference from lora.LoRALinear(r=1): {error:.3g}"
                       + (" (your output equals the base layer's: the update is missing)" if base_only else "") + ".")
    return True, f"equal to lora.LoRALinear(r=1, alpha={alpha:g}) (largest difference {error:.1e})."


# --- CH05_NB01: width pruning ------------------------------------------------------------------

@exercise("CH05_NB01.params_removed", "Parameters a width cut removes, counted before you cut",
          "Each neuron of a GLU MLP owns one row of gate_proj, one row of up_proj and one column of down_proj: "
          "3 x hidden_size weights (plus a bias entry per row or column where the layers have biases). Multiply "
          "by the neurons removed per block and by the number of blocks.",
          context=("model", "pruned"))
def _check_params_removed(answer, *, model, pruned):
    from .evaluation import count_parameters
    from .structure import glu_mlps

    widths = {m.gate_proj.out_features for m in glu_mlps(pruned)}
    if len(widths) != 1:
        raise ValueError("pruned= must keep the same number of neurons in every block (utils.width.prune_glu).")
    keep = widths.pop()
    expected = count_parameters(model) - count_parameters(pruned)
    got = answer(model, keep)
    if not _is_number(got, integer=True):
        return False, f"params_removed(model, {keep}) should return an int, got {got!r}."
    if got != expected:
        return False, (f"keeping {keep} neurons per block you count {got:,} parameters removed; the pruned model "
                       f"really has {expected:,} fewer (x{got / expected:.3f}).")
    return True, (f"{expected:,} parameters removed ({expected / count_parameters(model):.1%} of the model), "
                  f"counted before the cut and measured after it.")


@exercise("CH05_NB01.width_for_expansion", "The MLP width for a target expansion ratio, GPU-friendly",
          "Keep round(expansion x hidden) neurons, then round down to a multiple of divisor: (keep // divisor) x "
          "divisor.",
          context=("model",))
def _check_width_for_expansion(answer, *, model):
    from .structure import text_config
    from .width import target_width

    config = text_config(model)
    d_ff, hidden = int(config.intermediate_size), int(config.hidden_size)
    checked = 0
    for expansion in (1.5, 2.0, d_ff / hidden - 0.5):
        for divisor in (8, 32, 64):
            try:
                expected = target_width(d_ff, hidden, expansion_ratio=expansion, divisor=divisor)
            except ValueError:
                continue  # wider than the model, or rounded down to nothing on a tiny model
            got = answer(hidden, expansion, divisor)
            if got != expected:
                return False, (f"expansion {expansion:.2f} with divisor {divisor}: you keep {got!r}, "
                               f"width.target_width keeps {expected}.")
            checked += 1
    if not checked:
        raise ValueError(f"No expansion ratio could be checked for hidden {hidden}, intermediate {d_ff}.")
    return True, f"matches width.target_width on {checked} settings for hidden size {hidden}."


# --- CH03_NB01: anatomy ------------------------------------------------------------------------

def _check_part(answer, skeletons: dict, part: str, name: str) -> tuple[bool, str]:
    """``answer(spec)`` against :func:`utils.anatomy.parameter_breakdown`'s ``part`` of every GLU skeleton."""
    from .anatomy import parameter_breakdown
    from .architectures import get_spec

    checked = []
    for model_id, skeleton in skeletons.items():
        spec = get_spec(model_id)
        if spec.mlp != "glu":
            continue  # GPT-2's biased two-matrix MLP: the GLU models are the exercise
        expected = parameter_breakdown(skeleton)[part]
        got = answer(spec)
        if not _is_number(got, integer=True):
            return False, f"{name}(spec) should return an int, got {got!r} for {model_id}."
        if got != expected:
            return False, (f"{model_id}: you count {got:,} {part} parameters, the meta model holds {expected:,} "
                           f"(x{got / expected:.3f}).")
        checked.append(f"{model_id.split('/')[-1]} {expected / 1e6:,.1f}M")
    if not checked:
        raise ValueError("skeletons= holds no GLU model to check against.")
    return True, "equal to the meta models' count: " + ", ".join(checked) + "."


@exercise("CH03_NB01.mlp_params", "The MLP parameters of a whole GLU model, from its published shape",
          "A GLU MLP has three matrices: gate and up (hidden -> intermediate) and down (intermediate -> hidden), no "
          "biases in these models. Count one block, multiply by the number of blocks (spec.num_layers).",
          context=("skeletons",))
def _check_mlp_params(answer, *, skeletons):
    return _check_part(answer, skeletons, "mlp", "mlp_params")


@exercise("CH03_NB01.attention_params", "The attention parameters of a whole model, grouped-query attention included",
          "Per block: q_proj hidden -> heads x head_dim, k_proj and v_proj hidden -> kv_heads x head_dim each, o_proj "
          "heads x head_dim -> hidden. Use spec.head_dim (Gemma's heads are wider than hidden / heads). The small "
          "q_norm / k_norm of Qwen 3 and Gemma 3 count as norms, not attention.",
          context=("skeletons",))
def _check_attention_params(answer, *, skeletons):
    return _check_part(answer, skeletons, "attention", "attention_params")


# --- CH02_NB01: the first cut ------------------------------------------------------------------

@exercise("CH02_NB01.perplexity_by_hand", "Perplexity, written out",
          "For each batch: logits = model(input_ids, attention_mask).logits; position t predicts token t + 1, so "
          "compare logits[:, :-1] with input_ids[:, 1:], skipping targets where attention_mask[:, 1:] == 0. Add up "
          "the summed cross-entropy and the number of real targets over all batches; perplexity = exp(total / count). "
          "Use torch.no_grad() and put each batch on the model's device.",
          context=("model", "dataloader"))
def _check_perplexity_by_hand(answer, *, model, dataloader):
    from .evaluation import perplexity

    got = _as_number(answer(model, dataloader))
    expected = perplexity(model, dataloader, progress=False)
    if not _is_number(got):
        return False, f"perplexity_by_hand(model, dataloader) should return a number, got {type(got).__name__}."
    rel = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-3
    if not _close(got, expected, rel=rel):
        hint = (" (much lower: are padding positions counted?)" if got < 0.9 * expected else
                " (the mean per batch instead of per token?)" if 0.9 * expected < got < 1.1 * expected else "")
        return False, f"you get {got:.4f}, evaluation.perplexity gets {expected:.4f}{hint}."
    return True, f"{got:.4f}, equal to evaluation.perplexity ({expected:.4f})."


@exercise("CH02_NB01.drop_blocks", "Remove any blocks by hand, not only the last ones",
          "Keep the blocks whose index is not in `indices` in a new torch.nn.ModuleList, renumber every kept "
          "block's self_attn.layer_idx to its new position, and update config.num_hidden_layers (and "
          "config.layer_types, when the config has one, to the kept entries). Return the model.",
          context=("model", "dataloader"))
def _check_drop_blocks(answer, *, model, dataloader):
    import copy

    from .depth import remove_blocks
    from .structure import decoder_blocks

    n = len(decoder_blocks(model))
    indices = sorted({1, n // 2})
    got = answer(copy.deepcopy(model), list(indices))
    reference = remove_blocks(copy.deepcopy(model), indices)
    if not isinstance(got, torch.nn.Module):
        return False, f"drop_blocks(model, indices) should return the model, got {type(got).__name__}."
    left = n - len(indices)
    if len(decoder_blocks(got)) != left:
        return False, f"removing {indices} of {n} blocks should leave {left}, got {len(decoder_blocks(got))}."
    if got.config.num_hidden_layers != left:
        return False, f"config.num_hidden_layers is {got.config.num_hidden_layers}, the model has {left} blocks."
    slots = [getattr(b.self_attn, "layer_idx", i) for i, b in enumerate(decoder_blocks(got))]
    if slots != list(range(len(slots))):
        return False, f"the kept blocks' self_attn.layer_idx are {slots}: renumber them 0, 1, 2 ... in order."
    batch = {k: v.to(device_of(model)) for k, v in next(iter(dataloader)).items()
             if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        same = torch.equal(got(**batch).logits, reference(**batch).logits)
    if not same:
        return False, ("the logits differ from depth.remove_blocks on the same indices: are the right blocks kept, "
                       "in order?")
    return True, f"blocks {indices} removed; logits identical to depth.remove_blocks."


# --- CH06_NB01: distillation through the layers ------------------------------------------------

@exercise("CH06_NB01.uniform_map", "The uniform layer map, written out",
          "Spread the student's blocks evenly over the teacher's depth and make the last student block imitate the "
          "last teacher block: student block i -> teacher block round((i + 1) x T / S) - 1.",
          context=("n_teacher",))
def _check_uniform_map(answer, *, n_teacher):
    from .distillation import make_layer_map

    for n_student in sorted({1, max(1, n_teacher // 2), max(1, n_teacher - 4), n_teacher}):
        expected = make_layer_map(n_student, n_teacher, "uniform")
        got = answer(n_student, n_teacher)
        try:
            got = [int(i) for i in got]
        except (TypeError, ValueError):
            return False, f"uniform_map({n_student}, {n_teacher}) should return a list of teacher indices, got {got!r}."
        if got != expected:
            return False, (f"{n_student} student blocks on {n_teacher} teacher blocks: you map {got}, "
                           f"distillation.make_layer_map gives {expected}.")
    return True, f"equal to distillation.make_layer_map(..., 'uniform') for students of 1 to {n_teacher} blocks."


@exercise("CH06_NB01.recovered", "How much of the loss did recovery win back?",
          "Work on log-perplexities: (log pruned - log recovered) / (log pruned - log base). 1 means back to the base "
          "model, 0 no better than the pruned one. When pruning lost nothing (pruned <= base) return float('nan').",
          context=())
def _check_recovered(answer):
    from .distillation import recovered_share

    cases = [(20.0, 40.0, 25.0), (20.0, 1000.0, 33.0), (10.0, 12.0, 13.0), (15.0, 15.0, 14.0)]
    for base, pruned, recovered in cases:
        expected = recovered_share(base, pruned, recovered)
        got = answer(base, pruned, recovered)
        if not _is_number(got):
            return False, f"recovered({base}, {pruned}, {recovered}) should return a number, got {got!r}."
        if math.isnan(expected) != math.isnan(got) or (not math.isnan(expected) and not _close(got, expected,
                                                                                              rel=1e-9)):
            return False, (f"base {base}, pruned {pruned}, recovered {recovered}: you give {got:.4f}, "
                           f"distillation.recovered_share gives {expected:.4f}.")
    raw = (1000.0 - 33.0) / (1000.0 - 20.0)
    return True, ("equal to distillation.recovered_share: from 50x the base perplexity back to 1.65x wins back "
                  f"{recovered_share(20.0, 1000.0, 33.0):.0%} of the lost log-likelihood, not the {raw:.0%} raw "
                  "perplexities suggest.")


# --- CH06_NB04: how much data does recovery need? -----------------------------------------------

@exercise("CH06_NB04.retention", "Retention: the share of the teacher's score a student keeps",
          "Divide so that 1 is the teacher's level and less than 1 a loss, whatever the measure: student / teacher "
          "for an accuracy (higher is better), teacher / student for a perplexity (lower is better).",
          context=())
def _check_retention(answer):
    from .distillation import retention

    cases = [(0.60, 0.45, False), (0.30, 0.33, False), (12.0, 16.0, True), (20.0, 18.0, True)]
    for teacher, student, lower in cases:
        expected = retention(teacher, student, lower_is_better=lower)
        got = _as_number(answer(teacher, student, lower))
        what = "perplexity (lower is better)" if lower else "accuracy (higher is better)"
        if not _is_number(got):
            return False, f"retention({teacher}, {student}, {lower}) should return a number, got {got!r}."
        if not _close(got, expected, rel=1e-9):
            flipped = " You divided the wrong way round for this measure." if _close(got, 1 / expected, rel=1e-9) \
                else ""
            return False, (f"{what}, teacher {teacher}, student {student}: you give {got:.4f}, "
                           f"distillation.retention gives {expected:.4f}.{flipped}")
    return True, ("equal to distillation.retention on accuracies and perplexities: a perplexity of 16 where the "
                  f"teacher has 12 keeps {retention(12.0, 16.0, lower_is_better=True):.0%} of it.")


@exercise("CH06_NB04.texts_needed", "How many texts would reach a retention target? A fit in log size",
          "Fit retention = a + b * ln(size) by least squares over all the points (x = ln size), then solve "
          "a + b * ln(n) = target for n: n = exp((target - a) / b). Return math.inf when b <= 0.",
          context=("sizes", "retentions"))
def _check_texts_needed(answer, *, sizes, retentions):
    from .distillation import texts_for_retention

    cases = [([10, 100, 1000], [0.5, 0.6, 0.7], 0.8), ([42, 42, 336, 336], [0.70, 0.72, 0.80, 0.78], 0.9),
             ([10, 100], [0.6, 0.5], 0.9), (list(sizes), list(retentions), max(retentions) + 0.05)]
    for case_sizes, case_retentions, target in cases:
        expected = texts_for_retention(case_sizes, case_retentions, target)
        got = _as_number(answer(case_sizes, case_retentions, target))
        if not _is_number(got):
            return False, f"texts_needed({case_sizes}, ..., {target}) should return a number, got {got!r}."
        if math.isinf(expected) != math.isinf(float(got)) or (
                not math.isinf(expected) and not _close(got, expected, rel=1e-6)):
            return False, (f"sizes {case_sizes}, retentions {case_retentions}, target {target}: you give {got:.4g}, "
                           f"distillation.texts_for_retention gives {expected:.4g}. Fit on ln(size), not on the "
                           f"size itself, and use every point.")
    here = texts_for_retention(list(sizes), list(retentions), max(retentions) + 0.05)
    return True, (f"equal to distillation.texts_for_retention; on this run's points, 5 points more retention than "
                  f"the best measured would take about {here:,.0f} texts by the fitted line (an extrapolation)."
                  if not math.isinf(here) else
                  "equal to distillation.texts_for_retention; on this run's points the fitted line does not rise, so "
                  "no number of texts reaches the target by it.")


# --- CH06_NB03: the recovery challenge -------------------------------------------------------------

class _TrainingTokens:
    """Counts the real tokens a model reads while in training mode (a forward pre-hook): the data a recipe spent.
    Evaluation passes (eval mode) are not counted."""

    def __init__(self, model: torch.nn.Module):
        self.tokens = 0
        self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        if not module.training:
            return
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids", args[0] if args else None)
        if isinstance(mask, torch.Tensor):
            self.tokens += int(mask.sum())
        elif isinstance(ids, torch.Tensor):
            self.tokens += ids.numel()

    def remove(self) -> None:
        self.handle.remove()


def _real_tokens(loader) -> int:
    """The real (unpadded) tokens in one pass over ``loader``: the challenge's data budget."""
    from .data import batch_tensors

    return sum(int(batch_tensors(batch, "cpu")[1].sum()) for batch in loader)


def _steps_of(history) -> int | None:
    """Optimizer steps in a history of utils.distill / utils.train, or None when it is not one."""
    if not isinstance(history, dict) or not isinstance(history.get("step"), list):
        return None
    return int((history.get("settings") or {}).get("steps", len(history["step"])))


def _is_default_recipe(history: dict) -> bool:
    from . import distillation as d

    settings = history.get("settings") or {}
    defaults = {"temperature": d.DEFAULT_TEMPERATURE, "alpha": d.DEFAULT_ALPHA, "beta": 0.0, "skew": d.DEFAULT_SKEW,
                "gamma": 0.0, "lr": d.DEFAULT_LR, "warmup_steps": d.DEFAULT_WARMUP_STEPS, "grad_accum": 1}
    return all(settings.get(k) == v for k, v in defaults.items())


@exercise("CH06_NB03.recovery_recipe", "Beat the default recovery at the same budget, on text of another domain",
          "Start from distillation.distill(student, teacher, batches) (one pass over `batches` is the whole step "
          "budget) and change one thing at a time: the temperature, the blend alpha, the skew KL (skew=0.1), feature "
          "terms through the kept-block map (layer_map='kept', beta=..., gamma=...), the learning rate or warm-up. "
          "Train the `student` you are given (not a copy), stay within the steps and the tokens of `batches`, and "
          "return distill's history.",
          context=("pruned", "teacher", "batches", "held_out", "target", "steps"))
def _check_recovery_recipe(answer, *, pruned, teacher, batches, held_out, target, steps):
    import copy

    from .evaluation import perplexity

    tokens = _real_tokens(batches() if callable(batches) else batches)
    student = copy.deepcopy(pruned)
    counter = _TrainingTokens(student)
    try:  # first: an unfinished answer costs nothing but the copy
        history = answer(student, teacher, batches() if callable(batches) else batches)
    finally:
        counter.remove()
    used = _steps_of(history)
    if used is None:
        return False, ("recovery_recipe should return the history utils.distill gives back, got "
                       f"{type(history).__name__}.")
    if all(torch.equal(a, b) for a, b in zip(student.parameters(), pruned.parameters())):
        return False, ("the student you were given did not change: train `student` itself, not a copy of it or of "
                       "`pruned`.")
    if counter.tokens == 0:
        return False, ("the student changed, but the check saw no training pass to count: call the model itself, "
                       "student(input_ids=..., attention_mask=...) in training mode, as utils.train does, not one "
                       "of its submodules.")
    if used > steps or counter.tokens > tokens:
        return False, (f"over budget: {used} optimizer steps on {counter.tokens:,} tokens, for a budget of {steps} "
                       f"steps and {tokens:,} tokens (one pass over `batches`). More epochs, grad_accum or longer "
                       "texts buy quality with budget: keep to one pass.")
    ppl = perplexity(student, held_out, progress=False)
    details = {"model": student, "perplexity": ppl, "steps": used, "tokens": counter.tokens, "history": history}
    budget = f"{used} of {steps} steps, {counter.tokens:,} of {tokens:,} tokens"
    if ppl < target:
        return True, (f"held-out perplexity {ppl:.3f} < target {target:.3f} ({100 * (1 - ppl / target):.3g} % "
                      f"lower), in {budget}."), details
    if _is_default_recipe(history):
        return False, (f"held-out perplexity {ppl:.3f}, target {target:.3f}: these are distill's default settings, "
                       "the recipe that set the target. It can tie at best: change something."), details
    gap = 100 * (ppl / target - 1)
    return False, (f"held-out perplexity {ppl:.3f} is not below the target {target:.3f} ({gap:+.3g} %), in "
                   f"{budget}."), details


def _mentioned_numbers(texts: list[str]) -> set[int]:
    """Every integer the texts name, with ranges such as '12-17' or '12 to 17' expanded."""
    import re

    text = " ".join(texts)
    found = {int(n) for n in re.findall(r"\d+", text)}
    for a, b in re.findall(r"(\d+)\s*(?:-|–|to)\s*(\d+)", text):
        if int(a) <= int(b) <= int(a) + 200:
            found.update(range(int(a), int(b) + 1))
    return found


def _card_problem(card: dict, numbers: dict, base_model: str, removed, parameters: int) -> str | None:
    """What a card written for the challenge's model misses, or None."""
    if card["metadata"].get("base_model") != base_model:
        return (f"the card's base_model is {card['metadata'].get('base_model')!r}: it should be the model you started "
                f"from, {base_model!r}.")
    missing_blocks = sorted(set(int(i) for i in removed) - _mentioned_numbers(card["changes"]))
    if missing_blocks:
        return (f"the changes do not name every removed block: {missing_blocks} missing (the changes: "
                f"{card['changes']}).")
    if not any("distil" in change.lower() for change in card["changes"]):
        return "the changes do not say how the model was recovered (by distillation, and with what)."
    values = [float(v) for v in card["results"].values() if _is_number(v)]
    required = {**numbers, "parameters of the published model": parameters}

    def written(value) -> bool:  # a NaN (e.g. nothing was lost, so no recovered share) is written as nan
        value = float(_as_number(value))
        return any(math.isnan(v) for v in values) if math.isnan(value) else any(
            _close(v, value, rel=1e-4) for v in values if not math.isnan(v))
    missing = [name for name, value in required.items() if not written(value)]
    if missing:
        return f"the card's table lacks {len(missing)} required number(s): {missing}."
    return None


@exercise("CH06_NB03.write_card", "Publish your model: a folder that reloads, and a card with every number",
          "Call publish.save_with_card(model, tokenizer, folder, base_model=..., changes=[...], results={...}) and "
          "return what it returns. base_model: the model you started from (teacher.name_or_path). changes: one "
          "sentence for the cut (name the removed blocks) and one for the recovery (distillation, and the recipe). "
          "results: every number in `numbers`, plus the published model's parameter count "
          "(evaluation.count_parameters(model)).",
          context=("model", "tokenizer", "numbers", "base_model", "removed"))
def _check_write_card(answer, *, model, tokenizer, numbers, base_model, removed):
    import os
    import tempfile
    from pathlib import Path

    from .checks import tolerances
    from .evaluation import count_parameters
    from .models import load_model
    from .publish import read_card

    with tempfile.TemporaryDirectory() as tmp:
        folder = answer(model, tokenizer, Path(tmp) / "my_model", numbers)
        if not isinstance(folder, (str, os.PathLike)) or not (Path(folder) / "README.md").is_file():
            return False, (f"write_card should return the folder it wrote (publish.save_with_card returns it), with a "
                           f"README.md in it; got {folder!r}.")
        card = read_card(folder)
        problem = _card_problem(card, numbers, base_model, removed, count_parameters(model))
        if problem:
            return False, problem
        reloaded, _ = load_model(folder, device=str(device_of(model)))
        ids = tokenizer("The river rose fast after the storm.", return_tensors="pt")["input_ids"].to(device_of(model))
        with torch.no_grad():
            expected, got = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
        del reloaded
    tol = tolerances(expected)
    if not torch.allclose(got.to(expected.dtype), expected, atol=tol["atol"], rtol=tol["rtol"]):
        return False, ("the folder reloads (utils.load_model) to different logits: save the model you were given, "
                       "after training, with publish.save_with_card.")
    return True, (f"the card names {base_model}, the removed blocks {sorted(removed)}, the recovery, and all "
                  f"{len(numbers) + 1} numbers; the folder reloads to the same logits."), {"card": card}


# --- CH02_NB02: healing the cut ----------------------------------------------------------------

def _real_next_positions(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, mask of positions whose next token is real) of one batch on ``device``."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    real_next = torch.zeros_like(mask, dtype=torch.bool)
    real_next[:, :-1] = mask[:, 1:].bool() & mask[:, :-1].bool()
    return ids, mask, real_next


@torch.no_grad()
def _teacher_entropy_reference(teacher, dataloader, temperature: float) -> float:
    total, count = 0.0, 0
    for batch in dataloader:
        ids, mask, real = _real_next_positions(batch, device_of(teacher))
        logp = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float() / temperature, -1)
        entropy = -(logp.exp() * logp).sum(-1)
        total += float(entropy[real].sum())
        count += int(real.sum())
    return total / count


@exercise("CH02_NB02.teacher_entropy", "How much does temperature soften the teacher?",
          "For every position whose next token is real (attention_mask at t and t + 1): p = softmax(logits / T), "
          "entropy = -(p * log p).sum(-1), in nats. Average over all those positions of all batches (not per batch).",
          context=("teacher", "dataloader"))
def _check_teacher_entropy(answer, *, teacher, dataloader):
    rows = []
    for temperature in (1.0, 2.0):
        got = _as_number(answer(teacher, dataloader, temperature))
        expected = _teacher_entropy_reference(teacher, dataloader, temperature)
        if not _is_number(got):
            return False, f"teacher_entropy(teacher, dataloader, {temperature}) should return a number, got {got!r}."
        rel = 1e-5 if next(teacher.parameters()).dtype == torch.float32 else 1e-3
        if not _close(got, expected, rel=rel):
            return False, f"at T = {temperature:g} you get {got:.5f} nats, the answer key {expected:.5f}."
        rows.append(f"T={temperature:g}: {expected:.3f} nats")
    return True, "; ".join(rows) + " -- a softer target carries more of the teacher's second choices."


@exercise("CH02_NB02.top1_agreement", "How often does the student pick the teacher's first choice?",
          "Run both models on each batch; at every position whose next token is real, compare "
          "student_logits.argmax(-1) with teacher_logits.argmax(-1). Return the share of agreements over all "
          "those positions, between 0 and 1.",
          context=("student", "teacher", "dataloader"))
@torch.no_grad()
def _check_top1_agreement(answer, *, student, teacher, dataloader):
    got = _as_number(answer(student, teacher, dataloader))
    same, count = 0, 0
    for batch in dataloader:
        ids, mask, real = _real_next_positions(batch, device_of(teacher))
        t = teacher(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        s = student(input_ids=ids.to(device_of(student)), attention_mask=mask.to(device_of(student))).logits.argmax(-1)
        same += int((s.to(t.device) == t)[real].sum())
        count += int(real.sum())
    expected = same / count
    if not _is_number(got):
        return False, f"top1_agreement(student, teacher, dataloader) should return a share, got {got!r}."
    if not _close(got, expected, rel=1e-6, abs_=1e-9):
        return False, f"you get {got:.4f}, the answer key {expected:.4f} ({count} positions with a real next token)."
    return True, f"the student picks the teacher's first choice at {expected:.1%} of {count} positions."


# --- CH08_NB02: removing attention -------------------------------------------------------------

@exercise("CH08_NB02.attention_params_removed", "Parameters saved by removing attention sublayers",
          "Each removed attention takes its four projections with it: q_proj and o_proj (hidden x heads x head_dim "
          "each) and k_proj and v_proj (hidden x kv_heads x head_dim each), plus any bias or q/k norm weights the "
          "module holds, and the norm in front of it (input_layernorm), which has nothing left to feed (Gemma 3 also "
          "loses the norm after it, post_attention_layernorm). Summing p.numel() over those modules is simplest.",
          context=("model", "cut"))
def _check_attention_params_removed(answer, *, model, cut):
    from .attention import removed_attention
    from .evaluation import count_parameters

    removed = removed_attention(cut)
    if not removed:
        raise ValueError("cut= must be a model made by attention.remove_attention (it records what it removed).")
    expected = count_parameters(model) - count_parameters(cut)
    got = answer(model, list(removed))
    if not _is_number(got, integer=True):
        return False, f"attention_params_removed(model, {list(removed)}) should return an int, got {got!r}."
    if got != expected:
        return False, (f"removing attention from blocks {list(removed)} you count {got:,}; the cut model has "
                       f"{expected:,} parameters fewer (x{got / expected:.3f}).")
    return True, (f"{expected:,} parameters ({expected / count_parameters(model):.1%} of the model) for "
                  f"{len(removed)} attention sublayers.")


@exercise("CH08_NB02.cut_cache_bytes", "The KV cache of a model without some attentions",
          "Only the attentions that are left hold a cache: 2 (K and V) x (layers - removed) x kv_heads x head_dim x "
          "bytes per value x tokens.",
          context=("cut",))
def _check_cut_cache_bytes(answer, *, cut):
    from .attention import removed_attention
    from .structure import text_config

    config = text_config(cut)
    removed = list(removed_attention(cut))
    bytes_per_value = next(cut.parameters()).element_size()
    tokens = 9
    measured = _filled_cache_bytes(cut, tokens, seed=0)
    got = answer(config, removed, tokens, bytes_per_value)
    if not _is_number(got):
        return False, f"cut_cache_bytes(config, removed, tokens, bytes_per_value) should return a number, got {got!r}."
    if got != measured:
        return False, (f"for {tokens} tokens you give {got:,} bytes; the cut model's cache measured {measured:,} "
                       f"(x{got / measured:.3f}).")
    layers = int(config.num_hidden_layers)
    return True, f"{measured:,} bytes for {tokens} tokens: {layers - len(removed)} of {layers} attentions hold a cache."


# --- CH09_NB01: a mixture of experts from a dense model ----------------------------------------

@exercise("CH09_NB01.within_coactivation", "How tightly do an expert's neurons fire together?",
          "From the Gram matrix G: coactivation = |G_ij| / sqrt(G_ii G_jj). For each expert (a tensor of neuron "
          "indices) add up the coactivation of every ordered pair of two *different* members (drop the diagonal), "
          "then divide the grand total by the number of such pairs over all experts.",
          context=("gram", "experts"))
def _check_within_coactivation(answer, *, gram, experts):
    from .moe import within_expert_coactivation

    expected = within_expert_coactivation(gram, experts)
    got = answer(gram, experts)
    got = _as_number(got)
    if not _is_number(got):
        return False, f"within_coactivation(gram, experts) should return a number, got {got!r}."
    if not _close(got, expected, rel=1e-4):
        extra = " (is the diagonal, 1 for every neuron, still in?)" if got > expected else ""
        return False, f"you get {got:.5f}, moe.within_expert_coactivation gets {expected:.5f}{extra}."
    return True, f"{expected:.4f}, equal to moe.within_expert_coactivation."


@exercise("CH09_NB01.active_share", "What share of the model does one token use?",
          "Per MoE layer, one expert holds (gate + up + down parameters) / num_experts; a token skips "
          "num_experts - top_k of them. Active = total parameters minus the skipped experts' parameters over all "
          "layers; return active / total.",
          context=("moe_model",))
def _check_active_share(answer, *, moe_model):
    from .moe import active_parameters

    counts = active_parameters(moe_model)
    expected = counts["active"] / counts["total"]
    got = answer(moe_model)
    got = _as_number(got)
    if not _is_number(got):
        return False, f"active_share(moe_model) should return a share, got {got!r}."
    if not _close(got, expected, rel=1e-6):
        return False, (f"you get {got:.4f}, moe.active_parameters gives {expected:.4f} "
                       f"({counts['active']:,} of {counts['total']:,}).")
    return True, f"a token uses {expected:.1%} of the model's {counts['total']:,} parameters."


# --- CH10_NB01: capture points -----------------------------------------------------------------

@exercise("CH10_NB01.negative_gate_share", "How often would a ReLU have zeroed the gate?",
          "Hook each block's mlp.gate_proj (a forward hook: its output is the gate's pre-activation). Count, over the "
          "real tokens (attention_mask == 1) of all batches, how many entries are < 0, and divide by all entries "
          "(real tokens x neurons). One share per block.",
          context=("model", "dataloader"))
def _check_negative_gate_share(answer, *, model, dataloader):
    from .activations import glu_statistics

    answered = answer(model, dataloader)
    expected = glu_statistics(model, dataloader, progress=False)["negative_gate"]
    got = _as_floats(answered, len(expected), "negative_gate_share(model, dataloader)")
    if isinstance(got, str):
        return False, got
    wrong = [i for i, (g, e) in enumerate(zip(got, expected)) if not _close(g, e, rel=1e-4, abs_=1e-6)]
    if wrong:
        i = wrong[0]
        return False, (f"{len(wrong)} of {len(expected)} blocks differ from activations.glu_statistics; block {i}: "
                       f"yours {got[i]:.4f}, expected {expected[i]:.4f}.")
    return True, (f"between {min(got):.1%} and {max(got):.1%} of the gates are negative: what a ReLU would zero, and "
                  "a SiLU or GELU only makes small.")


@exercise("CH10_NB01.loudest_neurons", "The loudest neurons of one block on your own prompt",
          "Capture what down_proj receives (activations.capture_activations(model, tokenizer, prompt, "
          "'down_proj_input', layers=[layer]) gives [1, tokens, neurons]), take the mean |value| over the tokens "
          "and return the indices of the k largest, loudest first.",
          context=("model", "tokenizer", "prompt", "layer"))
def _check_loudest_neurons(answer, *, model, tokenizer, prompt, layer):
    from .activations import capture_activations

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt= must be a non-empty string.")
    k = 5
    values = capture_activations(model, tokenizer, prompt, "down_proj_input", layers=[layer])["down_proj_input"][0]
    loudness = values.abs().mean(0)
    expected = torch.topk(loudness, k).indices.tolist()
    got = answer(model, tokenizer, prompt, layer, k)
    try:
        got = [int(i) for i in got]
    except (TypeError, ValueError):
        return False, f"loudest_neurons(...) should return {k} neuron indices, got {got!r}."
    if len(got) != k:
        return False, f"expected {k} neuron indices, got {len(got)}."
    if got != expected:
        shown = ", ".join(f"{i} ({float(loudness[i]):.3g})" for i in expected)
        return False, f"you found {got}; the loudest {k} by mean |value| are {shown}."
    return True, f"block {layer}: neurons {expected}, loudest first (mean |value| {float(loudness[expected[0]]):.3g})."


# --- APPC: energy and cost per token -----------------------------------------------------------

@exercise("APPC_NB01.decode_cost_per_token", "Decoding cost per token from two generate calls",
          "The first call (prefill + 1 token) and the second (prefill + n tokens) share the prefill and the first "
          "token: their difference is the cost of the n - 1 later tokens of every sequence in the batch. Divide "
          "by (n - 1) x batch.",
          context=())
def _check_decode_cost_per_token(answer):
    cases = [(2.0, 5.0, 16, 1), (0.8, 3.2, 9, 4), (10.0, 10.5, 2, 8)]
    for first, second, n, batch in cases:
        expected = (second - first) / ((n - 1) * batch)
        got = answer(first, second, n, batch)
        if not _is_number(got) or not _close(got, expected, rel=1e-9):
            return False, (f"first call {first}, second {second}, {n} new tokens, batch {batch}: you give {got!r}, "
                           f"the answer key {expected:.6g}.")
    return True, "right: the prefill and the first token cancel out, the rest is spread over every decoded token."


@exercise("APPC_NB01.kwh_per_million_tokens", "From joules per token to kilowatt-hours per million tokens",
          "1 kWh = 3.6 million joules (1000 W for 3600 s). Multiply joules per token by one million tokens, then "
          "divide by 3.6e6.",
          context=())
def _check_kwh_per_million_tokens(answer):
    for joules in (0.05, 1.0, 12.5):
        expected = joules * 1e6 / 3.6e6
        got = answer(joules)
        if not _is_number(got) or not _close(got, expected, rel=1e-9):
            return False, (f"{joules} J per token: you give {got!r} kWh per million tokens, the answer key "
                           f"{expected:.6g}.")
    return True, f"right: at 1 J per token a million tokens cost {1e6 / 3.6e6:.3f} kWh."


# --- APPB_NB01: benchmarks ----------------------------------------------------------------------

@exercise("APPB_NB01.accuracy_stderr", "Accuracy and its standard error, as lm-eval reports them",
          "correct = 1 where the prediction equals item['label'], else 0. accuracy = mean(correct); standard error = "
          "sample standard deviation of `correct` (divide by n - 1) / sqrt(n).",
          context=("items", "predictions"))
def _check_accuracy_stderr(answer, *, items, predictions):
    from .benchmarks import accuracy

    expected = accuracy(items, predictions)
    got = answer(items, predictions)
    try:
        acc, stderr = (float(v) for v in got)
    except (TypeError, ValueError):
        return False, f"accuracy_stderr(items, predictions) should return (accuracy, standard error), got {got!r}."
    if not _close(acc, expected["acc"], rel=1e-9, abs_=1e-12):
        return False, f"accuracy: you give {acc:.4f}, benchmarks.accuracy gives {expected['acc']:.4f}."
    if not _close(stderr, expected["acc_stderr"], rel=1e-6):
        ratio = stderr / expected["acc_stderr"] if expected["acc_stderr"] else float("nan")
        return False, (f"standard error: you give {stderr:.5f}, benchmarks.accuracy gives {expected['acc_stderr']:.5f} "
                       f"(x{ratio:.3f}: n - 1 in the variance, and the square root of n?).")
    return True, f"{acc:.3f} ± {stderr:.3f} over {len(items)} items, equal to benchmarks.accuracy."


@exercise("APPB_NB01.mcnemar", "The exact McNemar test of two models on the same items",
          "Only the items where exactly one model is right carry information: under 'no difference' each is a fair "
          "coin flip. With a = items only model A gets right and b = only B, n = a + b: p = 2 x P(X <= min(a, b)) "
          "for X ~ Binomial(n, 1/2) (math.comb), at most 1; p = 1 when n = 0.",
          context=())
def _check_mcnemar(answer):
    from .benchmarks import mcnemar_exact

    for only_a, only_b in ((0, 0), (3, 3), (10, 2), (1, 9), (40, 25)):
        expected = mcnemar_exact(only_a, only_b)
        got = answer(only_a, only_b)
        if not _is_number(got) or not _close(got, expected, rel=1e-9,
                                                                                     abs_=1e-12):
            return False, f"only A right {only_a}, only B right {only_b}: you give {got!r}, expected {expected:.6g}."
    return True, (f"equal to benchmarks.mcnemar_exact; 10 against 2 disagreements gives p = "
                  f"{mcnemar_exact(10, 2):.3f}, 40 against 25 p = {mcnemar_exact(40, 25):.3f}.")


# --- CH07_NB01: low rank and quantisation ------------------------------------------------------

@exercise("CH07_NB01.int_quantize_blocks", "Blockwise symmetric int quantisation, by hand",
          "Cut the flattened weights into blocks of block_size (pad the last one with zeros), take each block's "
          "absmax, and store round(w / absmax x L) with L = 2^(bits - 1) - 1 (7 for int4); restore with "
          "code / L x absmax, then drop the padding and give back the original shape.",
          context=("weight",))
def _check_int_quantize_blocks(answer, *, weight):
    from .quantization import dequantize_blockwise, quantize_blockwise

    flat = weight.detach().float().cpu().reshape(-1)
    if flat.numel() < 64:
        raise ValueError("weight= must hold at least 64 values: pass a layer's weight, e.g. layer.weight.")
    w = flat[: min(flat.numel(), 4096) // 64 * 64].reshape(-1, 64)
    for bits, block in ((4, 64), (8, 32), (4, 16)):
        expected = dequantize_blockwise(quantize_blockwise(w, "int", bits, block_size=block)).reshape(w.shape)
        got = answer(w.clone(), bits, block)
        if not isinstance(got, torch.Tensor) or got.shape != w.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return False, (f"int_quantize_blocks(w, {bits}, {block}) should return a tensor shaped "
                           f"{tuple(w.shape)}, got {shape}.")
        error = float((got.float() - expected).abs().max())
        if error > 1e-6 * float(w.abs().max()):
            return False, (f"int{bits}, blocks of {block}: largest difference from quantization.quantize_blockwise "
                           f"{error:.3g} (one absmax per block, levels -L..L with L = 2^(bits-1) - 1?).")
    restored = dequantize_blockwise(quantize_blockwise(w, "int", 4, block_size=64)).reshape(w.shape)
    err = float((restored - w).abs().mean())
    return True, (f"equal to quantization.quantize_blockwise; int4 in blocks of 64 moves a weight by {err:.2e} "
                  "on average.")


@exercise("CH07_NB01.bits_per_weight", "What a 4-bit format really costs per weight",
          "Every block of block_size codes of `bits` bits stores one float32 absmax (32 bits): "
          "bits + 32 / block_size. "
          "With double quantisation the absmax is an 8-bit code instead, and every 256 absmax codes share one "
          "float32: bits + 8 / block_size + 32 / (block_size x 256).",
          context=())
def _check_bits_per_weight(answer):
    from .quantization import bits_per_parameter

    for bits, block, double in ((4, 64, False), (4, 64, True), (8, 32, False), (4, 128, True)):
        expected = bits_per_parameter(bits, block, double_quant=double)
        got = answer(bits, block, double)
        if not _is_number(got) or not _close(got, expected, rel=1e-9):
            return False, (f"{bits} bits, blocks of {block}, double quantisation {double}: you give {got!r}, "
                           f"quantization.bits_per_parameter gives {expected:.4f}.")
    return True, (f"NF4 in blocks of 64 costs {bits_per_parameter(4, 64):.3f} bits a weight, "
                  f"{bits_per_parameter(4, 64, double_quant=True):.3f} with double quantisation.")


# --- CH08_NB04: decoding speed ------------------------------------------------------------------

@exercise("CH08_NB04.decode_flops", "The FLOPs of one decoding step, on paper",
          "2 x every weight of a Linear layer (each weight is one multiply and one add; the LM head included, "
          "embeddings excluded), plus, for every attention layer, 4 x context x heads x head_dim (the new query "
          "against `context` keys, the weights against `context` values). This model has no sliding-window layers.",
          context=("model",))
def _check_decode_flops(answer, *, model):
    from .attention import decode_flops_per_token
    from .structure import text_config

    if getattr(text_config(model), "sliding_window", None) and getattr(text_config(model), "layer_types", None):
        raise ValueError("decode_flops exercise: pass a model without sliding-window layers (Llama, Qwen, SmolLM2).")
    for context in (0, 100, 1000):
        expected = decode_flops_per_token(model, context)
        got = answer(model, context)
        if not _is_number(got) or not _close(got, expected, rel=1e-9):
            return False, (f"context {context}: you give {got!r}, attention.decode_flops_per_token gives "
                           f"{expected:,.0f}.")
    share = 1 - decode_flops_per_token(model, 0) / decode_flops_per_token(model, 1000)
    return True, (f"equal to attention.decode_flops_per_token; at 1,000 tokens of context attention's term is "
                  f"{share:.1%}.")


@exercise("CH08_NB04.realised_share", "How much of the ideal speed-up did the machine deliver?",
          "(measured - 1) / (ideal - 1): 1 = all of the ideal gain, 0 = no gain, negative = slower. When the ideal "
          "is 1 (nothing to gain) there is no share: return float('nan').",
          context=())
def _check_realised_share(answer):
    for measured, ideal in ((1.2, 1.4), (1.0, 1.3), (0.9, 1.5), (1.3, 1.3), (1.1, 1.0)):
        expected = (measured - 1) / (ideal - 1) if ideal != 1 else float("nan")
        got = answer(measured, ideal)
        if not _is_number(got):
            return False, f"realised_share({measured}, {ideal}) should return a number, got {got!r}."
        if math.isnan(expected) != math.isnan(got) or (not math.isnan(expected) and not _close(got, expected,
                                                                                                rel=1e-9)):
            return False, (f"measured x{measured} against an ideal x{ideal}: you give {got!r}, the answer key "
                           f"{expected}.")
    return True, "right: x1.2 against an ideal x1.4 delivers half of the possible gain, not 86 % (1.2 / 1.4)."


# --- CH05_NB02: data-driven width pruning ------------------------------------------------------

@exercise("CH05_NB02.padded_norms", "Activation norms that count the padding, as optipfair does",
          "A forward pre-hook on each block's mlp.down_proj reads its input [batch, tokens, neurons]. Add up the "
          "squares over *every* position of every batch, padding included (no mask), then take the square root: "
          "one vector per block.",
          context=("model", "dataloader"))
def _check_padded_norms(answer, *, model, dataloader):
    from .width import activation_norms

    got = answer(model, dataloader)
    expected = activation_norms(model, dataloader, padding=True, progress=False)
    real_only = activation_norms(model, dataloader, padding=False, progress=False)
    if not isinstance(got, (list, tuple)) or len(got) != len(expected):
        return False, (f"padded_norms(model, dataloader) should return one vector per block ({len(expected)}), "
                       f"got {type(got).__name__}.")
    for i, (g, e, r) in enumerate(zip(got, expected, real_only)):
        g = torch.as_tensor(g).detach().double().cpu().flatten()
        if g.shape != e.shape:
            return False, f"block {i}: expected {e.numel()} norms (one per neuron), got {g.numel()}."
        if not torch.allclose(g, e.double(), rtol=1e-4, atol=1e-6):
            hint = (" (these are the real-token norms: count the padding too)"
                    if torch.allclose(g, r.double(), rtol=1e-4, atol=1e-6) else "")
            return False, f"block {i} differs from width.activation_norms(padding=True){hint}."
    return True, "equal to width.activation_norms(..., padding=True) in every block."


@exercise("CH05_NB02.kept_overlap", "How much do two rankings agree on what to keep?",
          "For each layer, keep the `keep` neurons with the highest score under each ranking (torch.topk), count "
          "the neurons both keep and divide by `keep`; return the mean over layers.",
          context=("scores_a", "scores_b", "keep"))
def _check_kept_overlap(answer, *, scores_a, scores_b, keep):
    from .width import kept_indices

    a, b = kept_indices(scores_a, keep), kept_indices(scores_b, keep)
    expected = sum(len(set(x.tolist()) & set(y.tolist())) / keep for x, y in zip(a, b)) / len(a)
    got = answer(scores_a, scores_b, keep)
    got = _as_number(got)
    if not _is_number(got) or not _close(got, expected, rel=1e-9, abs_=1e-12):
        return False, f"you give {got!r}, the answer key (width.kept_indices on both rankings) {expected:.4f}."
    return True, f"the two rankings keep {expected:.1%} of the same neurons, on average over {len(a)} layers."


# --- CH12_NB01: the capstone ---------------------------------------------------------------------

def _perturbed_answers(records) -> list[dict]:
    """The gold labels of ``records`` with deterministic mistakes: every third loses its first symptom, every
    fourth gains an invented one, every fifth invents a temperature where the gold has none."""
    import copy

    answers = []
    for k, record in enumerate(records):
        label = copy.deepcopy(record["label"])
        if k % 3 == 0 and label.get("symptoms"):
            label["symptoms"] = label["symptoms"][1:]
        if k % 4 == 0:
            label["symptoms"] = [*label.get("symptoms", []), "Mild Dizziness"]
        vitals = label.get("vital_signs")
        if k % 5 == 0 and isinstance(vitals, dict) and vitals.get("temperature") is None:
            vitals["temperature"] = 38.2
        answers.append(label)
    return answers


@exercise("CH12_NB01.symptom_f1", "Micro F1 of the extracted symptoms",
          "Normalise every symptom (lower case, single spaces: ' '.join(s.lower().split())), then add up over all "
          "notes: tp = symptoms in both the prediction and the gold set, and the sizes of both sets. "
          "F1 = 2 tp / (predicted + gold); 1.0 when both are empty everywhere.",
          context=("records",))
def _check_symptom_f1(answer, *, records):
    from .extraction import score_extraction

    records = list(records)
    predictions = _perturbed_answers(records)
    expected = score_extraction(predictions, records)["symptom_f1"]
    got = answer(predictions, records)
    if not _is_number(got) or not _close(got, expected, rel=1e-9, abs_=1e-12):
        return False, (f"on {len(records)} notes with planted mistakes you give {got!r}, extraction.score_extraction "
                       f"gives {expected:.4f} (micro F1: counts summed over notes, not an average of per-note F1).")
    return True, f"{expected:.4f}, equal to extraction.score_extraction on {len(records)} notes with planted mistakes."


@exercise("CH12_NB01.hallucination_rate", "How often does the model invent a value the note does not hold?",
          "Count the *null slots*: for every note with a prediction (a dict), each of the five scalar fields "
          "(patient_age, and temperature, heart_rate, blood_pressure inside vital_signs, duration_days) whose gold "
          "value is None, plus the medications list when the gold list is empty. A slot is hallucinated when the "
          "prediction has a value there (not None, '', [] or {}). Rate = hallucinated / null slots.",
          context=("records",))
def _check_hallucination_rate(answer, *, records):
    from .extraction import score_extraction

    records = list(records)
    predictions = _perturbed_answers(records)
    scores = score_extraction(predictions, records)
    expected = scores["hallucination_rate"]
    got = answer(predictions, records)
    if expected is None:
        raise ValueError("records= holds no null slot to judge: pass the test records of the task.")
    if not _is_number(got) or not _close(got, expected, rel=1e-9, abs_=1e-12):
        return False, (f"you give {got!r}; extraction.score_extraction counts {scores['hallucinated_values']} "
                       f"invented values in {scores['null_slots']} null slots = {expected:.4f}.")
    return True, (f"{scores['hallucinated_values']} invented values in {scores['null_slots']} null slots "
                  f"({expected:.1%}), equal to extraction.score_extraction.")


# --- CH09_NB02: upcycling and router training ----------------------------------------------------

@exercise("CH09_NB02.routing_entropy", "How evenly does the router spread the tokens?",
          "For each layer's row of `load` (shares of the picks per expert, summing to 1): entropy in bits = "
          "-sum(p x log2 p), where an expert with share 0 adds nothing (0 log 0 = 0). log2(E) means perfectly even, "
          "0 means one expert takes everything.",
          context=("moe_model", "dataloader"))
def _check_routing_entropy(answer, *, moe_model, dataloader):
    from .moe import moe_layers, routing_stats, set_top_k

    before = {layer: layer.top_k for layer in moe_layers(moe_model).values()}
    set_top_k(moe_model, 1)  # top-1 picks: with top_k = E every expert would get an equal share
    try:
        stats = routing_stats(moe_model, dataloader)
    finally:
        for layer, k in before.items():
            layer.top_k = k
    expected = [float(v) for v in stats["entropy"]]
    got = _as_floats(answer(stats["load"].clone()), len(expected), "routing_entropy(load)")
    if isinstance(got, str):
        return False, got.replace("one per block", "one per MoE layer")
    wrong = [i for i, (g, e) in enumerate(zip(got, expected)) if not _close(g, e, rel=1e-6, abs_=1e-9)]
    if wrong:
        i = wrong[0]
        return False, (f"layer {stats['layers'][i]}: you give {got[i]:.4f} bits, moe.routing_stats gives "
                       f"{expected[i]:.4f} (log base 2? zero shares skipped?).")
    return True, (f"equal to moe.routing_stats: {min(expected):.3f} to {max(expected):.3f} bits, of at most "
                  f"{stats['max_entropy']:.3f}.")


@exercise("CH09_NB02.balance_loss", "Switch Transformer's load-balancing loss for one layer",
          "softmax the router logits [tokens, E] -> P_e = mean probability of expert e over the real tokens; "
          "f_e = share of the real tokens' top-k picks that go to e (the shares sum to top_k); loss = E x sum_e "
          "f_e x P_e. Leave out padding (attention_mask == 0).",
          context=())
def _check_balance_loss(answer):
    from .moe import load_balancing_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * 6, 4, generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    for top_k in (1, 2):
        expected = float(load_balancing_loss([logits], top_k, mask))
        got = answer(logits.clone(), top_k, mask.clone())
        got = _as_number(got)
        if not _is_number(got) or not _close(got, expected, rel=1e-5):
            return False, (f"top_k = {top_k}: you give {got!r}, moe.load_balancing_loss gives {expected:.5f} "
                           "(padding left out? f_e summing to top_k?).")
    return True, "equal to moe.load_balancing_loss at top-1 and top-2, padding left out."


# --- CH06_NB02, CH07_NB03, CH08_NB03 ---

# CH06_NB02: what to prune when you will recover afterwards

@exercise("CH06_NB02.window_distances", "The angular distance of every window of n consecutive blocks",
          "Run the model with output_hidden_states=True: hidden_states[l] enters block l and hidden_states[l + n] "
          "leaves block l + n - 1. For each start l = 0 .. total - n - 1, take the cosine of the two per token "
          "(in float32), average it over the real tokens (attention_mask == 1) of all batches, then "
          "arccos(mean) / pi. Leave out the window that ends at the final block: hidden_states[-1] has the final "
          "norm applied, and that block is protected anyway.",
          context=("model", "dataloader", "n"))
def _check_window_distances(answer, *, model, dataloader, n):
    from .depth import angular_distances
    from .structure import decoder_blocks

    total = len(decoder_blocks(model))
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < total - 1:
        raise ValueError(f"n= must be the number of blocks removed, between 1 and {total - 2}, got {n!r}.")
    answered = answer(model, dataloader, n)  # first: an unfinished answer stops the check before the reference pass
    expected = angular_distances(model, dataloader, n, progress=False)[: total - n]
    got = _as_floats(answered, len(expected), f"window_distances(model, dataloader, {n})")
    if isinstance(got, str):
        return False, got.replace("one per block", f"one per start 0..{total - n - 1}: the window that ends at the "
                                                   "final block left out")
    rel, abs_ = (1e-4, 1e-6) if next(model.parameters()).dtype == torch.float32 else (1e-2, 1e-3)
    wrong = [i for i, (g, e) in enumerate(zip(got, expected)) if not _close(g, e, rel=rel, abs_=abs_)]
    if wrong:
        i = wrong[0]
        guess = (" (x pi: divide the arccos by pi, so that 1 means opposite directions)"
                 if all(_close(g, e * math.pi, rel=rel, abs_=abs_) for g, e in zip(got, expected)) else "")
        return False, (f"{len(wrong)} of {len(expected)} windows differ from depth.angular_distances; blocks "
                       f"{i}..{i + n - 1}: yours {got[i]:.5f}, expected {expected[i]:.5f}{guess}.")
    allowed = range(1, total - n)  # windows that keep block 0 and the final block, as the notebook's 'best window'
    best = min(allowed, key=lambda s: expected[s])
    return True, (f"all {len(expected)} windows match depth.angular_distances; the closest window that keeps the "
                  f"first and the final block is blocks {best}..{best + n - 1} (distance {expected[best]:.4f}).")


@exercise("CH06_NB02.width_ratio", "The width cut that removes as many parameters as a depth cut",
          "Add up p.numel() over the parameters of the blocks that depth pruning removes (their attention, MLP and "
          "norms all go), then divide by the parameters of all the MLPs together (every block's .mlp). Each neuron "
          "owns the same share of its MLP, so that quotient is the share of every MLP's neurons to remove.",
          context=("model", "blocks"))
def _check_width_ratio(answer, *, model, blocks):
    from .structure import decoder_blocks, glu_mlps

    layers = decoder_blocks(model)
    chosen = sorted({int(i) for i in blocks})
    if not chosen or not all(0 <= i < len(layers) for i in chosen):
        raise ValueError(f"blocks= must hold the indices (0..{len(layers) - 1}) of the blocks a depth cut removes.")
    got = _as_number(answer(model, list(chosen)))
    removed = sum(p.numel() for i in chosen for p in layers[i].parameters())
    mlp = sum(p.numel() for m in glu_mlps(model) for p in m.parameters())
    expected, naive = removed / mlp, len(chosen) / len(layers)
    if not _is_number(got):
        return False, f"width_ratio(model, blocks) should return a share (a number), got {got!r}."
    if not _close(got, expected, rel=1e-9):
        guess = (" (that is the share of the blocks removed: a block holds attention and norms besides its MLP, so "
                 "the MLPs must lose a larger share)" if _close(got, naive, rel=1e-9) else "")
        return False, (f"you give {got:.4f}; blocks {chosen} hold {removed:,} parameters and all the MLPs "
                       f"{mlp:,}: {expected:.4f}{guess}.")
    return True, (f"removing {expected:.1%} of every MLP's neurons removes as many parameters ({removed:,}) as "
                  f"blocks {chosen}; {len(chosen)} of {len(layers)} blocks is only {naive:.1%} of the depth.")


# CH07_NB03: LoRA, DoRA, QLoRA

def _dora_layer(dora_model):
    """The first peft DoRA layer of ``dora_model`` and the name of its active adapter."""
    for module in dora_model.modules():
        vectors = getattr(module, "lora_magnitude_vector", None)
        if vectors:
            name = next((a for a in module.active_adapters if a in vectors), None)
            if name is not None:
                return module, name
    raise ValueError("dora_model= holds no DoRA layer: pass a peft model built with LoraConfig(use_dora=True), "
                     "e.g. trained['DoRA'].")


def _dora_parts(layer, name: str) -> tuple:
    """(weight, lora_A, lora_B, magnitude, scaling) of one peft DoRA layer, as copies."""
    return (layer.get_base_layer().weight.detach().clone(), layer.lora_A[name].weight.detach().clone(),
            layer.lora_B[name].weight.detach().clone(), layer.lora_magnitude_vector[name].weight.detach().clone(),
            float(layer.scaling[name]))


@torch.no_grad()
def _computed_weight(layer) -> torch.Tensor:
    """The weight a Linear-like layer applies: its output on the identity, bias removed, transposed."""
    base = layer.get_base_layer()
    out = layer(torch.eye(base.in_features, dtype=base.weight.dtype, device=base.weight.device))
    return (out - base.bias if base.bias is not None else out).T


@torch.no_grad()
def _large_dora_update(layer, name: str) -> None:
    """Give ``layer`` (a copy) an update of a tenth of its weight's size and a magnitude off the row norms."""
    g = torch.Generator().manual_seed(0)
    weight, a, b, _, scaling = _dora_parts(layer, name)
    row = float(weight.float().norm(dim=1).mean())
    scale = 0.3 * row / (scaling * float(a.float().norm()) + 1e-12)
    layer.lora_B[name].weight.copy_((torch.randn(b.shape, generator=g) * scale).to(b))
    adapted = weight.float() + scaling * (layer.lora_B[name].weight.float() @ a.float())
    spread = 0.5 + torch.rand(weight.shape[0], generator=g).to(adapted.device)
    layer.lora_magnitude_vector[name].weight.copy_(adapted.norm(dim=1) * spread)


def _dora_mistakes(weight, a, b, m, scaling) -> dict[str, torch.Tensor]:
    """What a few likely wrong answers to CH07_NB03.dora_weight return, by the mistake's description."""
    w, a, b, m = weight.float(), a.float(), b.float(), m.float()[:, None]
    adapted = w + scaling * (b @ a)
    unscaled = w + b @ a
    return {"the direction without the magnitude: multiply each row by m": adapted / adapted.norm(dim=1, keepdim=True),
            "norms per column: DoRA normalises each output row (dim=1 of [out, in])":
                m * adapted / adapted.norm(dim=0, keepdim=True),
            "the row norms of W alone: normalise the adapted weight W + scaling B A":
                m * adapted / w.norm(dim=1, keepdim=True),
            "the update without `scaling`": m * unscaled / unscaled.norm(dim=1, keepdim=True),
            "plain LoRA: W + scaling B A, neither normalised nor rescaled": adapted}


@exercise("CH07_NB03.dora_weight", "DoRA's weight: the adapted weight's direction times a learned magnitude",
          "Work in float32. adapted = weight + scaling x (lora_B @ lora_A), shaped [out, in]; its row norms "
          "torch.linalg.vector_norm(adapted, dim=1) (one per output); return magnitude[:, None] x adapted / "
          "norms[:, None]: each row keeps its direction and takes its length from m.",
          context=("dora_model",))
def _check_dora_weight(answer, *, dora_model):
    import copy

    layer, name = _dora_layer(dora_model)
    trial = copy.deepcopy(layer).eval()
    _large_dora_update(trial, name)
    for label, module in (("a copy of the layer with a large update", trial), ("your trained layer", layer)):
        parts = _dora_parts(module, name)
        got = answer(*parts)
        expected = _computed_weight(module)
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return False, (f"dora_weight(...) should return a tensor shaped {tuple(expected.shape)} [out, in], "
                           f"got {shape}.")
        expected = expected.float()
        tol = (1e-4 if parts[0].dtype == torch.float32 else 5e-3) * float(expected.abs().max())
        got = got.detach().float().to(expected.device)
        error = float((got - expected).abs().max())
        if error > tol:
            guess = next((f" (it equals {what})" for what, wrong in _dora_mistakes(*parts).items()
                          if float((got - wrong.to(expected.device)).abs().max()) <= tol), "")
            out_features, in_features = expected.shape
            return False, (f"on {label} ({out_features} x {in_features} weight) the largest difference from what the "
                           f"peft layer computes is {error:.3g}{guess}.")
    weight, a, b, m, scaling = _dora_parts(layer, name)
    row_norms = (weight.float() + scaling * (b.float() @ a.float())).norm(dim=1)
    moved = float((m.float().to(row_norms.device) / row_norms - 1).abs().max())
    return True, (f"equal to what peft's DoRA layer computes, with a large update and on your trained layer; training "
                  f"moved that layer's magnitudes up to {moved:.2%} away from its row norms.")


def _qlora_parts(model, rank: int, targets: list[str], dora: bool) -> dict[str, float]:
    """The bytes of a QLoRA (or QDoRA) setup on paper, by part."""
    from .lora import lora_parameter_count
    from .quantization import bits_per_parameter
    from .structure import decoder_blocks

    linear = {id(m.weight): m.weight.numel() for block in decoder_blocks(model) for m in block.modules()
              if isinstance(m, torch.nn.Linear)}
    adapter = lora_parameter_count(model, rank, targets, dora=dora)
    return {"4-bit base": sum(linear.values()) * bits_per_parameter(4, 64, double_quant=True) / 8,
            "other weights": sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in linear),
            "adapter": 4 * adapter, "AdamW state": 8 * adapter}


def _qlora_mistakes(model, rank: int, targets: list[str], dora: bool) -> dict[str, float]:
    """What a few likely wrong answers to CH07_NB03.qlora_bytes return, by the mistake's description."""
    parts = _qlora_parts(model, rank, targets, dora)
    total = sum(parts.values())
    linear_weights = parts["4-bit base"] * 8 / (4 + 8 / 64 + 32 / (64 * 256))
    out = {"AdamW's two moments are missing: 2 x 4 bytes per trainable parameter": total - parts["AdamW state"],
           "the block constants are missing: NF4 in blocks of 64 with double quantisation costs 4.127 bits, not 4":
               total - parts["4-bit base"] + linear_weights * 4 / 8,
           "the embeddings and norms are missing: they stay in the model's dtype": total - parts["other weights"]}
    if dora:
        without = _qlora_parts(model, rank, targets, False)
        out["DoRA's magnitudes are missing: one per output row of every adapted layer"] = sum(without.values())
    return out


@exercise("CH07_NB03.qlora_bytes", "The memory of a QLoRA setup, on paper: a 4-bit base plus a trained adapter",
          "Four parts. (1) Every nn.Linear weight inside the decoder blocks in NF4, blocks of 64, double quantisation: "
          "numel x quantization.bits_per_parameter(4, 64, double_quant=True) / 8 bytes. (2) Every other parameter "
          "(embeddings, norms) in the model's dtype: p.numel() x p.element_size(). (3) The adapter in float32: "
          "rank x (in + out) per targeted layer, plus out per layer for DoRA's magnitudes, 4 bytes each. (4) AdamW's "
          "two moments: 8 bytes per adapter parameter.",
          context=("model",))
def _check_qlora_bytes(answer, *, model):
    attention, mlp = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]
    for rank, targets, dora in ((8, attention + mlp, False), (8, attention, True), (2, mlp, False)):
        got = _as_number(answer(model, rank, list(targets), dora))
        expected = sum(_qlora_parts(model, rank, targets, dora).values())
        if not _is_number(got):
            return False, f"qlora_bytes(model, {rank}, {targets}, {dora}) should return a number of bytes, got {got!r}."
        if not _close(got, expected, rel=1e-6):
            guess = next((f" ({what})" for what, wrong in _qlora_mistakes(model, rank, targets, dora).items()
                          if _close(got, wrong, rel=1e-6)), "")
            return False, (f"rank {rank} on {targets}, dora={dora}: you give {got:,.0f} bytes, the answer key "
                           f"{expected:,.0f}{guess}.")
    parts = _qlora_parts(model, 8, attention + mlp, False)
    plain = sum(p.numel() * p.element_size() for p in model.parameters())
    return True, ("rank 8 on all seven projections: " + ", ".join(f"{k} {v / 1e6:,.2f} MB" for k, v in parts.items())
                  + f"; {sum(parts.values()) / 1e6:,.2f} MB in all, against {plain / 1e6:,.2f} MB for the weights "
                  "alone in the model's own dtype.")


# CH08_NB03: adaptive attention bypass

def _late_rule_counts(rows, threshold, protected) -> tuple[list[int], list[int], list[int], int]:
    """Per prompt: attentions the late rule skips at ``threshold``, decoded tokens, prompt tokens; and blocks."""
    from .bypass import decisions, threshold_rule

    rows = list(rows)
    if not rows or not all(isinstance(r, dict) and {"scores", "scored_tokens", "prompt_tokens"} <= set(r)
                           for r in rows):
        raise ValueError("rows= must be the rows of bypass.prompt_attention_scores (e.g. fit_rows).")
    skips = decisions(rows, threshold_rule(threshold), protect=protected)
    decoded = [int(r["scored_tokens"]) for r in rows]
    if sum(decoded) == 0:
        raise ValueError("rows= holds no decoded token: pass the rows of texts longer than their prompts.")
    return [len(s) for s in skips], decoded, [int(r["prompt_tokens"]) for r in rows], len(rows[0]["scores"])


def _weighted_mean(values, weights) -> float:
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


@exercise("CH08_NB03.skipped_per_token", "Skipped attention sublayers per decoded token, not per prompt",
          "Every token decoded after prompt i runs with skipped[i] attentions switched off, so weigh each prompt by "
          "its decoded tokens: sum(skipped[i] x decoded[i]) / sum(decoded[i]) (np.average(skipped, weights=decoded)). "
          "A plain mean over prompts lets a prompt with 3 decoded tokens count as much as one with 300.",
          context=("rows", "threshold", "protected"))
def _check_skipped_per_token(answer, *, rows, threshold, protected):
    skipped, decoded, _, _ = _late_rule_counts(rows, threshold, protected)
    cases = [([2, 10, 6], [40, 4, 10]), ([0, 5], [7, 0]), ([3], [12]), (skipped, decoded)]
    for k, (s, d) in enumerate(cases):
        got = _as_number(answer(list(s), list(d)))
        expected, plain = _weighted_mean(s, d), sum(s) / len(s)
        where = ("on the notebook's calibration prompts (the late rule at its threshold)" if k == len(cases) - 1
                 else f"skipped {s}, decoded {d}")
        if not _is_number(got):
            return False, f"{where}: skipped_per_token should return a number, got {got!r}."
        if not _close(got, expected, rel=1e-9, abs_=1e-12):
            guess = (" (that is the plain mean over prompts: weigh each prompt by its decoded tokens)"
                     if _close(got, plain, rel=1e-9, abs_=1e-12) else "")
            return False, f"{where}: you give {got!r}, the answer key {expected:.4f}{guess}."
    return True, (f"on the {len(skipped)} calibration prompts the late rule at its threshold skips {expected:.3f} "
                  "attentions per decoded token (calibrate_threshold put the threshold where this comes closest to "
                  f"the budget); a plain mean over prompts would say {plain:.3f}.")


@exercise("CH08_NB03.expected_cache_ratio", "The share of the KV cache a rule should keep, from its decisions",
          "Every attention holds the same bytes per token, so prompt i's cache is proportional to prompt_tokens[i], "
          "and skipping skipped[i] of n_blocks attentions keeps (1 - skipped[i] / n_blocks) of it. Weigh by the "
          "cache: sum(tokens x (1 - skipped / n_blocks)) / sum(tokens). Neither the plain mean over prompts nor 1 - "
          "(skipped per decoded token) / n_blocks: those weigh a prompt by 1 or by its continuation, not its cache.",
          context=("rows", "threshold", "protected"))
def _check_expected_cache_ratio(answer, *, rows, threshold, protected):
    skipped, decoded, tokens, n_blocks = _late_rule_counts(rows, threshold, protected)
    cases = [([2, 10, 6], [100, 10, 30], 30), ([0, 4], [5, 50], 16), (skipped, tokens, n_blocks)]
    for k, (s, t, n) in enumerate(cases):
        got = _as_number(answer(list(s), list(t), n))
        expected = _weighted_mean([1 - v / n for v in s], t)
        last = k == len(cases) - 1
        where = ("on the notebook's calibration prompts (the late rule at its threshold)" if last
                 else f"skipped {s}, prompt tokens {t}, {n} blocks")
        if not _is_number(got):
            return False, f"{where}: expected_cache_ratio should return a share, got {got!r}."
        if not _close(got, expected, rel=1e-9, abs_=1e-12):
            mistakes = {"the plain mean over prompts": 1 - sum(s) / len(s) / n}
            if last:
                mistakes["1 - skipped per decoded token / blocks"] = 1 - _weighted_mean(s, decoded) / n
            guess = next((f" (that is {what}: weigh each prompt by its cache, i.e. its prompt tokens)"
                          for what, wrong in mistakes.items() if _close(got, wrong, rel=1e-9, abs_=1e-12)), "")
            return False, f"{where}: you give {got!r}, the answer key {expected:.4f}{guess}."
    per_token = 1 - _weighted_mean(skipped, decoded) / n_blocks
    return True, (f"the late rule should keep {expected:.3f} of the base cache on the {len(skipped)} calibration "
                  f"prompts; 1 - skipped per decoded token / blocks says {per_token:.3f}: one weighs a prompt by its "
                  "cache, the other by its continuation.")
# --- CH11 ---------------------------------------------------------------------------------------
# CH11_NB01: bias neurons; CH11_NB02: Fair Pruning; CH11_NB03: a bias benchmark.

def _bias_rel(model) -> float:
    """Relative tolerance for activations and log-probabilities computed in the model's own dtype."""
    return 1e-4 if next(model.parameters()).dtype in (torch.float32, torch.float64) else 5e-2


def _as_vector(got, n: int, what: str) -> torch.Tensor | str:
    """``got`` as a float CPU vector of ``n`` numbers, or a sentence saying why it is not."""
    try:
        got = torch.as_tensor(got.detach() if isinstance(got, torch.Tensor) else got).float().cpu().flatten()
    except (TypeError, ValueError, RuntimeError):
        return f"{what} should return a tensor of {n} numbers, got {type(got).__name__}."
    if got.numel() != n:
        return f"{what} should return {n} numbers (one per neuron), got {got.numel()}."
    return got


@exercise("CH11_NB01.signed_scores", "The signed score of one layer's neurons, with your own hook",
          "A forward pre-hook on model.model.layers[layer].mlp.down_proj sees a = inputs[0], [1, tokens, neurons]. "
          "Run the target prompt and the other prompt of each pair on their own, average a over the tokens of each, "
          "and subtract: target minus other. Average those differences over the pairs and keep the sign (no abs).",
          context=("model", "tokenizer", "pairs", "layer"))
def _check_signed_scores(answer, *, model, tokenizer, pairs, layer):
    from .bias import pair_differences, typical_magnitudes

    pairs = list(pairs)
    answered = answer(model, tokenizer, pairs, layer)
    diffs = pair_differences(model, tokenizer, pairs)[:, layer]
    expected = diffs.mean(0)
    got = _as_vector(answered, expected.numel(), f"signed_scores(model, tokenizer, pairs, {layer})")
    if isinstance(got, str):
        return False, got
    scale = float(typical_magnitudes(model, tokenizer, pairs)[layer].max())  # the size of the activations
    tol = {"rtol": _bias_rel(model), "atol": _bias_rel(model) * scale}
    if not torch.allclose(got, expected, **tol):
        if torch.allclose(got, -expected, **tol):
            return False, "every score has the wrong sign: take a(target prompt) - a(other prompt), not the reverse."
        if torch.allclose(got, diffs.abs().mean(0), **tol):
            return False, ("these are the mean |differences| (optipfair's unsigned score): average the signed "
                           "differences instead, so that a neuron that fires more for the other group is negative.")
        i = int((got - expected).abs().argmax())
        return False, (f"neuron {i} of layer {layer}: you give {float(got[i]):+.5f}, "
                       f"bias.pair_differences(...).mean(0) gives {float(expected[i]):+.5f} (mean over each prompt's "
                       "tokens, then over the pairs).")
    top = int(expected.abs().argmax())
    return True, (f"layer {layer}, {len(pairs)} pairs: {int((expected > 0).sum())} neurons fire more for the target "
                  f"group, {int((expected < 0).sum())} for the other; the largest |score| is neuron {top} "
                  f"({float(expected[top]):+.4f}). Equal to bias.signed_bias_scores.")


@exercise("CH11_NB01.relative_scores", "The relative score, and why it stays below 2",
          "|signed| / (typical + floor), element by element, where floor = 0.01 x the median of `typical` over the "
          "neurons of the same layer (one floor per layer: typical.median(dim=1, keepdim=True).values). The floor "
          "keeps near-silent neurons from dividing by almost zero.",
          context=("signed", "typical"))
def _check_relative_scores(answer, *, signed, typical):
    from .bias import relative_scores_from

    answered = answer(signed.clone(), typical.clone())
    expected = relative_scores_from(signed, typical)
    try:
        got = torch.as_tensor(answered.detach() if isinstance(answered, torch.Tensor) else answered).float().cpu()
    except (TypeError, ValueError, RuntimeError):
        return False, f"relative_scores(signed, typical) should return a tensor, got {type(answered).__name__}."
    if got.shape != expected.shape:
        return False, f"expected a tensor of shape {tuple(expected.shape)} (layers x neurons), got {tuple(got.shape)}."
    tol = {"rtol": 1e-5, "atol": 1e-7}
    if not torch.allclose(got, expected, **tol):
        if bool((got < 0).any()) and torch.allclose(got.abs(), expected, **tol):
            return False, "some scores are negative: divide the absolute value of the signed score."
        if torch.allclose(got, signed.abs() / (typical + 0.01 * typical.median()), **tol):
            return False, "one floor for the whole model: take the median of each layer (dim=1), not of every neuron."
        if torch.allclose(got, signed.abs() / typical, equal_nan=True, **tol):
            return False, "the floor is missing: add 0.01 x the layer's median typical magnitude to the denominator."
        layer, neuron = divmod(int((got - expected).abs().nan_to_num(float("inf")).argmax()), expected.size(1))
        return False, (f"layer {layer}, neuron {neuron}: you give {float(got[layer, neuron]):.5f}, "
                       f"bias.relative_scores_from gives {float(expected[layer, neuron]):.5f}.")
    layer, neuron = divmod(int(expected.argmax()), expected.size(1))
    return True, (f"the largest relative score is {float(expected.max()):.3f} (layer {layer}, neuron {neuron}): below "
                  "2, as every one must be. Can you say why?")


@exercise("CH11_NB02.removed_per_layer", "How many neurons does Fair Pruning take from each layer?",
          "per_layer=True: max(1, int(ratio x width)) in every layer that is not protected, 0 in the protected ones. "
          "per_layer=False: max(1, round(ratio x n_layers x width)) in all (a share of every neuron of the model, "
          "the protected layers' included), the largest |scores| over the unprotected layers together "
          "(torch.topk on the flattened scores, with the protected rows set to -1); count them per layer.",
          context=("scores", "protect_layers"))
def _check_removed_per_layer(answer, *, scores, protect_layers):
    from .bias import fair_prune_selection

    n_layers, width = scores.shape
    protect_layers = [int(i) for i in protect_layers]
    lines = []
    for ratio, per_layer in ((0.02, True), (0.02, False), (0.005, False)):
        got = answer(scores.clone(), ratio, list(protect_layers), per_layer)
        chosen = fair_prune_selection(scores, ratio, protect_layers=protect_layers, per_layer=per_layer)
        expected = [len(chosen.get(i, [])) for i in range(n_layers)]
        how = "per layer" if per_layer else "as one ranking"
        try:
            got = [int(c) for c in got]
        except (TypeError, ValueError):
            return False, f"removed_per_layer(...) should return {n_layers} counts (one per layer), got {got!r}."
        if len(got) != n_layers:
            return False, f"expected {n_layers} counts (one per layer), got {len(got)}."
        if got != expected:
            if any(got[i] for i in protect_layers):
                return False, f"ratio {ratio} {how}: you take neurons from the protected layers {protect_layers}."
            if sum(got) != sum(expected):
                return False, (f"ratio {ratio} {how}: {sum(got)} neurons in all, bias.fair_prune_selection removes "
                               f"{sum(expected)}.")
            i = next(i for i, (g, e) in enumerate(zip(got, expected)) if g != e)
            return False, f"ratio {ratio} {how}: layer {i} loses {got[i]} in yours, {expected[i]} in fair_prune."
        open_counts = [e for i, e in enumerate(expected) if i not in protect_layers]
        if per_layer:
            lines.append(f"{ratio:.1%} {how}: {open_counts[0]} in each of {len(open_counts)} layers, "
                         f"{sum(expected)} in all")
        else:
            top = max(range(n_layers), key=expected.__getitem__)
            lines.append(f"{ratio:.1%} {how}: {sum(expected)} in all, {min(open_counts)} to {max(open_counts)} per "
                         f"open layer (layer {top} the most)")
    return True, "equal to bias.fair_prune_selection. " + "; ".join(lines) + "."


@exercise("CH11_NB02.stereotype_score", "The signed stereotype score of one probe, by hand",
          "For each prompt (target, other) and continuation (stereo, anti): tokenise the prompt, and the prompt + "
          "continuation (it starts with a space); the continuation's tokens are those after the prompt's. Sum their "
          "log-probabilities, each read from the logits at the position before it (log_softmax in float32). Then "
          "[stereo - anti after the target prompt] - [stereo - anti after the other prompt].",
          context=("model", "tokenizer", "probes"))
def _check_stereotype_score(answer, *, model, tokenizer, probes):
    from .benchmarks import score_choices
    from .bias import stereotype_scores

    probes = list(probes)[:3]
    if not probes:
        raise ValueError("probes= is empty: pass the stereotype probes of the notebook.")
    got = [_as_number(answer(model, tokenizer, dict(p))) for p in probes]
    expected = stereotype_scores(model, tokenizer, probes).tolist()
    rel = abs_ = _bias_rel(model)  # float32: 1e-4 (padding in a batch changes the sums a little); 16-bit: 5e-2
    for k, (g, e, p) in enumerate(zip(got, expected, probes)):
        if not _is_number(g):
            return False, f"stereotype_score(model, tokenizer, probe) should return a number, got {g!r}."
        if _close(g, e, rel=rel, abs_=abs_):
            continue
        items = [{"query": p["target_prompt"], "choices": [p["stereo"].strip(), p["anti"].strip()]}]
        ll = score_choices(model, tokenizer, items, progress=False)["loglik"][0]
        if _close(g, -e, rel=rel, abs_=abs_):
            mistake = " (the sign is reversed: stereo minus anti, target bracket minus other bracket)"
        elif _close(g, ll[0] - ll[1], rel=rel, abs_=abs_):
            mistake = " (that is the target prompt's preference alone: subtract the other prompt's)"
        else:
            mistake = ""
        return False, (f"probe {k} ({p['target_prompt']!r}, stereo {p['stereo']!r}, anti {p['anti']!r}): you give "
                       f"{g:+.4f}, bias.stereotype_scores gives {e:+.4f}{mistake}.")
    return True, (f"equal to bias.stereotype_scores on {len(probes)} probes: "
                  + ", ".join(f"{e:+.3f}" for e in expected) + " nats (positive = the stereotype).")


def _bbq_cases(items: list[dict], predictions: list[int]) -> dict[str, list[int]]:
    """Prediction sets that exercise every part of BBQ's scores: the model's own answers and four planted ones."""
    stereotyped = [i["target_index"] if i["question_polarity"] == "neg" else i["other_index"] for i in items]
    return {"the model's answers": [int(p) for p in predictions],
            "always the target group": [i["target_index"] for i in items],
            "always the stereotyped answer": stereotyped,
            "the stereotype on every other item, else 'unknown'": [s if k % 2 else i["unknown_index"]
                                                                  for k, (i, s) in enumerate(zip(items, stereotyped))],
            "always 'unknown'": [i["unknown_index"] for i in items]}


@exercise("CH11_NB03.bbq_bias", "BBQ's two bias scores from a list of answers",
          "Among the answers that are not 'unknown', an answer is biased when it names the target group for a "
          "negative question ('neg') or the other group for a non-negative one. s_dis = 2 x biased / non-unknown - 1 "
          "on the disambiguated items; on the ambiguous items the same share is multiplied by (1 - their accuracy). "
          "A score with no non-unknown answer (or no item of its kind) is None.",
          context=("items", "predictions"))
def _check_bbq_bias(answer, *, items, predictions):
    from .bias import bbq_scores

    items = list(items)
    for case, preds in _bbq_cases(items, list(predictions)).items():
        got = answer(items, list(preds))
        expected = bbq_scores(items, preds)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return False, f"bbq_bias(items, predictions) should return (s_dis, s_amb), got {got!r}."
        for name, g in zip(("s_dis", "s_amb"), got):
            e = expected[name]
            g = _as_number(g)
            if e is None or g is None:
                if (e is None) != (g is None):
                    return False, f"{case}: you give {name} = {g!r}, bias.bbq_scores gives {e!r}."
                continue
            if not _is_number(g) or not _close(g, e, rel=1e-9, abs_=1e-12):
                shown = f"{g:+.4f}" if _is_number(g) else repr(g)
                return False, f"{case}: you give {name} = {shown}, bias.bbq_scores gives {e:+.4f}."
    base = bbq_scores(items, list(predictions))
    shown = ", ".join(f"{k} {base[k]:+.3f}" if base[k] is not None else f"{k} undefined" for k in ("s_dis", "s_amb"))
    return True, f"equal to bias.bbq_scores on the model's answers ({shown}) and on four planted answer sets."


@exercise("CH11_NB03.scenario_interval", "A bootstrap that resamples scenarios, not items",
          "Group the item indices by cluster label. n_boot times: draw as many clusters as there are, with "
          "replacement, take every item of each drawn cluster, and compute the accuracy of that resample "
          "(prediction == item['label']). The interval is the 2.5th and 97.5th percentiles of those accuracies.",
          context=("items", "predictions", "clusters"))
def _check_scenario_interval(answer, *, items, predictions, clusters):
    from .benchmarks import bootstrap_ci

    items, clusters = list(items), list(clusters)
    order = {c: k for k, c in enumerate(dict.fromkeys(clusters))}
    # planted: right on every item of every other scenario, wrong on the rest (answers move together)
    planted = [i["label"] if order[c] % 2 == 0 else (i["label"] + 1) % len(i["choices"])
               for i, c in zip(items, clusters)]
    n_boot = 2000

    def acc(items_, preds_):
        return {"acc": sum(p == i["label"] for i, p in zip(items_, preds_)) / len(items_)}

    for case, preds in (("the model's answers", [int(p) for p in predictions]), ("planted answers", planted)):
        got = answer(items, list(preds), list(clusters), n_boot, 0)
        try:
            low, high = (float(_as_number(v)) for v in got)
        except (TypeError, ValueError):
            return False, f"scenario_interval(...) should return (low, high), got {got!r}."
        ref = bootstrap_ci(items, preds, metric=acc, n_boot=n_boot, seed=0, clusters=clusters)["acc"]
        per_item = bootstrap_ci(items, preds, metric=acc, n_boot=n_boot, seed=0)["acc"]
        tol = 0.15 * (ref[1] - ref[0]) + 0.01  # two bootstraps with different random draws differ a little
        if abs(low - ref[0]) > tol or abs(high - ref[1]) > tol:
            item_tol = 0.15 * (per_item[1] - per_item[0]) + 0.01
            looks_per_item = abs(low - per_item[0]) <= item_tol and abs(high - per_item[1]) <= item_tol
            return False, (f"{case}: you give [{low:.3f}, {high:.3f}], resampling scenarios gives about "
                           f"[{ref[0]:.3f}, {ref[1]:.3f}]" + (" (yours is the interval of resampling items one by "
                                                               "one)" if looks_per_item else "") + ".")
    widths = f"{ref[1] - ref[0]:.3f} resampling scenarios, {per_item[1] - per_item[0]:.3f} resampling items"
    return True, (f"within the bootstrap's own noise of benchmarks.bootstrap_ci(clusters=...). On the planted answers, "
                  f"which move together within a scenario, the interval is {widths}.")
# --- labs: CH07_NB04, CH09_NB03 ------------------------------------------------------------------

#: The seven projections of a GLU decoder block: what the CH07_NB04 lab adapts.
_ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@exercise("CH07_NB04.adapter_params", "Count a LoRA adapter's parameters from the model's own layers",
          "Walk model.named_modules(): every nn.Linear whose name ends with one of the targets (the part after the "
          "last dot) gets A (r x in_features) and B (out_features x r), so it adds r x (in_features + out_features). "
          "Not in_features x out_features: that is the frozen weight. Sum over every matching layer of every block.",
          context=("model",))
def _check_adapter_params(answer, *, model):
    from .evaluation import count_parameters
    from .lora import find_target_modules, lora_parameter_count

    for rank, targets in ((1, _ALL_PROJECTIONS), (8, _ALL_PROJECTIONS), (4, ("k_proj", "down_proj"))):
        got = answer(model, rank, list(targets))
        if not _is_number(got, integer=True):
            return False, f"adapter_params(model, {rank}, {list(targets)}) should return an int, got {got!r}."
        expected = lora_parameter_count(model, rank, list(targets))
        if got != expected:
            found = find_target_modules(model, list(targets)).values()
            frozen = sum(m.in_features * m.out_features for m in found)
            why = (" (that is the frozen weights' size, in x out, not the adapter's)" if got == frozen else
                   " (the rank is missing: each of A and B has r rows or columns)" if got * rank == expected else "")
            return False, (f"rank {rank} on {list(targets)}: you count {got:,}, lora.lora_parameter_count counts "
                           f"{expected:,}{why}.")
    one = lora_parameter_count(model, 1, list(_ALL_PROJECTIONS))
    return True, (f"all three settings match; rank 1 on the seven projections adds {one:,} parameters, "
                  f"{one / count_parameters(model):.3%} of the model's {count_parameters(model):,}.")


def _merged_error(answer, weight, a, b, alpha, expected) -> tuple[float | None, str]:
    """Largest |difference| between the reader's merged weight and ``expected`` (None and a sentence if the
    answer is not a tensor of the right shape)."""
    got = answer(weight.detach().clone(), a.detach().clone(), b.detach().clone(), alpha)
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return None, f"merged_weight(...) should return a tensor shaped like W, {tuple(expected.shape)}, got {shape}."
    return float((got.detach().to(expected.device, torch.float32) - expected.float()).abs().max()), ""


@exercise("CH07_NB04.merged_weight", "Fold a trained adapter into its weight: W + (alpha / r) B A",
          "merged = W + (alpha / r) * (B @ A), where r = A.shape[0]: A is r x in, B is out x r, so B @ A is out x in, "
          "like W. At rank 1 alpha / r is alpha itself, so test your code at another rank too. Compute in float32 "
          "(W may be float16 on a GPU, A and B are float32).",
          context=("layer",))
def _check_merged_weight(answer, *, layer):
    from .checks import tolerances
    from .lora import LoRALinear

    expected = layer.merged_weight()
    error, problem = _merged_error(answer, layer.base.weight, layer.lora_A, layer.lora_B, layer.alpha, expected)
    if error is None:
        return False, problem
    tol = tolerances(expected)
    if error > tol["atol"] + tol["rtol"] * float(expected.float().abs().max()):
        return False, (f"on the notebook's rank-{layer.r} layer: largest difference from LoRALinear.merged_weight "
                       f"{error:.3g}.")
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(layer.in_features, max(2, layer.out_features // 4), bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=g) / layer.in_features ** 0.5)
    wide = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        wide.lora_B.copy_(torch.randn(wide.lora_B.shape, generator=g))
    expected4 = wide.merged_weight()
    error, problem = _merged_error(answer, base.weight, wide.lora_A, wide.lora_B, 8.0, expected4)
    if error is None:
        return False, problem
    delta = float(wide.delta_weight().detach().abs().max())
    if error > 1e-4 * float(expected4.abs().max()):
        return False, (f"right at rank 1, wrong at rank 4 (alpha 8): largest difference {error:.3g}, the update's "
                       f"largest entry is {delta:.3g}. Is the scale alpha / r, with r = A.shape[0]?")
    return True, (f"equal to LoRALinear.merged_weight on the trained rank-{layer.r} layer and on a rank-4 one "
                  f"(scale alpha / r = {wide.scaling:g}).")


@exercise("CH07_NB04.update_energy", "How much of a trained update lies in its first k directions?",
          "torch.linalg.svdvals(delta) gives the singular values s_1 >= s_2 >= ... of the update; its energy is "
          "sum_i s_i^2 (the squared Frobenius norm). Return (s_1^2 + ... + s_k^2) / sum_i s_i^2: square the "
          "singular values before adding them up.",
          context=("adapters",))
def _check_update_energy(answer, *, adapters):
    from .lora import update_energy_share

    layers = list(adapters.items())
    picks = [layers[i] for i in sorted({0, len(layers) // 2, len(layers) - 1})]
    shares = []
    for name, layer in picks:
        delta = layer.delta_weight().detach().float()
        for k in (1, 2):
            got = _as_number(answer(delta.clone(), k))
            if not _is_number(got):
                return False, f"update_energy(delta, {k}) should return a number, got {got!r}."
            expected = update_energy_share(layer, k)
            if not _close(got, expected, rel=1e-4, abs_=1e-6):
                s = torch.linalg.svdvals(delta.double())
                plain = float(s[:k].sum() / s.sum())
                why = " (that is the share of the singular values, not of their squares)" if _close(
                    got, plain, rel=1e-4) else ""
                return False, (f"{name}, k = {k}: you give {got:.5f}, lora.update_energy_share gives "
                               f"{expected:.5f}{why}.")
            shares.append((name, k, expected))
    first = [s for _, k, s in shares if k == 1]
    return True, (f"equal to lora.update_energy_share on {len(picks)} layers; the first direction holds "
                  f"{min(first):.1%} to {max(first):.1%} of their update's energy.")


@exercise("CH09_NB03.expert_share", "Where do a domain's tokens go? The share of first choices, per layer",
          "Inside `with moe.keep_router_logits(moe_model) as layers:` run the model on every batch (under "
          "torch.no_grad()); each layer's last_router_logits is [batch x seq, E], and a token's first choice is the "
          "argmax over E. Count, per layer, the real tokens (attention_mask.reshape(-1) == 1) whose first choice is "
          "`expert`, over all batches, and divide by the number of real tokens.",
          context=("moe_model", "dataloader", "expert"))
def _check_expert_share(answer, *, moe_model, dataloader, expert):
    from .moe import top1_routing

    got = answer(moe_model, dataloader, expert)
    stats = top1_routing(moe_model, dataloader)
    expected = [float(v) for v in stats["load"][:, expert]]
    got = _as_floats(got, len(expected), "expert_share(moe_model, dataloader, expert)")
    if isinstance(got, str):
        return False, got.replace("one per block", "one per MoE layer")
    slack = 1.5 / max(stats["tokens"], 1)  # one token: a near-tie that rounds the other way
    wrong = [i for i, (g, e) in enumerate(zip(got, expected)) if abs(g - e) > slack]
    if wrong:
        i = wrong[0]
        return False, (f"block {stats['layers'][i]}: you give {got[i]:.4f}, moe.top1_routing gives {expected[i]:.4f} "
                       f"over {stats['tokens']} real tokens (padding left out? argmax over the experts?).")
    return True, (f"equal to moe.top1_routing: {sum(expected) / len(expected):.1%} of these tokens pick expert "
                  f"{expert} first (per MoE layer {min(expected):.1%} to {max(expected):.1%}).")


@exercise("CH09_NB03.capacity_factor", "How uneven is the routing? The capacity factor that drops no token",
          "Each row of `load` holds one MoE layer's shares of first choices per expert (the row sums to 1). An even "
          "split gives each of the E experts 1/E; the busiest expert needs max share / (1/E) = E x max share times "
          "that room. Return one number per row: 1.0 is perfectly even, E means one expert takes every token.",
          context=("moe_model", "dataloader"))
def _check_capacity_factor(answer, *, moe_model, dataloader):
    from .moe import capacity_factor, top1_routing

    load = top1_routing(moe_model, dataloader)["load"]
    got = _as_floats(answer(load.clone()), load.shape[0], "capacity_factor(load)")
    if isinstance(got, str):
        return False, got.replace("one per block", "one per MoE layer")
    expected = [float(v) for v in capacity_factor(load)]
    wrong = [i for i, (g, e) in enumerate(zip(got, expected)) if not _close(g, e, rel=1e-5, abs_=1e-6)]
    if wrong:
        i = wrong[0]
        unscaled = _close(got[i], float(load[i].max()), rel=1e-5)
        return False, (f"row {i}: you give {got[i]:.4f}, moe.capacity_factor gives {expected[i]:.4f}"
                       + (" (that is the largest share itself: compare it with the even share 1/E)" if unscaled else "")
                       + ".")
    return True, (f"equal to moe.capacity_factor: {min(expected):.2f} to {max(expected):.2f} over the MoE layers "
                  f"(1.00 is even, {load.shape[1]} means one expert takes every token).")


def _as_table(got, models, loaders):
    """The reader's table as ``{model: {domain: value}}`` (a DataFrame either way round is accepted), or a sentence."""
    if hasattr(got, "to_dict") and not isinstance(got, dict):
        got = got.to_dict()
    if not isinstance(got, dict):
        return f"perplexity_table(models, loaders) should return a dict of dicts, got {type(got).__name__}."
    if set(got) == set(loaders) and set(got) != set(models):  # {domain: {model: value}}: turn it round
        got = {name: {d: row.get(name) for d, row in got.items()} for name in models}
    missing = [f"{n}/{d}" for n in models for d in loaders if not isinstance(got.get(n), dict) or d not in got[n]]
    return f"the table has no value for {', '.join(missing[:3])}: one per model and domain." if missing else got


@exercise("CH09_NB03.perplexity_table", "Perplexity per model and per domain, in one table",
          "For every model and every domain's loader: exp(total negative log-likelihood of the real next tokens / "
          "their number), pooled over all the batches of that loader (evaluation.perplexity does exactly this). Do "
          "not average per-batch perplexities: a short batch would weigh as much as a long one. Return "
          "{model name: {domain: perplexity}}.",
          context=("models", "loaders"))
def _check_perplexity_table(answer, *, models, loaders):
    from .evaluation import perplexity
    from .precision import HALF_DTYPES, dtype_of

    got = _as_table(answer(models, loaders), models, loaders)
    if isinstance(got, str):
        return False, got
    for name, model in models.items():
        rel = 2e-3 if dtype_of(model) in HALF_DTYPES else 1e-4
        for domain, loader in loaders.items():
            value = _as_number(got[name][domain])
            expected = perplexity(model, loader, progress=False)
            if not _is_number(value) or not _close(value, expected, rel=rel):
                return False, (f"{name} on {domain}: you give {value!r}, evaluation.perplexity gives {expected:.4f} "
                               "(pooled over every real token of the loader?).")
    return True, f"all {len(models) * len(loaders)} cells equal evaluation.perplexity."
# --- lab: CH12_NB02 ------------------------------------------------------------------------------

#: Distances of 12 runs where the first and the last run look best: a choice that forgets the protection shows.
_PLANTED_DISTANCES = (0.05, 0.40, 0.31, 0.22, 0.35, 0.50, 0.28, 0.45, 0.38, 0.33, 0.42, 0.04)


def _run_verdict(got, values: list[float], n: int, where: str) -> str | None:
    """None when ``got`` is the protected run with the smallest distance, else a sentence saying what is wrong."""
    try:
        got = sorted(int(i) for i in got)
    except (TypeError, ValueError):
        return f"choose_run(distances, {n}) should return a list of block indices, got {got!r}."
    total = len(values) + n - 1
    start = min(range(1, len(values) - 1), key=values.__getitem__)  # the first and the last run are excluded
    if got == list(range(start, start + n)):
        return None
    if len(got) != n or got != list(range(got[0], got[0] + n)):
        return f"on {where}: {got} is not a run of {n} consecutive blocks."
    if not 0 <= got[0] < len(values):
        return f"on {where}: {got} is outside the model's blocks 0..{total - 1}."
    if got[0] == 0 or got[-1] == total - 1:
        return (f"on {where}: your run {got} holds block 0 or the last block ({total - 1}); both must stay, so the "
                "first and the last run are not candidates.")
    return (f"on {where}: the run starting at block {start} has distance {values[start]:.4f}, smaller than yours "
            f"(starting at block {got[0]}: {values[got[0]]:.4f}).")


@exercise("CH12_NB02.choose_run", "Choose the run of blocks to cut, never the first or the last block",
          "The run that starts at block s holds blocks s .. s + n - 1, and the model has len(distances) + n - 1 "
          "blocks. The runs that leave block 0 and the last block alone start at s = 1 .. len(distances) - 2: take "
          "the one with the smallest distance and return list(range(s, s + n)).",
          context=("distances", "n"))
def _check_choose_run(answer, *, distances, n):
    distances = [float(d) for d in distances]
    if len(distances) < 3:
        raise ValueError("distances= needs at least 3 runs (depth.angular_distances(model, loader, n) of a model with "
                         "n + 2 blocks or more).")
    for where, values in (("this notebook's distances", distances),
                          ("planted distances where the first and the last run are lowest", list(_PLANTED_DISTANCES))):
        verdict = _run_verdict(answer(list(values), n), values, n, where)
        if verdict is not None:
            return False, verdict
    start = min(range(1, len(distances) - 1), key=distances.__getitem__)
    return True, (f"blocks {list(range(start, start + n))}: the protected run of {n} with the smallest angular "
                  f"distance ({distances[start]:.4f}), what depth.prune_depth chooses by default.")


@exercise("CH12_NB02.parameter_reduction", "What share of the parameters does a depth cut remove?",
          "Add up p.numel() over the parameters of every block in `blocks` (model.model.layers[i].parameters()), then "
          "divide by the parameters of the whole model (sum of p.numel() over model.parameters(): the embedding table, "
          "the final norm and the head are part of it; a tied head is the embedding table, counted once).",
          context=("model", "student"))
def _check_parameter_reduction(answer, *, model, student):
    from .evaluation import count_parameters
    from .structure import decoder_blocks

    blocks = [int(i) for i in (getattr(student.config, "removed_layers", None) or [])]
    if not blocks:
        raise ValueError("student= must be a model cut by depth.prune_depth or depth.remove_blocks (its config "
                         "records removed_layers).")
    got = _as_number(answer(model, list(blocks)))
    if not _is_number(got):
        return False, f"parameter_reduction(model, {blocks}) should return a share between 0 and 1, got {got!r}."
    total = count_parameters(model)
    removed = total - count_parameters(student)
    expected = removed / total
    block_share = len(blocks) / len(decoder_blocks(model))
    if _close(got, expected, rel=1e-6, abs_=1e-9):
        return True, (f"{expected:.1%} of the parameters for {block_share:.1%} of the blocks: the cut model has "
                      f"{removed:,} parameters fewer; the embedding table and the final norm sit in no block.")
    mistakes = [(block_share, "that is the share of the blocks, not of the parameters: the embedding table and the "
                              "final norm belong to no block, so a cut saves less"),
                (1 - expected, "that is the share the cut keeps, not the share it removes"),
                (100 * expected, "that is a percentage; return a share between 0 and 1")]
    listed = sum(v.numel() for v in model.state_dict().values())
    if listed != total:
        mistakes.append((removed / listed, "your total counts a tensor twice (the tied embedding and head?): count "
                                           "model.parameters(), which lists a shared tensor once"))
    for value, why in mistakes:
        if _close(got, value, rel=1e-6, abs_=1e-9):
            return False, f"you give {got:.4f}: {why}. The cut model lost {removed:,} of {total:,} = {expected:.4f}."
    return False, (f"you give {got:.4f}; the cut model (blocks {blocks} removed) has {removed:,} of {total:,} "
                   f"parameters fewer = {expected:.4f}.")


def _ledger(values: dict[str, tuple[int, float, float]]) -> dict[str, dict]:
    """A ledger like CH12_NB02's ``stages`` from ``{stage: (parameters, ppl_general, ppl_task)}``."""
    return {stage: {"parameters": p, "ppl_general": g, "ppl_task": t} for stage, (p, g, t) in values.items()}


#: Ledgers where a stage fails its contract, or meets it in a way a careless check misses: recovery that does not
#: reach the base model's perplexity, LoRA that helps the task while general perplexity rises, a cut that removed
#: nothing.
_PLANTED_LEDGERS = (
    {"base": (100, 12.0, 20.0), "cut": (80, 40.0, 60.0), "recovered": (80, 25.0, 65.0), "specialist": (80, 30.0, 15.0)},
    {"base": (100, 12.0, 20.0), "cut": (80, 40.0, 60.0), "recovered": (80, 45.0, 50.0), "specialist": (80, 35.0, 55.0)},
    {"base": (100, 12.0, 20.0), "cut": (100, 13.0, 21.0), "recovered": (100, 12.5, 20.5),
     "specialist": (100, 12.5, 20.5)},
)
_CONTRACT_HINTS = {
    "cut": "the cut model must have fewer parameters than the base model (strictly fewer)",
    "recovered": "compare the recovered model's ppl_general with the cut model's (not the base model's): recovery "
                 "has done its job when it lowers what the cut raised, even if it does not get all the way back",
    "specialist": "compare the specialist's ppl_task with the recovered model's: the task, not general text",
}


def _contracts(stages: dict) -> dict[str, bool]:
    return {"cut": stages["cut"]["parameters"] < stages["base"]["parameters"],
            "recovered": stages["recovered"]["ppl_general"] < stages["cut"]["ppl_general"],
            "specialist": stages["specialist"]["ppl_task"] < stages["recovered"]["ppl_task"]}


@exercise("CH12_NB02.stage_checks", "Did each stage of the pipeline do its job?",
          "Three comparisons, each between a stage and the stage just before it: stages['cut']['parameters'] < "
          "stages['base']['parameters']; stages['recovered']['ppl_general'] < stages['cut']['ppl_general']; "
          "stages['specialist']['ppl_task'] < stages['recovered']['ppl_task']. Return them as a dict of booleans.",
          context=("stages",))
def _check_stage_checks(answer, *, stages):
    import copy

    missing = [s for s in ("base", "cut", "recovered", "specialist") if s not in stages]
    if missing:
        raise ValueError(f"stages= lacks {missing}: pass the notebook's ledger after every stage has been measured.")
    for where, ledger in (("this notebook's ledger", stages),
                          *((f"planted ledger {k + 1}", _ledger(v)) for k, v in enumerate(_PLANTED_LEDGERS))):
        expected = _contracts(ledger)
        got = answer(copy.deepcopy(ledger))
        if not isinstance(got, dict) or sorted(got) != sorted(expected) or not all(v in (True, False)
                                                                                   for v in got.values()):
            return False, ('stage_checks(stages) should return {"cut": bool, "recovered": bool, "specialist": bool}, '
                           f"got {got!r}.")
        for stage, holds in expected.items():
            if bool(got[stage]) != holds:
                return False, (f"on {where}, {stage!r}: you say {bool(got[stage])}, it is {holds}; "
                               f"{_CONTRACT_HINTS[stage]}.")
    verdict = ", ".join(f"{stage} {'met' if holds else 'NOT met'}" for stage, holds in _contracts(stages).items())
    return True, f"Right on this ledger and on {len(_PLANTED_LEDGERS)} planted ones. This run: {verdict}."
