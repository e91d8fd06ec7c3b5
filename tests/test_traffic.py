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


def _users(monkeypatch, champion):
    from types import SimpleNamespace

    from loop.config import load_config
    from loop.sim.users import SimulatedUsers

    cfg = load_config("configs/tiny.yaml")
    users = SimulatedUsers(cfg, SimpleNamespace(), cfg.tenants[0].endpoints[0], WORLD, 1, "unused")
    monkeypatch.setattr(users, "champion", lambda: champion)
    return users


def test_the_static_snapshots_regression_is_asked_once(monkeypatch):
    """The snapshot never changes: an earlier cycle's regression figure is reused, not asked again."""
    from loop.sim import evaluate

    asked = []

    def fake(facts, adapters, max_tokens, concurrency, general):
        asked.append(set(general))
        return {n: {"acc": 1.0 if a else 0.25, "regression_acc": 0.9 if n in general else float("nan"),
                    "samples": []} for n, a in adapters.items()}

    monkeypatch.setattr(evaluate, "score_versions", fake)
    users = _users(monkeypatch, {"version": "v/3", "adapter_path": "a3"})
    static = {"version": "v/1", "adapter_path": None}
    first = users.evaluate(static)
    again = users.evaluate(static, static_regression=0.8)
    assert asked == [{"champion", "static"}, {"champion"}]
    assert (first["static_regression_acc"], again["static_regression_acc"]) == (0.9, 0.8)
    assert (again["eval_acc"], again["static_acc"], again["served_by"]) == (1.0, 0.25, "v/3")


def test_without_a_multi_lora_engine_the_champion_is_asked_through_the_gateway(monkeypatch):
    """Every endpoint on merged weights: the champion's figure comes from the gateway, the rest is NaN."""
    from loop.sim import evaluate
    from loop.sim.traffic import eval_traffic

    def no_engine(*a, **k):
        raise evaluate.NoEngine("merged only")

    monkeypatch.setattr(evaluate, "score_versions", no_engine)
    users = _users(monkeypatch, {"version": "v/2", "adapter_path": None})
    items = eval_traffic(WORLD.facts)
    right = len(items) // 2
    monkeypatch.setattr(users, "ask", lambda got: [
        Answer(fact, q, f"It is {fact.value}." if i < right else "No idea.", "r", "v/2", "champion")
        for i, (fact, q, _) in enumerate(got)])
    out = users.evaluate({"version": "v/1", "adapter_path": None})
    assert out["eval_acc"] == right / len(items) and out["served_by"] == "v/2"
    assert out["static_acc"] != out["static_acc"] and out["regression_acc"] != out["regression_acc"]
