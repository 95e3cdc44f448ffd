"""Download the public data sets into the folder layout :func:`core.data.load_dataset` reads.

Each file is downloaded to a temporary file next to its destination, checked with the loader,
then moved into place, so an interrupted or failed download never leaves a partial file.
"""
from __future__ import annotations

import http.client
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from .data import FORMATS, LABELS, LAYOUT, DataError, read_file

URLS: dict[str, dict[str, str]] = {
    "mams": {
        "train": "https://raw.githubusercontent.com/siat-nlp/MAMS-for-ABSA/master/data/MAMS-ATSA/raw/train.xml",
        "dev": "https://raw.githubusercontent.com/siat-nlp/MAMS-for-ABSA/master/data/MAMS-ATSA/raw/val.xml",
        "test": "https://raw.githubusercontent.com/siat-nlp/MAMS-for-ABSA/master/data/MAMS-ATSA/raw/test.xml",
    },
    "sentihood": {
        split: f"https://raw.githubusercontent.com/HSLCY/ABSA-BERT-pair/master/data/sentihood/sentihood-{split}.json"
        for split in ("train", "dev", "test")
    },
}
"""Raw download address of each data set's split files (destinations: :data:`core.data.LAYOUT`)."""

CHUNK = 1 << 16


class FetchError(RuntimeError):
    """A download that failed; the message says what went wrong and how to get the files by hand."""


def _by_hand(dest: Path, dataset: str) -> str:
    folder = (dest / LAYOUT[dataset]["train"]).parent
    names = ", ".join(Path(rel).name for rel in LAYOUT[dataset].values())
    source = URLS[dataset]["train"].rsplit("/", 1)[0]
    return f"copy {names} by hand into {folder}/ (from {source}/); see README.md"


def _is_valid(path: Path, dataset: str, split: str) -> bool:
    try:
        read_file(path, split, name=dataset, fmt=FORMATS[dataset], labels=LABELS[dataset])
    except DataError:
        return False
    return True


def _download(url: str, target: Path, dataset: str, split: str, hint: str, timeout: float, progress: bool) -> None:
    """Fetch ``url`` to a temporary file beside ``target``, check it with the loader, move it into place."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as err:
        raise FetchError(f"cannot write to {target.parent}: {err}") from err
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=str(target.relative_to(target.parents[1])),
                      disable=not progress) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        try:
            read_file(tmp, split, name=dataset, fmt=FORMATS[dataset], labels=LABELS[dataset])
        except DataError as err:
            raise FetchError(f"downloaded {url} but it is not a valid {dataset} file ({err}); {hint}") from err
        os.replace(tmp, target)
    except urllib.error.HTTPError as err:
        raise FetchError(f"{url}: HTTP {err.code} {err.reason}; {hint}") from err
    except urllib.error.URLError as err:
        host = urllib.parse.urlsplit(url).hostname
        raise FetchError(f"could not reach {host}: {err.reason}; {hint}") from err
    except (OSError, http.client.HTTPException) as err:
        raise FetchError(f"could not download {url} to {target}: {err!r}; {hint}") from err
    finally:
        tmp.unlink(missing_ok=True)


def fetch_data(dest: str | Path, datasets: Iterable[str] = ("mams", "sentihood"), *, timeout: float = 30,
               progress: bool = True) -> list[Path]:
    """Download ``datasets`` into ``dest`` (layout :data:`core.data.LAYOUT`); return their file paths.

    Files already present and readable by the loader are kept. Raises :class:`FetchError` when a
    download fails (nothing partial is left behind) and ValueError for an unknown data set name.
    """
    dest = Path(dest)
    names = [datasets] if isinstance(datasets, str) else list(datasets)
    unknown = [name for name in names if name not in URLS]
    if unknown:
        raise ValueError(f"unknown data set(s) {', '.join(unknown)}; choose from {', '.join(URLS)}")
    paths = []
    for dataset in names:
        hint = _by_hand(dest, dataset)
        for split, url in URLS[dataset].items():
            target = dest / LAYOUT[dataset][split]
            if target.is_file() and _is_valid(target, dataset, split):
                if progress:
                    tqdm.write(f"{target}: present, skipped")
            else:
                _download(url, target, dataset, split, hint, timeout, progress)
            paths.append(target)
    return paths
