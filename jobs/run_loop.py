"""Ray job entrypoint: run the loop for a config (N cycles per endpoint, or until stopped).

    python jobs/run_loop.py --config configs/demo.yaml --cycles 1
    ray job submit --working-dir . -- python jobs/run_loop.py --config configs/demo.yaml --cycles 2
    ray job submit --working-dir . -- python jobs/run_loop.py --config configs/gpu-7b.yaml --forever
"""
import argparse
import sys

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--cycles", type=int, default=1)
    when.add_argument("--forever", action="store_true")
    parser.add_argument("--endpoint", action="append", default=None, help="only this endpoint (repeatable)")
    parser.add_argument("--report-json", default=None, help="also write the cycle reports here")
    args = parser.parse_args()
    from loop.driver import main

    sys.exit(main(args.config, args.cycles, args.report_json, forever=args.forever, endpoints=args.endpoint))
