"""Local paths or ``http(s)://`` URLs for model files, statistics and snapshot folders.

``fetch(path_or_url)`` returns a local file: a path is checked and returned as is; a URL is
downloaded once into the cache folder and reused afterwards. Downloads go to a temporary
file next to the destination and are renamed over it only when complete (and as long as the
server announced), so an interrupted download never leaves a file that looks finished.

The cache folder is ``$EDM2FAST_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/edm2fast``
(``~/.cache/edm2fast``); files go to ``<cache>/downloads/<hash of the URL>-<file name>``.
What is downloaded is only ever read as data (safetensors, or pickles through the restricted
unpickler of :mod:`edm2fast.convert`); nothing from it runs.

For ``edm2fast metrics --ref URL`` & co.: ``path = download.fetch(args.ref, what="--ref")``.
"""

from __future__ import annotations

import hashlib
import html.parser
import os
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request

__all__ = ["CACHE_ENV", "is_url", "cache_dir", "cached_path", "fetch", "list_url_folder", "url_join"]

CACHE_ENV = "EDM2FAST_CACHE_DIR"
_CHUNK = 1 << 20


def is_url(value) -> bool:
    """True for ``http://`` and ``https://`` URLs."""
    return isinstance(value, str) and re.match(r"^https?://", value, re.IGNORECASE) is not None


def cache_dir() -> str:
    """The cache folder (``$EDM2FAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/edm2fast``, else ``~/.cache/edm2fast``)."""
    if os.environ.get(CACHE_ENV):
        return os.path.expanduser(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "edm2fast")


def url_join(root: str, name: str) -> str:
    """``root`` + ``/`` + ``name`` for a URL or a local folder."""
    if is_url(root):
        return root.rstrip("/") + "/" + name.lstrip("/")
    return os.path.join(root, name)


def _file_name(url: str) -> str:
    base = os.path.basename(urllib.parse.urlparse(url).path) or "index"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[-100:]
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"


def cached_path(url: str, cache: str | None = None) -> str:
    """Where ``url`` is (or will be) stored in the cache."""
    return os.path.join(cache or cache_dir(), "downloads", _file_name(url))


def _progress_bar(total, name, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, leave=False, file=sys.stderr)


def _download(url: str, dest: str, progress: bool, timeout: float) -> None:
    from .io import atomic_path
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "edm2fast"}),
                                          timeout=timeout)
    except urllib.error.HTTPError as e:
        raise FileNotFoundError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise FileNotFoundError(f"{url}: cannot download ({getattr(e, 'reason', e)})") from None
    with response:
        total = response.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        bar = _progress_bar(total, os.path.basename(dest).split("-", 1)[-1], progress)
        done = 0
        try:
            with atomic_path(dest) as tmp:
                with open(tmp, "wb") as f:
                    while True:
                        try:
                            chunk = response.read(_CHUNK)
                        except OSError as e:
                            raise FileNotFoundError(f"{url}: download interrupted after {done} bytes ({e})") from None
                        if not chunk:
                            break
                        f.write(chunk)
                        done += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                if total is not None and done != total:
                    raise FileNotFoundError(f"{url}: download incomplete ({done} of {total} bytes)")
        finally:
            if bar is not None:
                bar.close()


def fetch(path_or_url, what: str = "path", cache: str | None = None, progress: bool = True,
          timeout: float = 60.0) -> str:
    """A local file for ``path_or_url``: the path itself, or the cached download of the URL.

    Raises FileNotFoundError naming ``what`` (e.g. ``'--net'``) when the file does not exist
    or the download fails.
    """
    if not isinstance(path_or_url, (str, os.PathLike)):
        raise TypeError(f"{what}: expected a path or a URL, got {type(path_or_url).__name__}")
    path_or_url = os.fspath(path_or_url)
    if not is_url(path_or_url):
        if not os.path.exists(path_or_url):
            raise FileNotFoundError(f"{what}: {path_or_url}: no such file")
        return path_or_url
    dest = cached_path(path_or_url, cache)
    if not os.path.isfile(dest):
        try:
            _download(path_or_url, dest, progress, timeout)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{what}: {e}") from None
    return dest


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links += [v for k, v in attrs if k == "href" and v]


def list_url_folder(url: str, timeout: float = 60.0) -> list[str]:
    """The file names an HTTP folder listing (an HTML index page) links to, in page order."""
    if not is_url(url):
        raise ValueError(f"url: expected an http(s) URL, got {url!r}")
    folder = url.rstrip("/") + "/"
    try:
        with urllib.request.urlopen(urllib.request.Request(folder, headers={"User-Agent": "edm2fast"}),
                                    timeout=timeout) as r:
            page = r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        raise FileNotFoundError(f"{folder}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise FileNotFoundError(f"{folder}: cannot list ({getattr(e, 'reason', e)})") from None
    parser = _Links()
    parser.feed(page)
    names = []
    for link in parser.links:
        target = urllib.parse.urljoin(folder, link)
        if not target.startswith(folder):
            continue
        name = urllib.parse.unquote(target[len(folder):])
        if name and "/" not in name and name not in names:
            names.append(name)
    return names


def remove_cached(url: str, cache: str | None = None) -> bool:
    """Delete the cached copy of ``url``; True if there was one."""
    path = cached_path(url, cache)
    if os.path.isfile(path):
        os.remove(path)
        return True
    return False


def clear_cache(cache: str | None = None) -> None:
    """Delete every cached download."""
    shutil.rmtree(os.path.join(cache or cache_dir(), "downloads"), ignore_errors=True)
