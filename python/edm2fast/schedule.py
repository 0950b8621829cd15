"""Learning-rate schedule of EDM2 (spec §6; paper Eq. 69, "inverse square root decay").

    t  = cur_nimg / batch_size                      (training iterations so far)
    lr = ref_lr / sqrt(max(t / t_ref, 1))           (constant, then 1/sqrt(t) decay)
    lr = lr * min(cur_nimg / (rampup_Mimg * 1e6), 1)  (linear warm-up; rampup_Mimg = 0: none)
"""

import math

__all__ = ['learning_rate']


def _check_number(name, value, *, positive=False):
    """Return `value` as a float; ValueError naming the argument if negative (or not positive)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f'{name} must be a real number, got {value!r}') from None
    if not math.isfinite(value):
        raise ValueError(f'{name} must be finite, got {value!r}')
    if positive and value <= 0:
        raise ValueError(f'{name} must be > 0, got {value!r}')
    if value < 0:
        raise ValueError(f'{name} must be >= 0, got {value!r}')
    return value


def learning_rate(cur_nimg, batch_size, ref_lr=100e-4, ref_batches=70e3, rampup_Mimg=10):
    """Learning rate after `cur_nimg` training images (spec §6, paper Eq. 69).

    Args:
        cur_nimg: images seen so far (>= 0).
        batch_size: images per optimizer step (> 0); `cur_nimg / batch_size` is the
            iteration count `t`.
        ref_lr: base learning rate `alpha_ref` (>= 0).
        ref_batches: `t_ref`, the iteration at which the 1/sqrt(t) decay starts (> 0).
        rampup_Mimg: length of the linear warm-up in millions of images (>= 0; 0 = no warm-up).

    Returns:
        float: `ref_lr / sqrt(max(t / ref_batches, 1)) * min(cur_nimg / (rampup_Mimg*1e6), 1)`.
    """
    cur_nimg = _check_number('cur_nimg', cur_nimg)
    batch_size = _check_number('batch_size', batch_size, positive=True)
    ref_lr = _check_number('ref_lr', ref_lr)
    ref_batches = _check_number('ref_batches', ref_batches, positive=True)
    rampup_Mimg = _check_number('rampup_Mimg', rampup_Mimg)

    t = cur_nimg / batch_size
    lr = ref_lr / math.sqrt(max(t / ref_batches, 1.0))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1.0)
    return lr
