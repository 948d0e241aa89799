"""Sources end to end: a fresh clone of main fetches weights from the web URLs its spec lists, through a
real HTTP server on 127.0.0.1, with every download checked against the spec's sha256."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from brainzoo import sources
from brainzoo.catalogue import find_version
from conftest import brainzoo, clone_main, sh

TOY = "neuronets/toy/0.1.0"
TOY_WEIGHTS = f"{TOY}/weights/model.h5"
SERVER_LIFETIME_S = 120  # every test that starts a server ends within this, server included


@dataclass
class Served:
    """What a local server hands out (path -> bytes, changeable while it runs) and what it was asked for."""

    url: str
    routes: dict[str, bytes]
    hits: list[str] = field(default_factory=list)


@contextlib.contextmanager
def serving(routes: dict[str, bytes]) -> Iterator[Served]:
    """A real HTTP server on 127.0.0.1 (a free port) for the duration of the block."""
    class Handler(BaseHTTPRequestHandler):
        def send_head(self) -> bytes | None:
            served.hits.append(self.path)
            body = served.routes.get(self.path)
            if body is None:
                self.send_error(404)
                return None
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return body

        def do_HEAD(self):
            self.send_head()

        def do_GET(self):
            body = self.send_head()
            if body is not None:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    served = Served(url=f"http://127.0.0.1:{server.server_address[1]}", routes=routes)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def add_web_source(origin: Path, url: str) -> None:
    """List a web URL for the toy weights in the origin's spec and commit it."""
    spec_file = origin / TOY / "spec.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    spec["weights"][0]["sources"].append({"type": "web", "url": url})
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    sh("git", "commit", "-q", "-m", "toy: web source", str(spec_file), cwd=origin)


def allow_loopback_downloads(clone: Path) -> None:
    """git-annex refuses private addresses by default; allow loopback in this clone only."""
    sh("git", "config", "annex.security.allowed-ip-addresses", "127.0.0.1", cwd=clone)


def empty_store(clone: Path) -> None:
    for obj in (clone / "store").rglob("SHA256E-*"):
        if obj.is_file():
            obj.unlink()


def annex_objects(clone: Path) -> list[Path]:
    return [p for p in (clone / ".git" / "annex" / "objects").rglob("SHA256E-*") if p.is_file()]


@pytest.fixture
def web_only_clone(toy_dataset, tmp_path) -> Iterator[tuple[Path, Served, bytes]]:
    """A fresh clone of main, never bootstrapped, whose only source of the toy weights is a URL in the
    spec: the origin remote is removed and the committed store emptied."""
    content = (toy_dataset / TOY_WEIGHTS).read_bytes()
    with serving({f"/{TOY_WEIGHTS}": content}) as server:
        add_web_source(toy_dataset, f"{server.url}/{TOY_WEIGHTS}")
        clone = clone_main(toy_dataset, tmp_path / "clone")
        sh("git", "remote", "remove", "origin", cwd=clone)
        empty_store(clone)
        allow_loopback_downloads(clone)
        yield clone, server, content


@pytest.mark.timeout(SERVER_LIFETIME_S)
def test_fresh_clone_gets_weights_from_a_spec_url_without_bootstrap(web_only_clone):
    clone, server, content = web_only_clone
    records = list(sources.get(clone, TOY))
    assert [r["action"] for r in records if r["action"] != "bootstrap"] == ["sources", "get"]
    assert records[-1] == {"action": "get", "path": TOY_WEIGHTS, "status": "ok", "message": "sha256 matches the spec"}
    assert (clone / TOY_WEIGHTS).read_bytes() == content
    assert server.hits.count(f"/{TOY_WEIGHTS}") >= 1
    assert sh("git", "annex", "fsck", TOY_WEIGHTS, cwd=clone).returncode == 0


@pytest.mark.timeout(SERVER_LIFETIME_S)
@pytest.mark.parametrize("damage", ["tampered", "truncated"])
def test_a_bad_download_is_rejected_and_leaves_nothing(web_only_clone, damage):
    clone, server, content = web_only_clone
    bad = b"\0" * len(content) if damage == "tampered" else content[: len(content) // 2]
    server.routes[f"/{TOY_WEIGHTS}"] = bad
    record = list(sources.get(clone, TOY))[-1]
    assert record["status"] == "error" and record["path"] == TOY_WEIGHTS, record
    assert server.hits, "the web URL was never tried"
    assert not (clone / TOY_WEIGHTS).exists()
    assert annex_objects(clone) == []


@pytest.mark.timeout(SERVER_LIFETIME_S)
def test_the_spec_checksum_catches_what_git_annex_was_told_not_to_check(web_only_clone):
    clone, server, content = web_only_clone
    sh("git", "config", "remote.web.annex-verify", "false", cwd=clone)
    server.routes[f"/{TOY_WEIGHTS}"] = b"\0" * len(content)
    record = list(sources.get(clone, TOY))[-1]
    assert record["status"] == "error" and "the spec says" in record["message"], record
    assert not (clone / TOY_WEIGHTS).exists()
    assert annex_objects(clone) == []


@pytest.mark.timeout(SERVER_LIFETIME_S)
def test_the_in_repo_store_is_tried_before_the_web(toy_dataset, tmp_path):
    with serving({}) as server:
        add_web_source(toy_dataset, f"{server.url}/{TOY_WEIGHTS}")
        clone = clone_main(toy_dataset, tmp_path / "clone")
        allow_loopback_downloads(clone)
        assert brainzoo("bootstrap", cwd=clone).returncode == 0
        assert list(sources.get(clone, TOY))[-1]["status"] == "ok"
        assert server.hits == []


def test_a_spec_whose_checksum_disagrees_with_the_annexed_file_is_not_fetched(toy_dataset, tmp_path):
    clone = clone_main(toy_dataset, tmp_path / "clone")
    spec_file = clone / TOY / "spec.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    spec["weights"][0]["sha256"] = "1" * 64
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    [record] = [r for r in sources.get(clone, TOY) if r["action"] == "get"]
    assert record["status"] == "error" and "does not match the spec's sha256" in record["message"]
    assert not (clone / TOY_WEIGHTS).exists()


def test_source_urls_put_osf_before_other_web_urls(toy_dataset):
    spec_file = toy_dataset / TOY / "spec.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    spec["weights"][0]["sources"] += [{"type": "web", "url": "https://example.org/model.h5"},
                                      {"type": "upstream", "url": "https://example.org/model.pth"},
                                      {"type": "osf", "url": "https://osf.io/download/abc/"}]
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    weights = find_version(TOY, toy_dataset).weights_file()
    assert sources.source_urls(weights) == ["https://osf.io/download/abc/", "https://example.org/model.h5"]


SPEC_WITH_COMMENTS = """\
# hand-written: comments and layout must survive
weights:
  - name: model   # the only one
    sources:
      - {type: inrepo-store}
      - type: web
        url: https://example.org/a.h5   # mirror
    size: 3
  - name: other
    sources: [{type: inrepo-store}]
"""


@pytest.mark.parametrize("index, added_line", [
    (0, "      - {type: osf, url: 'https://osf.io/download/x/'}\n    size: 3"),
    (1, "    sources: [{type: inrepo-store}, {type: osf, url: 'https://osf.io/download/x/'}]"),
])
def test_add_spec_source_keeps_the_file_as_written(tmp_path, index, added_line):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(SPEC_WITH_COMMENTS)
    source = {"type": "osf", "url": "https://osf.io/download/x/"}
    assert sources.add_spec_source(spec_file, index, source) is True
    text = spec_file.read_text()
    assert added_line in text
    assert "# hand-written" in text and "# the only one" in text and "# mirror" in text
    assert yaml.safe_load(text)["weights"][index]["sources"][-1] == source
    assert sources.add_spec_source(spec_file, index, source) is False
    assert spec_file.read_text() == text
