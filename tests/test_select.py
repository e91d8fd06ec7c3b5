"""Prompt selection from the trace log: reasons, priorities, deduplication, user strata, held-out split."""
import json

from loop.data.select import replay_rows, select_prompts


def _rec(text, user="u1", tenant="acme", **kw):
    return {"prompt": json.dumps([{"role": "user", "content": text}]), "user": user, "tenant": tenant,
            "request_id": f"req-{text}-{user}", **kw}


def _fb(request_id, tenant="acme", **kw):
    return {"request_id": request_id, "tenant": tenant, **kw}


def _texts(rows):
    return [json.loads(r["prompt"])[0]["content"] for r in rows]


def test_reasons_priorities_and_dedup():
    records = [_rec("esc", escalated=True, confidence=-3.0), _rec("esc", user="u2"),  # the same prompt twice
               _rec("unsure", confidence=-2.5), _rec("sure", confidence=-0.1), _rec("disliked", confidence=-0.2),
               _rec("unmeasured", confidence=0.0)]
    feedback = [_fb("req-disliked-u1", score=0.0, label=None), _fb("req-sure-u1", score=1.0, label=None)]
    sel = select_prompts(records, feedback, max_prompts=10, sample_size=0, min_confidence=-1.0)
    assert _texts(sel.train) == ["esc", "unsure", "disliked"]
    assert sel.train[0]["reasons"] == ["escalated", "low_confidence"]
    assert sel.counts == {"candidates": 5, "escalated": 1, "low_confidence": 2, "negative_feedback": 1,
                          "sampled": 0, "train": 3, "heldout": 0}
    # A cap keeps the most important first.
    assert _texts(select_prompts(records, feedback, max_prompts=1, sample_size=5, min_confidence=-1.0).train) == ["esc"]
    # Labels count as feedback too.
    by_label = select_prompts([_rec("x")], [_fb("req-x-u1", label="Wrong")], max_prompts=5, sample_size=0)
    assert by_label.train[0]["reasons"] == ["negative_feedback"]


def test_the_sample_is_stratified_by_user():
    records = [_rec(f"heavy-{i}", user="heavy") for i in range(50)]
    records += [_rec(f"light-{u}-{i}", user=f"u{u}") for u in range(4) for i in range(2)]
    sel = select_prompts(records, [], max_prompts=100, sample_size=10, seed=1)
    texts = _texts(sel.train)
    assert len(texts) == 10 and sel.counts["sampled"] == 10
    assert sum(t.startswith("heavy") for t in texts) <= 2, texts  # one user cannot crowd out the others
    assert {t.split("-")[1] for t in texts if t.startswith("light")} == {"0", "1", "2", "3"}
    assert _texts(select_prompts(records, [], max_prompts=100, sample_size=10, seed=1).train) == texts, "seeded"


def test_heldout_split_is_stable_and_never_trained():
    records = [_rec(f"q{i}", escalated=True) for i in range(400)]
    a = select_prompts(records, [], max_prompts=1000, sample_size=0, heldout_fraction=0.25)
    b = select_prompts(list(reversed(records)), [], max_prompts=1000, sample_size=0, heldout_fraction=0.25)
    assert 0.19 < len(a.heldout) / 400 < 0.31
    assert {r["prompt"] for r in a.heldout} == {r["prompt"] for r in b.heldout}
    assert not {r["prompt"] for r in a.heldout} & {r["prompt"] for r in a.train}


def test_replay_leaves_out_relabelled_prompts_and_is_seeded():
    import json

    def line(q, a):
        return json.dumps({"messages": [{"role": "user", "content": q}], "completion": a})

    earlier = [line(f"q{i}", f"old {i}") for i in range(10)] + [line("q0", "old 0")]  # a duplicate
    current = [line("q1", "new 1"), line("q2", "new 2")]
    picked = replay_rows(earlier, current, n=20, seed=3)
    prompts = [json.loads(p)["messages"][0]["content"] for p in picked]
    assert sorted(prompts) == sorted(f"q{i}" for i in range(10) if i not in (1, 2)), "stale, duplicate rows out"
    assert replay_rows(earlier, current, n=4, seed=3) == replay_rows(earlier, current, n=4, seed=3)
    assert len(replay_rows(earlier, current, n=4, seed=3)) == 4 and replay_rows(earlier, current, 0, 3) == []


def test_rated_good_answers_are_kept_once_and_never_when_in_doubt():
    from loop.data.select import rated_good

    records = [_rec("good", completion="Yes. It is 3.5 m tall, more or"),
               _rec("good", user="u2", completion="Yes. It is 3.5 m tall, more or"),
               _rec("mixed", completion="a"), _rec("mixed", user="u2", completion="b"),
               _rec("escalated", completion="teacher's", escalated=True), _rec("labelled", completion="c"),
               _rec("unrated", completion="d")]
    feedback = [_fb(f"req-{t}-{u}", score=s) for t, u, s in [
        ("good", "u1", 1.0), ("good", "u2", 1.0), ("mixed", "u1", 1.0), ("mixed", "u2", 0.0),
        ("escalated", "u1", 1.0), ("labelled", "u1", 1.0)]]
    labelled = {json.dumps([{"role": "user", "content": "labelled"}])}
    kept = rated_good(records, feedback, labelled, n=10, min_score=0.5, seed=0)
    # One row per prompt rated good everywhere; not the teacher's answer, not a prompt the teacher
    # labels this cycle, not a prompt any user rated bad, not an unrated answer.
    assert [(json.loads(r["prompt"])[0]["content"], r["completion"]) for r in kept] == [("good", "Yes.")]
    assert rated_good(records, feedback, set(), n=0, min_score=0.5, seed=0) == []
    from loop.data.select import first_sentence

    assert first_sentence("The version is 3.5. It was") == "The version is 3.5."
    assert first_sentence("It costs $3.50 and more") == "It costs $3.50 and more", "no sentence end: whole"


def test_feedback_joins_only_its_own_tenants_requests():
    from loop.data.select import rated_good

    # Two tenants' records with the same request id string (imported logs, or ids from before the
    # gateway minted its own), and three prompts acme users rated.
    records = [_rec("shared", completion="Acme's answer."), _rec("shared", tenant="globex", user="g1",
                                                                 completion="Globex's answer.")]
    records[1]["request_id"] = records[0]["request_id"]
    records += [_rec("liked", completion="Yes."), _rec("other", completion="Fine.")]
    acme = [_fb("req-liked-u1", score=1.0), _fb("req-other-u1", score=1.0)]
    base = select_prompts(records, acme, max_prompts=10, sample_size=0)
    kept = rated_good(records, acme, set(), n=10, min_score=0.5, seed=0)
    assert base.counts["negative_feedback"] == 0 and _texts(kept) == ["liked", "other"]
    # globex grades acme's requests (by id), and a row from before feedback carried a tenant:
    # neither changes what acme's records select or keep.
    hostile = acme + [_fb("req-liked-u1", tenant="globex", score=0.0, label="wrong"),
                      _fb("req-other-u1", tenant="globex", score=0.0),
                      {"request_id": "req-liked-u1", "score": 0.0, "label": "bad"}]
    sel = select_prompts(records, hostile, max_prompts=10, sample_size=0)
    assert (sel.train, sel.counts) == (base.train, base.counts)
    assert rated_good(records, hostile, set(), n=10, min_score=0.5, seed=0) == kept
    # The same id string in two tenants: globex's negative grade reaches globex's record only.
    shared = select_prompts(records, [_fb(records[0]["request_id"], tenant="globex", score=0.0)],
                            max_prompts=10, sample_size=0)
    assert shared.counts["negative_feedback"] == 1 and _texts(shared.train) == ["shared"]
    good_for_globex = [_fb(records[0]["request_id"], tenant="globex", score=1.0)]
    # acme's record of the shared id is unrated, so its prompt is in doubt: nothing is kept.
    assert rated_good(records, good_for_globex, set(), n=10, min_score=0.5, seed=0) == []
    assert rated_good(records[1:2], good_for_globex, set(), n=10, min_score=0.5, seed=0) == [
        {"prompt": records[1]["prompt"], "completion": "Globex's answer."}]


def test_escalated_prompts_reuse_the_answer_the_cascade_paid_for():
    from loop.data.label_outputs import escalation_labels

    rows = [_rec("hard", escalated=True, completion="The teacher's answer."), _rec("easy", completion="mine")]
    prompts = [r["prompt"] for r in rows] + [json.dumps([{"role": "user", "content": "other"}])]
    asked, reused = escalation_labels(rows, prompts)
    assert _texts([{"prompt": p} for p in asked]) == ["easy", "other"]
    assert [(r["completion"], r["cost_usd"], r["from_escalation"]) for r in reused] == [("The teacher's answer.", 0.0, True)]
