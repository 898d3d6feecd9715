"""Companion package of the structured-pruning course.

The pipeline it mirrors: model + calibration data -> importance scores -> PruningPlan -> surgery
-> evaluate / recover / quantize / save. Import the pieces from their modules
(``course_lib.zoo``, ``course_lib.data``, ``course_lib.surgery`` ...); this file stays light so
that ``import course_lib`` never loads torch before it is needed.

``import course_lib`` alone is enough for ``AutoModel*.from_pretrained(dir)`` to load a pruned
checkpoint the package saved (no ``trust_remote_code``): the ``pruned_*`` model types are
registered with transformers' Auto classes by ``course_lib.pruned_modeling``. Importing that
module here would cost ~5 s (torch and six families' model classes) on every ``import
course_lib``, CLI and ``--help`` included, so instead the registration happens the moment
transformers itself is imported -- the only moment anybody can call ``from_pretrained`` -- or
right away if transformers is already imported. ``_RegisterOnTransformersImport`` does that: a
one-shot import hook that lets Python's own finders load transformers and then imports
``pruned_modeling``.
"""

import importlib
import importlib.abc
import importlib.util
import logging
import sys

__version__ = "0.1.0"

# Two import-time warnings of the pinned stack that say nothing about the user's work: torchao 0.18
# tries to load its CUDA / cp310 extensions ("Failed to load ..._C_mxfp8...so") and registers enums
# the way torch 2.13 deprecates. Its CPU paths, which benchmarks/speed.py compares with
# course_lib.lowbit, work without them. Silenced by logger name, before anything imports torchao.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)


def _register_pruned_models() -> None:
    """Importing ``pruned_modeling`` registers every ``pruned_*`` config and model class with the Auto classes."""
    importlib.import_module(f"{__name__}.pruned_modeling")


class _RegisterOnTransformersImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``transformers`` is first imported, wraps the real loader so that
    ``_register_pruned_models`` runs as soon as the package has been executed, then leaves ``sys.meta_path``."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; and the lookup below must not find this finder again
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                _register_pruned_models()

            spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_pruned_models()
else:
    sys.meta_path.insert(0, _RegisterOnTransformersImport())
