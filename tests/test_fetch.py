"""fetch_data against a fake urllib opener: downloads, skips, and failures that leave nothing behind."""
from __future__ import annotations

import io
import urllib.error
import urllib.request
import urllib.response
from email.message import Message
from pathlib import Path

import pytest

from core.data import LAYOUT, load_dataset
from core.fetch import URLS, FetchError, fetch_data

FIXTURES = Path(__file__).parent / "fixtures" / "data"
BODIES = {
    **{url: (FIXTURES / "semeval.xml").read_bytes() for url in URLS["mams"].values()},
    **{url: (FIXTURES / "sentihood.json").read_bytes() for url in URLS["sentihood"].values()},
}


class Dropped(io.BytesIO):
    """A response body whose connection drops after the first chunk."""

    def read(self, size: int = -1) -> bytes:
        if self.tell():
            raise ConnectionResetError("connection reset by peer")
        return super().read(10)


class FakeServer(urllib.request.BaseHandler):
    """Answers https requests from ``bodies``; a bytes body is served, an exception raised."""

    def __init__(self, bodies: dict[str, bytes | Exception | io.BytesIO]) -> None:
        self.bodies = bodies
        self.requests: list[str] = []

    def https_open(self, request: urllib.request.Request) -> urllib.response.addinfourl:
        url = request.full_url
        self.requests.append(url)
        body = self.bodies[url]
        if isinstance(body, Exception):
            raise body
        headers = Message()
        if isinstance(body, bytes):
            headers["Content-Length"] = str(len(body))
            body = io.BytesIO(body)
        return urllib.response.addinfourl(body, headers, url, 200)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    fake = FakeServer(dict(BODIES))
    opener = urllib.request.OpenerDirector()
    opener.add_handler(fake)
    monkeypatch.setattr(urllib.request, "_opener", opener)  # what urlopen uses once installed
    return fake


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_fetch_downloads_checks_and_skips(server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = fetch_data(tmp_path, progress=False)
    expected = [tmp_path / rel for name in ("mams", "sentihood") for rel in LAYOUT[name].values()]
    assert paths == expected
    assert files_under(tmp_path) == sorted(str(p.relative_to(tmp_path)) for p in expected)  # no .part files
    assert (tmp_path / "mams-atsa" / "val.xml").read_bytes() == BODIES[URLS["mams"]["dev"]]
    assert len(load_dataset("mams", tmp_path).splits["dev"]) == 5
    assert len(server.requests) == 6

    (tmp_path / "sentihood" / "sentihood-dev.json").write_text("<html>rate limited</html>")
    assert fetch_data(tmp_path, ["sentihood"], progress=True) == expected[3:]
    assert server.requests[6:] == [URLS["sentihood"]["dev"]]  # only the broken file again
    assert len(load_dataset("sentihood", tmp_path).splits["dev"]) == 3
    assert "sentihood-train.json: present, skipped" in capsys.readouterr().out


def test_offline_gives_helpful_error(server: FakeServer, tmp_path: Path) -> None:
    server.bodies[URLS["mams"]["train"]] = urllib.error.URLError(OSError("[Errno -3] Temporary failure in name resolution"))
    with pytest.raises(FetchError) as err:
        fetch_data(tmp_path, ["mams"], progress=False)
    message = str(err.value)
    assert message.startswith("could not reach raw.githubusercontent.com: [Errno -3] Temporary failure")
    assert f"copy train.xml, val.xml, test.xml by hand into {tmp_path / 'mams-atsa'}/" in message
    assert "siat-nlp/MAMS-for-ABSA" in message and "README" in message
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"<html>Not here</html>", "is not a valid mams file"),
        (Dropped(b"<sentences>" + b" " * 100), "connection reset by peer"),
        (urllib.error.HTTPError(URLS["mams"]["test"], 404, "Not Found", Message(), None), "HTTP 404 Not Found"),
        (TimeoutError("timed out"), "timed out"),
    ],
    ids=["invalid", "dropped", "404", "timeout"],
)
def test_failed_download_leaves_nothing(server: FakeServer, tmp_path: Path, body, fragment: str) -> None:
    server.bodies[URLS["mams"]["test"]] = body
    with pytest.raises(FetchError, match=fragment) as err:
        fetch_data(tmp_path, ["mams"], progress=False)
    assert "by hand" in str(err.value)
    assert files_under(tmp_path) == ["mams-atsa/train.xml", "mams-atsa/val.xml"]  # complete, checked files only


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown data set"):
        fetch_data(tmp_path, ["semeval"])
