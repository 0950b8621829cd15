"""Power-function EMA and post-hoc EMA reconstruction (spec §7; paper Section 3 and Appendix C).

An EMA "profile" of length `t` and exponent `gamma` averages the training trajectory with the
weights

    p(tau) = (gamma + 1) * tau^gamma / t^(gamma + 1),   0 <= tau <= t           (paper Eq. 2-3)

whose width relative to `t` is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 * (gamma + 3)))               (paper Eq. 4)

Tracked online with `beta = (1 - dt/t)^(gamma + 1)`, `ema <- lerp(ema, net, 1 - beta)`: for
a trajectory held constant within each step this discrete update gives exactly the integral
of the continuous profile, so snapshots of tracked EMAs are linear functionals of the
trajectory, and any other profile can be approximated by least squares over those snapshots
(paper Appendix C.3, inner products below).

Times (`t`, offsets) may be in any unit (images, iterations): every result here is invariant
to a common rescaling of all of them.
"""

import copy
import math

import numpy as np
import torch

__all__ = [
    'exp_to_std', 'std_to_exp', 'power_function_beta', 'profile', 'inner_product',
    'solve_posthoc_coefficients', 'PowerFunctionEMA', 'MAX_STD',
]

# sigma_rel of gamma = 0 (a uniform average); any smaller positive sigma_rel has gamma > 0.
MAX_STD = math.sqrt(1 / 12)

# Bumped by torch's global registration hooks whenever a parameter, buffer or submodule is
# registered on any module: PowerFunctionEMA's cached (module, name) slots are listed again after
# any such change (a training step registers nothing, so they are listed once).
_REGISTRATIONS = [0]


def _count_registration(*_):
    _REGISTRATIONS[0] += 1  # returns None: the registered value is kept as it is


for _hook in ('register_module_parameter_registration_hook', 'register_module_buffer_registration_hook',
              'register_module_module_registration_hook'):
    getattr(torch.nn.modules.module, _hook)(_count_registration)


def _slots(module, named):
    """`(submodule, local name)` of every entry of `module.named_parameters()` / `named_buffers()`
    (`named` names the method), in that order (shared entries once, as `parameters()` lists them)."""
    out = []
    for full, _ in getattr(module, named)():
        prefix, _, name = full.rpartition('.')
        out.append((module.get_submodule(prefix) if prefix else module, name))
    return out


def _unwrap(x, scalar_input):
    return float(x) if scalar_input else x


def exp_to_std(gamma):
    """Relative standard deviation of the power-function profile of exponent `gamma` (Eq. 4).

    Accepts a scalar (returns float) or an array (returns ndarray); `gamma > -1`.
    """
    scalar = np.ndim(gamma) == 0
    gamma = np.asarray(gamma, dtype=np.float64)
    if not np.all(np.isfinite(gamma)) or np.any(gamma <= -1):
        raise ValueError(f'gamma must be finite and > -1, got {gamma}')
    std = np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))
    return _unwrap(std, scalar)


def std_to_exp(sigma_rel):
    """Exponent `gamma` of the power-function profile with relative std `sigma_rel` (spec §7).

    `gamma` is the largest real root of
        g^3 + 7 g^2 + (16 - sigma_rel^-2) g + (12 - sigma_rel^-2) = 0,
    i.e. Eq. 4 squared and rearranged. Requires 0 < sigma_rel < sqrt(1/12) ~= 0.2887 (gamma > 0).
    Accepts a scalar (returns float) or an array (returns ndarray of the same shape).
    """
    scalar = np.ndim(sigma_rel) == 0
    s = np.asarray(sigma_rel, dtype=np.float64)
    if not np.all(np.isfinite(s)) or np.any(s <= 0) or np.any(s >= MAX_STD):
        raise ValueError(f'sigma_rel must be in (0, {MAX_STD:.6f}) (sqrt(1/12)), got {sigma_rel}')
    c = s.ravel() ** -2
    # The cubic is negative at g = 0 and grows to +inf, so its largest real root is positive;
    # the roots sum to -7, so a complex pair (if any) has a negative real part and the root
    # with the largest real part is the wanted one.
    gamma = np.array([np.roots([1.0, 7.0, 16.0 - ci, 12.0 - ci]).real.max() for ci in c])
    for _ in range(2):  # Newton polish; the cubic is convex for g > -7/3, so this is safe.
        f = ((gamma + 7) * gamma + 16 - c) * gamma + 12 - c
        df = (3 * gamma + 14) * gamma + 16 - c
        gamma = gamma - f / df
    return _unwrap(gamma.reshape(s.shape), scalar)


def power_function_beta(std, t_next, t_delta):
    """EMA decay of one power-function update (spec §7): `(1 - t_delta / t_next)^(gamma + 1)`.

    Args:
        std: relative std `sigma_rel` of the tracked profile (`gamma = std_to_exp(std)`).
        t_next: length of the trajectory after the step (images seen after it), > 0.
        t_delta: length of the step (batch size), 0 <= t_delta <= t_next. The first step
            (`t_delta == t_next`) gives beta = 0: the EMA starts as a copy of the net.
    """
    return _beta_of_exp(std_to_exp(std), t_next, t_delta)


def _beta_of_exp(gamma, t_next, t_delta):
    """:func:`power_function_beta` for a known exponent `gamma` (what `PowerFunctionEMA` caches)."""
    t_next = np.asarray(t_next, dtype=np.float64)
    t_delta = np.asarray(t_delta, dtype=np.float64)
    if not np.all(np.isfinite(t_next)) or np.any(t_next <= 0):
        raise ValueError(f't_next must be > 0, got {t_next}')
    if not np.all(np.isfinite(t_delta)) or np.any(t_delta < 0) or np.any(t_delta > t_next):
        raise ValueError(f't_delta must be in [0, t_next], got {t_delta} (t_next={t_next})')
    beta = (1 - t_delta / t_next) ** (np.asarray(gamma) + 1)
    return _unwrap(beta, np.ndim(beta) == 0)


def profile(t, gamma, tau):
    """Power-function EMA weight `p(tau) = (gamma+1) tau^gamma / t^(gamma+1)` on [0, t], else 0.

    Eq. 2-3 of the paper; broadcasts over all arguments, returns float64 ndarray.
    """
    t = np.asarray(t, dtype=np.float64)
    gamma = np.asarray(gamma, dtype=np.float64)
    tau = np.asarray(tau, dtype=np.float64)
    inside = (tau >= 0) & (tau <= t)
    p = (gamma + 1) * np.where(inside, tau, 0.0) ** gamma / t ** (gamma + 1)
    return np.where(inside, p, 0.0)


def inner_product(t_a, g_a, t_b, g_b):
    """L2 inner product of two power-function profiles (spec §7, paper Appendix C.3).

        <p_a, p_b> = (g_a+1)(g_b+1) / (g_a+g_b+1) * r / max(t_a, t_b),
        r = (t_a/t_b)^g_b if t_a < t_b else (t_a/t_b)^(-g_a),

    i.e. the integral of `p_a * p_b` over [0, min(t_a, t_b)]. Broadcasts (float64).
    """
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    ratio = t_a / t_b
    r = np.where(t_a < t_b, ratio ** g_b, ratio ** -g_a)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * r / np.maximum(t_a, t_b)


def _check_profiles(name_ofs, ofs, name_std, std):
    ofs = np.asarray(ofs, dtype=np.float64).ravel()
    std = np.asarray(std, dtype=np.float64).ravel()
    if ofs.size == 0 or std.size == 0:
        raise ValueError(f'{name_ofs} and {name_std} must not be empty')
    try:
        ofs, std = np.broadcast_arrays(ofs, std)
    except ValueError:
        raise ValueError(f'{name_ofs} ({ofs.size}) and {name_std} ({std.size}) must have the '
                         'same length (or one of them length 1)') from None
    if not np.all(np.isfinite(ofs)) or np.any(ofs <= 0):
        raise ValueError(f'{name_ofs} must be > 0, got {ofs}')
    try:
        gamma = std_to_exp(std)
    except ValueError as e:
        raise ValueError(f'{name_std}: {e}') from None
    return ofs, gamma


def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std):
    """Coefficients that combine stored EMA snapshots into new EMA profiles (spec §7).

    Input profile `i` is a snapshot taken at `in_ofs[i]` of an EMA with `in_std[i]`; output
    profile `j` is the wanted EMA `(out_ofs[j], out_std[j])`. With `A_ik = <p_i, p_k>` and
    `B_ij = <p_i, p_j>` (`inner_product`), solve `A X = B` in float64 (least squares, after a
    symmetric diagonal equilibration of `A`), then rescale every column of `X` to sum 1.

    `theta_j = sum_i X[i, j] * theta_i`. Scalars broadcast (e.g. one std for every offset).

    Returns:
        ndarray float64 `[num_in, num_out]`.
    """
    in_ofs, in_gamma = _check_profiles('in_ofs', in_ofs, 'in_std', in_std)
    out_ofs, out_gamma = _check_profiles('out_ofs', out_ofs, 'out_std', out_std)
    A = inner_product(in_ofs[:, None], in_gamma[:, None], in_ofs[None, :], in_gamma[None, :])
    B = inner_product(in_ofs[:, None], in_gamma[:, None], out_ofs[None, :], out_gamma[None, :])
    scale = 1 / np.sqrt(np.diag(A))  # equilibrate: unit diagonal
    Y = np.linalg.lstsq(A * scale[:, None] * scale[None, :], B * scale[:, None], rcond=None)[0]
    X = Y * scale[:, None]
    total = X.sum(axis=0, keepdims=True)
    if np.any(np.abs(total) < 1e-12):
        raise ValueError('degenerate reconstruction: coefficients sum to zero')
    return X / total


class PowerFunctionEMA:
    """Power-function EMAs of a network, tracked during training (spec §7, paper Alg. 2).

    `emas[k]` is a deep copy of `net` (eval mode, `requires_grad=False`) averaging its
    parameters with relative std `stds[k]`; buffers are copied from the net at every update.
    """

    def __init__(self, net, stds=(0.050, 0.100)):
        if not isinstance(net, torch.nn.Module):
            raise ValueError(f'net must be a torch.nn.Module, got {type(net).__name__}')
        stds = tuple(float(s) for s in np.atleast_1d(np.asarray(stds, dtype=np.float64)))
        if len(stds) == 0:
            raise ValueError('stds must not be empty')
        try:
            std_to_exp(np.array(stds))
        except ValueError as e:
            raise ValueError(f'stds: {e}') from None
        self.net = net
        self.stds = stds
        # The exponents are fixed: solving the cubic (np.roots) once, not twice per training step.
        self._gammas = tuple(std_to_exp(s) for s in stds)  # scalar calls: the values power_function_beta uses
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in stds]

    def _listing(self):
        """`[(net params, net buffers), (ema params, ema buffers) for each EMA]` as `(module, name)`
        slots, listed once and again only after a registration anywhere (`_REGISTRATIONS`)."""
        cache = getattr(self, '_slot_cache', None)
        if cache is None or cache[0] != _REGISTRATIONS[0]:
            listing = [(_slots(m, 'named_parameters'), _slots(m, 'named_buffers'))
                       for m in (self.net, *self.emas)]
            cache = self._slot_cache = (_REGISTRATIONS[0], listing)  # _pairs checks the structure
        return cache[1]

    @staticmethod
    def _lookup(slots, table):
        return [getattr(m, table)[n] for m, n in slots]

    def _net_tensors(self):
        """The net's (parameters, buffers): looked up once per update, shared by every EMA."""
        return self._tensors(0)

    def _tensors(self, k):
        """(parameters, buffers) of `self.net` (`k = 0`) or of `self.emas[k - 1]`, looked up through the
        cached slots: a parameter or buffer replaced in its module's table (e.g. by `Module.to` with
        `torch.__future__.set_overwrite_module_params_on_conversion(True)`) is seen at once."""
        for attempt in range(2):
            p_slots, b_slots = self._listing()[k]
            try:
                return self._lookup(p_slots, '_parameters'), self._lookup(b_slots, '_buffers')
            except (KeyError, AttributeError):  # an entry deleted since the listing: list again
                self._slot_cache = None
                if attempt:
                    raise RuntimeError('the network changed structure since the EMA was created') from None

    def _pairs(self, ema, net_tensors=None):
        """Return (ema params, net params, ema buffers, net buffers), the parameters as `Parameter`s
        (every use is under `no_grad`)."""
        net_p, net_b = net_tensors if net_tensors is not None else self._net_tensors()
        ema_p, ema_b = self._tensors(1 + next(i for i, e in enumerate(self.emas) if e is ema))
        if len(ema_p) != len(net_p) or len(ema_b) != len(net_b) or \
                any(e.shape != p.shape for e, p in zip(ema_p + ema_b, net_p + net_b)):
            raise RuntimeError('the network changed structure since the EMA was created')
        return ema_p, net_p, ema_b, net_b

    @torch.no_grad()
    def reset(self):
        """Set every EMA to the current network (parameters and buffers)."""
        for ema in self.emas:
            ema_p, net_p, ema_b, net_b = self._pairs(ema)
            for e, p in zip(ema_p + ema_b, net_p + net_b):
                e.copy_(p)

    @torch.no_grad()
    def update(self, cur_nimg, batch_size):
        """Advance every EMA by one optimizer step (spec §7).

        Args:
            cur_nimg: images seen after the step (`t`).
            batch_size: images in the step (`dt`).

        `beta = power_function_beta(std, cur_nimg, batch_size)`; every parameter of an EMA is
        updated by one multi-tensor `mpkernels.ema_lerp_(ema, net, 1 - beta)` call.
        """
        import mpkernels as mk
        net_tensors = self._net_tensors()
        for gamma, ema in zip(self._gammas, self.emas):
            beta = _beta_of_exp(gamma, cur_nimg, batch_size)  # = power_function_beta(std, ...), bit for bit
            ema_p, net_p, ema_b, net_b = self._pairs(ema, net_tensors)
            if ema_p:
                mk.ema_lerp_(ema_p, net_p, 1 - beta)
            for e, b in zip(ema_b, net_b):
                e.copy_(b)

    def get(self):
        """List of `(ema_net, suffix)`, e.g. `[(ema, '-0.050'), (ema, '-0.100')]`."""
        return [(ema, f'-{std:.3f}') for std, ema in zip(self.stds, self.emas)]

    def state_dict(self):
        """Flat `{name: tensor}`: `'stds'` (float64) and `'emas.{k}.{param or buffer}'`.

        Tensors only, so it is loadable by `torch.load(weights_only=True)` and storable by
        safetensors. Like `nn.Module.state_dict`, the values share storage with the EMAs.
        """
        state = {'stds': torch.tensor(self.stds, dtype=torch.float64)}
        for k, ema in enumerate(self.emas):
            for name, value in ema.state_dict().items():
                state[f'emas.{k}.{name}'] = value
        return state

    def load_state_dict(self, state):
        """Load what `state_dict()` returned; the stds must match this object's."""
        if 'stds' not in state:
            raise ValueError("state has no 'stds' entry")
        stds = tuple(float(s) for s in torch.as_tensor(state['stds']).reshape(-1).tolist())
        if len(stds) != len(self.stds) or any(abs(a - b) > 1e-9 for a, b in zip(stds, self.stds)):
            raise ValueError(f'state stds {stds} do not match this EMA\'s stds {self.stds}')
        known = {'stds'}
        for k, ema in enumerate(self.emas):
            prefix = f'emas.{k}.'
            sub = {name[len(prefix):]: v for name, v in state.items() if name.startswith(prefix)}
            ema.load_state_dict(sub, strict=True)
            known.update(prefix + name for name in sub)
        unknown = sorted(set(state) - known)
        if unknown:
            raise ValueError(f'unexpected keys in state: {unknown[:5]}')
