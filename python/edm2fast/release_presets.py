"""The release's 36 generation presets: networks, guiding networks, guidance weights, reported metrics.

``RELEASE_PRESETS[name]``: ``{'net': file, 'gnet': file or None, 'guidance': w, 'metric': 'fid' | 'fd_dinov2',
'reported': value}``; file names are relative to :data:`MODEL_ROOT`. ``resolve(name)`` gives the
full URLs. Same table as the release's ``generate_images.py`` (its README lists the metric values).
"""

from __future__ import annotations

__all__ = ["MODEL_ROOT", "DATASET_REFS", "RELEASE_PRESETS", "resolve", "preset_names"]

MODEL_ROOT = 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions'
DATASET_REFS = 'https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs'

# name: (net, gnet, guidance, reported metric, reported value)
_TABLE = [
    ('edm2-img512-xs-fid', 'edm2-img512-xs-2147483-0.135.pkl', None, 1.0, 'fid', 3.53),
    ('edm2-img512-xs-dino', 'edm2-img512-xs-2147483-0.200.pkl', None, 1.0, 'fd_dinov2', 103.39),
    ('edm2-img512-s-fid', 'edm2-img512-s-2147483-0.130.pkl', None, 1.0, 'fid', 2.56),
    ('edm2-img512-s-dino', 'edm2-img512-s-2147483-0.190.pkl', None, 1.0, 'fd_dinov2', 68.64),
    ('edm2-img512-m-fid', 'edm2-img512-m-2147483-0.100.pkl', None, 1.0, 'fid', 2.25),
    ('edm2-img512-m-dino', 'edm2-img512-m-2147483-0.155.pkl', None, 1.0, 'fd_dinov2', 58.44),
    ('edm2-img512-l-fid', 'edm2-img512-l-1879048-0.085.pkl', None, 1.0, 'fid', 2.06),
    ('edm2-img512-l-dino', 'edm2-img512-l-1879048-0.155.pkl', None, 1.0, 'fd_dinov2', 52.25),
    ('edm2-img512-xl-fid', 'edm2-img512-xl-1342177-0.085.pkl', None, 1.0, 'fid', 1.96),
    ('edm2-img512-xl-dino', 'edm2-img512-xl-1342177-0.155.pkl', None, 1.0, 'fd_dinov2', 45.96),
    ('edm2-img512-xxl-fid', 'edm2-img512-xxl-0939524-0.070.pkl', None, 1.0, 'fid', 1.91),
    ('edm2-img512-xxl-dino', 'edm2-img512-xxl-0939524-0.150.pkl', None, 1.0, 'fd_dinov2', 42.84),
    ('edm2-img64-s-fid', 'edm2-img64-s-1073741-0.075.pkl', None, 1.0, 'fid', 1.58),
    ('edm2-img64-m-fid', 'edm2-img64-m-2147483-0.060.pkl', None, 1.0, 'fid', 1.43),
    ('edm2-img64-l-fid', 'edm2-img64-l-1073741-0.040.pkl', None, 1.0, 'fid', 1.33),
    ('edm2-img64-xl-fid', 'edm2-img64-xl-0671088-0.040.pkl', None, 1.0, 'fid', 1.33),
    ('edm2-img512-xs-guid-fid', 'edm2-img512-xs-2147483-0.045.pkl', 'edm2-img512-xs-uncond-2147483-0.045.pkl', 1.4, 'fid', 2.91),
    ('edm2-img512-xs-guid-dino', 'edm2-img512-xs-2147483-0.150.pkl', 'edm2-img512-xs-uncond-2147483-0.150.pkl', 1.7, 'fd_dinov2', 79.94),
    ('edm2-img512-s-guid-fid', 'edm2-img512-s-2147483-0.025.pkl', 'edm2-img512-xs-uncond-2147483-0.025.pkl', 1.4, 'fid', 2.23),
    ('edm2-img512-s-guid-dino', 'edm2-img512-s-2147483-0.085.pkl', 'edm2-img512-xs-uncond-2147483-0.085.pkl', 1.9, 'fd_dinov2', 52.32),
    ('edm2-img512-m-guid-fid', 'edm2-img512-m-2147483-0.030.pkl', 'edm2-img512-xs-uncond-2147483-0.030.pkl', 1.2, 'fid', 2.01),
    ('edm2-img512-m-guid-dino', 'edm2-img512-m-2147483-0.015.pkl', 'edm2-img512-xs-uncond-2147483-0.015.pkl', 2.0, 'fd_dinov2', 41.98),
    ('edm2-img512-l-guid-fid', 'edm2-img512-l-1879048-0.015.pkl', 'edm2-img512-xs-uncond-2147483-0.015.pkl', 1.2, 'fid', 1.88),
    ('edm2-img512-l-guid-dino', 'edm2-img512-l-1879048-0.035.pkl', 'edm2-img512-xs-uncond-2147483-0.035.pkl', 1.7, 'fd_dinov2', 38.2),
    ('edm2-img512-xl-guid-fid', 'edm2-img512-xl-1342177-0.020.pkl', 'edm2-img512-xs-uncond-2147483-0.020.pkl', 1.2, 'fid', 1.85),
    ('edm2-img512-xl-guid-dino', 'edm2-img512-xl-1342177-0.030.pkl', 'edm2-img512-xs-uncond-2147483-0.030.pkl', 1.7, 'fd_dinov2', 35.67),
    ('edm2-img512-xxl-guid-fid', 'edm2-img512-xxl-0939524-0.015.pkl', 'edm2-img512-xs-uncond-2147483-0.015.pkl', 1.2, 'fid', 1.81),
    ('edm2-img512-xxl-guid-dino', 'edm2-img512-xxl-0939524-0.015.pkl', 'edm2-img512-xs-uncond-2147483-0.015.pkl', 1.7, 'fd_dinov2', 33.09),
    ('edm2-img512-s-autog-fid', 'edm2-img512-s-2147483-0.070.pkl', 'edm2-img512-xs-0134217-0.125.pkl', 2.1, 'fid', 1.34),
    ('edm2-img512-s-autog-dino', 'edm2-img512-s-2147483-0.120.pkl', 'edm2-img512-xs-0134217-0.165.pkl', 2.45, 'fd_dinov2', 36.67),
    ('edm2-img512-xxl-autog-fid', 'edm2-img512-xxl-0939524-0.075.pkl', 'edm2-img512-m-0268435-0.155.pkl', 2.05, 'fid', 1.25),
    ('edm2-img512-xxl-autog-dino', 'edm2-img512-xxl-0939524-0.130.pkl', 'edm2-img512-m-0268435-0.205.pkl', 2.3, 'fd_dinov2', 24.18),
    ('edm2-img512-s-uncond-autog-fid', 'edm2-img512-s-uncond-2147483-0.070.pkl', 'edm2-img512-xs-uncond-0134217-0.110.pkl', 2.85, 'fid', 3.86),
    ('edm2-img512-s-uncond-autog-dino', 'edm2-img512-s-uncond-2147483-0.090.pkl', 'edm2-img512-xs-uncond-0134217-0.125.pkl', 2.9, 'fd_dinov2', 90.39),
    ('edm2-img64-s-autog-fid', 'edm2-img64-s-1073741-0.045.pkl', 'edm2-img64-xs-0134217-0.110.pkl', 1.7, 'fid', 1.01),
    ('edm2-img64-s-autog-dino', 'edm2-img64-s-1073741-0.105.pkl', 'edm2-img64-xs-0134217-0.175.pkl', 2.2, 'fd_dinov2', 31.85),
]

RELEASE_PRESETS: dict[str, dict] = {
    name: {"net": net, "gnet": gnet, "guidance": float(w), "metric": metric, "reported": value}
    for name, net, gnet, w, metric, value in _TABLE
}


def preset_names() -> list[str]:
    return list(RELEASE_PRESETS)


def resolve(name: str, root: str = MODEL_ROOT) -> dict:
    """``{'net': URL, 'gnet': URL or None, 'guidance': w, ...}`` of preset ``name`` (files under ``root``)."""
    if name not in RELEASE_PRESETS:
        raise ValueError(f"preset: unknown generation preset {name!r}; choose one of {preset_names()}")
    p = dict(RELEASE_PRESETS[name])
    join = lambda f: None if f is None else root.rstrip("/") + "/" + f  # noqa: E731
    p["net"], p["gnet"] = join(p["net"]), join(p["gnet"])
    return p
