"""Published checkpoints → diffjax runs, without torch and without running anything they contain.

    import diffjax as dj
    from diffjax import convert
    convert.from_edm('edm-cifar10-32x32-cond-vp.pkl', 'runs/edm-cifar10')          # NVlabs/edm
    convert.from_edm('edm2-img64-s-1073741-0.075.pkl', 'runs/edm2-s')               # NVlabs/edm2
    convert.from_improved_diffusion('cifar10_uncond_50M_500K.pt', 'runs/iddpm',      # openai
                                    image_size=32, num_channels=128, num_res_blocks=3,
                                    learn_sigma=True, dropout=0.3, diffusion_steps=4000,
                                    noise_schedule='cosine')
    convert.from_diffusers('ddpm-cifar10-32', 'runs/ddpm')                          # diffusers
    run = dj.load('runs/edm-cifar10')        # an ordinary run: sample.py, evaluate.py, distill.py

Each `from_*` is `read_*(...).write(workdir)`; `read_*` returns a `Conversion` (config and
parameters in memory, `.denoiser()` for a Denoiser without writing anything). The command line is
`python -m diffjax.convert {edm,improved-diffusion,guided-diffusion,diffusers} SRC --workdir=OUT`,
where SRC may be an http(s) URL (downloaded once into a cache). See docs/convert.md.
"""

from diffjax.convert.diffusers import from_diffusers, read_diffusers  # noqa: F401
from diffjax.convert.download import fetch  # noqa: F401
from diffjax.convert.edm import from_edm, read_edm  # noqa: F401
from diffjax.convert.openai import (  # noqa: F401
    from_guided_diffusion,
    from_improved_diffusion,
    read_improved_diffusion,
)
from diffjax.convert.torch_pickle import UnsafePickleError, load_network_pickle  # noqa: F401
from diffjax.convert.workdir import Conversion, ConversionError  # noqa: F401
