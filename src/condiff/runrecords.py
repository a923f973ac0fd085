"""What the JSON records of a run must hold for their readers: a metrics.jsonl line, summary.json and its record of
the last measured-control step. Each check returns what is wrong in words, or None; rundir names the file."""

from __future__ import annotations


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def metrics_record_problem(record) -> str | None:
    """What makes a metrics record unusable to its readers (a resume, the training curves), or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if not is_integer(record.get("step")):
        return "no integer step"
    if record.get("objective_loss") is not None and not is_number(record["objective_loss"]):
        return "objective_loss is not a number"
    for key in ("multipliers", "constraint_losses", "slacks"):   # per constraint: by name, or (older logs) a list
        values = record.get(key)
        values = list(values.values()) if isinstance(values, dict) else [] if values is None else values
        if not isinstance(values, list) or any(value is not None and not is_number(value) for value in values):
            return f"{key} are not numbers per constraint"
    return None


def summary_problem(summary) -> str | None:
    """What makes summary.json unusable to its readers (sampling's provenance, evaluation, reports), or None."""
    if not isinstance(summary, dict):
        return "not a JSON object"
    if not is_integer(summary.get("steps")):
        return "no integer steps"
    for key in ("data_class_shares", "predicted_class_shares"):
        if not isinstance(summary.get(key), list) or not all(is_number(share) for share in summary[key]):
            return f"{key} are not numbers"
    if len(summary["data_class_shares"]) != len(summary["predicted_class_shares"]):
        return "data_class_shares and predicted_class_shares differ in length"
    constraints = summary.get("constraints")
    if not isinstance(constraints, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                    and is_number(c.get("multiplier")) for c in constraints):
        return "constraints are not a list of names and multipliers"
    if summary.get("control") is not None:
        return control_problem(summary["control"], len(summary["data_class_shares"]))
    return None


def control_problem(control, num_classes: int) -> str | None:
    """What makes summary.json's record of the last measured-control step unusable to the run's report, or None."""
    classes = control.get("classes") if isinstance(control, dict) else None
    if not isinstance(classes, list) or not all(is_integer(c) and 0 <= c < num_classes for c in classes):
        return "control.classes are not class indices"
    per_class = {"targets": is_number, "smoothed": is_number,
                 "interval_95": lambda pair: isinstance(pair, list) and len(pair) == 2 and all(map(is_number, pair))}
    for key, valid in per_class.items():
        values = control.get(key)
        if not isinstance(values, list) or len(values) != len(classes) or not all(map(valid, values)):
            return f"control.{key} do not give one value per class"
    return None
