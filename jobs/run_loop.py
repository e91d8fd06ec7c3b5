"""Ray job entrypoint: run N cycles of the loop for a config.

    python jobs/run_loop.py --config configs/demo.yaml --cycles 1
    ray job submit --working-dir . -- python jobs/run_loop.py --config configs/demo.yaml --cycles 1
"""
import argparse
import sys

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--cycles", type=int, default=1)
    parser.add_argument("--report-json", default=None, help="also write the cycle reports here")
    args = parser.parse_args()
    from loop.driver import main

    sys.exit(main(args.config, args.cycles, args.report_json))
