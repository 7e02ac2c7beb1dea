"""The DDPM++ / NCSN++ U-Net of Song et al. 2021, in the form EDM (Karras et al. 2022) reimplemented it.

DDPM++: positional noise embedding, box resampling [1, 1], standard encoder and decoder.
NCSN++: random Fourier noise embedding (twice as wide), FIR resampling [1, 3, 3, 1], residual encoder
(a second, progressively downsampled image path added at every level).

The network is F(x, c_noise, class, augment) of EDM eq. 7 and knows nothing of σ: the preconditioning
(diffjax.precond) scales its input and output. Submodule names follow EDM's (`enc_32x32_block0`,
`dec_16x16_up`, ...) so that the parameter tree reads like the paper's figure and a converted EDM
checkpoint maps onto it one to one.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.embeddings import FourierEmbedding, PositionalEmbedding, conditioning_labels
from diffjax.models.layers import (
  Conv2d,
  GroupNorm,
  Init,
  Linear,
  UNetBlock,
  check_remat,
  remat_block,
)

Array = jax.Array

_EMBEDDINGS = ('positional', 'fourier')
_ENCODERS = ('standard', 'skip', 'residual')
_DECODERS = ('standard', 'skip')

# EDM's SongUNet initialization: Xavier-uniform everywhere, zero biases, output layers scaled by 1e-5
# (not exactly 0, so their gradients w.r.t. earlier layers are not all zero at step 0), and the qkv
# projection scaled by sqrt(0.2).
_INIT = Init('xavier_uniform')
_INIT_ZERO = Init('xavier_uniform', weight=1e-5)
_INIT_ATTN = Init('xavier_uniform', weight=math.sqrt(0.2))
# Guidance weights w ∈ [0, 4] times 250 span the 0…1000 range of DDPM step indices.
GUIDANCE_EMBEDDING_SCALE = 250.0


class SongUNet(nn.Module):
  """DDPM++ / NCSN++ U-Net (NHWC).

  Attributes:
    img_resolution: input and output height = width.
    in_channels: channels of x.
    out_channels: channels of the output.
    label_dim: number of classes; 0 = unconditional.
    augment_dim: width of the augmentation label (EDM: 9); 0 = none.
    model_channels: base width.
    channel_mult: width multiplier per resolution level (level i runs at img_resolution / 2^i).
    channel_mult_emb: embedding width = model_channels · channel_mult_emb.
    num_blocks: residual blocks per level in the encoder (the decoder has one more).
    attn_resolutions: resolutions whose blocks get self-attention.
    dropout: dropout probability inside the blocks.
    label_dropout: probability of replacing the class label by the null (all-zero) label in training,
      for classifier-free guidance.
    embedding_type: 'positional' (DDPM++) or 'fourier' (NCSN++).
    channel_mult_noise: noise-embedding width = model_channels · channel_mult_noise (1 DDPM++, 2 NCSN++).
    encoder_type: 'standard', 'skip' (add a downsampled copy of the input at every level) or
      'residual' (NCSN++: a strided conv path from the input, averaged into the features).
    decoder_type: 'standard' (one output head at full resolution) or 'skip' (an output head per level,
      upsampled and summed).
    resample_filter: taps of the up/down-sampling filter ((1, 1) DDPM++, (1, 3, 3, 1) NCSN++).
    fourier_freqs: the NCSN++ noise embedding's frequencies (model_channels · channel_mult_noise / 2
      floats), as a converted EDM checkpoint stores them; None draws them from a fixed seed.
    guidance_embedding: take a guidance weight w (guided distillation, Meng et al. 2022 §4.1): a
      sinusoidal embedding of w, through a zero-initialized map, is added to the noise embedding,
      so a student made from a teacher's weights starts as that teacher.
    dtype: compute dtype; parameters stay float32 and the output is float32.
    remat: rematerialization of the blocks in the backward pass: 'none', 'blocks' (recompute the
      elementwise work) or 'full' (recompute each block); see `layers.REMAT_POLICIES`. The
      parameter tree is the same in every mode.
  """

  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.10
  label_dropout: float = 0.0
  embedding_type: str = 'positional'
  channel_mult_noise: int = 1
  encoder_type: str = 'standard'
  decoder_type: str = 'standard'
  resample_filter: Sequence[int] = (1, 1)
  fourier_freqs: Optional[Sequence[float]] = None
  guidance_embedding: bool = False
  dtype: Any = jnp.float32
  remat: str = 'none'

  def _check(self, x: Array) -> None:
    """Fails with one sentence on a bad configuration or input shape."""
    for field, value, allowed in (
      ('embedding_type', self.embedding_type, _EMBEDDINGS),
      ('encoder_type', self.encoder_type, _ENCODERS),
      ('decoder_type', self.decoder_type, _DECODERS),
    ):
      if value not in allowed:
        raise ValueError(f'Unknown SongUNet {field} {value!r}; known: {", ".join(allowed)}.')
    check_remat(self.remat)
    levels = len(self.channel_mult)
    if levels < 1 or self.img_resolution % (2 ** (levels - 1)):
      raise ValueError(
        f'img_resolution {self.img_resolution} must be divisible by 2^{levels - 1} for '
        f'channel_mult {tuple(self.channel_mult)}; use fewer levels or a larger image.'
      )
    expected = (self.img_resolution, self.img_resolution, self.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
      raise ValueError(
        f'SongUNet expects x of shape [B, {expected[0]}, {expected[1]}, {expected[2]}] '
        f'(NHWC), got {tuple(x.shape)}.'
      )

  def _embed(
    self,
    noise_labels: Array,
    class_labels: Optional[Array],
    augment_labels: Optional[Array],
    batch: int,
    train: bool,
    guidance: Optional[Array] = None,
  ) -> Array:
    """The conditioning vector [B, model_channels · channel_mult_emb] shared by every block."""
    noise_ch = self.model_channels * self.channel_mult_noise
    emb_ch = self.model_channels * self.channel_mult_emb
    dt = self.dtype
    noise_labels = jnp.broadcast_to(jnp.asarray(noise_labels, jnp.float32).reshape(-1), (batch,))
    if self.embedding_type == 'positional':
      emb = PositionalEmbedding(noise_ch, endpoint=True, name='map_noise')(noise_labels)
    else:
      emb = FourierEmbedding(noise_ch, freqs=self.fourier_freqs, name='map_noise')(noise_labels)
    # The embeddings return [cos, sin]; Song et al.'s networks use [sin, cos].
    emb = jnp.concatenate(jnp.split(emb, 2, axis=-1)[::-1], axis=-1).astype(dt)

    if self.label_dim:
      labels = conditioning_labels(class_labels, self.label_dim, batch,
                                   label_dropout=self.label_dropout,
                                   dropout_key=self.make_rng('dropout') if train and self.label_dropout else None)
      # sqrt(label_dim) makes a one-hot vector unit-variance per entry, like the noise embedding.
      emb = emb + Linear(noise_ch, init_spec=_INIT, dtype=dt, name='map_label')(
        labels * math.sqrt(self.label_dim)
      )

    if self.augment_dim:
      if augment_labels is None:  # No augmentation: zeros (the map has no bias, so this adds 0).
        augment_labels = jnp.zeros((batch, self.augment_dim), jnp.float32)
      if augment_labels.shape != (batch, self.augment_dim):
        raise ValueError(
          f'augment_labels must have shape [{batch}, {self.augment_dim}], '
          f'got {tuple(augment_labels.shape)}.'
        )
      emb = emb + Linear(noise_ch, use_bias=False, init_spec=_INIT, dtype=dt, name='map_augment')(
        augment_labels
      )

    if self.guidance_embedding:
      # w ∈ [0, 4] scaled to the index range the positional embedding was made for; the map starts
      # at exactly zero, so the new input is a no-op until the student learns to use it.
      w = jnp.zeros((batch,), jnp.float32) if guidance is None else guidance
      w = jnp.broadcast_to(jnp.asarray(w, jnp.float32).reshape(-1), (batch,))
      w_emb = PositionalEmbedding(noise_ch, endpoint=True, name='map_guidance_pos')(
        w * GUIDANCE_EMBEDDING_SCALE
      )
      emb = emb + Linear(noise_ch, init_spec=Init('xavier_uniform', weight=0.0), dtype=dt,
                         name='map_guidance')(w_emb.astype(dt))

    emb = nn.silu(Linear(emb_ch, init_spec=_INIT, dtype=dt, name='map_layer0')(emb))
    return nn.silu(Linear(emb_ch, init_spec=_INIT, dtype=dt, name='map_layer1')(emb))

  @nn.compact
  def __call__(
    self,
    x: Array,
    noise_labels: Array,
    class_labels: Optional[Array] = None,
    augment_labels: Optional[Array] = None,
    train: bool = False,
    guidance: Optional[Array] = None,
  ) -> Array:
    """Applies the network.

    Args:
      x: [B, H, W, in_channels] input (already scaled by c_in).
      noise_labels: [B] noise conditioning c_noise (a scalar is broadcast).
      class_labels: [B, label_dim] one-hot float labels; None gives the null (all-zero) label.
        Ignored when label_dim == 0.
      augment_labels: [B, augment_dim] augmentation labels; None means no augmentation.
        Ignored when augment_dim == 0.
      train: enables dropout and label dropout (both draw from the 'dropout' rng).
      guidance: [B] (or scalar) guidance weights w when guidance_embedding is set; None means w = 0.

    Returns:
      [B, H, W, out_channels] float32.
    """
    self._check(x)
    if guidance is not None and not self.guidance_embedding:
      raise ValueError('This network takes no guidance weight; build it with guidance_embedding=True '
                       '(a guided-distillation student) or sample it with classifier-free guidance.')
    dt = self.dtype
    batch = x.shape[0]
    emb = self._embed(noise_labels, class_labels, augment_labels, batch, train, guidance)
    block_cls = remat_block(UNetBlock, self.remat)
    block = lambda feats, name, **kw: block_cls(
      feats,
      num_heads=1,
      dropout=self.dropout,
      skip_scale=math.sqrt(0.5),
      eps=1e-6,
      resample_filter=tuple(self.resample_filter),
      resample_proj=True,
      adaptive_scale=False,
      init_spec=_INIT,
      init_zero=_INIT_ZERO,
      init_attn=_INIT_ATTN,
      dtype=dt,
      name=name,
      **kw,
    )
    resample = lambda name, **kw: Conv2d(
      0, 0, resample_filter=tuple(self.resample_filter), dtype=dt, name=name, **kw
    )

    # Encoder: every block output is kept as a skip connection for the decoder.
    x = jnp.asarray(x, dt)
    aux = x
    skips = []
    cout = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      tag = f'{res}x{res}'
      if level == 0:
        cout = self.model_channels
        x = Conv2d(cout, 3, init_spec=_INIT, dtype=dt, name=f'enc_{tag}_conv')(x)
        skips.append(x)
      else:
        x = block(cout, f'enc_{tag}_down', down=True)(x, emb, train)
        skips.append(x)
        if self.encoder_type == 'skip':
          aux = resample(f'enc_{tag}_aux_down', down=True)(aux)
          x = skips[-1] = x + Conv2d(
            cout, 1, init_spec=_INIT, dtype=dt, name=f'enc_{tag}_aux_skip'
          )(aux)
        elif self.encoder_type == 'residual':
          aux_res = Conv2d(
            cout,
            3,
            down=True,
            resample_filter=tuple(self.resample_filter),
            fused_resample=True,
            init_spec=_INIT,
            dtype=dt,
            name=f'enc_{tag}_aux_residual',
          )
          x = skips[-1] = aux = (x + aux_res(aux)) * jnp.asarray(math.sqrt(0.5), dt)
      for idx in range(self.num_blocks):
        cout = self.model_channels * mult
        x = block(cout, f'enc_{tag}_block{idx}', attention=res in self.attn_resolutions)(
          x, emb, train
        )
        skips.append(x)

    # Decoder: the lowest level starts with two blocks (the first with attention); every other level
    # with an upsampling block. Each level then has num_blocks + 1 blocks fed with a skip each.
    out = None
    last = len(self.channel_mult) - 1
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      tag = f'{res}x{res}'
      if level == last:
        x = block(cout, f'dec_{tag}_in0', attention=True)(x, emb, train)
        x = block(cout, f'dec_{tag}_in1')(x, emb, train)
      else:
        x = block(cout, f'dec_{tag}_up', up=True)(x, emb, train)
      for idx in range(self.num_blocks + 1):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        cout = self.model_channels * mult
        attn = idx == self.num_blocks and res in self.attn_resolutions
        x = block(cout, f'dec_{tag}_block{idx}', attention=attn)(x, emb, train)
      if self.decoder_type == 'skip' or level == 0:
        if self.decoder_type == 'skip' and level < last:
          out = resample(f'dec_{tag}_aux_up', up=True)(out)
        h = nn.silu(GroupNorm(eps=1e-6, dtype=dt, name=f'dec_{tag}_aux_norm')(x))
        h = Conv2d(
          self.out_channels, 3, init_spec=_INIT_ZERO, dtype=dt, name=f'dec_{tag}_aux_conv'
        )(h)
        out = h if out is None else h + out
    return out.astype(jnp.float32)
