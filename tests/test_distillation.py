"""Tests of utils.distillation: the loss's properties, the training loop, layer maps, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import utils
from utils.distillation import feature_dynamics_loss, feature_loss, soft_target_loss


def _logits(seed: int, shape=(2, 5, 11)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def _labels(shape=(2, 5), vocab=11) -> torch.Tensor:
    labels = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(7))
    labels[1, 3:] = -100  # right padding in the second row
    return labels


def _tiny_llama(layers: int = 4, vocab: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _drop_block(model: LlamaForCausalLM, index: int) -> LlamaForCausalLM:
    """A student: ``model`` minus one block, attention indices renumbered (test-local surgery)."""
    del model.model.layers[index]
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(model.model.layers)
    return model


def _batches(n: int = 4, vocab: int = 64, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


# --- loss properties -------------------------------------------------------------------------

def _reference_loss(s, t, labels, temperature, alpha):
    """The textbook formula with plain autograd, to check the chunked implementation against."""
    mask = (labels != -100).float()
    log_ps, log_pt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    soft = (kl * mask).sum() / mask.sum() * temperature**2
    ce = F.cross_entropy(s[:, :-1].reshape(-1, s.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
    return alpha * soft + (1 - alpha) * ce


@pytest.mark.parametrize("chunk_elements", [11, 30, 2**25])  # one position, a few, everything per chunk
def test_chunked_loss_matches_the_formula_in_value_and_gradient(monkeypatch, chunk_elements):
    monkeypatch.setattr(utils.distillation, "CHUNK_ELEMENTS", chunk_elements)
    s, t, labels = _logits(1).double(), _logits(2).double(), _labels()
    s_ref = s.clone().requires_grad_(True)
    s_new = s.clone().requires_grad_(True)
    expected = _reference_loss(s_ref, t, labels, 2.0, 0.3)
    got = utils.distillation_loss(s_new, t, labels, temperature=2.0, alpha=0.3)
    expected.backward()
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(s_new.grad, s_ref.grad)


def test_chunked_loss_gradient_passes_gradcheck():
    s = _logits(3, (1, 3, 5)).double().requires_grad_(True)
    t, labels = _logits(4, (1, 3, 5)).double(), torch.tensor([[1, 4, -100]])
    assert torch.autograd.gradcheck(
        lambda x: utils.distillation_loss(x, t, labels, temperature=1.5, alpha=0.4), (s,))

def test_identical_logits_give_zero_soft_loss():
    z = _logits(0)
    assert soft_target_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    loss = utils.distillation_loss(z, z.clone(), temperature=3.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_soft_loss_is_t_squared_times_kl_of_softened_distributions():
    s, t = _logits(0), _logits(1)
    for temperature in (1.0, 2.0, 4.0):
        kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                      log_target=True, reduction="none").sum(-1).mean()
        got = utils.distillation_loss(s, t, temperature=temperature)
        torch.testing.assert_close(got, kl * temperature**2)


def test_ignored_positions_have_no_effect():
    s, t, labels = _logits(0), _logits(1), _labels()
    before = utils.distillation_loss(s, t, labels, alpha=0.5)
    s2, t2 = s.clone(), t.clone()
    s2[1, 3:] += 100 * torch.randn_like(s2[1, 3:])
    t2[1, 3:] -= 50
    after = utils.distillation_loss(s2, t2, labels, alpha=0.5)
    torch.testing.assert_close(before, after)


def test_alpha_blends_soft_and_cross_entropy():
    s, t, labels = _logits(0), _logits(1), _labels()
    soft = utils.distillation_loss(s, t, labels, alpha=1.0)
    ce = utils.distillation_loss(s, t, labels, alpha=0.0)
    expected_ce = F.cross_entropy(s[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ce, expected_ce)
    mask = labels != -100
    torch.testing.assert_close(soft, soft_target_loss(s, t, mask, temperature=2.0))
    mixed = utils.distillation_loss(s, t, labels, alpha=0.3)
    torch.testing.assert_close(mixed, 0.3 * soft + 0.7 * ce)


def test_feature_term_is_one_minus_cosine_and_masked():
    s, t, labels = _logits(0), _logits(1), _labels()
    h = torch.randn(2, 5, 8)
    assert feature_loss([(h, h * 2.0)]).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_loss([(h, -h)]).item() == pytest.approx(2.0, abs=1e-5)
    base = utils.distillation_loss(s, t, labels, alpha=1.0)
    with_feat, parts = utils.distillation_loss(s, t, labels, alpha=1.0, hidden_pairs=[(h, -h)], beta=0.5,
                                               return_parts=True)
    torch.testing.assert_close(with_feat, base + 0.5 * 2.0)
    assert set(parts) == {"soft", "ce", "feature"}
    h2 = h.clone()
    h2[1, 3:] = torch.randn(2, 8)  # ignored positions
    torch.testing.assert_close(feature_loss([(h2, -h)], labels != -100), torch.tensor(2.0))


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"),
    ({"beta": -1.0}, "beta"),
    ({"beta": 1.0}, "hidden_pairs"),
])
def test_loss_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        utils.distillation_loss(_logits(0), _logits(1), _labels(), **kwargs)


def test_loss_rejects_shape_and_vocab_mismatch():
    with pytest.raises(ValueError, match="Vocabulary mismatch"):
        utils.distillation_loss(_logits(0), _logits(1, (2, 5, 12)))
    with pytest.raises(ValueError, match="same batch"):
        utils.distillation_loss(_logits(0), _logits(1, (2, 6, 11)))
    with pytest.raises(ValueError, match="labels"):
        utils.distillation_loss(_logits(0), _logits(1), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="same width"):
        feature_loss([(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))])


# --- skew KL and feature dynamics -------------------------------------------------------------

def _reference_skew(s, t, mask, temperature, skew):
    """KL(p || skew p + (1 - skew) q) written directly in probabilities, with plain autograd."""
    p, q = F.softmax(t / temperature, -1), F.softmax(s / temperature, -1)
    m = skew * p + (1 - skew) * q
    kl = (p * (p.log() - m.log())).sum(-1)
    mask = mask.float()
    return (kl * mask).sum() / mask.sum() * temperature**2


@pytest.mark.parametrize("skew", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("chunk_elements", [11, 2**25])
def test_skew_kl_matches_the_formula_in_value_and_gradient(monkeypatch, skew, chunk_elements):
    monkeypatch.setattr(utils.distillation, "CHUNK_ELEMENTS", chunk_elements)
    s, t, labels = _logits(1).double(), _logits(2).double(), _labels()
    mask = labels != -100
    s_ref, s_new = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    expected = _reference_skew(s_ref, t, mask, 2.0, skew)
    got = soft_target_loss(s_new, t, mask, temperature=2.0, skew=skew)
    expected.backward()
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(s_new.grad, s_ref.grad)


def test_skew_kl_gradient_passes_gradcheck():
    s = _logits(3, (1, 3, 5)).double().requires_grad_(True)
    t, labels = _logits(4, (1, 3, 5)).double(), torch.tensor([[1, 4, -100]])
    assert torch.autograd.gradcheck(
        lambda x: utils.distillation_loss(x, t, labels, temperature=1.5, alpha=0.4, skew=0.3), (s,))


def test_skew_kl_tends_to_the_plain_kl_and_stays_bounded():
    s, t = _logits(0).double() / 3, _logits(1).double() / 3
    plain = soft_target_loss(s, t, temperature=1.0)
    assert soft_target_loss(s, t, temperature=1.0, skew=0.0).item() == plain.item()
    gaps = [abs(soft_target_loss(s, t, temperature=1.0, skew=k).item() - plain.item()) for k in (1e-2, 1e-4, 1e-6)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-4 * plain.item()
    s, t = s * 9, t * 9  # far apart: a large plain KL, which the skew KL caps
    plain = soft_target_loss(s, t, temperature=1.0)
    for k in (0.1, 0.5, 0.9):  # KL(p || k p + ...) <= -log k, whatever the student
        value = soft_target_loss(s, t, temperature=1.0, skew=k).item()
        assert 0 < value <= -math.log(k) + 1e-9 and value < plain.item()
    z = _logits(2)
    assert soft_target_loss(z, z.clone(), skew=0.5).item() == pytest.approx(0.0, abs=1e-6)


def test_feature_dynamics_compares_the_steps_between_mapped_blocks():
    g = torch.Generator().manual_seed(0)
    h = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    same_steps = [(h[i], h[i] + 7.0) for i in range(3)]  # shifted states, identical steps
    assert feature_dynamics_loss(same_steps).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_loss(same_steps).item() > 0.01  # the states themselves differ
    reversed_steps = [(h[i], -h[i]) for i in range(3)]  # every teacher step points the other way
    assert feature_dynamics_loss(reversed_steps).item() == pytest.approx(2.0, abs=1e-5)
    s, t = [torch.randn(2, 5, 8, generator=g) for _ in range(3)], [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    by_hand = torch.stack([(1 - F.cosine_similarity(s[i + 1] - s[i], t[i + 1] - t[i], dim=-1)).mean()
                           for i in range(2)]).mean()
    torch.testing.assert_close(feature_dynamics_loss(list(zip(s, t))), by_hand)
    labels = _labels()
    s2 = [x.clone() for x in s]
    s2[1][1, 3:] = 99.0  # padding positions
    masked = labels != -100
    torch.testing.assert_close(feature_dynamics_loss(list(zip(s2, t)), masked),
                               feature_dynamics_loss(list(zip(s, t)), masked))


def test_loss_adds_the_dynamics_term_with_gamma():
    s, t, labels = _logits(0), _logits(1), _labels()
    g = torch.Generator().manual_seed(3)
    pairs = [(torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)) for _ in range(3)]
    base = utils.distillation_loss(s, t, labels, alpha=0.5)
    both, parts = utils.distillation_loss(s, t, labels, alpha=0.5, hidden_pairs=pairs, beta=0.2, gamma=0.3,
                                          return_parts=True)
    expected = base + 0.2 * feature_loss(pairs, labels != -100) + 0.3 * feature_dynamics_loss(pairs, labels != -100)
    torch.testing.assert_close(both, expected)
    assert set(parts) == {"soft", "ce", "feature", "dynamics"}


def test_feature_terms_match_optipfair_on_the_same_positions():
    """optipfair's compound loss has the same two feature terms (trajectory = our feature term, derivative = our
    dynamics term). It counts position t when label t + 1 is real (and never the last position): given that
    mask, ours must agree."""
    from optipfair.distillation.loss import compute_distillation_loss

    g = torch.Generator().manual_seed(5)
    labels = _labels()
    student_h = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    teacher_h = [torch.randn(2, 5, 8, generator=g) for _ in range(5)]
    mapping = [0, 2, 4]
    logits = _logits(0)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    pairs = [(student_h[i], teacher_h[j]) for i, j in enumerate(mapping)]
    for gamma, delta, ours in ((1.0, 0.0, feature_loss), (0.0, 1.0, feature_dynamics_loss)):
        theirs, _ = compute_distillation_loss(logits, logits, student_h, teacher_h, labels, layer_map=mapping,
                                              alpha=0.0, beta=0.0, gamma=gamma, delta=delta)
        torch.testing.assert_close(ours(pairs, mask), theirs)


@pytest.mark.parametrize("kwargs, match", [
    ({"skew": 1.0}, "skew"),
    ({"skew": -0.1}, "skew"),
    ({"skew": "0.1"}, "skew"),
    ({"gamma": -1.0}, "gamma"),
    ({"gamma": 0.5}, "hidden_pairs"),
])
def test_loss_rejects_bad_skew_and_gamma(kwargs, match):
    with pytest.raises(ValueError, match=match):
        utils.distillation_loss(_logits(0), _logits(1), _labels(), **kwargs)


def test_feature_dynamics_rejects_one_pair_and_mismatched_shapes():
    h = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="at least two"):
        feature_dynamics_loss([(h, h)])
    with pytest.raises(ValueError, match="same"):
        feature_dynamics_loss([(h, h), (h, torch.zeros(1, 2, 4))])


def test_distill_trains_with_the_compound_loss():
    teacher = _tiny_llama()
    student = _drop_block(copy.deepcopy(teacher), 2)
    data = _batches(2)
    history = utils.distill(student, teacher, data * 5, max_steps=6, lr=3e-3, skew=0.1, beta=0.5, gamma=0.5,
                            layer_map=utils.kept_blocks(4, [2]), progress=False)
    assert history["settings"]["skew"] == 0.1 and history["settings"]["gamma"] == 0.5
    assert len(history["dynamics"]) == 6 and all(v > 0 for v in history["dynamics"])
    assert history["loss"][-1] < history["loss"][0]
    with pytest.raises(ValueError, match="layer_map"):
        utils.distill(copy.deepcopy(student), teacher, data, max_steps=1, gamma=0.5, progress=False)
    with pytest.raises(ValueError, match="skew"):
        utils.distill(copy.deepcopy(student), teacher, data, max_steps=1, skew=1.5, progress=False)


# --- layer maps ------------------------------------------------------------------------------

def test_kept_layer_map_follows_remove_blocks(tiny):
    teacher, _ = utils.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # tiny: 30 blocks
    student = utils.remove_blocks(copy.deepcopy(teacher), [3, 4])
    student = utils.remove_blocks(student, [0, 25])  # original blocks 0 and 27
    assert student.config.removed_layers == [0, 3, 4, 27]
    mapping = utils.distillation._resolve_layer_map("kept", student, teacher)
    assert mapping == utils.kept_blocks(30, [0, 3, 4, 27])
    dl = [{"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}]
    history = utils.distill(student, teacher, dl, max_steps=1, layer_map="kept", beta=1.0, progress=False)
    assert history["layer_map"] == mapping and history["feature"][0] >= 0


def test_layer_maps():
    assert utils.make_layer_map(3, 6, "uniform") == [1, 3, 5]
    assert utils.make_layer_map(24, 30, "uniform")[-1] == 29
    assert utils.make_layer_map(3, 6, "last") == [3, 4, 5]
    assert utils.kept_blocks(6, [1, 4]) == [0, 2, 3, 5]
    assert utils.make_layer_map(4, 6, "kept", removed=[1, 4]) == [0, 2, 3, 5]
    with pytest.raises(ValueError, match="Unknown layer map"):
        utils.make_layer_map(3, 6, "diagonal")
    with pytest.raises(ValueError, match="student"):
        utils.make_layer_map(7, 6)
    with pytest.raises(ValueError, match="outside"):
        utils.kept_blocks(6, [6])


# --- training --------------------------------------------------------------------------------

def test_distill_lowers_training_loss_and_keeps_teacher_frozen():
    teacher = _tiny_llama()
    student = _drop_block(copy.deepcopy(teacher), 2)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = _batches(2)
    history = utils.distill(student, teacher, data * 10, max_steps=20, lr=3e-3, eval_dataloader=data,
                            progress=False)
    assert len(history["loss"]) == 20
    assert sum(history["loss"][-3:]) / 3 < sum(history["loss"][:3]) / 3
    assert history["eval_step"] == [0, 20] and history["eval_ppl"][-1] < history["eval_ppl"][0]
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_state[key])
    assert all(p.requires_grad for p in teacher.parameters())  # flags restored


def test_distill_epochs_grad_accum_and_feature_map():
    teacher = _tiny_llama()
    student = _drop_block(copy.deepcopy(teacher), 1)
    data = _batches(3)
    history = utils.distill(student, teacher, data, epochs=2, grad_accum=2, eval_dataloader=data,
                            layer_map=utils.kept_blocks(4, [1]), beta=1.0, progress=False)
    assert len(history["step"]) == 4  # ceil(3 / 2) steps per epoch
    assert history["eval_epoch"] == [0, 1, 2]
    assert history["layer_map"] == [0, 2, 3]
    assert all(v >= 0 and math.isfinite(v) for v in history["feature"])
    fig = utils.plot_history(history)
    assert fig.axes[0].get_title() and fig.axes[1].get_ylabel() == "perplexity"


def test_distill_rejects_bad_inputs():
    teacher = _tiny_llama()
    student = copy.deepcopy(teacher)
    with pytest.raises(ValueError, match="empty"):
        utils.distill(student, teacher, [], progress=False)
    with pytest.raises(ValueError, match="Vocabulary mismatch"):
        utils.distill(_tiny_llama(vocab=80), teacher, _batches(1), progress=False)
    with pytest.raises(ValueError, match="same object"):
        utils.distill(teacher, teacher, _batches(1), progress=False)
    with pytest.raises(ValueError, match="alpha"):
        utils.distill(student, teacher, _batches(1), alpha=2.0, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        utils.distill(student, teacher, _batches(1), temperature=0, progress=False)
    with pytest.raises(ValueError, match="layer_map"):
        utils.distill(student, teacher, _batches(1), beta=0.5, progress=False)
    with pytest.raises(ValueError, match="one teacher index per student block"):
        utils.distill(student, teacher, _batches(1), beta=0.5, layer_map=[0, 1], progress=False)



def test_distill_forwards_training_options_with_its_own_defaults():
    import inspect

    from utils.distillation import DEFAULT_LR, DEFAULT_WARMUP_STEPS, TRAIN_OPTIONS, train_options

    assert set(TRAIN_OPTIONS) <= set(inspect.signature(utils.train).parameters)
    assert train_options({}) == {"lr": DEFAULT_LR, "warmup_steps": DEFAULT_WARMUP_STEPS}
    assert train_options({"lr": 1e-3, "epochs": 2}) == {"lr": 1e-3, "warmup_steps": DEFAULT_WARMUP_STEPS,
                                                        "epochs": 2}
    teacher = _tiny_llama()
    student = _drop_block(copy.deepcopy(teacher), 2)
    history = utils.distill(student, teacher, _batches(2), max_steps=1, weight_decay=0.01, max_grad_norm=0.5,
                            micro_batch_size=1, progress=False)
    settings = history["settings"]
    assert (settings["lr"], settings["warmup_steps"]) == (DEFAULT_LR, DEFAULT_WARMUP_STEPS)
    assert (settings["weight_decay"], settings["max_grad_norm"], settings["micro_batch_size"]) == (0.01, 0.5, 1)
    assert settings["steps"] == 1 and settings["alpha"] == utils.distillation.DEFAULT_ALPHA


@pytest.mark.parametrize("option", ["learning_rate", "eval_fn", "params", "desc"])
def test_distill_names_the_valid_options_for_an_unknown_one(option):
    teacher = _tiny_llama()
    student = copy.deepcopy(teacher)
    flags = [p.requires_grad for p in teacher.parameters()]
    with pytest.raises(TypeError, match=f"unknown option.*{option}.*temperature.*max_steps, epochs, lr"):
        utils.distill(student, teacher, _batches(1), progress=False, **{option: 1})
    assert [p.requires_grad for p in teacher.parameters()] == flags and not teacher.training

def test_recovered_share_is_measured_on_log_perplexity(monkeypatch):
    # log scale: from 10 -> 1000 lost two decades; back to 100 recovered one of them.
    assert utils.recovered_share(10.0, 1000.0, 100.0) == pytest.approx(0.5)
    assert utils.recovered_share(10.0, 20.0, 10.0) == pytest.approx(1.0)
    assert utils.recovered_share(10.0, 20.0, 20.0) == pytest.approx(0.0)
    # a model still x33 worse than the base has NOT recovered 98 % (the raw-perplexity share would say so)
    assert utils.recovered_share(1.0, 1500.0, 33.0) < 0.6
    assert math.isnan(utils.recovered_share(10.0, 9.0, 9.0))
    with pytest.raises(ValueError, match="positive, finite"):
        utils.recovered_share(10.0, 0.0, 12.0)
    monkeypatch.setenv("RLLM_PROFILE", "cpu")
    assert utils.budget(full=1, cpu=2, tiny=3) == 2


@pytest.mark.slow
def test_distill_two_steps_on_the_real_cpu_model(monkeypatch):
    monkeypatch.setenv("RLLM_PROFILE", "cpu")
    teacher, tok = utils.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    student = copy.deepcopy(teacher)
    layers = student.model.layers
    del layers[20]
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i
    student.config.num_hidden_layers = len(layers)
    dl = utils.make_dataloader(utils.load_texts("wikitext", split="train", n=4), tok, batch_size=2, max_length=32)
    history = utils.distill(student, teacher, dl, max_steps=2, eval_dataloader=dl, progress=False)
    assert len(history["loss"]) == 2 and all(math.isfinite(v) for v in history["loss"])
    assert history["eval_ppl"][-1] < history["eval_ppl"][0]


def test_retention_is_a_ratio_to_the_teacher_in_the_good_direction():
    assert utils.retention(0.60, 0.45) == pytest.approx(0.75)  # accuracy: higher is better
    assert utils.retention(12.0, 16.0, lower_is_better=True) == pytest.approx(0.75)  # perplexity
    assert utils.retention(12.0, 10.0, lower_is_better=True) > 1.0  # better than the teacher
    for bad in [(0.0, 0.5), (0.5, -1.0), (float("inf"), 1.0), ("0.5", 0.5), (True, 0.5)]:
        with pytest.raises(ValueError, match="positive, finite"):
            utils.retention(*bad)


def test_texts_for_retention_solves_the_log_linear_fit():
    sizes = [10, 100, 1000]
    retentions = [0.5, 0.6, 0.7]  # +0.1 per factor of ten
    assert utils.texts_for_retention(sizes, retentions, 0.8) == pytest.approx(10_000)
    assert utils.texts_for_retention(sizes, retentions, 0.6) == pytest.approx(100)
    # one point per seed: the fit goes through the means
    assert utils.texts_for_retention([10, 10, 100, 100], [0.4, 0.6, 0.5, 0.7], 0.7) == pytest.approx(1000)
    assert math.isinf(utils.texts_for_retention([10, 100], [0.6, 0.5], 0.9))  # no gain with more data


@pytest.mark.parametrize("sizes, retentions, message", [
    ([10, 100], [0.5], "differ in length"),
    ([10, 10], [0.5, 0.6], "two distinct sizes"),
    ([0, 100], [0.5, 0.6], "positive and finite"),
])
def test_texts_for_retention_rejects_bad_input(sizes, retentions, message):
    with pytest.raises(ValueError, match=message):
        utils.texts_for_retention(sizes, retentions, 0.9)
