"""Converter for the authors' EDM2 pickles: round trip of self-built official-format files,
and refusal of anything that would run code (no code from the file is ever executed)."""

import argparse
import collections
import os
import pickle
import sys
import textwrap

import numpy as np
import pytest
import torch

from edm2fast import convert, io, networks
from edm2fast.commands import convert as convert_cmd

KW = dict(img_resolution=8, img_channels=2, label_dim=3, model_channels=8, channel_mult=[1, 2], num_blocks=1,
          attn_resolutions=[4], channels_per_head=8)

# A stand-in for the authors' torch_utils/persistence.py and dnnlib/util.py, written by this test:
# objects reduce to `_reconstruct_persistent_obj(meta)` exactly as the released pickles do.
FAKE_PERSISTENCE = textwrap.dedent('''
    CALLS = []

    def _reconstruct_persistent_obj(meta):
        CALLS.append(meta)  # the converter must never call this
        raise RuntimeError('edm2fast executed _reconstruct_persistent_obj')

    class PersistentObject:
        def __init__(self, class_name, state, module_src='import os\\nos.system("echo src-ran")'):
            self.class_name, self.state, self.module_src = class_name, state, module_src

        def __reduce__(self):
            meta = dict(type='class', version=6, module_src=self.module_src, class_name=self.class_name,
                        state=self.state)
            return (_reconstruct_persistent_obj, (meta,), None)
''')
FAKE_DNNLIB = textwrap.dedent('''
    class EasyDict(dict):
        def __getattr__(self, name):
            return self[name]
''')


@pytest.fixture(scope="module")
def fake_modules(tmp_path_factory):
    root = tmp_path_factory.mktemp("authors_code")
    for pkg, src in (("torch_utils", FAKE_PERSISTENCE), ("dnnlib", FAKE_DNNLIB)):
        (root / pkg).mkdir()
        (root / pkg / "__init__.py").write_text("")
        (root / pkg / ("persistence.py" if pkg == "torch_utils" else "util.py")).write_text(src)
    sys.path.insert(0, str(root))
    import dnnlib.util
    import torch_utils.persistence
    yield torch_utils.persistence, dnnlib.util
    sys.path.remove(str(root))
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        sys.modules.pop(name, None)




def make_net(seed=0, **overrides):
    torch.manual_seed(seed)
    net = networks.Precond(**{**KW, **overrides})
    with torch.no_grad():  # nonzero gains so every parameter matters for the output
        for name, p in net.named_parameters():
            if p.ndim == 0:
                p.fill_(0.3 + 0.1 * torch.rand([]).item())
    return net.eval()


def as_official(module, persistence, init_kwargs=None):
    """Mirror our module tree with the authors' pickling: persistent records for the network
    classes (state = the object's __dict__), real torch.nn.ModuleDict for enc/dec."""
    state = dict(module.__dict__)
    state["_modules"] = collections.OrderedDict(
        (name, None if child is None else as_official(child, persistence)) for name, child in module._modules.items())
    if isinstance(module, torch.nn.ModuleDict):
        md = torch.nn.ModuleDict()
        md.__dict__.update(state)  # children are persistent stand-ins, not nn.Modules
        return md
    state["_init_args"] = ()
    state["_init_kwargs"] = dict(init_kwargs or {})
    return persistence.PersistentObject(type(module).__name__, state)


def official_snapshot(net, fake_modules, **extra):
    persistence, dnnlib_util = fake_modules
    encoder = persistence.PersistentObject("StabilityVAEEncoder", dict(
        _init_args=(), _init_kwargs=dict(vae_name="stabilityai/sd-vae-ft-mse"), vae_name="stabilityai/sd-vae-ft-mse",
        raw_mean=np.float32([5.81, 3.25, 0.12, -2.15]), raw_std=np.float32([4.17, 4.62, 3.71, 3.28]),
        final_mean=np.float32(0), final_std=np.float32(0.5), batch_size=8, _vae=None))
    loss_fn = persistence.PersistentObject("EDM2Loss", dict(_init_args=(), _init_kwargs=dict(P_mean=-0.4, P_std=1.0),
                                                             P_mean=-0.4, P_std=1.0, sigma_data=0.5))
    dataset_kwargs = dnnlib_util.EasyDict(class_name="training.dataset.ImageFolderDataset", path="x.zip",
                                          use_labels=True)
    data = dict(ema=as_official(net, persistence, KW), encoder=encoder, loss_fn=loss_fn,
                dataset_kwargs=dataset_kwargs)
    data.update(extra)
    return data


def outputs(net):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 8, 8, generator=g)
    sigma = torch.tensor([0.02, 0.7, 30.0])
    labels = torch.eye(3)[[0, 2, 1]]
    return net(x, sigma, labels, return_logvar=True)


def assert_identical(a, b):
    for x, y in zip(outputs(a), outputs(b)):
        assert torch.equal(x, y), f"max diff {(x - y).abs().max().item()}"


@pytest.mark.parametrize("fmt", ["pickle", "pickle-proto2", "torch.save"])
def test_round_trip_identical(tmp_path, fake_modules, fmt):
    net = make_net()
    data = official_snapshot(net, fake_modules)
    path = tmp_path / "edm2-img512-xs-2147483-0.135.pkl"
    if fmt == "torch.save":
        torch.save(data, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=2 if fmt == "pickle-proto2" else pickle.DEFAULT_PROTOCOL)
    converted = io.load_official_pickle(path)
    assert fake_modules[0].CALLS == []
    assert isinstance(converted, networks.Precond) and not converted.training
    assert set(converted.state_dict()) == set(net.state_dict())
    assert_identical(converted, net)
    meta = converted.snapshot_metadata
    assert meta["preset"] == "edm2-img512-xs" and meta["nimg"] == 2147483000 and meta["sigma_rel"] == 0.135
    assert meta["encoder"]["vae_name"] == "stabilityai/sd-vae-ft-mse"
    assert meta["encoder"]["raw_mean"] == pytest.approx([5.81, 3.25, 0.12, -2.15])
    assert meta["dataset_kwargs"]["use_labels"] is True


def test_fp16_network_and_positional_args(tmp_path, fake_modules):
    """Authors' snapshots may hold fp16 tensors and record positional constructor args."""
    half = make_net(seed=3).half()
    persistence = fake_modules[0]
    rec = as_official(half, persistence, {k: v for k, v in KW.items() if k not in ("img_resolution", "img_channels")})
    rec.state["_init_args"] = (8, 2)
    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps({"ema": rec}))
    converted = io.load_official_pickle(path)
    ref = make_net(seed=3)
    with torch.no_grad():
        for t in ref.state_dict().values():  # parameters and buffers went through fp16
            t.copy_(t.half().float())
    assert_identical(converted, ref)
    assert next(converted.parameters()).dtype == torch.float32


def test_ema_key_and_bare_network(tmp_path, fake_modules):
    net_a, net_b = make_net(1), make_net(2)
    persistence = fake_modules[0]
    path = tmp_path / "two.pkl"
    path.write_bytes(pickle.dumps({"net": as_official(net_a, persistence, KW),
                                   "ema2": as_official(net_b, persistence, KW)}))
    assert_identical(io.load_official_pickle(path), net_a)  # 'net' is the default without 'ema'
    assert_identical(io.load_official_pickle(path, key="ema2"), net_b)
    with pytest.raises(ValueError, match="no key 'nope'"):
        io.load_official_pickle(path, key="nope")
    bare = tmp_path / "bare.pkl"
    bare.write_bytes(pickle.dumps(as_official(net_b, persistence, KW)))
    assert_identical(io.load_official_pickle(bare), net_b)


class Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class EvilBlob:
    """A storage blob whose inner torch.save pickle calls os.system."""

    def __init__(self, blob):
        self.blob = blob

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.blob,))


def malicious_payloads(marker):
    import builtins
    import subprocess
    cmd = f"echo pwned > {marker}"
    return {
        "os.system": Evil(os.system, (cmd,)),
        "eval": Evil(builtins.eval, (f"__import__('os').system({cmd!r})",)),
        "exec": Evil(builtins.exec, (f"import os; os.system({cmd!r})",)),
        "subprocess": Evil(subprocess.call, (["sh", "-c", cmd],)),
        "getattr": Evil(builtins.getattr, (int, "mro")),
        "torch.load": Evil(torch.load, (str(marker),)),
    }


@pytest.mark.parametrize("name", ["os.system", "eval", "exec", "subprocess", "getattr", "torch.load"])
def test_malicious_pickle_refused(tmp_path, fake_modules, name):
    marker = tmp_path / "pwned"
    payload = malicious_payloads(marker)[name]
    path = tmp_path / "evil.pkl"
    data = official_snapshot(make_net(), fake_modules)
    data["ema"].state["_modules"]["unet"].state["evil"] = payload  # hidden deep inside the network
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(convert.UnsafePickleError, match="refusing global") as exc:
        io.load_official_pickle(path)
    assert str(path) in str(exc.value)
    assert not marker.exists()
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="refusing global"):  # the CLI prints it as one line, exit status 2
        convert_cmd.run(parse([str(path), str(out)]))
    assert not marker.exists() and not out.exists()


def test_malicious_in_top_level_and_torch_save(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"ema": Evil(os.system, (f"echo pwned > {marker}",))}, path)
    with pytest.raises(convert.UnsafePickleError, match="posix.system|os.system"):
        io.load_official_pickle(path)
    assert not marker.exists()


def test_malicious_storage_blob_refused(tmp_path):
    import io as pyio
    marker = tmp_path / "pwned"
    buf = pyio.BytesIO()
    torch.save(Evil(os.system, (f"echo pwned > {marker}",)), buf)
    path = tmp_path / "blob.pkl"
    path.write_bytes(pickle.dumps({"ema": EvilBlob(buf.getvalue())}))
    with pytest.raises(convert.UnsafePickleError, match="weights_only"):
        io.load_official_pickle(path)
    assert not marker.exists()


def test_module_src_never_executed(tmp_path, fake_modules, capfd):
    data = official_snapshot(make_net(), fake_modules)
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps(data))
    net = io.load_official_pickle(path)
    assert "src-ran" not in capfd.readouterr().out
    assert fake_modules[0].CALLS == []
    del net


def test_bad_files(tmp_path, fake_modules):
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        io.load_official_pickle(tmp_path / "missing.pkl")
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x80\x04not really a pickle at all")
    with pytest.raises(ValueError, match="garbage.pkl"):
        io.load_official_pickle(garbage)
    good = pickle.dumps(official_snapshot(make_net(), fake_modules))
    trunc = tmp_path / "trunc.pkl"
    trunc.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="trunc.pkl"):
        io.load_official_pickle(trunc)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"ema": [1, 2, 3]}))
    with pytest.raises(ValueError, match="expected an EDM2 network"):
        io.load_official_pickle(plain)
    persistence = fake_modules[0]
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"ema": persistence.PersistentObject("EDMPrecond", {"_init_kwargs": {}})}))
    with pytest.raises(ValueError, match="expected class 'Precond'"):
        io.load_official_pickle(other)
    # kwargs that do not fit our Precond
    rec = as_official(make_net(), persistence, {**KW, "mystery_option": 1})
    odd = tmp_path / "odd.pkl"
    odd.write_bytes(pickle.dumps({"ema": rec}))
    with pytest.raises(ValueError, match="mystery_option"):
        io.load_official_pickle(odd)
    # state dict that does not match the kwargs
    rec = as_official(make_net(), persistence, {**KW, "model_channels": 16})
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps({"ema": rec}))
    with pytest.raises(ValueError, match="shape mismatch"):
        io.load_official_pickle(wrong)


def parse(argv):
    parser = argparse.ArgumentParser()
    convert_cmd.add_arguments(parser)
    return parser.parse_args(argv)


def test_convert_command_round_trip(tmp_path, fake_modules, capsys):
    net = make_net(5)
    src = tmp_path / "edm2-img64-s-1073741-0.075.pkl"
    src.write_bytes(pickle.dumps(official_snapshot(net, fake_modules)))
    dst = tmp_path / "out.safetensors"
    assert convert_cmd.run(parse([str(src), str(dst), "--dtype", "fp32"])) == 0
    loaded = io.load(dst)
    assert_identical(loaded, net)
    meta = io.read_metadata(dst)
    assert meta["preset"] == "edm2-img64-s" and meta["nimg"] == 1073741000 and meta["sigma_rel"] == 0.075
    assert meta["converted_from"] == src.name and meta["net_kwargs"]["model_channels"] == 8
    # fp16 (default): parameters rounded once, buffers exact
    dst16 = tmp_path / "out16.safetensors"
    assert convert_cmd.run(parse([str(src), str(dst16)])) == 0
    half = io.load(dst16)
    for k, v in net.state_dict().items():
        expected = v if "fourier" in k else v.half().float()
        assert torch.equal(half.state_dict()[k], expected), k
    # --list prints the entries without converting
    assert convert_cmd.run(parse([str(src), "--list"])) == 0
    out = capsys.readouterr().out
    assert "ema: persistent Precond" in out and "encoder: persistent StabilityVAEEncoder" in out
    # io.load reads the pickle directly too
    assert_identical(io.load(src), net)


def test_convert_command_errors(tmp_path, fake_modules):
    from edm2fast.cli import UserError
    src = tmp_path / "a.pkl"
    src.write_bytes(pickle.dumps(official_snapshot(make_net(), fake_modules)))
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        convert_cmd.run(parse([str(tmp_path / "nope.pkl"), str(tmp_path / "o.safetensors")]))
    with pytest.raises(UserError, match="DST"):
        convert_cmd.run(parse([str(src)]))
    with pytest.raises(ValueError, match="--ema"):
        convert_cmd.run(parse([str(src), str(tmp_path / "o.safetensors"), "--ema", "missing"]))
    with pytest.raises(UserError, match="folder"):
        convert_cmd.run(parse([str(src), str(tmp_path / "no" / "o.safetensors")]))
    with pytest.raises(UserError, match="same file"):
        convert_cmd.run(parse([str(src), str(src)]))
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_convert_help_and_refusal(tmp_path, capsys):
    from edm2fast import cli
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert", "--help"])
    assert exc.value.code == 0 and "--ema" in capsys.readouterr().out
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pkl"
    src.write_bytes(pickle.dumps({"ema": Evil(os.system, (f"echo pwned > {marker}",))}))
    assert cli.main(["convert", str(src), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edm2fast convert: error:") and "refusing global" in err and "\n" not in err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
