"""MovieLens-100k in the common session format.

Two on-disk layouts are accepted (detected from the files present in ``root``):

* GroupLens: ``u.data`` (tab: user item rating timestamp), ``u.user``
  (``id|age|gender|occupation|zip``), ``u.item`` (latin-1, ``id|title|release date|video
  release|url|19 genre flags``);
* RecBole atomic files: ``ml-100k.inter``, ``ml-100k.user``, ``ml-100k.item`` (tab
  separated, typed headers such as ``user_id:token``; genres in ``class:token_seq``).

The data is never shipped with the package (GroupLens terms forbid redistribution).
:func:`fetch_movielens_100k` downloads it into a cache: first from GroupLens, and where that
is unreachable from the RecBole wheel on PyPI, which carries the atomic files.

Example::

    from recd_plugin.data import load_movielens_100k, TableBatches
    table = load_movielens_100k()          # ~/.cache/recd_plugin/ml-100k, fetched if missing
    batches = TableBatches(table, batch_size=1024)

Raw ids become 0-based dense ids (users/items sorted by raw id; gender and occupation by
name); ages are bucketed (<18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), zip codes by their
first two digits (non-numeric -> bucket 100), release years by value (unknown -> bucket 0).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import pyarrow as pa

from recd_plugin.errors import RecDError
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from .sessions import HISTORY_LENGTH, SESSION_GAP_SECONDS, build_session_table

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE_REQUIREMENT = "recbole==1.2.1"
GROUPLENS_FILES = ("u.data", "u.user", "u.item")
RECBOLE_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip
AGE_EDGES = [18, 25, 35, 45, 50, 56]
NUM_ZIP = 101  # "00".."99" plus one bucket for non-numeric (foreign) codes
_FIX = "re-download it with fetch_movielens_100k(<dir>) or point root at a clean copy"


class MovieLensNotFoundError(RecDError, FileNotFoundError):
    """The MovieLens files are missing (and could not be fetched)."""


class MovieLensFormatError(RecDError, ValueError):
    """A MovieLens file has a malformed row or a missing/invalid column."""


def default_root() -> Path:
    """``$RECD_PLUGIN_DATA/ml-100k`` if set, else ``~/.cache/recd_plugin/ml-100k``."""
    base = os.environ.get("RECD_PLUGIN_DATA")
    base_path = Path(base) if base else Path.home() / ".cache" / "recd_plugin"
    return base_path / "ml-100k"


def _detect_layout(root: Path) -> Optional[str]:
    """"grouplens" or "recbole" (a complete set of files), None (neither started)."""
    layouts = {"grouplens": GROUPLENS_FILES, "recbole": RECBOLE_FILES}
    present = {k: [f for f in files if (root / f).is_file()] for k, files in layouts.items()}
    for layout, files in layouts.items():
        if len(present[layout]) == len(files):
            return layout
    for layout, files in layouts.items():
        if present[layout]:  # a partial copy: do not silently download next to it
            missing = [str(root / f) for f in files if f not in present[layout]]
            raise MovieLensNotFoundError(
                f"incomplete MovieLens-100k ({layout} layout) in {root}: missing "
                f"{', '.join(missing)}; add the missing files or {_FIX}"
            )
    return None


def _read(path: Path, names: List[str], types: Dict[str, pa.DataType], delimiter: str,
          encoding: str = "utf8", skip_rows: int = 0) -> pa.Table:
    """Read a delimited file without quoting; wrap Arrow's errors with the file name."""
    try:
        return pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(column_names=names, skip_rows=skip_rows,
                                          encoding=encoding),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, quote_char=False),
            convert_options=pcsv.ConvertOptions(column_types=types,
                                                include_columns=list(types)),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise MovieLensFormatError(f"{path}: malformed file ({e}); {_FIX}") from e


def _col(table: pa.Table, name: str, path: Path) -> np.ndarray:
    """Column as numpy, rejecting empty values with an error that names file and column."""
    col = table.column(name)
    if col.null_count:
        row = pc.index(pc.is_null(col), True).as_py()
        raise MovieLensFormatError(f"{path}: empty value in column '{name}' (data row "
                                   f"{row + 1}); {_FIX}")
    return col.to_numpy()


def _recbole_names(path: Path, required: List[str]) -> List[str]:
    """Column names of a RecBole atomic file, with the ``:type`` suffixes stripped."""
    with open(path, encoding="utf8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    names = [h.split(":", 1)[0] for h in header]
    for r in required:
        if r not in names:
            raise MovieLensFormatError(f"{path}: header has no column '{r}' (found "
                                       f"{header}); {_FIX}")
    return names


def _genre_lists(parent: np.ndarray, genre: np.ndarray, num_items: int) -> pa.ListArray:
    """list<int64> [num_items] from (item row, genre id) pairs, genres sorted per item."""
    order = np.lexsort((genre, parent))
    offsets = np.r_[0, np.cumsum(np.bincount(parent, minlength=num_items))]
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                    pa.array(genre[order].astype(np.int64)))


def _read_grouplens(root: Path) -> Dict[str, object]:
    p = root / "u.data"
    t = _read(p, ["user", "item", "rating", "ts"], {c: pa.int64() for c in
              ["user", "item", "rating", "ts"]}, "\t")
    inter = {c: _col(t, c, p) for c in t.column_names}
    p = root / "u.user"
    t = _read(p, ["id", "age", "gender", "occupation", "zip"],
              {"id": pa.int64(), "age": pa.int64(), "gender": pa.string(),
               "occupation": pa.string(), "zip": pa.string()}, "|")
    users = {c: _col(t, c, p) for c in t.column_names}
    p = root / "u.item"
    flags = [f"g{i}" for i in range(len(GENRES))]
    t = _read(p, ["id", "title", "date", "video", "url"] + flags,
              {"id": pa.int64(), "date": pa.string(), **{g: pa.int64() for g in flags}},
              "|", encoding="latin-1")
    m = np.stack([_col(t, g, p) for g in flags], axis=1)
    if not np.isin(m, (0, 1)).all():
        raise MovieLensFormatError(f"{p}: genre flags must be 0 or 1; {_FIX}")
    parent, genre = np.nonzero(m)
    dates = t.column("date").fill_null("")
    return dict(inter=inter, users=users, item_ids=_col(t, "id", p),
                years=pc.utf8_slice_codeunits(dates, -4).to_numpy(zero_copy_only=False),
                genres=_genre_lists(parent, genre, len(m)))


def _read_recbole(root: Path) -> Dict[str, object]:
    p = root / "ml-100k.inter"
    req = ["user_id", "item_id", "rating", "timestamp"]
    t = _read(p, _recbole_names(p, req), {"user_id": pa.int64(), "item_id": pa.int64(),
              "rating": pa.float64(), "timestamp": pa.float64()}, "\t", skip_rows=1)
    inter = {k: _col(t, c, p) for k, c in zip(["user", "item", "rating", "ts"], req)}
    inter["ts"] = inter["ts"].astype(np.int64)
    p = root / "ml-100k.user"
    req = ["user_id", "age", "gender", "occupation", "zip_code"]
    t = _read(p, _recbole_names(p, req), {"user_id": pa.int64(), "age": pa.int64(),
              "gender": pa.string(), "occupation": pa.string(), "zip_code": pa.string()},
              "\t", skip_rows=1)
    users = {k: _col(t, c, p) for k, c in zip(["id", "age", "gender", "occupation", "zip"],
                                              req)}
    p = root / "ml-100k.item"
    t = _read(p, _recbole_names(p, ["item_id", "release_year", "class"]),
              {"item_id": pa.int64(), "release_year": pa.string(), "class": pa.string()},
              "\t", skip_rows=1)
    tokens = pc.split_pattern(t.column("class").fill_null("").combine_chunks(), " ")
    flat = pc.list_flatten(tokens)
    parent = pc.list_parent_indices(tokens).to_numpy()
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    genre = pc.index_in(flat, value_set=pa.array(GENRES))
    bad = pc.and_(pc.is_null(genre), pa.array(keep))
    if pc.any(bad).as_py():
        raise MovieLensFormatError(f"{p}: unknown genre '{flat.filter(bad)[0]}' in column "
                                   f"'class' (expected one of {GENRES}); {_FIX}")
    return dict(inter=inter, users=users, item_ids=_col(t, "item_id", p),
                years=t.column("release_year").fill_null("").to_numpy(zero_copy_only=False),
                genres=_genre_lists(parent[keep], genre.to_numpy(zero_copy_only=False)[keep]
                                    .astype(np.int64), t.num_rows))


def _dense(ids: np.ndarray, what: str, path: Path) -> np.ndarray:
    """Sorted unique raw ids; duplicates are an error (one row per user/item)."""
    uniq = np.unique(ids)
    if len(uniq) == 0:
        raise MovieLensFormatError(f"{path}: no {what} rows; {_FIX}")
    if len(uniq) != len(ids):
        raise MovieLensFormatError(f"{path}: duplicate {what} ids; {_FIX}")
    return uniq


def _lookup(sorted_ids: np.ndarray, raw: np.ndarray, what: str, root: Path) -> np.ndarray:
    pos = np.minimum(np.searchsorted(sorted_ids, raw), len(sorted_ids) - 1)
    bad = sorted_ids[pos] != raw
    if bad.any():
        raise MovieLensFormatError(f"{root}: rating refers to unknown {what} id "
                                   f"{raw[bad][0]}; {_FIX}")
    return pos.astype(np.int64)


def _build(raw: Dict[str, object], root: Path, session_gap: int,
           history_length: int) -> pa.Table:
    inter, users = raw["inter"], raw["users"]
    user_ids = _dense(users["id"], "user", root)
    item_ids = _dense(raw["item_ids"], "item", root)
    u_order = np.argsort(users["id"])
    i_order = np.argsort(raw["item_ids"])
    gender_names, gender = np.unique(users["gender"][u_order], return_inverse=True)
    occ_names, occ = np.unique(users["occupation"][u_order], return_inverse=True)
    zip2 = np.asarray(pc.utf8_slice_codeunits(pa.array(users["zip"][u_order]), 0, 2)
                      .to_numpy(zero_copy_only=False), dtype=str)
    numeric = np.char.isdigit(zip2) & (np.char.str_len(zip2) == 2)
    zip_bucket = np.where(numeric, np.where(numeric, zip2, "0").astype(np.int64), 100)
    years = np.asarray(raw["years"], dtype=str)[i_order]
    known = np.char.isdigit(years) & (np.char.str_len(years) == 4)
    year = np.where(known, np.where(known, years, "0").astype(np.int64), 0)
    year_values, year_rank = np.unique(year[known], return_inverse=True)
    year_bucket = np.zeros(len(years), dtype=np.int64)
    year_bucket[known] = year_rank + 1  # bucket 0 = unknown release year
    lo, hi = (year_values[0], year_values[-1]) if len(year_values) else (0, 1)
    dense_year = (year - lo) / max(hi - lo, 1)
    dense_year[~known] = dense_year[known].mean() if known.any() else 0.5
    return build_session_table(
        _lookup(user_ids, inter["user"], "user", root),
        _lookup(item_ids, inter["item"], "item", root),
        inter["ts"],
        (inter["rating"] >= 4).astype(np.float32),
        users={"user_age": np.digitize(users["age"][u_order], AGE_EDGES),
               "user_gender": gender, "user_occupation": occ, "user_zip": zip_bucket},
        item_genres=raw["genres"].take(pa.array(i_order)),
        item_year=year_bucket,
        item_dense_year=dense_year.astype(np.float32),
        cardinalities={"user_id": len(user_ids), "user_age": len(AGE_EDGES) + 1,
                       "user_gender": len(gender_names), "user_occupation": len(occ_names),
                       "user_zip": NUM_ZIP, "item_id": len(item_ids),
                       "item_genres": len(GENRES), "item_year": len(year_values) + 1},
        source="movielens-100k",
        session_gap=session_gap,
        history_length=history_length,
    )


def load_movielens_100k(
    root: Optional[Union[str, Path]] = None,
    download: bool = True,
    session_gap: int = SESSION_GAP_SECONDS,
    history_length: int = HISTORY_LENGTH,
) -> pa.Table:
    """MovieLens-100k as the common table (100000 rows, 943 users, 1682 items).

    ``root`` holds either layout; default :func:`default_root`. When it holds neither and
    ``download`` is true, the files are fetched into it first.
    """
    root = default_root() if root is None else Path(root)
    layout = _detect_layout(root)
    if layout is None:
        if not download:
            raise MovieLensNotFoundError(
                f"MovieLens-100k not found in {root}: expected {', '.join(GROUPLENS_FILES)} "
                f"or {', '.join(RECBOLE_FILES)}; pass download=True or run "
                f"fetch_movielens_100k('{root}')")
        fetch_movielens_100k(root)
        layout = _detect_layout(root)
    raw = _read_grouplens(root) if layout == "grouplens" else _read_recbole(root)
    return _build(raw, root, session_gap, history_length)


def _fetch_grouplens(tmp: Path, timeout: float) -> None:
    with urllib.request.urlopen(GROUPLENS_URL, timeout=timeout) as r:
        archive = zipfile.ZipFile(io.BytesIO(r.read()))
    for name in GROUPLENS_FILES + ("README",):
        (tmp / name).write_bytes(archive.read(f"ml-100k/{name}"))


def _fetch_recbole(tmp: Path) -> None:
    with tempfile.TemporaryDirectory() as wheel_dir:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               RECBOLE_REQUIREMENT, "-d", wheel_dir]
        print(f"[recd_plugin] running: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL)
        wheel = next(Path(wheel_dir).glob("recbole-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            for name in RECBOLE_FILES:
                (tmp / name).write_bytes(
                    archive.read(f"recbole/dataset_example/ml-100k/{name}"))


def fetch_movielens_100k(dest: Union[str, Path], timeout: float = 10.0) -> Path:
    """Download MovieLens-100k into ``dest`` (created) and return it.

    Tries the GroupLens zip (``timeout`` seconds), then the RecBole wheel from PyPI via
    ``pip download``. Files are written to a temporary directory next to ``dest`` and moved
    into place with renames, so a crash never leaves a half-written file behind.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache dir should not be
    try:
        try:
            print(f"[recd_plugin] fetching {GROUPLENS_URL} -> {dest}", flush=True)
            _fetch_grouplens(tmp, timeout)
        except Exception as e:  # offline / blocked: fall back to PyPI
            print(f"[recd_plugin] GroupLens unreachable ({e}); using the "
                  f"{RECBOLE_REQUIREMENT} wheel from PyPI", flush=True)
            for f in tmp.iterdir():
                f.unlink()
            try:
                _fetch_recbole(tmp)
            except (OSError, subprocess.SubprocessError, StopIteration, KeyError) as e2:
                raise MovieLensNotFoundError(
                    f"could not fetch MovieLens-100k ({e2}); download {GROUPLENS_URL} "
                    f"and unzip u.data, u.user, u.item into {dest}") from e2
        try:
            os.rename(tmp, dest)  # atomic when dest does not exist (or is empty)
        except OSError:
            dest.mkdir(parents=True, exist_ok=True)
            for f in tmp.iterdir():
                os.replace(f, dest / f.name)  # atomic per file
        print(f"[recd_plugin] MovieLens-100k ready in {dest}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
