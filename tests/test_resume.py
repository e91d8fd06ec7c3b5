"""A loop driver killed in each stage resumes and finishes with one model version, deployed once.

Cycle 2 of `tiny-support` on the session's cluster (after the cycle-1 job and the tests that read
its state; conftest runs this module last): the driver is started once per stage with
LOOP_FAULT_KILL set, and dies there like a kill -9; the next start resumes. Stages whose work has
outside effects (traffic sent, labels cached, a version registered, a deployment, a promotion) are
killed after the work and before it is recorded (the worst moment); pure compute stages before any
work. The last run is one `ray job submit ... --forever`: it finishes the resumed cycle 2, then starts
cycle 3 on the new traces (schedule.min_new_traces 1), and is stopped once cycle 3 has sent its traffic
(the rest of a cycle is what cycle 2 just proved). Cycle 2 also runs serving parity on a vLLM engine
on the merged weights (the cycle-1 job checks the multi-LoRA engine's only: one engine start, not two).
"""
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import yaml
from mlflow import MlflowClient

from benchmarks.reliability.lifecycle import DRIVER_KILLS, kill_driver_in_each_stage
from conftest import BIN, ROOT
from loop.config import load_config

pytestmark = [pytest.mark.cluster, pytest.mark.last]
ENDPOINT = "tiny-support"
KILLS = DRIVER_KILLS


@pytest.fixture(scope="module")
def resumed(cycle_job):
    assert cycle_job["proc"].returncode == 0
    # The same loop (storage, MLflow, port), cheaper knobs: a short draft co-training, no speculative
    # check (the cycle-1 job checked it); serving parity on the merged weights too (validation.merged_parity).
    raw = yaml.safe_load(cycle_job["config"].read_text())
    raw["draft_training"]["max_steps"] = 10
    raw["promotion"]["canary_rounds"] = 6
    raw.setdefault("validation", {}).update(spec_check_questions=0, merged_parity="always")
    # --forever: a cycle as soon as one new trace arrived; live challengers re-decided every 5 s.
    raw["schedule"] = {"min_new_traces": 1, "poll_s": 1}
    raw["promotion"]["check_interval_s"] = 5
    config = cycle_job["config"].with_name("tiny-resume.yaml")
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config)
    client = MlflowClient(cfg.storage.tracking_uri, registry_uri=cfg.storage.tracking_uri)
    globex = sorted(int(v.version) for v in client.search_model_versions("name = 'student-globex-chat'"))
    runs = kill_driver_in_each_stage(config, cycle_job["env"], ENDPOINT)
    final = _forever_job(cycle_job["env"], config,
                         cfg.storage.path("cycles", ENDPOINT, "cycle-0003", "traffic", "result.json"))
    return {"cfg": cfg, "client": client, "runs": runs, "final": final, "globex_versions": globex}


def _forever_job(env: dict, config, stop_after) -> SimpleNamespace:
    """`ray job submit --forever`, stopped (`ray job stop`) once `stop_after` exists; its logs and status."""
    ray, address = str(BIN / "ray"), ["--address", env["LOOP_DASHBOARD"]]
    job_id = f"resume-forever-{time.time_ns()}"
    subprocess.run([ray, "job", "submit", *address, "--no-wait", "--submission-id", job_id, "--working-dir", str(ROOT),
                    "--runtime-env-json", json.dumps({"env_vars": {k: env[k] for k in
                                                                    ("LOOP_DEMO_API_KEY", "LOOP_DEMO_GLOBEX_KEY")}}),
                    "--", "python", "jobs/run_loop.py", "--config", str(config), "--forever", "--endpoint", ENDPOINT],
                   env=env, check=True, capture_output=True, cwd=ROOT, timeout=120)
    deadline, status = time.time() + 1200, ""
    while time.time() < deadline and not stop_after.exists():
        status = subprocess.run([ray, "job", "status", *address, job_id], env=env, capture_output=True, text=True,
                                timeout=60).stdout
        if any(s in status for s in ("FAILED", "SUCCEEDED", "STOPPED")):
            break
        time.sleep(3)
    running = "RUNNING" in subprocess.run([ray, "job", "status", *address, job_id], env=env, capture_output=True,
                                          text=True, timeout=60).stdout
    subprocess.run([ray, "job", "stop", *address, job_id], env=env, capture_output=True, timeout=120)
    logs = subprocess.run([ray, "job", "logs", *address, job_id], env=env, capture_output=True, text=True,
                          timeout=120).stdout
    return SimpleNamespace(stdout=logs, running=running, status=status)


def test_each_kill_landed_in_its_stage_and_left_it_unrecorded(resumed):
    for run in resumed["runs"]:
        out = run["proc"].stdout
        assert run["proc"].returncode == 137, (run["kill"], out[-3000:], run["proc"].stderr[-3000:])
        stage, when = run["kill"].split("@")
        assert f"[fault] killing the driver {when} stage {stage} of {ENDPOINT}" in out
        assert not run["done"], f"{stage} has no result.json after a kill in it"
        # The stages before it were not run again: each earlier one either resumed or was redone once.
        earlier = KILLS[:KILLS.index(run["kill"])]
        for e in earlier[:-1]:
            assert f"[{e.split('@')[0]}] done in an earlier run, skipped" in out, (run["kill"], e)
    # A restart joins what is running: the teacher of the same epoch is kept, not deployed again.
    for run in resumed["runs"][1:]:
        assert "[loop] the reference teacher (epoch 2) is already serving: kept" in run["proc"].stdout, run["kill"]


def test_the_champion_is_untouched_until_the_promotion(resumed):
    for run in resumed["runs"]:
        if KILLS.index(run["kill"]) <= KILLS.index("register@after"):
            assert run["aliases"].get("champion") == 2 and "challenger" not in run["aliases"], run["kill"]
    after_deploy = next(r for r in resumed["runs"] if r["kill"] == "deploy@after")
    assert after_deploy["aliases"] == {"champion": 2, "challenger": 3, "previous": 1}


def test_resumed_cycle_finished_with_one_version_deployed_once(resumed):
    final, cfg, client = resumed["final"], resumed["cfg"], resumed["client"]
    assert final.running, ("the --forever job was still running in cycle 3", final.status, final.stdout[-4000:])
    assert "running until interrupted" in final.stdout
    report = json.loads(cfg.storage.path("cycles", ENDPOINT, "cycle-0002", "report.json").read_text())
    assert report["new_version"] == f"student-{ENDPOINT}/3" and report["validation_passed"]
    # The same job went on to cycle 3 by itself, on traffic of its own (nothing of cycle 2 reused).
    assert "[traffic] done in an earlier run" not in final.stdout.split("cycle 3 of")[1]
    versions = client.search_model_versions(f"name = 'student-{ENDPOINT}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3], "one new version per cycle, however many restarts"
    v3 = client.get_model_version(f"student-{ENDPOINT}", "3")
    train = json.loads(cfg.storage.path("cycles", ENDPOINT, "cycle-0002", "train", "result.json").read_text())
    assert v3.tags["adapter_digest"] == train["adapter_digest"]
    assert v3.tags["deployments"] == "1", "the resumed deploy stage did not deploy again"
    assert v3.tags["promotion_decision"] == report["promotion"] == "promote"
    assert int(client.get_registered_model(f"student-{ENDPOINT}").aliases["champion"]) >= 3
    cycle_runs = client.search_runs([client.get_experiment_by_name("continual-loop").experiment_id],
                                    f"tags.`loop.cycle` = '2' and tags.`loop.endpoint` = '{ENDPOINT}'")
    assert len(cycle_runs) == 1, "one MLflow run for the cycle across every restart"
    # The other tenant's endpoint was not touched by any of it.
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'student-globex-chat'")) == \
        resumed["globex_versions"], "the other endpoint's versions are its own business"


def test_the_merged_weights_serve_what_the_gate_scored(resumed):
    """Serving parity on both engines: the adapter on the multi-LoRA engine and a vLLM engine on the
    merged weights with the draft; the latter is the merge's proof 4, in the validation result and on the
    registered version (the merge stage's own report is left as the merge wrote it)."""
    cfg = resumed["cfg"]
    cycle = cfg.storage.path("cycles", ENDPOINT, "cycle-0002")
    val = json.loads((cycle / "validate" / "result.json").read_text())
    n = cfg.validation.parity_questions
    assert n > 0 and val["parity"] == {"questions": n, "multi_lora_identical": f"{n}/{n}",
                                       "merged_identical": f"{n}/{n}"}, val["parity"]
    merge = json.loads((cycle / "merge" / "merge_report.json").read_text())
    assert merge["passed"] and "the validate stage's serving parity runs it" in merge["engine_note"], merge
    v3 = resumed["client"].get_model_version(f"student-{ENDPOINT}", "3")
    assert v3.tags["engine_identical"] == f"{n}/{n}", v3.tags


def test_lineage_prints_the_whole_chain(resumed):
    cfg = resumed["cfg"]
    out = subprocess.run([sys.executable, "-m", "loop.cli", "lineage", f"model-{ENDPOINT}", "3", "--config",
                          str(cfg_path(resumed))], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    v3 = resumed["client"].get_model_version(f"student-{ENDPOINT}", "3").tags
    assert text.startswith(f"student-{ENDPOINT}/3  live as: ") and f"(parent student-{ENDPOINT}/2)" in text
    for key in ("dataset_digest", "adapter_digest", "merged_digest", "draft_digest"):
        assert v3[key] in text, key
    label = json.loads(cfg.storage.path("cycles", ENDPOINT, "cycle-0002", "label", "result.json").read_text())
    # Replay draws on cycle 1's data minus the prompts cycle 2 relabelled (here: all of them).
    assert ("+ replay of cycle-1:" in text) == (label["replayed"] > 0) and "validation    pass" in text
    assert "deployed" in text and "by cycle" in text and "promoted" in text and "by controller" in text
    served = json.loads(subprocess.run([sys.executable, "-m", "loop.cli", "lineage", ENDPOINT, "3", "--json",
                                        "--config", str(cfg_path(resumed))], capture_output=True, text=True,
                                       cwd=ROOT, timeout=120).stdout)["requests_served"]
    assert served["total"] > 0 and served["as_challenger"] > 0
    bad = subprocess.run([sys.executable, "-m", "loop.cli", "lineage", "model-nope", "--config",
                          str(cfg_path(resumed))], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "not an endpoint" in bad.stderr


def cfg_path(resumed):
    return resumed["cfg"].storage.path("tiny-resume.yaml")


def test_a_worse_challenger_is_rolled_back_on_live_evidence(resumed, cycle_job):
    """A broken version (an adapter of noise: every answer garbage) deployed against the champion: the
    simulated users' graded answers make the promotion controller roll it back. (Not the base: the
    tiny base was built knowing epoch 0, and can answer as well as a champion of a few cycles.)"""
    from types import SimpleNamespace

    import ray

    from loop.control.controller import PromotionController
    from loop.lineage.registry import Lineage
    from benchmarks.serving import make_adapter
    from loop.models.digest import dir_digest
    from loop.cluster import admin, helper_actors
    from loop.sim.traffic import ask_gateway, post_feedback, user_traffic
    from loop.sim.world import World

    cfg = resumed["cfg"]
    ray.init(address=cycle_job["env"]["RAY_ADDRESS"], namespace=cfg.ray.namespace, ignore_reinit_error=True)
    lineage = Lineage(cfg.storage.tracking_uri, cfg.storage.path("mlartifacts"))
    _, _, controller = helper_actors(cfg, lineage)
    services = SimpleNamespace(cfg=cfg, lineage=lineage, rollout_controller=controller, teacher_url="")
    champion = lineage.version_info(ENDPOINT, "champion")
    # Noise on every linear layer: the model it makes answers garbage.
    noise = make_adapter(cfg.model_path(cfg.student), cfg.storage.path("noise-adapter"), 8, seed=0, std=1.0)
    run = lineage.start_run("noise-adapter")
    lineage.log_artifacts(run, noise, "adapter")
    broken = lineage.register_version(ENDPOINT, run, "adapter", {
        "adapter_digest": dir_digest(noise), "training_run_id": run, "validation_verdict": "pass"})
    admin(services, "deploy", ENDPOINT, version=broken["number"], weight=0.5)
    w = cfg.world
    world = World(w.seed, 2, w.num_entities, w.drift_fraction, w.new_per_epoch)
    url = f"http://127.0.0.1:{cfg.serving.port}/v1"
    decisions = []
    for rnd in range(6):
        answers = ask_gateway(url, "sk-loop-demo-acme", f"model-{ENDPOINT}",
                              user_traffic(world.facts, cfg.traffic.users, seed=5000 + rnd), 16, 4)
        assert post_feedback(url, "sk-loop-demo-acme", answers) == len(answers)
        decisions.append(PromotionController(services).step(ENDPOINT))
        if decisions[-1].action != "continue":
            break
    d = decisions[-1]
    assert d.action == "rollback" and d.p_better < 0.05, [x.reasons for x in decisions]
    assert d.challenger["success_rate"] < d.champion["success_rate"]
    assert lineage.version_info(ENDPOINT, "challenger") is None
    assert lineage.version_info(ENDPOINT, "champion")["number"] == champion["number"], "the champion stayed"
    tags = resumed["client"].get_model_version(f"student-{ENDPOINT}", str(broken["number"])).tags
    assert tags["promotion_decision"] == "rollback" and tags["rolled_back_by"] == "controller"

