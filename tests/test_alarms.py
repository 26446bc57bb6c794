"""Alarms (app/alarms.py): each trips on data made to trip it, and stays quiet on a healthy run."""
import json
import math

from app.alarms import LN2, data_alarms, length_alarms, training_alarms

STEPS = 60


def healthy_records():
    """A DPO run as tiny's: ln 2 at step 0, the loss falling, accuracy rising from about chance."""
    records = [{"step": 0, "eval_loss": LN2}]
    for step in range(5, STEPS + 1, 5):
        records.append({"step": step, "loss": LN2 * math.exp(-step / 40), "rewards/accuracies": min(1.0, 0.5 + step / 40)})
    return records


def names(alarms):
    return [a["name"] for a in alarms]


def test_a_healthy_run_trips_nothing():
    assert training_alarms("dpo", healthy_records(), STEPS) == []
    pairs = [(f"question {i}?", f"A kind, full answer number {i}.", f"no {i}") for i in range(100)]
    assert data_alarms(pairs) == []
    assert length_alarms([10, 12, 14], [15, 20, 22]) == []


def test_a_loss_stuck_at_ln2():
    records = [{"step": 0, "eval_loss": LN2}] + [{"step": s, "loss": LN2 - 0.001, "rewards/accuracies": 0.5}
                                                 for s in range(5, STEPS + 1, 5)]
    assert names(training_alarms("dpo", records, STEPS)) == ["loss stuck"]
    moved = records[:-1] + [{"step": STEPS, "loss": LN2 - 0.01, "rewards/accuracies": 0.6}]
    assert training_alarms("dpo", moved, STEPS) == []  # one log that moved beyond 0.005 is movement
    assert training_alarms("dpo", records, STEPS, sigmoid_loss=False) == []  # other losses do not start at ln 2


def test_reward_accuracy_one_from_the_start_is_a_leak_signature():
    records = healthy_records()
    for r in records:
        if r.get("step") in (5, 10):
            r["rewards/accuracies"] = 1.0
    alarms = training_alarms("dpo", records, STEPS)
    assert names(alarms) == ["leak signature"] and "(5, 10)" in alarms[0]["message"], alarms
    records[1]["rewards/accuracies"] = 0.95  # one early log below 100%: not the signature
    assert training_alarms("dpo", records, STEPS) == []
    # logged at every step: the step-1 log (before any update, accuracy 0) does not hide it
    every = [{"step": 1, "loss": LN2, "rewards/accuracies": 0.0}] + [
        {"step": s, "loss": 0.5, "rewards/accuracies": 1.0} for s in range(2, STEPS + 1)]
    assert "leak signature" in names(training_alarms("dpo", every, STEPS))
    assert training_alarms("orpo", every, STEPS) == []  # ORPO's log-odds rewards start high on easy data


def test_a_start_far_from_ln2_means_another_reference():
    records = healthy_records()
    records[0]["eval_loss"] = 0.0009  # after SFT, a DPO adapter stacked on the SFT one
    assert names(training_alarms("dpo", records, STEPS)) == ["wrong reference"]
    records[0]["eval_loss"] = LN2 + 0.05
    assert training_alarms("dpo", records, STEPS) == []
    no_eval = [{"step": 1, "loss": 0.02, "rewards/accuracies": 0.0}] + healthy_records()[1:]
    assert names(training_alarms("dpo", no_eval, STEPS)) == ["wrong reference"]


def test_pairs_whose_replies_are_the_same():
    pairs = [(f"question {i}?", f"Answer {i}.", f"Reply {i}!") for i in range(100)]
    same = pairs[:94] + [(f"q {i}", "The same words here.", "the same  words here") for i in range(6)]
    alarms = data_alarms(same)
    assert names(alarms) == ["same pairs"] and "6 of 100" in alarms[0]["message"], alarms
    assert data_alarms(pairs[:95] + same[95:]) == []  # 5 of 100 is not more than 5%


def test_the_prompt_repeated_at_the_start_of_a_reply():
    pairs = [(f"What is thing number {i}?", f"What is thing number {i}? It is a thing.", f"no {i}")
             for i in range(10)] + [(f"question {i}?", f"Answer {i}.", f"Reply {i}!") for i in range(90)]
    alarms = data_alarms(pairs)
    assert names(alarms) == ["prompt in reply"] and "10 of 100" in alarms[0]["message"], alarms


def test_replies_more_than_twice_as_long_and_past_the_datas_replies():
    alarms = length_alarms([10, 10, 10], [25, 21, 22])
    assert names(alarms) == ["length drift"] and "2.3x" in alarms[0]["message"], alarms
    assert length_alarms([10, 10, 10], [20, 20, 20]) == []
    # tiny's case: curt replies (8 tokens) become polite ones (34) as its chosen replies (37): no drift
    assert length_alarms([11, 6, 6], [38, 36, 29], targets=[37] * 10) == []
    alarms = length_alarms([11, 6, 6], [64, 64, 60], targets=[37] * 10)
    assert names(alarms) == ["length drift"] and "past the 37 of the data's chosen replies" in alarms[0]["message"]


def test_every_alarm_says_what_to_do():
    tripped = (training_alarms("dpo", [{"step": 0, "eval_loss": 0.0}] + [{"step": s, "loss": LN2, "rewards/accuracies": 1.0}
                                                                        for s in range(2, 61)], STEPS)
               + data_alarms([("What is it now?", "What is it now? x", "What is it now? x")] * 10)
               + length_alarms([1], [9]))
    assert {a["name"] for a in tripped} == {"loss stuck", "leak signature", "wrong reference", "same pairs",
                                            "prompt in reply", "length drift"}
    for a in tripped:
        assert a["message"] and a["fix"] and "\n" not in a["message"] + a["fix"], a
    json.dumps(tripped)  # they go into train.json as they are


def test_tripped_alarms_lead_the_console_and_the_report():
    from app.report import alarm_lines
    from app.train import training_summary_lines

    tripped = length_alarms([10], [30])
    summary = {"method": "dpo", "alarms": tripped, "preference": {"base": {}, "trained": {}}, "eval": {}, "replies": []}
    assert training_summary_lines(summary)[0].startswith("ALARM (length drift): the greedy probe replies grew")
    lines = alarm_lines(tripped)
    assert lines[0] == "## Alarms" and lines[2].startswith("- **length drift**: ") and "*Fix:*" in lines[2]
    assert alarm_lines([])[0].startswith("**Alarms: none**") and alarm_lines(None) == []
