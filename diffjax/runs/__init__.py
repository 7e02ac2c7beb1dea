"""The run on disk: config.json, integrity-checked Orbax checkpoints, `load` of a trained run, and
the workdir lock that keeps one run per workdir."""

from diffjax.runs import checkpoint, lock  # noqa: F401
from diffjax.runs.lock import WorkdirLock, WorkdirLocked  # noqa: F401
from diffjax.runs.run import CHECKPOINT_DIR, CONFIG_FILE, Run, load, read_config, save_config  # noqa: F401
