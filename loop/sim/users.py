"""The simulated side of a cycle: users sending a round of traffic through the gateway (the `openai`
client, sticky ids), the feedback oracle grading every answer onto `/v1/feedback`, and the demo's
accuracy lines (loop/sim/evaluate.py). A cycle with `traffic.simulate: false` never builds one.
"""
from __future__ import annotations

import time

from loop.config import EndpointConfig, LoopConfig
from loop.cluster import Services
from loop.sim.traffic import ask_gateway, eval_traffic, post_feedback, user_traffic
from loop.sim.world import Fact, World, is_correct, value_pattern


class SimulatedUsers:
    def __init__(self, cfg: LoopConfig, services: Services, endpoint: EndpointConfig, world: World, number: int,
                 api_key: str, progress=print):
        self.cfg, self.services, self.endpoint, self.world = cfg, services, endpoint, world
        self.number, self.api_key, self.progress = number, api_key, progress

    def ask(self, items):
        return ask_gateway(self.services.gateway_url, self.api_key, self.endpoint.model_name, items,
                           self.cfg.traffic.max_tokens, self.cfg.traffic.concurrency)

    def round(self, seed: int) -> tuple[list, int]:
        """One round of user traffic, every answer graded and posted as feedback: (answers, graded)."""
        t = self.cfg.traffic
        answers = self.ask(user_traffic(self.world.facts, t.users, seed=seed, requests=t.requests,
                                        routine_share=t.routine_share))
        return answers, post_feedback(self.services.gateway_url, self.api_key, answers)

    def champion(self) -> dict:
        import ray

        return ray.get(self.services.rollout_controller.live.remote())[self.endpoint.id]["champion"]

    def scores(self, versions: dict[str, dict], general: set[str] = frozenset()) -> dict[str, dict]:
        """Each named version (a registry version's info) on the held-out phrasings of the current facts,
        and those in `general` on the regression questions, asked of the multi-LoRA engine itself."""
        from loop.sim.evaluate import NoEngine, score_versions

        try:
            scores = score_versions(self.world.facts, {n: v.get("adapter_path") for n, v in versions.items()},
                                    self.cfg.traffic.max_tokens, 2 * self.cfg.traffic.concurrency, set(general))
        except NoEngine:
            # Every endpoint serves merged weights: only the live champion, through the gateway.
            answers = self.ask(eval_traffic(self.world.facts))
            nan = float("nan")
            scores = {n: {"acc": sum(a.correct for a in answers) / len(answers) if n == "champion" else nan,
                          "regression_acc": nan, "samples": []} for n in versions}
        return {n: {"eval_acc": s["acc"], "regression_acc": s["regression_acc"], "served_by": versions[n]["version"],
                    "samples": s["samples"]} for n, s in scores.items()}

    def write_suites(self) -> None:
        """The world's facts as evaluation suites, files the demo configs name in `validation.suites`
        exactly as a user names theirs (see `world_suite_rows`)."""
        from loop.suites import write_suite

        out = self.cfg.storage.path("sim", f"cycle-{self.number:04d}")
        for name, rows in world_suite_rows(self.world).items():
            write_suite(out / f"{name}.jsonl", rows)

    def heldout_questions(self) -> list[str]:
        return [f.heldout_question() for f in self.world.facts]

    def traffic(self) -> dict:
        """The traffic stage: a round of users, then the champion and the teacher on the held-out phrasings."""
        from loop.teacher.calls import answers as teacher_answers

        self.write_suites()
        started = time.time()
        answers, graded = self.round(seed=self.number)
        result = {"requests": len(answers), "since": started, "feedback": graded,
                  "user_acc": sum(a.correct for a in answers) / len(answers)}
        result.update(self.scores({"champion": self.champion()})["champion"])
        facts = self.world.facts
        teacher = teacher_answers(self.cfg, self.services.teacher_url,
                                  [[{"role": "user", "content": f.heldout_question()}] for f in facts])
        result["teacher_acc"] = sum(is_correct(f, a) for f, a in zip(facts, teacher)) / len(teacher)
        return result

    def canary(self, controller) -> tuple:
        """Rounds of users with a decision after each (at most `promotion.canary_rounds`):
        (decision, rounds, requests sent)."""
        sent = 0
        for rounds in range(1, self.cfg.promotion.canary_rounds + 1):
            answers, _ = self.round(seed=1000 * self.number + rounds)
            sent += len(answers)
            decision = controller.step(self.endpoint.id)
            self.progress(f"  [canary] round {rounds}: {sent} requests; {decision.action}: {decision.reasons[-1]}")
            if decision.action != "continue":
                break
        return decision, rounds, sent

    def evaluate(self, static: dict, static_regression: float | None = None) -> dict:
        """The champion now and the static snapshot (`static`, version 1) on the same questions; the
        snapshot's regression accuracy is asked only when not already known (it never changes)."""
        general = {"champion"} if static_regression is not None else {"champion", "static"}
        scores = self.scores({"champion": self.champion(), "static": static}, general=general)
        result, snap = scores["champion"], scores["static"]
        result.update(static_acc=snap["eval_acc"],
                      static_regression_acc=snap["regression_acc"] if static_regression is None else static_regression)
        return result


def world_suite_rows(world: World) -> dict[str, list[dict]]:
    """`world-current` (skill): the held-out phrasing of every current fact; `world-earlier`
    (regression): the facts unchanged since the last epoch. A right answer states the value."""
    def row(f: Fact) -> dict:
        return {"messages": [{"role": "user", "content": f.heldout_question()}],
                "reference": value_pattern(f.value), "grader": "regex"}

    return {"world-current": [row(f) for f in world.facts],
            "world-earlier": [row(f) for f in world.facts if f.entity not in world.changed]}


def world_suites(world: World, earlier_max_drop: float | None = None) -> list:
    """The same suites in memory (the benchmarks' gate), `world-earlier` against the champion."""
    import json

    from loop.suites import Suite, parse_suite

    rows = world_suite_rows(world)
    text = {k: "".join(json.dumps(r) + "\n" for r in v) for k, v in rows.items()}
    return [Suite("world-current", "skill", parse_suite(text["world-current"], "world-current")),
            Suite("world-earlier", "regression", parse_suite(text["world-earlier"], "world-earlier"),
                  baseline="champion", options={"max_drop": earlier_max_drop})]
