"""Simulated traffic: coverage of every training phrasing, popular facts again, routine questions."""
from collections import Counter

from loop.sim.traffic import Answer, Routine, user_traffic
from loop.sim.world import ROUTINE_QUESTIONS, World, general_answer

WORLD = World(7, 1, 16, 0.3, 2)


def test_a_round_covers_every_phrasing_then_repeats_popular_facts_and_routine_questions():
    items = user_traffic(WORLD.facts, users=32, seed=1, requests=120, routine_share=0.25)
    assert len(items) == 120
    routine = [i for i in items if isinstance(i[0], Routine)]
    assert len(routine) == 30 and {r[1] for r in routine} <= {q for q, _ in ROUTINE_QUESTIONS}
    asked = Counter(q for f, q, _ in items if not isinstance(f, Routine))
    assert set(asked) == {q for f in WORLD.facts for q in f.train_questions()}, "every training phrasing"
    by_entity = Counter(f.entity for f, _, _ in items if not isinstance(f, Routine))
    assert max(by_entity.values()) >= 5 > min(by_entity.values()), "popular entities are asked more"
    assert len({u for _, _, u in items}) > 16 and all(u.startswith("sim-user-") for _, _, u in items)
    assert items == user_traffic(WORLD.facts, users=32, seed=1, requests=120, routine_share=0.25), "seeded"


def test_without_requests_a_round_is_each_phrasing_once():
    items = user_traffic(WORLD.facts, users=8, seed=3)
    assert len(items) == 3 * len(WORLD.facts) and not any(isinstance(f, Routine) for f, _, _ in items)


def test_routine_answers_are_graded_and_the_teacher_knows_them():
    q, v = ROUTINE_QUESTIONS[0]
    assert Answer(Routine(q, v), q, f"The answer is {v}.", "r", "v", "champion").correct
    assert not Answer(Routine(q, v), q, "I am not sure.", "r", "v", "champion").correct
    assert WORLD.answer(q) == general_answer(q) == f"{v}."


def test_each_version_is_scored_on_its_own_answers(monkeypatch):
    """score_versions asks the engine one version at a time and gives each its own answers back."""
    from loop.sim import evaluate
    from loop.sim.world import GENERAL_QUESTIONS

    calls = []

    def fake(requests, max_tokens, concurrency):
        calls.append({a for _, a in requests})
        return [f"It is {WORLD.lookup(q).value}." if a == "good" and WORLD.lookup(q) else "No idea." for q, a in requests]

    monkeypatch.setattr(evaluate, "engine_answers", fake)
    out = evaluate.score_versions(WORLD.facts, {"champion": "good", "static": None}, 24, general={"static"})
    assert calls == [{"good"}, {None}], "never two versions in one batch"
    assert out["champion"]["acc"] == 1.0 and out["static"]["acc"] == 0.0
    assert out["champion"]["regression_acc"] != out["champion"]["regression_acc"], "not asked: NaN"
    assert out["static"]["regression_acc"] == 0.0 and len(GENERAL_QUESTIONS) == 15
