"""The simulated world: deterministic, drifting by the configured share, scored by value."""
from loop.sim.world import NUM_TRAIN_PHRASINGS, World, is_correct


def test_world_is_deterministic():
    a, b = World(5, 2, 12), World(5, 2, 12)
    assert [f.answer() for f in a.facts] == [f.answer() for f in b.facts]


def test_drift_changes_the_configured_share_and_adds_entities():
    w0, w1 = World(1, 0, 20, 0.3, 2), World(1, 1, 20, 0.3, 2)
    old = {f.entity: f.value for f in w0.facts}
    changed = [f for f in w1.facts if f.entity in old and old[f.entity] != f.value]
    assert len(changed) == 6  # 30% of 20
    assert len(w1.facts) == 22
    assert w1.changed == {f.entity for f in changed} | (set(f.entity for f in w1.facts) - set(old))


def test_heldout_phrasing_is_not_a_training_phrasing_and_teacher_answers_it():
    w = World(0, 1)
    f = w.facts[0]
    assert f.heldout_question() not in f.train_questions() and len(f.train_questions()) == NUM_TRAIN_PHRASINGS
    assert w.answer(f.heldout_question()) == f.answer()
    assert w.answer("  " + f.question(1).upper() + " ") == f.answer()
    assert w.answer("What is the meaning of life?") == "I don't know."


def test_scoring_checks_the_current_value():
    w = World(0, 0)
    f = w.facts[0]
    assert is_correct(f, f.answer())
    assert not is_correct(f, "I don't know.")


def test_near_misses_are_wrong():
    from loop.sim.world import Fact

    price, version = Fact("Zorvex widget", "price", "$59"), Fact("Zorvex widget", "version", "3.1")
    assert is_correct(price, "It costs $59.") and is_correct(price, "$59")
    assert not is_correct(price, "It costs $590.") and not is_correct(price, "It costs $159.")
    assert is_correct(version, "The latest version is 3.1.") and is_correct(version, "v 3.1, released")
    assert not is_correct(version, "The latest version is 3.15.") and not is_correct(version, "13.1")
    assert not is_correct(version, "3.1.2")
