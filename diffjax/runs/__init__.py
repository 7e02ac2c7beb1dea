"""The run on disk: config.json, integrity-checked Orbax checkpoints, and `load` of a trained run."""

from diffjax.runs import checkpoint  # noqa: F401
from diffjax.runs.run import CHECKPOINT_DIR, CONFIG_FILE, Run, load, read_config, save_config  # noqa: F401
