"""Jane Austen's six novels as plain text, from the Debian package ``r-cran-janeaustenr``.

Real English text for calibration and perplexity, with no model hub involved.

Where the text comes from, first hit wins:

1. ``<cache>/austen/austen-v<VERSION>.json`` (the decoded texts of an earlier call);
2. an installed package: ``/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx``;
3. a ``.deb`` in ``<cache>/austen/`` (``r-cran-janeaustenr_*.deb``);
4. ``apt-get download r-cran-janeaustenr`` run (lazily, via subprocess) in
   ``<cache>/austen/``. This needs apt's package lists (``apt-get update``)
   but no root and installs nothing. Without apt, or when the download fails,
   ``AustenUnavailableError`` says how to get the package.

The ``.deb`` (an ar archive) is read in Python: from its ``data.tar.*`` member
the two files ``data/Rdata.rdb/.rdx`` are copied to ``<cache>/austen/deb/``, and
the lazy-load database ``data/Rdata.rdb/.rdx`` is decoded with
``tierserve.data.rds``: six character vectors (one element per line of the
Project Gutenberg text). Each novel's lines are joined with ``"\\n"``.

``<cache>`` is ``cache_dir`` if given, else ``$XDG_CACHE_HOME/tierserve``, else
``~/.cache/tierserve``. The JSON cache is written to a temporary file and
renamed into place, so readers never see a partial file.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile

from tierserve.data.rds import RVector, read_lazy_load_db
from tierserve.errors import TierserveError
from tierserve.paths import cache_root

PACKAGE = "r-cran-janeaustenr"
INSTALLED_DB = "/usr/lib/R/site-library/janeaustenr/data/Rdata"
_DB_IN_DEB = "usr/lib/R/site-library/janeaustenr/data/Rdata"
CACHE_VERSION = 1
# R object name -> title.
NOVELS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
INSTALL_HINT = (f"get it with `apt-get update && apt-get download {PACKAGE}` (run in the cache folder "
                f"named above) or `apt-get install {PACKAGE}`")


class AustenUnavailableError(TierserveError):
    """The janeaustenr package cannot be found or downloaded."""


def austen_dir(cache_dir: str | None = None) -> str:
    return os.path.join(cache_root(cache_dir), "austen")


def austen_texts(cache_dir: str | None = None) -> dict[str, str]:
    """``{title: text}`` for the six novels (see module docstring for sources and cache)."""
    folder = austen_dir(cache_dir)
    cached = os.path.join(folder, f"austen-v{CACHE_VERSION}.json")
    if os.path.isfile(cached):
        with open(cached, encoding="utf-8") as f:
            return json.load(f)
    texts = _decode_db(_find_db(folder))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".austen-", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(texts, f)
    os.chmod(tmp, 0o644)
    os.replace(tmp, cached)
    return texts


def _decode_db(base: str) -> dict[str, str]:
    objects = read_lazy_load_db(base)
    texts = {}
    for name, title in NOVELS.items():
        vec = objects.get(name)
        if not isinstance(vec, RVector):
            raise AustenUnavailableError(f"{base}.rdb holds no character vector {name!r}; found {sorted(objects)}")
        texts[title] = "\n".join("" if line is None else line for line in vec.values)
    return texts


def _find_db(folder: str) -> str:
    if os.path.isfile(INSTALLED_DB + ".rdx"):
        return INSTALLED_DB
    extracted = os.path.join(folder, "deb", _DB_IN_DEB)
    if os.path.isfile(extracted + ".rdx"):
        return extracted
    debs = sorted(glob.glob(os.path.join(folder, f"{PACKAGE.replace('-', '?')}_*.deb")))
    deb = debs[-1] if debs else _download(folder)
    _extract(deb, os.path.join(folder, "deb"))
    return extracted


def _download(folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    try:
        proc = subprocess.run(["apt-get", "download", PACKAGE], cwd=folder, capture_output=True, text=True,
                              timeout=300)
    except FileNotFoundError:
        raise AustenUnavailableError(f"`apt-get` is not available on this machine, so the Jane Austen corpus "
                                     f"({PACKAGE}) cannot be fetched into {folder}; {INSTALL_HINT}, or copy a "
                                     f"{PACKAGE}_*.deb there") from None
    debs = sorted(glob.glob(os.path.join(folder, f"{PACKAGE.replace('-', '?')}_*.deb")))
    if proc.returncode != 0 or not debs:
        raise AustenUnavailableError(f"`apt-get download {PACKAGE}` failed in {folder} "
                                     f"(exit {proc.returncode}: {proc.stderr.strip()[-300:]}); {INSTALL_HINT}")
    return debs[-1]


def _extract(deb: str, target: str) -> None:
    """Copy ``Rdata.rdb/.rdx`` out of the .deb: an ar archive whose ``data.tar.{xz,gz,bz2}`` holds them."""
    with open(deb, "rb") as f:
        blob = f.read()
    if blob[:8] != b"!<arch>\n":
        raise AustenUnavailableError(f"{deb} is not a Debian package (no ar magic)")
    pos, data = 8, None
    while pos + 60 <= len(blob):
        name, size = blob[pos:pos + 16].decode().strip(), int(blob[pos + 48:pos + 58])
        if name.rstrip("/").startswith("data.tar"):
            data = blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    if data is None:
        raise AustenUnavailableError(f"{deb} has no data.tar member")
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except tarfile.ReadError as exc:
        raise AustenUnavailableError(f"cannot read the data archive of {deb} ({exc}); unpack it with "
                                     f"`dpkg-deb -x {deb} {target}`") from exc
    with tar:
        for suffix in (".rdx", ".rdb"):
            member = tar.extractfile("./" + _DB_IN_DEB + suffix)
            if member is None:
                raise AustenUnavailableError(f"{deb} does not contain {_DB_IN_DEB}{suffix}")
            out = os.path.join(target, _DB_IN_DEB + suffix)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".rdata-", dir=os.path.dirname(out))
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(member, f)
            os.replace(tmp, out)
