"""The Jane Austen corpus (r-cran-janeaustenr) and the R serialization reader behind it."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from tierserve.data.austen import INSTALLED_DB, NOVELS, AustenUnavailableError, austen_dir, austen_texts
from tierserve.data.rds import RDataError, RPairList, RVector, read_lazy_load_db, unserialize


def _i(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _chars(s: str | None) -> bytes:
    if s is None:
        return _i(9, -1)
    raw = s.encode()
    return _i(9 | (1 << 3 << 12), len(raw)) + raw  # CHARSXP with the UTF-8 level bit


def _header(version: int = 3) -> bytes:
    out = b"X\n" + _i(version, 0x040201, 0x030500)
    return out + (_i(5) + b"UTF-8" if version == 3 else b"")


def _named_strs() -> bytes:
    """Hand-encoded per R Internals: c(a = "x", b = NA) -- STRSXP with a names attribute."""
    names_attr = (_i(2 | (1 << 10)) + _i(1) + _chars("names")        # LISTSXP with tag: SYMSXP "names"
                  + _i(16, 2) + _chars("a") + _chars("b") + _i(254))  # car = STRSXP, cdr = NULL
    return _i(16 | (1 << 9), 2) + _chars("x") + _chars(None) + names_attr


def test_unserialize_hand_encoded_vectors():
    value = unserialize(_header() + _named_strs())
    assert isinstance(value, RVector)
    assert value.values == ["x", None]
    assert value.as_dict() == {"a": "x", "b": None}
    ints = unserialize(_header(2) + _i(13, 3, 7, -(2 ** 31), -1))
    assert ints.values == [7, None, -1]
    reals = unserialize(_header() + _i(14, 2) + struct.pack(">2d", 1.5, -0.25))
    assert reals.values == [1.5, -0.25]
    # list(1L, NULL) and a pairlist whose second tag is a back-reference to symbol #1.
    lst = unserialize(_header() + _i(19, 2) + _i(13, 1, 1) + _i(254))
    assert lst.values[0].values == [1] and lst.values[1] is None
    pl = unserialize(_header() + _i(2 | (1 << 10)) + _i(1) + _chars("k") + _i(13, 1, 5)
                     + _i(2 | (1 << 10)) + _i(255 | (1 << 8)) + _i(13, 1, 6) + _i(254))
    assert isinstance(pl, RPairList) and pl.items[0][0] == "k" and pl.items[1][0] == "k"
    assert [v.values for _, v in pl.items] == [[5], [6]]


def test_unserialize_rejects_bad_streams():
    with pytest.raises(RDataError, match="format"):
        unserialize(b"A\n" + _i(3, 0, 0))
    with pytest.raises(RDataError, match="version 4"):
        unserialize(b"X\n" + _i(4, 0, 0))
    with pytest.raises(RDataError, match="truncated"):
        unserialize(_header() + _i(16, 5) + _chars("only one"))


def test_lazy_load_db_roundtrip(tmp_path):
    """An .rdx/.rdb pair built by hand: gzip'd index, zlib records with a 4-byte length."""
    records = {"first": _header() + _named_strs(), "second": _header() + _i(13, 2, 4, 2)}
    rdb, entries = b"", []
    for name, payload in records.items():
        blob = struct.pack(">I", len(payload)) + zlib.compress(payload)
        entries.append((name, len(rdb), len(blob)))
        rdb += blob
    names = _i(2 | (1 << 10)) + _i(1) + _chars("names")
    variables = (_i(19 | (1 << 9), len(entries)) + b"".join(_i(13, 2, off, n) for _, off, n in entries)
                 + names + _i(16, len(entries)) + b"".join(_chars(n) for n, _, _ in entries) + _i(254))
    index = (_header() + _i(19 | (1 << 9), 1) + variables + names + _i(16, 1) + _chars("variables") + _i(254))
    (tmp_path / "db.rdx").write_bytes(gzip.compress(index))
    (tmp_path / "db.rdb").write_bytes(rdb)
    out = read_lazy_load_db(str(tmp_path / "db"))
    assert out["first"].values == ["x", None]
    assert out["second"].values == [4, 2]


@pytest.fixture(scope="module")
def texts():
    return austen_texts()


def test_six_novels_with_known_openings(texts):
    assert list(texts) == list(NOVELS.values())
    assert "It is a truth universally acknowledged, that a single man in possession" in texts["Pride & Prejudice"]
    assert texts["Emma"].startswith("EMMA")
    assert "Emma Woodhouse, handsome, clever, and rich" in texts["Emma"]
    assert "Sir Walter Elliot, of Kellynch Hall, in Somersetshire" in texts["Persuasion"]
    assert "No one who had ever seen Catherine Morland in her infancy" in texts["Northanger Abbey"]
    assert "The family of Dashwood had long been settled in Sussex." in texts["Sense & Sensibility"]
    assert "About thirty years ago Miss Maria Ward, of Huntingdon" in texts["Mansfield Park"]


def test_sizes_plausible(texts):
    # janeaustenr's austen_books() has 73,422 lines in total (one element per line).
    assert sum(t.count("\n") + 1 for t in texts.values()) == 73422
    for title, text in texts.items():
        assert 400_000 < len(text) < 950_000, title
    # Persuasion has fewer lines than Emma (the package's own test).
    assert texts["Persuasion"].count("\n") < texts["Emma"].count("\n")


def test_cache_dir_and_xdg_from_a_cached_deb(tmp_path, monkeypatch, texts):
    """XDG_CACHE_HOME is honoured; a .deb already in <cache>/tierserve/austen is unpacked, not re-downloaded."""
    debs = list(Path(austen_dir()).glob("r?cran?janeaustenr_*.deb"))
    if not debs or os.path.isfile(INSTALLED_DB + ".rdx"):
        pytest.skip("the corpus came from an installed package, no .deb to reuse")
    target = tmp_path / "tierserve" / "austen"
    target.mkdir(parents=True)
    shutil.copy(debs[0], target)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                               if not os.path.isfile(os.path.join(p, "apt-get"))))
    assert austen_texts() == texts
    assert (target / "austen-v1.json").is_file()


def test_clear_error_without_apt(tmp_path, monkeypatch):
    if os.path.isfile(INSTALLED_DB + ".rdx"):
        pytest.skip("janeaustenr is installed system-wide")
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-deb
    with pytest.raises(AustenUnavailableError, match="apt-get"):
        austen_texts(cache_dir=str(tmp_path))
