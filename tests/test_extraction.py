"""utils.extraction: the schema check, answer parsing, answer-only labels, greedy generation, the scorer."""

import copy
import json

import pytest
import torch

from utils import extraction as ex
from utils import load_records

GOLD = {
    "patient_age": 45,
    "symptoms": ["fever", "cough"],
    "vital_signs": {"temperature": 101.2, "heart_rate": 98, "blood_pressure": "130/85"},
    "medications": [{"name": "ibuprofen", "dose": "400 mg", "frequency": "every 6 hours"}],
    "duration_days": 3,
}
EMPTY = {"patient_age": None, "symptoms": ["headache"],
         "vital_signs": {"temperature": None, "heart_rate": None, "blood_pressure": None},
         "medications": [], "duration_days": None}


def with_(label, path, value):
    out = copy.deepcopy(label)
    target = out
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return out


# --- schema ---------------------------------------------------------------------------------------

def test_valid_labels_comply():
    assert ex.check_schema(GOLD) == [] and ex.check_schema(EMPTY) == []


@pytest.mark.parametrize("label,match", [
    ([GOLD], "JSON object"),
    (with_(GOLD, ["duration_days"], KeyError), "missing keys: duration_days"),
    (dict(GOLD, notes="x"), "unexpected keys: notes"),
    (with_(GOLD, ["patient_age"], "45"), "patient_age must be an integer"),
    (with_(GOLD, ["patient_age"], True), "patient_age must be an integer"),
    (with_(GOLD, ["duration_days"], 2.5), "duration_days must be an integer"),
    (with_(GOLD, ["symptoms"], "fever"), "symptoms must be a list"),
    (with_(GOLD, ["symptoms"], ["fever", ""]), "symptoms must be a list"),
    (with_(GOLD, ["vital_signs"], None), "vital_signs must be an object"),
    (with_(GOLD, ["vital_signs", "heart_rate"], KeyError), "vital_signs is missing: heart_rate"),
    (with_(GOLD, ["vital_signs", "spo2"], 97), "unexpected keys: spo2"),
    (with_(GOLD, ["vital_signs", "temperature"], "101.2"), "temperature must be a number"),
    (with_(GOLD, ["vital_signs", "heart_rate"], 98.5), "heart_rate must be an integer"),
    (with_(GOLD, ["vital_signs", "blood_pressure"], 130), "blood_pressure must be a string"),
    (with_(GOLD, ["medications"], {"name": "x"}), "medications must be a list"),
    (with_(GOLD, ["medications", 0, "frequency"], KeyError), r"medications\[0\] must be an object"),
    (with_(GOLD, ["medications", 0, "dose"], 400), r"medications\[0\]: name, dose and frequency"),
])
def test_schema_violations_are_named(label, match):
    problems = ex.check_schema(label)
    assert problems and any(__import__("re").search(match, p) for p in problems), problems


def test_check_schema_agrees_with_the_json_schema_document():
    jsonschema = pytest.importorskip("jsonschema")
    cases = [GOLD, EMPTY, dict(GOLD, notes="x"), with_(GOLD, ["patient_age"], "45"),
             with_(GOLD, ["vital_signs", "blood_pressure"], "130 over 85"), with_(GOLD, ["duration_days"], 2.5),
             with_(GOLD, ["vital_signs", "blood_pressure"], 130), with_(GOLD, ["vital_signs", "blood_pressure"], ""),
             with_(GOLD, ["medications", 0, "frequency"], KeyError), with_(GOLD, ["vital_signs", "heart_rate"], None)]
    for case in cases:
        ours = ex.check_schema(case) == []
        theirs = jsonschema.Draft202012Validator(ex.JSON_SCHEMA).is_valid(case)
        assert ours == theirs, case


def test_format_answer_round_trips_and_rejects_bad_labels():
    shuffled = {k: GOLD[k] for k in reversed(ex.TOP_LEVEL_KEYS)}
    text = ex.format_answer(shuffled)
    assert json.loads(text) == GOLD and text.startswith('{"patient_age":45,"symptoms":')
    with pytest.raises(ValueError, match="does not follow the extraction schema"):
        ex.format_answer(with_(GOLD, ["symptoms"], None))


def test_coerce_label_fixes_formats_only():
    messy = {"patient_age": 45.0, "symptoms": ["fever"], "vital_signs": {"temperature": "101.2", "heart_rate": "98",
                                                                          "blood_pressure": "130 / 85 mmHg"},
             "medications": None, "duration_days": "3"}
    fixed = ex.coerce_label(messy)
    assert fixed == {"patient_age": 45, "symptoms": ["fever"], "medications": [], "duration_days": 3,
                     "vital_signs": {"temperature": 101.2, "heart_rate": 98, "blood_pressure": "130/85"}}
    assert ex.check_schema(ex.coerce_label({"patient_age": "unknown"}))  # nothing invented
    with pytest.raises(TypeError, match="expects a dict"):
        ex.coerce_label("{}")


# --- parsing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    json.dumps(GOLD),
    "```json\n" + json.dumps(GOLD, indent=2) + "\n```",
    "Here is the JSON: " + json.dumps(GOLD) + " Let me know if you need more.",
    "{not json} then " + json.dumps(GOLD),
    'Here\'s the "extracted" data: ' + json.dumps(GOLD),
])
def test_parse_json_answer_finds_the_object(text):
    assert ex.parse_json_answer(text) == GOLD


def test_parse_json_answer_ignores_braces_inside_strings():
    curly = {**GOLD, "symptoms": ["a {curly} symptom", "}"]}
    assert ex.parse_json_answer("Answer: " + json.dumps(curly) + " {trailing") == curly


@pytest.mark.parametrize("text", [
    "", "no json here", '{"patient_age": 45, "symptoms": ["fev', "[1, 2]",
    # a broken answer must not be mistaken for the medication object inside it
    '{"patient_age":51,"vital_signs":{"blood_pressure":163/60},'
    '"medications":[{"name":"x","dose":"1 mg","frequency":"qd"}]}',
])
def test_parse_json_answer_returns_none_without_an_object(text):
    assert ex.parse_json_answer(text) is None


def test_parse_json_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="as a string"):
        ex.parse_json_answer(GOLD)


# --- answer-only labels -------------------------------------------------------------------------

@pytest.fixture
def tokenizer(tiny):
    from utils import load_tokenizer

    return load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_chat_prompt_uses_the_chat_template(tokenizer):
    text = ex.chat_prompt(tokenizer, "45 yo M c/o cough.", ex.STRICT_PROMPT)
    assert text.startswith("<|im_start|>system\n" + ex.STRICT_PROMPT) and text.endswith("<|im_start|>assistant\n")
    assert "45 yo M c/o cough." in text


def test_labels_cover_the_answer_and_its_end_of_turn_only(tokenizer):
    example = ex.encode_example(tokenizer, "45 yo M c/o cough.", GOLD)
    batch = ex.collate_answer_only([example, ex.encode_example(tokenizer, "short", EMPTY)], tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    n_prompt = example["prompt_length"]
    assert (labels[0, :n_prompt] == -100).all()
    learned = ids[0][labels[0] != -100].tolist()
    eot = ex.end_of_turn_id(tokenizer)
    assert learned[-1] == eot and tokenizer.decode(learned[:-1]) == ex.format_answer(GOLD)
    assert (labels[mask == 0] == -100).all() and (mask[1] == 0).any()


def test_end_of_turn_stays_learned_when_pad_is_the_end_of_turn_token(tokenizer):
    # SmolLM2's pad token IS <|im_end|>. Labels built from `input_ids == pad_id` would erase the final
    # <|im_end|> of every answer and the model would never learn to stop: this test catches that.
    eot = ex.end_of_turn_id(tokenizer)
    long_ = ex.encode_example(tokenizer, "45 yo M c/o cough and fever for three days.", GOLD)
    short = ex.encode_example(tokenizer, "cough", EMPTY)
    batch = ex.collate_answer_only([long_, short], pad_id=eot)
    for row, example in enumerate([long_, short]):
        last = len(example["input_ids"]) - 1
        assert batch["input_ids"][row, last] == eot and batch["labels"][row, last] == eot
    assert (batch["labels"][1, len(short["input_ids"]):] == -100).all()
    naive = batch["input_ids"].masked_fill(batch["input_ids"] == eot, -100)  # the mistake, for contrast
    assert naive[0, len(long_["input_ids"]) - 1] == -100


def test_sft_dataloader_batches(tokenizer, tiny):
    records = load_records("clinical_notes", split="train", n=10)
    loader = ex.make_sft_dataloader(records, tokenizer, batch_size=4, max_length=512, shuffle=False)
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert all(type(b) is dict and b["labels"].shape == b["input_ids"].shape for b in batches)
    first = batches[0]
    answer = first["input_ids"][0][first["labels"][0] != -100].tolist()
    assert tokenizer.decode(answer[:-1]) == ex.format_answer(records[0]["label"])


def test_with_replay_adds_general_rows_with_every_token_learned(tokenizer, tiny):
    records = load_records("clinical_notes", split="train", n=6)
    loader = ex.make_sft_dataloader(records, tokenizer, batch_size=4, max_length=512, shuffle=True, seed=3)
    reference = ex.make_sft_dataloader(records, tokenizer, batch_size=4, max_length=512, shuffle=True, seed=3)
    task = [b for _ in range(3) for b in reference][:5]  # what utils.train would read in 5 steps: 2 passes and a half
    texts = ["one two three four five six seven eight", "a b c", "hello world again"]
    batches = ex.with_replay(loader, texts, tokenizer, steps=5, rows=2, max_tokens=4)
    assert len(batches) == 5
    cycle = [tokenizer(t, add_special_tokens=False).input_ids[:4] for t in texts]
    for k, (mixed, plain) in enumerate(zip(batches, task)):
        n, width = plain["input_ids"].shape
        assert mixed["input_ids"].shape == (n + 2, width)  # the task rows are wider than 4 tokens here
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(mixed[key][:n], plain[key])  # the task rows are untouched, same batches, same order
        for r in range(2):
            ids = cycle[(2 * k + r) % 3]
            row = mixed["input_ids"][n + r]
            assert row[:len(ids)].tolist() == ids and mixed["attention_mask"][n + r].sum() == len(ids)
            labels = mixed["labels"][n + r]
            assert labels[:len(ids)].tolist() == ids and (labels[len(ids):] == -100).all()
        assert mixed["replay"].tolist() == [False] * n + [True] * 2  # which rows are replayed general text


def test_with_replay_widens_the_task_rows_for_a_longer_text(tokenizer, tiny):
    records = load_records("clinical_notes", split="train", n=2)
    loader = ex.make_sft_dataloader(records, tokenizer, batch_size=2, max_length=512, shuffle=False)
    plain = next(iter(loader))
    long_text = " ".join(["word"] * 2000)
    mixed = ex.with_replay(loader, [long_text], tokenizer, steps=1, max_tokens=plain["input_ids"].shape[1] + 7)[0]
    width = plain["input_ids"].shape[1] + 7
    assert mixed["input_ids"].shape == (3, width)
    assert (mixed["labels"][:2, -7:] == -100).all() and (mixed["attention_mask"][:2, -7:] == 0).all()
    assert (mixed["labels"][2] != -100).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 0}, "steps must be a positive int"),
    ({"steps": True}, "steps must be a positive int"),
    ({"rows": 0}, "rows must be a positive int"),
    ({"max_tokens": 1}, "max_tokens must be an int >= 2"),
    ({"texts": "one text"}, "non-empty list"),
    ({"texts": []}, "non-empty list"),
    ({"texts": ["fine text", "  "]}, "non-empty list"),
    ({"texts": ["a"]}, "at least 2 tokens"),
])
def test_with_replay_rejects_bad_input(tokenizer, tiny, kwargs, match):
    loader = ex.make_sft_dataloader(load_records("clinical_notes", split="train", n=2), tokenizer, batch_size=2)
    args = {"texts": ["general text to replay"], "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        ex.with_replay(loader, args.pop("texts"), tokenizer, **args)
    with pytest.raises(ValueError, match="input_ids, attention_mask and labels"):
        ex.with_replay([{"input_ids": torch.ones(1, 3, dtype=torch.long)}], ["general text"], tokenizer, steps=1)
    with pytest.raises(ValueError, match="dataloader is empty"):
        ex.with_replay([], ["general text"], tokenizer, steps=1)


def test_sft_dataloader_leaves_out_long_examples(tokenizer, tiny, capsys):
    records = load_records("clinical_notes", split="train", n=6)
    lengths = sorted(len(ex.encode_example(tokenizer, r["text"], r["label"])["input_ids"]) for r in records)
    loader = ex.make_sft_dataloader(records, tokenizer, batch_size=8, max_length=lengths[2])
    assert len(loader.dataset) == 3 and "left out 3 of 6" in capsys.readouterr().out
    with pytest.raises(ValueError, match="raise max_length"):
        ex.make_sft_dataloader(records, tokenizer, max_length=8)


@pytest.mark.parametrize("records,error,match", [
    ([{"text": 3, "label": GOLD}], ValueError, "record 0 has no note"),
    ([{"text": "note"}], ValueError, "record 0 has no 'label'"),
    ([{"text": "note", "label": {"patient_age": 4}}], ValueError, "record 0's label breaks the schema"),
    (["just a note"], ValueError, "record 0 is a str"),
    ("a note", TypeError, "list of dicts"),
    ([], ValueError, "records is empty"),
])
def test_malformed_records_get_clear_errors(tokenizer, records, error, match):
    with pytest.raises(error, match=match):
        ex.make_sft_dataloader(records, tokenizer)


def test_chat_prompt_without_template_is_a_clear_error(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        ex.chat_prompt(tokenizer, "note")


def test_answer_loss_equals_the_full_causal_lm_loss_with_the_same_gradient(tiny_llama):
    from peft import LoraConfig, get_peft_model

    from utils import causal_lm_loss

    model, tokenizer = tiny_llama
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    batch = next(iter(ex.make_sft_dataloader(load_records("clinical_notes", split="train", n=3), tokenizer,
                                             batch_size=3, max_length=1024, shuffle=False)))
    grads = []
    for loss_fn in (causal_lm_loss, ex.answer_loss):
        peft_model.zero_grad()
        loss = loss_fn(peft_model, batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="needs batch\\['labels'\\]"):
        ex.answer_loss(peft_model, {"input_ids": batch["input_ids"]})


def _replay_batch(tokenizer):
    loader = ex.make_sft_dataloader(load_records("clinical_notes", split="train", n=2), tokenizer, batch_size=2,
                                    max_length=1024, shuffle=False)
    return ex.with_replay(loader, ["The river ran past the old mill and on to the sea."], tokenizer, steps=1)[0]


def test_replay_distill_loss_is_answer_ce_plus_kl_to_the_teacher_on_replayed_rows(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_llama
    teacher = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():  # a teacher that predicts differently from the student
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    batch = _replay_batch(tokenizer)
    loss, parts = ex.replay_distill_loss(teacher, temperature=2.0)(peft_model, batch)
    # by hand, on the full logits: CE summed over answer tokens, T^2 KL(teacher || student) summed over replayed ones
    logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    task = (targets != -100) & ~batch["replay"][:, None]
    replay = (targets != -100) & batch["replay"][:, None]
    ce = torch.nn.functional.cross_entropy(logits[task], targets[task], reduction="sum")
    kl = 4.0 * torch.nn.functional.kl_div(torch.log_softmax(logits[replay] / 2, -1), torch.log_softmax(
        t_logits[replay] / 2, -1), log_target=True, reduction="sum")
    expected = (ce + kl) / (task.sum() + replay.sum())
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert parts["kd"] == pytest.approx(float(kl) / int(replay.sum()), rel=1e-4) and parts["kd"] > 0
    assert parts["ce"] == pytest.approx(float(ce) / int(task.sum()), rel=1e-4)
    # the gradient matches too
    peft_model.zero_grad()
    loss.backward()
    ours = [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]
    peft_model.zero_grad()
    logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits[task], targets[task], reduction="sum")
    kl = 4.0 * torch.nn.functional.kl_div(torch.log_softmax(logits[replay] / 2, -1), torch.log_softmax(
        t_logits[replay] / 2, -1), log_target=True, reduction="sum")
    ((ce + kl) / (task.sum() + replay.sum())).backward()
    for a, b in zip(ours, (p.grad for p in peft_model.parameters() if p.requires_grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_replay_distill_loss_with_the_model_as_its_own_teacher_leaves_only_the_answers(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_llama
    teacher = copy.deepcopy(model)  # made before the adapter, whose B = 0 leaves the model as it was
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    batch = _replay_batch(tokenizer)
    loss, parts = ex.replay_distill_loss(teacher)(peft_model, batch)
    assert parts["kd"] == pytest.approx(0.0, abs=1e-5)
    targets = batch["labels"][:, 1:]
    n_task = int(((targets != -100) & ~batch["replay"][:, None]).sum())
    plain = ex.answer_loss(peft_model, {k: v[~batch["replay"]] for k, v in batch.items()})
    torch.testing.assert_close(loss, plain * n_task / int((targets != -100).sum()), atol=1e-5, rtol=1e-5)
    # the full-logits path (models with soft-capped logits) gives the same loss
    model.config.final_logit_softcapping = 1e9  # read by replay_distill_loss only; Llama ignores it
    try:
        torch.testing.assert_close(ex.replay_distill_loss(teacher)(peft_model, batch)[0], loss, atol=1e-5, rtol=1e-5)
    finally:
        del model.config.final_logit_softcapping


def test_replay_distill_loss_rejects_bad_input(tiny_llama):
    model, tokenizer = tiny_llama
    batch = _replay_batch(tokenizer)
    for bad in (0, -1.0, True, "2"):
        with pytest.raises(ValueError, match="temperature must be a positive number"):
            ex.replay_distill_loss(copy.deepcopy(model), temperature=bad)
    with pytest.raises(ValueError, match="teacher must be a torch model"):
        ex.replay_distill_loss("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match="shares weights"):
        ex.replay_distill_loss(model)(model, batch)
    with pytest.raises(ValueError, match="labels and replay"):
        ex.replay_distill_loss(copy.deepcopy(model))(model, {k: v for k, v in batch.items() if k != "replay"})


# --- generation ---------------------------------------------------------------------------------

def test_generate_answers_batched_equals_one_by_one(tiny_llama):
    model, tokenizer = tiny_llama
    notes = [r["text"] for r in load_records("clinical_notes", split="test", n=2)]
    together = ex.generate_answers(model, tokenizer, notes, max_new_tokens=6, batch_size=2)
    alone = [ex.generate_answers(model, tokenizer, [n], max_new_tokens=6, batch_size=1)[0] for n in notes]
    assert len(together) == 2 and all(isinstance(a, str) for a in together)
    assert together == alone  # left padding does not change a greedy answer


@pytest.mark.parametrize("notes,error,match", [
    ("one note", TypeError, "not a single string"),
    ([{"text": "x"}], TypeError, "note 0 is a dict"),
    ([None], TypeError, "note 0 is a NoneType"),
    (["  "], ValueError, "note 0 is empty"),
])
def test_generate_answers_rejects_bad_notes(tiny_llama, notes, error, match):
    model, tokenizer = tiny_llama
    with pytest.raises(error, match=match):
        ex.generate_answers(model, tokenizer, notes)


# --- scoring --------------------------------------------------------------------------------------

def records_of(*labels, categories=None):
    categories = categories or ["clean"] * len(labels)
    return [{"text": f"note {i}", "label": lab, "category": c} for i, (lab, c) in enumerate(zip(labels, categories))]


def test_perfect_answers_score_one():
    records = records_of(GOLD, EMPTY, categories=["clean", "typos"])
    scores = ex.score_extraction([json.dumps(GOLD), ex.format_answer(EMPTY)], records)
    for key in ("valid_json", "schema_compliance", "field_exact_match", "symptom_f1", "medication_f1"):
        assert scores[key] == 1.0, key
    assert scores["hallucination_rate"] == 0.0 and scores["null_slots"] == 6
    assert set(scores["per_category"]) == {"clean", "typos"}
    table = ex.category_table(scores)
    assert list(table.index) == ["clean", "typos", "all"] and table.loc["all", "n"] == 2


def test_scores_of_a_hand_checked_case():
    records = records_of(GOLD, EMPTY)
    wrong = with_(GOLD, ["patient_age"], 54)  # one scalar wrong
    wrong["symptoms"] = ["fever", "sore throat"]  # one right, one invented
    wrong["medications"][0]["dose"] = "400mg"  # same dose once spaces are ignored
    invented = with_(EMPTY, ["vital_signs", "temperature"], 98.6)  # a value where the gold is null
    invented["medications"] = [{"name": "aspirin", "dose": "81 mg", "frequency": "once daily"}]
    scores = ex.score_extraction([json.dumps(wrong), json.dumps(invented)], records)
    assert scores["schema_compliance"] == 1.0
    assert scores["field_accuracy"]["patient_age"] == 0.5 and scores["field_accuracy"]["temperature"] == 0.5
    assert scores["field_exact_match"] == pytest.approx((0.5 + 0.5 + 1 + 1 + 1) / 5)
    assert scores["symptom_f1"] == pytest.approx(2 * 2 / (3 + 3))  # tp=2 of 3 predicted, 3 gold
    assert scores["medication_f1"] == pytest.approx(2 * 1 / (2 + 1))
    # null slots: 5 scalars + the empty medication list of EMPTY = 6; invented: temperature, medications
    assert (scores["null_slots"], scores["hallucinated_values"]) == (6, 2)
    assert scores["hallucination_rate"] == pytest.approx(2 / 6)


def test_unparseable_answers_score_zero_and_are_not_counted_as_hallucinations():
    records = records_of(GOLD, EMPTY)
    scores = ex.score_extraction(["I cannot help with that.", '{"patient_age": 45'], records)
    assert scores["valid_json"] == 0 and scores["schema_compliance"] == 0
    assert scores["symptom_f1"] == 0 and scores["null_slots"] == 0
    assert scores["hallucination_rate"] is None  # no object at all: nothing to judge, which is not a rate of 0
    assert scores["field_exact_match"] == 0.0  # no object: every field wrong, a null gold included
    assert scores["field_accuracy"]["duration_days"] == 0.0


def test_valid_json_that_breaks_the_schema():
    scores = ex.score_extraction(['{"age": 45}', None], records_of(GOLD, EMPTY))
    assert scores["valid_json"] == 0.5 and scores["schema_compliance"] == 0.0


@pytest.mark.parametrize("predictions,records,error,match", [
    (["{}"], records_of(GOLD, EMPTY), ValueError, "1 predictions for 2 records"),
    ("{}", records_of(GOLD), TypeError, "predictions must be a list"),
    ([3], records_of(GOLD), TypeError, "prediction 0 is a int"),
    (["{}"], [{"text": "note"}], ValueError, "has no 'label'"),
    (["{}"], [{"text": None, "label": GOLD}], ValueError, "has no note"),
])
def test_score_extraction_bad_inputs(predictions, records, error, match):
    with pytest.raises(error, match=match):
        ex.score_extraction(predictions, records)


def test_category_table_needs_scores():
    with pytest.raises(ValueError, match="returned by score_extraction"):
        ex.category_table({"schema_compliance": 1.0})


def test_gold_labels_of_the_offline_set_score_perfectly(tiny):
    records = load_records("clinical_notes", split="test")
    scores = ex.score_extraction([ex.format_answer(r["label"]) for r in records], records)
    assert scores["schema_compliance"] == scores["field_exact_match"] == scores["medication_f1"] == 1.0
    assert set(scores["per_category"]) == {"clean", "abbreviations", "implicit", "typos", "irrelevant"}
    assert scores["symptom_f1"] == 1.0 and scores["hallucination_rate"] == 0.0
