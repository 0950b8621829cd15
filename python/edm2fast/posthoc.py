"""Post-hoc EMA: reconstruct EMA networks of any length from stored snapshots (spec §7).

The trainer stores snapshots of power-function EMAs (``<prefix>-<kimg:07d>-<std:.3f>.safetensors``);
the release's pickles (``network-snapshot-<kimg>-<std>.pkl``, ``<preset>-<kimg>-<std>.pkl``) are
inputs too, read by the restricted unpickler of :mod:`edm2fast.convert` (no code runs).
Any other profile ``(t_o, sigma_o)`` is approximated by the least-squares combination
``theta_o = sum_i x_i theta_i`` of the snapshots taken at ``t_i <= t_o``
(:func:`edm2fast.phema.solve_posthoc_coefficients`).

Streaming: outputs are made in batches of ``max_outputs``; for each batch every input file is
read once, and memory holds one input plus one fp32 accumulator per output, never all the
snapshots. Python API::

    from edm2fast import posthoc
    snaps = posthoc.list_snapshots('runs/digits')
    paths = posthoc.reconstruct_to_files(snaps, 'runs/digits/posthoc', [0.02, 0.05, 0.15])
    nets = posthoc.reconstruct_networks(snaps, [0.1])          # [(sigma_rel, Precond)]
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import torch

from . import convert as foreign
from . import io as edm_io
from . import phema

__all__ = ["Snapshot", "list_snapshots", "select_inputs", "solve", "reconstruct_states", "reconstruct_to_files",
           "iter_networks", "reconstruct_networks", "plot_profiles", "check_stds"]

_SNAPSHOT_RE = re.compile(r"^(?P<prefix>.+)-(?P<kimg>\d{7})-(?P<std>\d+\.\d{3})\.safetensors$")


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One stored EMA snapshot: file, images seen, sigma_rel and the metadata of the file."""
    path: str
    nimg: int
    std: float
    prefix: str
    metadata: dict = dataclasses.field(repr=False, compare=False, hash=False)

    @property
    def net_kwargs(self) -> dict:
        return self.metadata["net_kwargs"]


def check_stds(stds, name: str = "sigma_rel") -> list[float]:
    """Validate a list of relative EMA lengths: each in (0, sqrt(1/12) ~= 0.2887)."""
    values = [float(s) for s in np.atleast_1d(np.asarray(stds, dtype=np.float64))]
    if not values:
        raise ValueError(f"{name}: give at least one value")
    for s in values:
        if not (0 < s < phema.MAX_STD):
            raise ValueError(f"{name}: {s} is outside (0, {phema.MAX_STD:.4f}); a power-function EMA "
                             "needs 0 < sigma_rel < sqrt(1/12)")
    return values


def snapshot_name_info(name: str) -> dict | None:
    """``{'prefix', 'kimg', 'sigma_rel', 'release'}`` for an input file name (ours or the release's), else None."""
    m = _SNAPSHOT_RE.match(name)
    if m:
        return {"prefix": m.group("prefix"), "kimg": int(m.group("kimg")), "sigma_rel": float(m.group("std")),
                "release": False}
    info = foreign.parse_release_name(name)
    if info is not None and info["kind"] == "snapshot":
        return {"prefix": info["prefix"], "kimg": info["kimg"], "sigma_rel": info["sigma_rel"], "release": True}
    return None


def _matches_std(std: float, wanted) -> bool:
    return wanted is None or any(abs(std - float(w)) < 5e-4 for w in wanted)


def list_snapshots(directory, prefix: str | None = None, in_stds=None) -> list[Snapshot]:
    """The power-function EMA snapshots in ``directory``, sorted by (nimg, sigma_rel).

    Ours (``.safetensors``: only headers are read) and the release's pickles (read whole,
    safely; their time is the file name's kimg * 1000). Post-hoc results (metadata
    ``posthoc``) are skipped: they are not power-function profiles. ``in_stds``: keep only
    inputs of these sigma_rel (the release's ``--instd``). Raises ValueError for an unreadable
    snapshot, a folder holding several runs' prefixes when ``prefix`` is not given, or no
    snapshot at all.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such folder")
    found = []
    for name in sorted(os.listdir(directory)):
        info = snapshot_name_info(name)
        if info is None or (prefix is not None and info["prefix"] != prefix):
            continue
        if not _matches_std(info["sigma_rel"], in_stds):
            continue
        path = os.path.join(directory, name)
        if info["release"]:
            kwargs, _, extras = foreign.read_official_pickle(path)
            meta = {"net_kwargs": kwargs, "nimg": info["kimg"] * 1000, "sigma_rel": info["sigma_rel"],
                    "converted_from": name, **foreign.metadata_from_filename(path)}
            found.append(Snapshot(path, meta["nimg"], info["sigma_rel"], info["prefix"], meta))
            continue
        meta = edm_io.read_metadata(path)  # ValueError naming the file if corrupt
        if meta.get("posthoc"):
            continue
        try:
            nimg = int(meta["nimg"])
            std = float(meta["sigma_rel"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: snapshot metadata lacks 'nimg' or 'sigma_rel'") from None
        found.append(Snapshot(path, nimg, std, info["prefix"], meta))
    if not found:
        what = f" with prefix {prefix!r}" if prefix is not None else ""
        what += f" and sigma_rel in {list(in_stds)}" if in_stds is not None else ""
        raise ValueError(f"{directory}: no EMA snapshots{what} (<prefix>-<kimg>-<std>.safetensors, or the "
                         "release's <prefix>-<kimg>-<std>.pkl)")
    prefixes = sorted({s.prefix for s in found})
    if len(prefixes) > 1:
        raise ValueError(f"{directory}: snapshots of several runs ({', '.join(prefixes)}); choose one with prefix")
    return sorted(found, key=lambda s: (s.nimg, s.std))


def select_inputs(snapshots, out_nimg: int | None = None) -> tuple[list[Snapshot], int]:
    """The snapshots usable for a reconstruction at ``out_nimg`` (default: the latest time)."""
    snapshots = [s for s in snapshots if s.nimg > 0]
    if not snapshots:
        raise ValueError("no snapshot taken after 0 images")
    latest = max(s.nimg for s in snapshots)
    if out_nimg is None:
        out_nimg = latest
    out_nimg = int(out_nimg)
    if out_nimg <= 0:
        raise ValueError(f"nimg: the reconstruction time must be > 0 images, got {out_nimg}")
    if out_nimg > latest:
        raise ValueError(f"nimg: {out_nimg} images is after the latest snapshot ({latest}); "
                         "a reconstruction can only use training that happened")
    inputs = [s for s in snapshots if s.nimg <= out_nimg]
    if not inputs:
        raise ValueError(f"nimg: no snapshot at or before {out_nimg} images (earliest: "
                         f"{min(s.nimg for s in snapshots)})")
    ref = inputs[0].net_kwargs
    for s in inputs[1:]:
        if s.net_kwargs != ref:
            raise ValueError(f"{s.path}: network differs from {inputs[0].path}; snapshots of one run only")
    return inputs, out_nimg


def solve(snapshots, out_stds, out_nimg: int | None = None) -> tuple[list[Snapshot], np.ndarray, int]:
    """``(inputs, coefficients [num_in, num_out], out_nimg)`` for the wanted sigma_rel values."""
    out_stds = check_stds(out_stds)
    inputs, out_nimg = select_inputs(snapshots, out_nimg)
    coefs = phema.solve_posthoc_coefficients([s.nimg for s in inputs], [s.std for s in inputs],
                                             out_nimg, out_stds)
    return inputs, coefs, out_nimg


def _buffer_names(net_kwargs: dict) -> set[str]:
    return {name for name, _ in edm_io.build_net("meta", **net_kwargs).named_buffers()}


def reconstruct_states(snapshots, out_stds, out_nimg: int | None = None, max_outputs: int = 8,
                       device="cpu", progress=None):
    """Yield ``(sigma_rel, state_dict (fp32), info)`` for every wanted sigma_rel, streaming the inputs.

    ``info``: ``{'nimg', 'coefficients', 'inputs'}``. Every input is read once per batch
    of ``max_outputs`` outputs; buffers (Fourier features, identical in every snapshot)
    are taken from the latest input instead of being averaged.
    ``progress(i, n, path)`` is called before reading each input.
    """
    if int(max_outputs) < 1:
        raise ValueError(f"max_outputs: expected an integer >= 1, got {max_outputs!r}")
    inputs, coefs, out_nimg = solve(snapshots, out_stds, out_nimg)
    out_stds = check_stds(out_stds)
    buffers = _buffer_names(inputs[0].net_kwargs)
    for start in range(0, len(out_stds), int(max_outputs)):
        cols = list(range(start, min(start + int(max_outputs), len(out_stds))))
        accs: list[dict[str, torch.Tensor] | None] = [None] * len(cols)
        for i, snap in enumerate(inputs):
            if progress is not None:
                progress(i, len(inputs), snap.path)
            state = _read_state(snap, device)
            for k, col in enumerate(cols):
                c = float(coefs[i, col])
                if accs[k] is None:
                    accs[k] = {n: (t.to(torch.float32) * c if n not in buffers else t.clone())
                               for n, t in state.items()}
                    continue
                if set(state) != set(accs[k]):
                    raise ValueError(f"{snap.path}: tensor names differ from the other snapshots")
                for n, t in state.items():
                    if n in buffers:
                        accs[k][n].copy_(t)
                    else:
                        accs[k][n].add_(t.to(torch.float32), alpha=c)
            del state
        for k, col in enumerate(cols):
            info = {"nimg": out_nimg, "coefficients": coefs[:, col].tolist(),
                    "inputs": [os.path.basename(s.path) for s in inputs]}
            yield out_stds[col], accs[k], info
            accs[k] = None


def _read_state(snap: Snapshot, device="cpu") -> dict:
    if snap.path.endswith(".safetensors"):
        return edm_io.load_state_dict(snap.path, device=device)
    return {k: v.to(device) for k, v in foreign.read_official_pickle(snap.path)[1].items()}


def _as_snapshots(source, prefix=None) -> list[Snapshot]:
    if isinstance(source, (str, os.PathLike)):
        return list_snapshots(source, prefix)
    snaps = list(source)
    if not snaps or not all(isinstance(s, Snapshot) for s in snaps):
        raise ValueError("snapshots: expected a folder or a non-empty list of Snapshot")
    return snaps


def reconstruct_to_files(source, out_dir, out_stds, out_nimg: int | None = None, *, prefix: str | None = None,
                         out_prefix: str | None = None, dtype: str = "fp16", max_outputs: int = 8,
                         progress=None, skip_existing: bool = False) -> list[str]:
    """Reconstruct and write one snapshot per sigma_rel into ``out_dir``; returns the paths.

    ``source``: a folder of snapshots or :func:`list_snapshots`' result. Outputs are named
    like the inputs (``<prefix>-<kimg:07d>-<std:.3f>.safetensors``) and carry the inputs'
    metadata plus ``posthoc: true``, ``sigma_rel`` and ``nimg``. An output never replaces
    one of its inputs. ``skip_existing``: outputs whose file exists are not made again (and
    not returned), as the release's ``--skip``.
    """
    from .train import snapshot_name
    snaps = _as_snapshots(source, prefix)
    out_stds = check_stds(out_stds)
    names = [f"{s:.3f}" for s in out_stds]
    if len(set(names)) != len(names):
        raise ValueError(f"sigma_rel: values must differ in the third decimal (file names), got {out_stds}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    inputs, _, nimg = solve(snaps, out_stds, out_nimg)
    out_prefix = out_prefix or inputs[0].prefix
    input_paths = {os.path.realpath(s.path) for s in snaps}
    planned = [os.path.join(out_dir, snapshot_name(out_prefix, nimg, s)) for s in out_stds]
    for p in planned:
        if os.path.realpath(p) in input_paths:
            raise ValueError(f"{p}: would overwrite an input snapshot; choose another output folder")
    if skip_existing:
        todo = [k for k, p in enumerate(planned) if not os.path.exists(p)]
        out_stds, planned = [out_stds[k] for k in todo], [planned[k] for k in todo]
        if not out_stds:
            return []
    base_meta = {k: v for k, v in inputs[-1].metadata.items() if k != "net_kwargs"}
    net_kwargs = inputs[0].net_kwargs
    paths = []
    for (std, state, info), path in zip(reconstruct_states(snaps, out_stds, out_nimg, max_outputs,
                                                           progress=progress), planned):
        meta = dict(base_meta, sigma_rel=std, nimg=info["nimg"], posthoc=True,
                    posthoc_inputs=len(info["inputs"]))
        edm_io.save_state_dict(state, path, net_kwargs, dtype=dtype, **meta)
        paths.append(path)
    return paths


def iter_networks(source, out_stds, out_nimg: int | None = None, *, prefix: str | None = None,
                  device="cpu", max_outputs: int = 8, compute_dtype: str | None = None):
    """Yield ``(sigma_rel, Precond)`` per wanted sigma_rel (eval mode, fp32 parameters), streaming.

    Memory holds one batch of ``max_outputs`` reconstructions (and one input) at a time.
    ``compute_dtype`` (``'fp16'|'bf16'|'fp32'``) replaces the compute precision the
    snapshots recorded (None keeps it).
    """
    snaps = _as_snapshots(source, prefix)
    meta_keys = {k: v for k, v in snaps[-1].metadata.items() if k != "net_kwargs"}
    kwargs = dict(snaps[0].net_kwargs)
    if compute_dtype is not None:
        kwargs["dtype"] = compute_dtype
    for std, state, info in reconstruct_states(snaps, out_stds, out_nimg, max_outputs):
        net = edm_io.build_net("meta", **kwargs)
        net.load_state_dict(state, strict=True, assign=True)
        del state
        net = net.to(device).eval().requires_grad_(False)
        net.snapshot_metadata = dict(meta_keys, sigma_rel=std, nimg=info["nimg"], posthoc=True)
        yield std, net


def reconstruct_networks(source, out_stds, out_nimg: int | None = None, **kwargs) -> list:
    """:func:`iter_networks` as a list of ``(sigma_rel, Precond)``."""
    return list(iter_networks(source, out_stds, out_nimg, **kwargs))


def plot_profiles(source, out_stds, path, out_nimg: int | None = None, prefix: str | None = None) -> str:
    """Draw the input EMA profiles and, for each wanted sigma_rel, the target and its reconstruction.

    One panel per output (up to 6): thin grey lines are the input profiles ``p_i(tau)``,
    the dashed line is the wanted profile and the solid one ``sum_i x_i p_i(tau)``.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snaps = _as_snapshots(source, prefix)
    out_stds = check_stds(out_stds)[:6]
    inputs, coefs, nimg = solve(snaps, out_stds, out_nimg)
    tau = np.linspace(0, nimg, 2001)[1:]
    in_profiles = np.stack([phema.profile(s.nimg, phema.std_to_exp(s.std), tau) for s in inputs])
    cols = min(3, len(out_stds))
    rows = (len(out_stds) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for k, std in enumerate(out_stds):
        ax = axes[k // cols][k % cols]
        for p in in_profiles:
            ax.plot(tau / 1000, p * 1000, color="0.75", lw=0.6)
        target = phema.profile(nimg, phema.std_to_exp(std), tau)
        recon = coefs[:, k] @ in_profiles
        ax.plot(tau / 1000, target * 1000, "k--", lw=1.4, label=f"target sigma_rel={std:.3f}")
        ax.plot(tau / 1000, recon * 1000, color="C3", lw=1.2, label="reconstruction")
        top = max(target.max(), recon.max()) * 1000
        ax.set_ylim(min(0.0, recon.min() * 1000) - 0.05 * top, 1.15 * top)
        ax.set_xlabel("training images (k)")
        ax.set_ylabel("weight per kimg")
        ax.legend(fontsize=7, loc="upper left")
    for k in range(len(out_stds), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(f"post-hoc EMA at {nimg / 1000:g} kimg from {len(inputs)} snapshots (grey)", fontsize=10)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with edm_io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=os.path.splitext(path)[1][1:] or "png")
    plt.close(fig)
    return path
