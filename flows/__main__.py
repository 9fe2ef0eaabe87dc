"""``python -m flows run|serve``: run the fine-tuning flow once, or serve it on a cron schedule.

    python -m flows run [--params params.yaml] [--out-dir outputs/samples] [overrides ...]
    python -m flows serve --cron "0 3 * * *" [--name NAME] [--params params.yaml] [overrides ...]

Only these commands' own flags are parsed here; the cogvx configuration is passed through as a
params file plus dotted ``section.key=value`` overrides (e.g. ``train.max_steps=50``), exactly as
on the cogvx command line, and validated by cogvx itself.
"""

from __future__ import annotations

import argparse
import json
import sys

from flows.finetune import SERVED_NAME


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m flows",
                                   description="Run the cogvx fine-tuning flow once, or serve it on a cron schedule.")
    commands = main.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--params", default="params.yaml",
                         help="params.yaml path (default: %(default)s); 'none' for the built-in defaults")
        sub.add_argument("--out-dir", default="outputs/samples",
                         help="folder the sample clip flow-sample.mp4 is rendered to (default: %(default)s)")
        sub.add_argument("overrides", nargs="*", metavar="section.key=value",
                         help="cogvx config overrides, e.g. train.max_steps=50")
        return sub

    add("run", "run the fine-tuning flow once and print its summary as JSON")
    serve = add("serve", "serve the flow as a deployment on a cron schedule (blocks until stopped)")
    serve.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *" (03:00 daily)')
    serve.add_argument("--name", default=SERVED_NAME, help="deployment name (default: %(default)s)")
    return main


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    # Overrides may come before or after the flags: collect the ones argparse left over.
    args, extra = cli.parse_known_args(argv)
    unknown = [arg for arg in extra if arg.startswith("-") or "=" not in arg]
    if unknown:
        cli.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    params = None if args.params.lower() == "none" else args.params
    from cogvx.config import load_config
    from cogvx.errors import ConfigError

    try:  # a bad params file or override fails here, before any Prefect server or run starts
        load_config(params, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    from flows.finetune import finetune, serve

    if args.command == "run":
        summary = finetune(params=params, overrides=args.overrides, out_dir=args.out_dir)
        print(json.dumps(summary, indent=2, default=str))
    else:
        serve(cron=args.cron, name=args.name, params=params, overrides=args.overrides,
              out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
