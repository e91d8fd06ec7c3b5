"""Run the loop for every endpoint of a config and print what happened; shared by `loopctl run` and
`jobs/run_loop.py`. `cycles=N` runs N cycles per endpoint; `forever` runs until interrupted, starting an
endpoint's cycle when `schedule` says so and re-deciding live challengers every
`promotion.check_interval_s`. Endpoints are independent: one whose cycle fails is reported and the
others go on. Errors a user can fix end as one line and exit code 2."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import NoReturn

from loop.config import ConfigError, LoopConfig, load_config


def next_cycle(cfg: LoopConfig, endpoint: str) -> int:
    """The first cycle without a finished report: a crashed cycle is resumed, not restarted."""
    n = 1
    while cfg.storage.path("cycles", endpoint, f"cycle-{n:04d}", "report.json").exists():
        n += 1
    return n


def latest_epoch(cfg: LoopConfig) -> int:
    """The world epoch of the newest finished cycle (0 before any)."""
    return max((next_cycle(cfg, e.id) - 1 for _, e in cfg.endpoints()), default=0)


def check_models(cfg: LoopConfig) -> None:
    """The student and draft are present and are the files their manifests recorded. A damaged one stops
    everything before it starts; the reason also goes to MLflow (a failed `preflight` run), so the
    lineage UI shows why no cycle ran."""
    from loop.lineage.registry import Lineage
    from loop.models.fetch import ModelDamaged, verify_model

    try:
        for model in (cfg.student, cfg.draft):
            verify_model(cfg.model_path(model))
    except ModelDamaged as e:
        try:
            lineage = Lineage(cfg.storage.tracking_uri, cfg.storage.path("mlartifacts"))
            run_id = lineage.start_run("preflight", tags={"loop.stage": "preflight", "verdict": "fail",
                                                          "refused": str(e)[:4000]})
            lineage.end_run(run_id, ok=False)
        except Exception as record_error:  # noqa: BLE001 - the refusal itself must still reach the user
            print(f"[loop] the refusal below could not be recorded in MLflow ({type(record_error).__name__})",
                  file=sys.stderr)
        raise


def run(cfg: LoopConfig, cycles: int, forever: bool = False, only: list[str] | None = None) -> list[dict]:
    from loop.cluster import start_services, stop_services
    from loop.teacher.client import check_reachable
    from loop.teacher.local import check_same_tokenizer

    keys = {t.id: "" for t in cfg.tenants}
    for i, tenant in enumerate(cfg.tenants if cfg.traffic.simulate else []):
        if not tenant.sim_api_key_env or not os.environ.get(tenant.sim_api_key_env):
            raise ConfigError(f"tenants[{i}].sim_api_key_env: the simulated users of tenant {tenant.id} need a key; "
                              f"set the field and export that variable (the Makefile exports the demo keys)")
        keys[tenant.id] = os.environ[tenant.sim_api_key_env]
    # Fail fast, before anything starts or is written: models present, external teacher reachable.
    check_models(cfg)
    if cfg.teacher.kind == "openai":
        check_reachable(cfg.teacher, cfg.teacher.base_url)
    if cfg.teacher.kind == "local":
        teacher_dir = cfg.model_path(cfg.teacher)
        if not (teacher_dir / "config.json").exists():
            raise ConfigError(f"teacher.path: {teacher_dir} holds no Hugging Face model (config.json); "
                              "download or save the teacher there")
        check_same_tokenizer(cfg.model_path(cfg.student), teacher_dir)
    t0 = time.perf_counter()
    first = min(next_cycle(cfg, e.id) for _, e in cfg.endpoints())
    print(f"[loop] {cfg.name}: starting Ray, MLflow ({cfg.storage.tracking_uri}), teacher and gateway", flush=True)
    services = start_services(cfg, epoch=first)
    print(f"[loop] services up in {time.perf_counter() - t0:.1f} s; gateway {services.gateway_url}", flush=True)
    endpoints = [(t, e) for t, e in cfg.endpoints() if not only or e.id in only or e.model_name in only]
    if only and not endpoints:
        raise ConfigError(f"--endpoint {', '.join(only)}: not an endpoint of {cfg.name} "
                          f"(one of {', '.join(e.id for _, e in cfg.endpoints())})")
    try:
        if forever:
            return _forever(cfg, services, keys, endpoints)
        return _cycles(cfg, services, keys, cycles, t0, endpoints)
    finally:
        stop_services(cfg)


def _one_cycle(cfg, services, keys, tenant, endpoint, failed: dict) -> dict | None:
    """One cycle of one endpoint; a failure is that endpoint's, recorded, and the others go on."""
    import traceback

    from loop.cycle import Cycle, CycleFailed
    from loop.lineage.registry import LineageUnavailable

    n = next_cycle(cfg, endpoint.id)
    print(f"[loop] cycle {n} of model-{endpoint.id} (world epoch {n})", flush=True)
    try:
        services.lineage.wait_reachable(cfg.storage.tracking_wait_s)
        rep = Cycle(cfg, services, endpoint, n, keys[tenant.id], progress=lambda m: print(m, flush=True)).run()
    except (CycleFailed, LineageUnavailable) as e:
        failed[endpoint.id] = str(e)
        print(f"[loop] cycle {n} of model-{endpoint.id} stopped: {e}", flush=True)
        return None
    except Exception as e:  # noqa: BLE001 - one endpoint's crash must not stop the others
        failed[endpoint.id] = f"{type(e).__name__}: {e}"
        print(f"[loop] cycle {n} of model-{endpoint.id} crashed (it resumes at this stage next run):\n"
              f"{traceback.format_exc()}", flush=True)
        return None
    _print_report(rep)
    return rep.__dict__


def _cycles(cfg, services, keys, cycles, t0, endpoints) -> list[dict]:
    reports, failed = [], {}
    for i in range(cycles):
        for tenant, endpoint in endpoints:
            if endpoint.id not in failed:
                print(f"[loop] ---- {i + 1} of {cycles} cycles for model-{endpoint.id}; "
                      f"{(time.perf_counter() - t0) / 60:.1f} min so far", flush=True)
                rep = _one_cycle(cfg, services, keys, tenant, endpoint, failed)
                if rep:
                    reports.append(rep)
    if failed:
        for endpoint, reason in failed.items():
            print(f"[loop] model-{endpoint}: FAILED: {reason}", flush=True)
    finished = [(r["endpoint"], r["cycle"]) for r in reports
                if cfg.storage.path("cycles", r["endpoint"], f"cycle-{r['cycle']:04d}", "report.json").exists()]
    if finished:
        try:
            write_run_report(cfg, finished, time.perf_counter() - t0, services.gateway_url)
        except Exception as e:  # noqa: BLE001 - the cycles are done and on disk; `loopctl report` can retry
            print(f"[loop] the run's report was not written ({type(e).__name__}: {e}); "
                  "`loopctl report CONFIG` builds it from the finished cycles", flush=True)
    _where_next(cfg, services, t0)
    if failed:
        raise EndpointsFailed(failed, reports)
    return reports


class EndpointsFailed(RuntimeError):
    """Some endpoints' cycles failed (the others finished); `reports` has the finished ones."""

    def __init__(self, failed: dict, reports: list[dict]):
        super().__init__("; ".join(f"model-{k}: {v}" for k, v in failed.items()))
        self.failed, self.reports = failed, reports


def _forever(cfg, services, keys, endpoints) -> NoReturn:
    """Until interrupted: decide live challengers every promotion.check_interval_s, and start an
    endpoint's cycle once schedule.min_new_traces arrived since its last cycle, or schedule.interval_s
    passed (with at least one new trace, unless the world is simulated: then its cycles make the traffic).
    A failed cycle is printed and tried again at the endpoint's next trigger (it resumes at its stage)."""
    from loop.control.controller import PromotionController

    controller = PromotionController(services)
    last_cycle = {e.id: time.time() if next_cycle(cfg, e.id) > 1 else 0.0 for _, e in endpoints}
    last_check: dict[str, float] = {}
    sc = cfg.schedule
    print(f"[loop] running until interrupted: a cycle per endpoint at {sc.min_new_traces} new traces"
          f"{f' or every {sc.interval_s:.0f} s' if sc.interval_s else ''}", flush=True)
    while True:
        for tenant, endpoint in endpoints:
            now = time.time()
            if now - last_check.get(endpoint.id, 0) >= cfg.promotion.check_interval_s:
                last_check[endpoint.id] = now
                decision = controller.step(endpoint.id)
                if decision and decision.action != "continue":
                    print(f"[loop] model-{endpoint.id}: {decision.action}: {decision.reasons[-1]}", flush=True)
            new = new_traces(cfg, endpoint.id)
            due = sc.interval_s is not None and now - last_cycle[endpoint.id] >= sc.interval_s
            if new >= sc.min_new_traces or (due and (new or last_cycle[endpoint.id] == 0)):
                _one_cycle(cfg, services, keys, tenant, endpoint, failed={})
                last_cycle[endpoint.id] = time.time()
        time.sleep(sc.poll_s)


def new_traces(cfg: LoopConfig, endpoint: str) -> int:
    """Served requests of `endpoint` (evaluation traffic aside) since its last cycle read the log."""
    from loop.data.label_outputs import previous_cutoff
    from loop.traces.log import EVAL_USER, read_traces

    since = previous_cutoff(cfg.storage.path("cycles", endpoint), next_cycle(cfg, endpoint))
    return sum(1 for r in read_traces(cfg.storage.path("traces"))
               if r["endpoint"] == endpoint and r["ts"] > since and r["status"] == 200
               and not r["user"].startswith(EVAL_USER))


def write_run_report(cfg: LoopConfig, cycles: list[tuple[str, int]], wall_seconds: float | None = None,
                     gateway_url: str | None = None, run: str | None = None) -> None:
    """The run's report (loop/run_report.py) under .loop/reports/<run>/, and its headline numbers."""
    from loop import run_report as report

    run = run or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    rep = report.build(cfg, cycles, run, wall_seconds, gateway_url)
    out = report.write(cfg, rep)
    print(f"[loop] report: {out / 'report.md'} (+ report.json, accuracy.png)", flush=True)
    for c in rep["cycles"]:
        if cfg.traffic.simulate:
            print(f"[loop]   epoch {c['epoch']} model-{c['endpoint']}: static {_f(c['static_acc'])}, champion "
                  f"{_f(c['champion_acc_before'])} -> {_f(c['champion_acc'])}, teacher {_f(c['teacher_acc'])}; general "
                  f"questions {_f(c['regression_acc'])} (static {_f(c['base_regression_acc'])})", flush=True)
        if c["suites"]:
            print(f"[loop]   cycle {c['cycle']} model-{c['endpoint']} gate: {suite_line(c['suites'])}", flush=True)
    money = rep["cost"]
    if money["requests"]:
        print(f"[loop]   {money['requests']} requests: {100 * money['student_share']:.0f}% answered by the student, "
              f"{money['escalated']} escalated, {money['teacher_calls']['labels']} teacher labels; cost per request "
              f"{_f(rep['cost_ratio_vs_teacher'], 3)}x the teacher's", flush=True)
    if rep["targets"]:  # the demo's targets; a real-traffic run is judged by its suites
        missed = [k for k, v in rep["targets"].items() if v["met"] is False]
        print(f"[loop]   targets: {'all met' if not missed else 'missed ' + ', '.join(missed)}", flush=True)


def _f(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _where_next(cfg, services, t0) -> None:
    from loop.cluster import embedded, joined_server

    if embedded(cfg) and not joined_server():
        print("[loop] the gateway stops with this process; to serve while the loop learns, start "
              "`loopctl serve CONFIG` first: `loopctl run` then joins it and leaves it up", flush=True)
    print(f"[loop] done in {time.perf_counter() - t0:.1f} s. Where to look next:\n"
          f"[loop]   lineage:  mlflow ui --backend-store-uri {cfg.storage.tracking_uri}\n"
          f"[loop]   serving:  loopctl serve CONFIG (or make serve), then the openai client at {services.gateway_url}\n"
          f"[loop]   Ray:      the dashboard at http://127.0.0.1:8265 while the loop or `loopctl serve` runs\n"
          f"[loop]   outputs:  {cfg.storage.path('cycles')}", flush=True)


def _print_report(rep) -> None:
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in rep.stage_seconds.items())
    gate = '' if rep.validation_passed else ' (gate failed: ' + '; '.join(rep.notes) + ')'
    served = f"served by {rep.served_before} -> {rep.served_after}; new version {rep.new_version or 'none'}{gate}"
    if rep.student_acc_before == rep.student_acc_before:  # a simulated world measured its accuracy
        static = "" if rep.static_acc != rep.static_acc else f", static snapshot {rep.static_acc:.2f}"
        print(f"[loop] cycle {rep.cycle} model-{rep.endpoint}: student accuracy {rep.student_acc_before:.2f} -> "
              f"{rep.student_acc_after:.2f} (teacher {rep.teacher_acc:.2f}{static}); {served}", flush=True)
    else:
        print(f"[loop] cycle {rep.cycle} model-{rep.endpoint}: {served}", flush=True)
    if rep.suites:
        print(f"[loop]   gate suites (champion -> candidate): {suite_line(rep.suites)}", flush=True)
    figures = [f"teacher cost ${rep.teacher_cost_usd:.4f}"]
    if rep.teacher_agreement == rep.teacher_agreement:
        figures.insert(0, f"teacher agreement {rep.teacher_agreement:.2f}")
    if rep.promotion:
        figures.append(f"canary: {rep.promotion}")
    print(f"[loop]   {', '.join(figures)}", flush=True)
    print(f"[loop]   stage times: {stages}", flush=True)


def suite_line(suites: dict) -> str:
    """`name champion -> candidate (base b)` per suite, a failed one marked."""
    def one(name: str, s: dict) -> str:
        base = f", base {s['base']:.2f}" if s.get("base") is not None else ""
        return f"{name} {s['champion']:.2f} -> {s['candidate']:.2f}{base}{'' if s['passed'] else ' FAILED'}"

    return "; ".join(one(k, v) for k, v in suites.items())


def main(config_path: str, cycles: int, report_json: str | None = None, forever: bool = False,
         endpoints: list[str] | None = None) -> int:
    from loop.models.fetch import ModelMissing
    from loop.teacher.client import TeacherUnreachable
    from loop.teacher.local import TokenizerMismatch

    code = 0
    try:
        cfg = load_config(config_path)
        reports = run(cfg, cycles, forever=forever, only=endpoints)
    except (ConfigError, ModelMissing, TeacherUnreachable, TokenizerMismatch) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except EndpointsFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        reports, code = e.reports, 2
    except KeyboardInterrupt:
        return 130
    if report_json:
        with open(report_json, "w") as f:
            json.dump(reports, f, indent=2, default=str)
    return code
