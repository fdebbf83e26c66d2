"""Solutions of CH12_NB01's exercises."""

SCALARS = ("patient_age", "duration_days")
VITALS = ("temperature", "heart_rate", "blood_pressure")


def _norm(text):
    return " ".join(str(text).lower().split())


def symptom_f1(predictions, records):
    """Micro F1 over normalised symptom sets, counts summed over all notes."""
    tp = n_pred = n_gold = 0
    for pred, record in zip(predictions, records):
        got = {_norm(s) for s in pred.get("symptoms", []) if isinstance(s, str)} if isinstance(pred, dict) else set()
        gold = {_norm(s) for s in record["label"]["symptoms"]}
        tp, n_pred, n_gold = tp + len(got & gold), n_pred + len(got), n_gold + len(gold)
    if n_pred == 0 and n_gold == 0:
        return 1.0
    return 2 * tp / (n_pred + n_gold)


def _field(obj, name):
    if name in VITALS:
        vitals = obj.get("vital_signs")
        return vitals.get(name) if isinstance(vitals, dict) else None
    return obj.get(name)


def _has_value(value):
    return value is not None and value != "" and value != [] and value != {}


def hallucination_rate(predictions, records):
    """Invented values / null slots (gold None scalars, and empty gold medication lists)."""
    slots = invented = 0
    for pred, record in zip(predictions, records):
        if not isinstance(pred, dict):
            continue
        gold = record["label"]
        for name in SCALARS + VITALS:
            if _field(gold, name) is None:
                slots += 1
                invented += _has_value(_field(pred, name))
        if not gold["medications"]:
            slots += 1
            invented += _has_value(pred.get("medications"))
    return invented / slots
