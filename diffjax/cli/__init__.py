"""What the four entry points share: process set-up, one-sentence errors, and the common flags."""

from diffjax.cli.errors import USER_ERRORS, error_message, parse_flags, run  # noqa: F401
from diffjax.cli.flags import (  # noqa: F401
                               GuidanceFlags,
                               SamplerFlags,
                               define_debug,
                               define_guidance_flags,
                               define_no_progress,
                               define_sampler_flags,
                               main,
)
from diffjax.cli.xla import CPU_XLA_FLAGS, enable_compilation_cache, quiet_logs, tune_xla_cpu  # noqa: F401
