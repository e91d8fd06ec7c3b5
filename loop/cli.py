"""`loopctl`: the command-line face of the loop."""
from __future__ import annotations

import argparse
import os
import sys

CONFIG_ENV = "LOOP_CONFIG"
"""The config of the loop in use, for the commands that act on it (`lineage`, `status`, `promote`,
`rollback`, `traces`) when no --config is given: they never fall back to the demo's silently."""
DEMO_CONFIG = "configs/demo.yaml"
"""What `models fetch` and `bench` use when neither --config nor $LOOP_CONFIG says (as `make setup` and
the README's benchmarks expect)."""


def _config_path(args) -> str | None:
    """--config, else $LOOP_CONFIG; None, with the one-line error printed, when neither is set."""
    path = args.config or os.environ.get(CONFIG_ENV)
    if not path:
        print(f"error: no config: pass --config CONFIG or set {CONFIG_ENV}=CONFIG", file=sys.stderr)
    return path


def _config_or_demo(args) -> str:
    return args.config or os.environ.get(CONFIG_ENV) or DEMO_CONFIG


def _config_check(args) -> int:
    from loop.config import ConfigError, load_config

    bad = 0
    for path in args.files:
        try:
            cfg = load_config(path)
            if cfg.student.tool_call_parser:
                from loop.serving.engine import tool_parser_problem

                if problem := tool_parser_problem(cfg.student.tool_call_parser, cfg.model_path(cfg.student)):
                    raise ConfigError(f"{path}: {problem}")
            print(f"{path}: ok ({cfg.name}: {len(cfg.endpoints())} endpoint(s), student {cfg.student.name})")
        except ConfigError as e:
            print(e, file=sys.stderr)
            bad += 1
    return 1 if bad else 0


def _models_fetch(args) -> int:
    from loop.config import ConfigError, load_config
    from loop.models.fetch import ModelMissing, ensure_models

    try:
        out = ensure_models(load_config(_config_or_demo(args)), force=args.force)
    except (ConfigError, ModelMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for role, m in out.items():
        print(f"{role}: {m['name']} {m['num_parameters'] / 1e6:.1f}M parameters, {m['digest'][:19]}")
    return 0


def _keys_hash(args) -> int:
    from loop.config import hash_api_key

    print(hash_api_key(args.key))
    return 0


def _run(args) -> int:
    from loop.driver import main

    return main(args.config, args.cycles, args.report_json, forever=args.forever, endpoints=args.endpoint)


def _report(args) -> int:
    """The report of every finished cycle on disk (or the last N per endpoint), as the demo writes it."""
    from loop.config import ConfigError, load_config
    from loop.driver import write_run_report

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cycles = []
    for _, e in cfg.endpoints():
        done = sorted(int(p.parent.name.split("-")[1]) for p in cfg.storage.path("cycles", e.id).glob("cycle-*/report.json"))
        cycles += [(e.id, n) for n in (done[-args.last:] if args.last else done)]
    if not cycles:
        print(f"error: no finished cycle under {cfg.storage.path('cycles')}; run `loopctl run {args.config}` first",
              file=sys.stderr)
        return 2
    write_run_report(cfg, cycles, run=args.run)
    return 0


def _lineage(args) -> int:
    """One version's chain, from the cycle that made it to the requests it served."""
    import json

    from loop.config import ConfigError, load_config
    from loop.lineage.chain import chain, render

    if (path := _config_path(args)) is None:
        return 2
    try:
        c = chain(load_config(path), args.endpoint, args.version)
    except (ConfigError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    print(json.dumps(c, indent=2, default=str) if args.json else render(c))
    return 0


def _serve(args) -> int:
    """Serve what MLflow says is live, until interrupted; the teacher at the latest cycle's epoch."""
    import time

    from loop.config import ConfigError, load_config
    from loop.driver import check_models, latest_epoch
    from loop.models.fetch import ModelMissing
    from loop.cluster import (announce_serving, embedded, running_server, start_services, stop_services,
                               withdraw_serving)

    try:
        cfg = load_config(args.config)
        check_models(cfg)
    except (ConfigError, ModelMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if embedded(cfg) and (server := running_server(cfg)):
        print(f"error: `loopctl serve` of {cfg.storage.path()} is already up (pid {server['pid']}, gateway "
              f"{server['gateway_url']}); stop it first, or run `loopctl run` beside it", file=sys.stderr)
        return 2
    try:
        services = start_services(cfg, epoch=latest_epoch(cfg))
        for tenant, endpoint in cfg.endpoints():
            info = services.lineage.version_info(endpoint.id)
            print(f"model-{endpoint.id} (tenant {tenant.id}): {info['version']} at {services.gateway_url}")
        if embedded(cfg):
            announce_serving(cfg, services.gateway_url)
            print(f"`loopctl run {args.config}` learns beside this server (it joins its Ray cluster; serving "
                  "never stops)")
        print("serving; Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        withdraw_serving(cfg)
        stop_services(cfg)


def _admin_call(args, method: str, route: str, body: dict | None = None) -> int:
    """An admin API call to the running gateway (`serving.host:port` of the config, or --url), with
    the admin key from $LOOP_ADMIN_KEY; prints the JSON answer, exit 1 on an error answer."""
    import json

    import httpx

    from loop.config import ConfigError, load_config

    url = args.url
    if not url:  # the config is only needed to find the gateway
        if (path := _config_path(args)) is None:
            return 2
        try:
            url = f"http://{(cfg := load_config(path)).serving.host}:{cfg.serving.port}"
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    key = os.environ.get("LOOP_ADMIN_KEY")
    if not key:
        print("error: set LOOP_ADMIN_KEY to the admin key whose sha256 is serving.admin_key_hash", file=sys.stderr)
        return 2
    try:
        r = httpx.request(method, f"{url.rstrip('/')}{route}", json=body, timeout=600,
                          headers={"Authorization": f"Bearer {key}"})
    except httpx.HTTPError as e:
        print(f"error: no gateway at {url} ({e}); is the loop serving (make serve)?", file=sys.stderr)
        return 2
    print(json.dumps(r.json(), indent=2))
    return 0 if r.status_code < 400 else 1


def _promote(args) -> int:
    return _admin_call(args, "POST", "/admin/promote", {"model": args.model})


def _rollback(args) -> int:
    return _admin_call(args, "POST", "/admin/rollback", {"model": args.model})


def _status(args) -> int:
    return _admin_call(args, "GET", "/admin/status")


BENCHMARKS = ("serving", "draft", "distill", "merge", "rollout", "reliability", "domain")


def _bench(args) -> int:
    """Run benchmarks/NAME.py and write benchmarks/results/NAME.json with the machine it ran on."""
    import importlib
    import json
    import platform
    import time
    from pathlib import Path

    from loop.config import ConfigError, load_config
    from loop.models.fetch import ModelMissing

    config = _config_or_demo(args)
    try:
        cfg = load_config(config)
        started = time.time()
        result = importlib.import_module(f"benchmarks.{args.name}").run(cfg)
    except (ConfigError, ModelMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    result["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                         "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                         "python": platform.python_version()}
    result["config"] = config
    result["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    result["seconds"] = time.time() - started
    out = Path(args.out_dir) / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
    print(f"wrote {out}")
    return 0


def _traces_import(args) -> int:
    """A JSONL file of chat completions into the trace log; every problem with its line, or nothing."""
    from loop.config import ConfigError, load_config
    from loop.data.importer import ImportRefused, import_file

    if (path := _config_path(args)) is None:
        return 2
    try:
        result = import_file(load_config(path), args.file, endpoint=args.endpoint)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or args.file}: {e.strerror or e}", file=sys.stderr)
        return 2
    except ImportRefused as e:
        for problem in e.problems:
            print(f"{args.file}: {problem}", file=sys.stderr)
        lines = len({p.line for p in e.problems if p.line is not None})
        print(f"error: {len(e.problems)} problem(s)" + (f" on {lines} line(s)" if lines else "")
              + f" of {args.file}; nothing was imported", file=sys.stderr)
        return 2
    if result.already_imported:
        print(f"{args.file} ({result.digest}) was imported before: nothing added")
        return 0
    per = ", ".join(f"model-{e}: {n}" for e, n in sorted(result.endpoints.items()))
    print(f"imported {result.records} records ({per}) and {result.feedback} feedback rows from {args.file} "
          f"({result.digest})")
    return 0


def _traces_show(args) -> int:
    """Records per endpoint and source (live, imported), feedback rows, and the imported files."""
    from collections import Counter

    from loop.config import ConfigError, load_config
    from loop.data.importer import imports
    from loop.traces.log import read_feedback, read_traces

    if (path := _config_path(args)) is None:
        return 2
    try:
        root = load_config(path).storage.path("traces")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [r for r in read_traces(root) if args.source in (None, r.get("source") or "live")]
    counts = Counter((r["endpoint"] or "(refused)", r.get("source") or "live") for r in rows)
    print(f"{'endpoint':<24} {'source':<9} records")
    for (endpoint, source), n in sorted(counts.items()):
        print(f"{endpoint:<24} {source:<9} {n}")
    ids = {r["request_id"] for r in rows}
    print(f"feedback rows: {sum(f['request_id'] in ids for f in read_feedback(root))}")
    for digest, row in imports(root).items():
        print(f"imported: {row['file']} ({digest}): {row['records']} records, {row['feedback']} feedback rows")
    return 0


def _merge(args) -> int:
    """Merge an adapter into a base, prove it, and print the MergeReport; exit 1 when refused or disproved."""
    import json
    from pathlib import Path

    from loop.config import EngineConfig, MergeConfig
    from loop.merge.merger import MergeFailed, Merger

    cfg = MergeConfig(**({"max_abs_logit_diff": args.max_abs_logit_diff} if args.max_abs_logit_diff else {}))
    engine = EngineConfig().model_dump() if args.engine_proof else None
    try:
        report = Merger(cfg).run(Path(args.base), Path(args.adapter), Path(args.out), engine=engine)
    except MergeFailed as e:
        print(f"error: merge refused: {e} (report: {Path(args.out).parent / 'merge_report.json'})", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=2))
    return 0


CONFIG_HELP = f"the loop's config (default: ${CONFIG_ENV}; one of the two is required)"
DEMO_HELP = f"the config (default: ${CONFIG_ENV}, else {DEMO_CONFIG})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loopctl", description="continual-loop control")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("config", help="config files").add_subparsers(dest="sub", required=True)
    ck = c.add_parser("check", help="validate config files; errors name the field")
    ck.add_argument("files", nargs="+")
    ck.set_defaults(fn=_config_check)
    m = sub.add_parser("models", help="student and draft models").add_subparsers(dest="sub", required=True)
    mf = m.add_parser("fetch", help="fetch/convert the student and build the draft under .loop/models")
    mf.add_argument("--config", default=None, help=DEMO_HELP)
    mf.add_argument("--force", action="store_true")
    mf.set_defaults(fn=_models_fetch)
    k = sub.add_parser("keys", help="API keys").add_subparsers(dest="sub", required=True)
    kh = k.add_parser("hash", help="print the sha256:<hex> form a config stores")
    kh.add_argument("key")
    kh.set_defaults(fn=_keys_hash)
    r = sub.add_parser("run", help="run N cycles of the loop")
    r.add_argument("config")
    when = r.add_mutually_exclusive_group()
    when.add_argument("--cycles", type=int, default=1, help="cycles per endpoint (default 1)")
    when.add_argument("--forever", action="store_true",
                      help="until interrupted: cycles when schedule says, promotion decisions in between")
    r.add_argument("--endpoint", action="append", default=None, help="only this endpoint (repeatable)")
    r.add_argument("--report-json", default=None)
    r.set_defaults(fn=_run)
    rp = sub.add_parser("report", help="the continual-learning report (plot, cost) of the finished cycles")
    rp.add_argument("config")
    rp.add_argument("--last", type=int, default=0, help="only the last N cycles of each endpoint")
    rp.add_argument("--run", default=None, help="report name under .loop/reports/ (default: config name + time)")
    rp.set_defaults(fn=_report)
    ln = sub.add_parser("lineage", help="a version's chain: cycle, data, adapter, merge, draft, gate, deployments")
    ln.add_argument("endpoint", help="model-<id> or <id>")
    ln.add_argument("version", nargs="?", type=int, default=None, help="version number (default: the champion)")
    ln.add_argument("--config", default=None, help=CONFIG_HELP)
    ln.add_argument("--json", action="store_true")
    ln.set_defaults(fn=_lineage)
    s = sub.add_parser("serve", help="serve the registry's champions until Ctrl-C")
    s.add_argument("config")
    s.set_defaults(fn=_serve)
    mg = sub.add_parser("merge", help="merge a LoRA adapter into its base and prove the merge")
    mg.add_argument("--base", required=True, help="base model directory (safetensors, possibly sharded or quantized)")
    mg.add_argument("--adapter", required=True, help="peft LoRA adapter directory")
    mg.add_argument("--out", required=True, help="merged model directory (the report goes beside it)")
    mg.add_argument("--max-abs-logit-diff", type=float, default=None)
    mg.add_argument("--engine-proof", action=argparse.BooleanOptionalAction, default=True,
                    help="proof 4: start vLLM on the merged directory and compare its greedy answers (~45 s on CPU)")
    mg.set_defaults(fn=_merge)
    for name, fn, text in (("promote", _promote, "make the challenger the champion now (admin API)"),
                           ("rollback", _rollback, "drop the challenger, or return to the previous champion")):
        a = sub.add_parser(name, help=text)
        a.add_argument("model", help="the endpoint, model-<id> or <id>")
        a.add_argument("--config", default=None, help=CONFIG_HELP)
        a.add_argument("--url", default=None, help="the gateway (default: the config's serving host and port)")
        a.set_defaults(fn=fn)
    st = sub.add_parser("status", help="what every endpoint serves: champion, challenger, weight (admin API)")
    st.add_argument("--config", default=None, help=CONFIG_HELP)
    st.add_argument("--url", default=None)
    st.set_defaults(fn=_status)
    b = sub.add_parser("bench", help="run a benchmark, write benchmarks/results/NAME.json")
    b.add_argument("name", choices=BENCHMARKS)
    b.add_argument("--config", default=None, help=DEMO_HELP)
    b.add_argument("--out-dir", default="benchmarks/results")
    b.set_defaults(fn=_bench)
    t = sub.add_parser("traces", help="the trace log").add_subparsers(dest="sub", required=True)
    ti = t.add_parser("import", help="bring your own logs: a JSONL file of chat completions into the trace log")
    ti.add_argument("file", help='one object a line: {"messages", "response", "model"?, "user"?, "score"?, '
                                 '"label"?, "created"?}, or {"request": {...}, "response": {...}}')
    ti.add_argument("--config", default=None, help=CONFIG_HELP)
    ti.add_argument("--endpoint", default=None,
                    help="model-<id> or <id> of lines that name no model (default: the config's only endpoint)")
    ti.set_defaults(fn=_traces_import)
    ts = t.add_parser("show", help="records per endpoint and source, feedback rows, imported files")
    ts.add_argument("--config", default=None, help=CONFIG_HELP)
    ts.add_argument("--source", choices=("live", "imported"), default=None)
    ts.set_defaults(fn=_traces_show)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
