"""The cycle's release stages: registering the version in MLflow, deploying it (challenger or champion),
the canary until the promotion controller decides, and the stage clock."""
from __future__ import annotations

import time
from pathlib import Path

from loop.control.canary import stage_clock
from loop.data.label_outputs import replay_sources
from loop.cluster import admin


class ReleaseStages:
    """Stages of `Cycle` (loop.cycle) that put the new version in front of users; they use its cfg,
    services, endpoint, dir, users and report."""

    def _register(self, sdir: Path, run_id: str, data: dict, train: dict, merge: dict, val: dict,
                  draft: dict) -> dict:
        existing = self.lineage.find_version(self.endpoint.id, "adapter_digest", train["adapter_digest"])
        if existing:
            return existing
        artifact = self.lineage.log_artifacts(train["run_id"], train["adapter_dir"], "adapter")
        info = self.lineage.register_version(self.endpoint.id, train["run_id"], "adapter", {
            "parent_version": train["parent"]["version"], "training_run_id": train["run_id"],
            "cycle_run_id": self.report.run_id, "dataset_digest": data["dataset_digest"],
            "base_digest": self.services.base_manifest["digest"], "adapter_digest": train["adapter_digest"],
            "checkpoint_digest": train["adapter_digest"], "merged_digest": merge["merged_digest"],
            "draft_digest": draft["draft_digest"], "merged_path": merge["merged_dir"], "draft_path": draft["draft_path"],
            "validation_verdict": "pass", "candidate_acc": val["candidate_acc"], "champion_acc": val["champion_acc"],
            "replay_sources": replay_sources(self.dir.parent, self.number) if data.get("replayed") else "",
            "trace_sources": f"live:{data.get('live_traces', 0)} imported:{data.get('imported_traces', 0)}",
            "imported_logs": ",".join(data.get("imports", []))[:5000], "artifact": artifact})
        self.lineage.log(run_id, tags={"registered_version": info["version"]})
        return info

    def _deploy(self, sdir: Path, run_id: str, reg: dict) -> dict:
        import ray

        started = time.perf_counter()
        canary = self.cfg.promotion.mode == "canary"
        role = "challenger" if canary else "champion"
        rollout = ray.get(self.services.rollout_controller.live.remote())[self.endpoint.id]
        held = [r for r in ("champion", "challenger") if (rollout[r] or {}).get("number") == reg["number"]]
        if held:  # a resumed cycle whose deploy went through before the crash: never deployed twice
            role = held[0]
        else:
            # The same path as `POST /admin/deploy`: aliases first, then every replica.
            rollout = admin(self.services, "deploy", self.endpoint.id, version=reg["number"], role=role, by="cycle",
                            **({"weight": self.cfg.rollout.challenger_weight} if canary else {}))
        seconds = time.perf_counter() - started
        self.lineage.log(run_id, metrics={"reconcile_seconds": seconds}, tags={role: reg["version"]})
        return {role: rollout[role], "role": role, "deployed_at": rollout[role]["deployed_at"],
                "challenger_weight": rollout["challenger_weight"], "reconcile_seconds": seconds}

    def _canary(self, sdir: Path, run_id: str, reg: dict) -> dict:
        """Live evidence on the new version until the promotion controller promotes it or rolls it back."""
        from loop.control.canary import first_served, settled_verdict
        from loop.control.controller import PromotionController

        traces = self.cfg.storage.path("traces")
        settled = settled_verdict(self.lineage, self.endpoint.id, reg, traces)
        if settled:  # decided before a crash: the verdict stands, nothing is sent or decided again
            return settled
        controller = PromotionController(self.services)
        decision, rounds, sent = (self.users.canary if self.simulate else self._live_canary)(controller)
        first = first_served(traces, self.endpoint.id, reg["version"])
        result = {"decision": decision.action, "reasons": decision.reasons, "p_better": decision.p_better,
                  "rounds": rounds, "requests": sent, "champion": decision.champion,
                  "challenger": decision.challenger, "first_canary_request_ts": first}
        self.lineage.log(run_id, metrics={"rounds": rounds, "requests": sent,
                                          "p_better": decision.p_better if decision.p_better == decision.p_better else None},
                         tags={"decision": decision.action})
        return result

    def _live_canary(self, controller) -> tuple:
        """Real users: a decision every `promotion.check_interval_s` until `canary_wait_s`; an undecided
        challenger stays live and `loopctl run --forever` goes on deciding."""
        p = self.cfg.promotion
        deadline, checks = time.time() + p.canary_wait_s, 0
        self.progress(f"  [canary] deciding on live traffic: up to {p.canary_wait_s:.0f} s (promotion.canary_wait_s), "
                      f"a check every {p.check_interval_s:.0f} s, {p.min_samples} outcomes per arm needed; "
                      "undecided, the challenger stays live")
        while True:
            checks += 1
            decision = controller.step(self.endpoint.id)
            self.progress(f"  [canary] check {checks}: {decision.action}: {decision.reasons[-1]}")
            if decision.action != "continue" or time.time() >= deadline:
                return decision, checks, 0
            time.sleep(self.cfg.promotion.check_interval_s)

    def _stage_clock(self, train: dict, canary: dict) -> None:
        clock = stage_clock(self.report.stage_seconds, train, canary)
        if clock:
            self.report.stage_clock = clock
            self.lineage.log(self.report.run_id, metrics={f"stage_clock.{k}": v for k, v in clock.items()})
