"""Post-hoc EMA from snapshot files (spec §7): streaming reconstruction, validation, plot, `edm2fast phema`."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from edm2fast import cli, phema, posthoc
from edm2fast import io as edm_io

NET_KWARGS = dict(img_resolution=8, img_channels=1, label_dim=0, model_channels=16, channel_mult=[1, 1], num_blocks=1,
                  attn_resolutions=[], channels_per_head=16, dtype="fp32")
STDS = (0.05, 0.10)
BATCH = 4
SNAP_EVERY = 8  # steps
STEPS = 32


def _trajectory_snapshots(folder, prefix="phema", dtype="fp32"):
    """Track power-function EMAs of a synthetic parameter trajectory and store snapshots like the trainer.

    Returns ``{(nimg, std): state_dict}`` of what was written (fp32, as in memory).
    """
    torch.manual_seed(0)
    net = edm_io.build_net(**NET_KWARGS)
    ema = phema.PowerFunctionEMA(net, stds=STDS)
    written = {}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for step in range(1, STEPS + 1):
            for p in net.parameters():  # a drifting, noisy trajectory
                p.add_(torch.randn(p.shape, generator=gen) * 0.3 + 0.05)
            nimg = step * BATCH
            ema.update(nimg, BATCH)
            if step % SNAP_EVERY == 0:
                for std, e in zip(ema.stds, ema.emas):
                    # kimg would collide at this tiny scale: named by nimg, the metadata holds the truth
                    name = f"{prefix}-{nimg:07d}-{std:.3f}.safetensors"
                    edm_io.save(e, os.path.join(folder, name), dtype=dtype, nimg=nimg, sigma_rel=std, preset="test",
                                dataset="synthetic")
                    written[(nimg, std)] = {k: v.clone() for k, v in e.state_dict().items()}
    return written


@pytest.fixture(scope="module")
def snap_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("snaps")
    written = _trajectory_snapshots(str(folder))
    return folder, written


def _in_memory(written, out_std, out_nimg):
    keys = sorted(k for k in written if k[0] <= out_nimg)
    coefs = phema.solve_posthoc_coefficients([k[0] for k in keys], [k[1] for k in keys], out_nimg, out_std)
    names = written[keys[0]].keys()
    buffers = {n for n, _ in edm_io.build_net("meta", **NET_KWARGS).named_buffers()}
    out = []
    for j in range(coefs.shape[1]):
        state = {}
        for n in names:
            if n in buffers:
                state[n] = written[keys[-1]][n]
            else:
                state[n] = sum(float(coefs[i, j]) * written[k][n].double() for i, k in enumerate(keys)).float()
        out.append(state)
    return out


def test_list_snapshots(snap_dir):
    folder, written = snap_dir
    snaps = posthoc.list_snapshots(folder)
    assert [(s.nimg, s.std) for s in snaps] == sorted(written)
    assert snaps[0].net_kwargs["model_channels"] == 16


def test_reconstruction_from_files_matches_in_memory_solve(snap_dir, tmp_path):
    folder, written = snap_dir
    stds = [0.03, 0.07, 0.2]
    paths = posthoc.reconstruct_to_files(folder, tmp_path, stds, dtype="fp32")
    assert [os.path.basename(p) for p in paths] == [f"phema-{STEPS * BATCH // 1000:07d}-{s:.3f}.safetensors"
                                                    for s in stds]
    expected = _in_memory(written, stds, STEPS * BATCH)
    for path, std, exp in zip(paths, stds, expected):
        meta = edm_io.read_metadata(path)
        assert meta["posthoc"] is True and meta["sigma_rel"] == pytest.approx(std)
        assert meta["nimg"] == STEPS * BATCH and meta["dataset"] == "synthetic"
        got = edm_io.load_state_dict(path)
        for name, t in exp.items():
            torch.testing.assert_close(got[name], t, rtol=1e-5, atol=1e-5 * max(1.0, float(t.abs().max())))
        net = edm_io.load(path)  # rebuilds from the file alone
        assert net.unet.enc["8x8_conv"].weight.shape == (16, 2, 3, 3)


def test_reconstructing_a_stored_profile_returns_that_snapshot(snap_dir):
    folder, written = snap_dir
    (std, state, info), = posthoc.reconstruct_states(posthoc.list_snapshots(folder), [0.10], out_nimg=16 * BATCH)
    coefs = np.array(info["coefficients"])
    assert len(coefs) == 4 and coefs[-1] == pytest.approx(1.0, abs=1e-6)  # inputs at 32 and 64 images
    for name, t in written[(16 * BATCH, 0.10)].items():
        torch.testing.assert_close(state[name], t, rtol=1e-5, atol=1e-4)


def test_streaming_reads_each_input_once_per_output_batch(snap_dir, monkeypatch):
    folder, _ = snap_dir
    snaps = posthoc.list_snapshots(folder)
    reads = []
    real = edm_io.load_state_dict
    monkeypatch.setattr(edm_io, "load_state_dict", lambda path, **kw: reads.append(path) or real(path, **kw))
    stds = [0.02, 0.04, 0.06, 0.08, 0.12]
    batched = {s: st for s, st, _ in posthoc.reconstruct_states(snaps, stds, max_outputs=2)}
    assert len(reads) == len(snaps) * 3  # ceil(5 / 2) passes over the inputs
    assert sorted(set(reads)) == sorted(s.path for s in snaps)
    reads.clear()
    one_pass = {s: st for s, st, _ in posthoc.reconstruct_states(snaps, stds, max_outputs=8)}
    assert len(reads) == len(snaps)
    for s in stds:
        for name in one_pass[s]:
            assert torch.equal(one_pass[s][name], batched[s][name])


def test_reconstruct_networks_in_memory(snap_dir):
    folder, _ = snap_dir
    (std, net), = posthoc.reconstruct_networks(folder, [0.08])
    assert std == 0.08 and not net.training and net.snapshot_metadata["posthoc"]
    out = net(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 1.0]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("stds, nimg, match", [
    ([0.3], None, "sigma_rel"), ([0.0], None, "sigma_rel"), ([0.05], STEPS * BATCH + 1, "after the latest"),
    ([0.05], 8, "no snapshot at or before"), ([], None, "at least one"),
])
def test_reconstruction_validates_arguments(snap_dir, stds, nimg, match):
    folder, _ = snap_dir
    with pytest.raises(ValueError, match=match):
        posthoc.solve(posthoc.list_snapshots(folder), stds, nimg)


def test_missing_and_corrupt_inputs(tmp_path, snap_dir):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        posthoc.list_snapshots(tmp_path / "nope")
    with pytest.raises(ValueError, match="no EMA snapshots"):
        posthoc.list_snapshots(tmp_path)
    folder, _ = snap_dir
    src = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))[0]
    data = open(os.path.join(folder, src), "rb").read()
    bad = tmp_path / src
    bad.write_bytes(data[: len(data) // 2])  # truncated tensors: header fine, data missing
    with pytest.raises(ValueError, match=src):
        list(posthoc.reconstruct_states(posthoc.list_snapshots(tmp_path), [0.05]))
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=src):
        posthoc.list_snapshots(tmp_path)


def test_snapshots_of_different_networks_are_refused(tmp_path):
    for k, (nimg, channels) in enumerate([(8, 16), (16, 32)]):
        net = edm_io.build_net(**dict(NET_KWARGS, model_channels=channels, channels_per_head=channels))
        edm_io.save(net, tmp_path / f"phema-{nimg:07d}-0.100.safetensors", nimg=nimg, sigma_rel=0.1)
    with pytest.raises(ValueError, match="network differs"):
        posthoc.solve(posthoc.list_snapshots(tmp_path), [0.05])


def test_outputs_never_overwrite_inputs(tmp_path):
    net = edm_io.build_net(**NET_KWARGS)
    for nimg in (1000, 2000):  # named by kimg, as the trainer does
        edm_io.save(net, tmp_path / f"phema-{nimg // 1000:07d}-0.100.safetensors", nimg=nimg, sigma_rel=0.1)
    with pytest.raises(ValueError, match="overwrite an input"):
        posthoc.reconstruct_to_files(tmp_path, tmp_path, [0.1])
    assert len(os.listdir(tmp_path)) == 2


def test_plot_profiles(snap_dir, tmp_path):
    folder, _ = snap_dir
    path = posthoc.plot_profiles(folder, [0.03, 0.15], tmp_path / "profiles.png")
    assert os.path.getsize(path) > 5000
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_phema_command(snap_dir, tmp_path, capsys):
    folder, written = snap_dir
    out = tmp_path / "out"
    rc = cli.main(["phema", "--indir", str(folder), "--std", "0.03,0.07", "--outdir", str(out), "--plot",
                   "--dtype", "fp32"])
    assert rc == 0
    files = sorted(os.listdir(out))
    assert files == ["phema-0000000-0.030.safetensors", "phema-0000000-0.070.safetensors", "phema-profiles.png"]
    expected = _in_memory(written, [0.07], STEPS * BATCH)[0]
    got = edm_io.load_state_dict(out / files[1])
    name = "unet.out_conv.weight"
    torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)
    assert "reconstructing sigma_rel 0.030, 0.070" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--std", "0.3"], "outside"), (["--std", "abc"], "expected a number"),
    (["--std", "0.05", "--nimg", "1Mi"], "after the latest snapshot"),
])
def test_phema_command_errors(snap_dir, capsys, argv, match):
    folder, _ = snap_dir
    with pytest.raises(SystemExit) as e:
        rc = cli.main(["phema", "--indir", str(folder)] + argv)
        raise SystemExit(rc)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_phema_command_missing_folder(tmp_path, capsys):
    assert cli.main(["phema", "--indir", str(tmp_path / "nope"), "--std", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edm2fast phema: error:") and "no such folder" in err and "\n" not in err
