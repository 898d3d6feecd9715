"""``python -m course_lib``: run the pruning pipeline and write a report folder.

    python -m course_lib demo                       # the embedded decoder, ci profile defaults
    python -m course_lib run --param-fraction 0.2 --out reports/smollm2-20   # the planner picks the mix
    python -m course_lib run --model minilm-l6 --head-fraction 0.25 --out reports/minilm
    python -m course_lib examples --out data/own    # two files of data the course never uses
    python -m course_lib run --model minilm-l6 --train-file data/own/amazon_reviews.csv --text-column review \
        --label-column sentiment --head-fraction 0.25 --out reports/amazon
    python -m course_lib run --text-file data/own/lee_news.txt --layers 6 --quantize int4 int8 --out reports/lee
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys

from .errors import CourseError
from .pipeline import QUANTIZERS, PruningConfig, run

DEMO = PruningConfig(model="smollm2-135m", param_fraction=0.2)  # every format in PruningConfig.quantize


# settings whose default (None) the profile or the task fills in: the type to parse, and what the default is
TASK_DEFAULTS = {"recovery_tokens": (int, "the profile's budget for the task"),
                 "learning_rate": (float, "the task's (decoder 3e-4, encoder 5e-5)")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m course_lib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune, recover and quantize the embedded decoder (ci profile)")
    demo.add_argument("--out", default="reports/demo")
    examples = sub.add_parser("examples", help="write two data files the course never uses, to try "
                              "--train-file and --text-file on")
    examples.add_argument("--out", default="data/own")
    runner = sub.add_parser("run", help="run the pipeline with explicit settings")
    runner.add_argument("--out", required=True)
    defaults = PruningConfig()
    for f in dataclasses.fields(PruningConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "quantize":
            runner.add_argument(flag, nargs="*", default=list(default), help=f"any of {', '.join(QUANTIZERS)}")
        elif isinstance(default, bool):
            runner.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"default: {default}")
        elif f.name in TASK_DEFAULTS:
            kind, meaning = TASK_DEFAULTS[f.name]
            runner.add_argument(flag, type=kind, default=None, help=f"default: {meaning}")
        else:
            shown = default if default != "" else "none (the course's data)"
            runner.add_argument(flag, type=type(default), default=default, help=f"default: {shown}")
    return parser


FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(PruningConfig)}
_ASSIGNED = re.compile(r"(?<![\w-])(" + "|".join(FLAGS) + r")=")


def _one_line(error: CourseError) -> str:
    """The error as the CLI says it: one line, the settings it names written as the flags that set them.

    The package speaks of config fields (``head_fraction=0.99``), the user typed flags
    (``--head-fraction 0.99``): every ``field=`` becomes ``--flag=``, and so does the setting the
    error is about (``SettingError.setting``) where the message starts with it.
    """
    message = " ".join(str(error).split())
    setting = getattr(error, "setting", None)
    if setting in FLAGS and message.startswith(setting):
        message = FLAGS[setting] + message[len(setting):]
    return "error: " + _ASSIGNED.sub(lambda match: FLAGS[match.group(1)] + "=", message)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; exit code 2 with one line on stderr for anything the package refuses on purpose, as argparse does."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "examples":
            from .user_data import write_examples

            for path, what in write_examples(args.out).items():
                print(f"{path}: {what}")
            return 0
        if args.command == "demo":
            config = DEMO
        else:
            values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PruningConfig)}
            config = PruningConfig(**{**values, "quantize": tuple(values["quantize"])})
        history = run(config, args.out)
    except CourseError as error:
        print(_one_line(error), file=sys.stderr)
        return 2
    print(open(f"{args.out}/report.md").read())
    return 0 if history else 1


if __name__ == "__main__":
    sys.exit(main())
