"""Publishing to OSF with OSF out of reach: the dry run step by step, the special remote datalad-osf would
configure, every bad input refused before anything changes, a push that fails midway, and whole
publications by the real datalad-osf, git-annex-remote-osf and osfclient against a stand-in for OSF's API
and file service, reached on 127.0.0.1 through an HTTPS proxy that this test trusts."""

from __future__ import annotations

import datetime
import json
import re
import shutil
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import keyring
import keyring.backends.null
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from datalad_osf.utils import initialize_osf_remote

from brainzoo import annex, validate
from brainzoo.errors import BrainzooError
from brainzoo.publish import NEW_NODE, publish
from conftest import sh
from test_sources import SERVER_LIFETIME_S, TOY, TOY_WEIGHTS

NODE = "abcde"
STEPS = ["save", "sibling", "push", "urls", "save"]


def toy_key(root: Path) -> str:
    return sh("git", "annex", "lookupkey", TOY_WEIGHTS, cwd=root).stdout.strip()


def snapshot(root: Path) -> dict:
    """Everything publishing could change: commits, the git-annex branch, configuration, the work tree."""
    queries = {"commit": ["rev-parse", "HEAD"], "git-annex branch": ["rev-parse", "git-annex"],
               "config": ["config", "--local", "--list"], "work tree": ["status", "--porcelain"]}
    return {what: sh("git", *args, cwd=root, check=False).stdout for what, args in queries.items()}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def osf_unreachable(monkeypatch):
    """Credentials as datalad-osf reads them from the environment, and every HTTPS request (this process
    and git-annex's special remote alike) sent to a closed port on 127.0.0.1 instead of OSF."""
    proxy = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("OSF_TOKEN", "not-a-real-token")
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, proxy)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def no_stored_credentials(monkeypatch):
    """No OSF credentials anywhere datalad-osf looks: environment or keyring."""
    for var in ("OSF_TOKEN", "OSF_USERNAME", "OSF_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    previous = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.null.Keyring())
    yield
    keyring.set_keyring(previous)


def test_dry_run_shows_the_exact_call_of_each_step_and_changes_nothing(toy_dataset, osf_unreachable):
    root = toy_dataset
    before = snapshot(root)
    records = list(publish(root, TOY, osf_project=NODE, dry_run=True))
    assert [r["step"] for r in records] == STEPS
    assert all(r["status"] == "ok" and r["message"].startswith(f"dry run of the {r['step']} step; would call:\n") for r in records)
    assert records[1]["message"].endswith(
        f"\ngit annex initremote osf-storage type=external externaltype=osf encryption=none autoenable=true node={NODE}")
    assert f"\ndatalad.api.push(dataset='{root}', to='osf-storage'" in records[2]["message"]
    save, sibling, push, urls, save_spec = (r["operations"] for r in records)
    assert save == [{"call": "datalad.api.save", "arguments": {
        "dataset": str(root), "path": [str(root / TOY)], "message": f"{TOY}: weights to publish on OSF"}}]
    assert sibling == [{"call": "git", "arguments": [
        "annex", "initremote", "osf-storage", "type=external", "externaltype=osf", "encryption=none",
        "autoenable=true", f"node={NODE}"]}]
    assert push == [{"call": "datalad.api.push", "arguments": {
        "dataset": str(root), "to": "osf-storage", "path": [str(root / TOY_WEIGHTS)], "data": "anything"}}]
    assert urls == [
        {"call": "osfclient.OSF.project", "arguments": {"project_id": NODE}},
        {"call": "osfclient.Project.storage", "arguments": {"provider": "osfstorage"}},
        {"call": "brainzoo.sources.add_spec_source", "arguments": {
            "spec_file": str(root / TOY / "spec.yaml"),
            "sources": {"model": {"type": "osf", "url": f"https://osf.io/download/<OSF file id of {toy_key(root)}>/"}}}},
        {"call": "git", "arguments": ["annex", "registerurl", "--batch"]},
    ]
    assert save_spec == [{"call": "datalad.api.save", "arguments": {
        "dataset": str(root), "path": [str(root / TOY / "spec.yaml")], "message": f"{TOY}: OSF download URLs of its weights"}}]
    assert snapshot(root) == before


def test_dry_run_of_a_new_project_creates_it_with_datalad_osf(toy_dataset, osf_unreachable):
    records = list(publish(toy_dataset, TOY, new_osf_project="brainzoo weights", dry_run=True))
    assert [r["step"] for r in records] == STEPS
    assert records[1]["operations"] == [{"call": "datalad.api.create_sibling_osf", "arguments": {
        "dataset": str(toy_dataset), "title": "brainzoo weights", "name": "osf", "storage_name": "osf-storage",
        "mode": "annex", "public": True, "category": "data", "existing": "error"}}]
    assert records[3]["operations"][0]["arguments"] == {"project_id": NEW_NODE}


def test_the_osf_remote_is_configured_as_datalad_osf_configures_it(toy_dataset, tmp_path, osf_unreachable, monkeypatch):
    """Run the dry run's initremote for real (git-annex starts git-annex-remote-osf, which needs no
    network to initialise) and compare with what datalad-osf's own helper writes."""
    assert shutil.which("git-annex-remote-osf")
    [sibling] = [r for r in publish(toy_dataset, TOY, osf_project=NODE, dry_run=True) if r["step"] == "sibling"]
    [operation] = sibling["operations"]
    sh(operation["call"], *operation["arguments"], cwd=toy_dataset)
    reference = tmp_path / "reference"
    reference.mkdir()
    sh("git", "init", "-q", cwd=reference)
    sh("git", "annex", "init", "-q", cwd=reference)
    monkeypatch.chdir(reference)
    initialize_osf_remote("osf-storage", NODE)

    def config(root: Path) -> dict:
        return {k: v for k, v in annex.known_special_remotes(root)["osf-storage"].items() if k not in ("uuid", "timestamp")}
    assert config(toy_dataset) == config(reference)
    assert config(toy_dataset)["node"] == NODE and config(toy_dataset)["autoenable"] == "true"


@pytest.mark.timeout(180)
def test_a_push_that_fails_midway_says_what_remains_and_how_to_resume(toy_dataset, osf_unreachable):
    records = list(publish(toy_dataset, TOY, osf_project=NODE))
    assert [(r["step"], r["status"]) for r in records] == [("save", "notneeded"), ("sibling", "ok"), ("push", "error")]
    message = records[-1]["message"]
    assert f"state: osf-storage points at OSF project {NODE}" in message
    assert "state: OSF holds 0 of 1 weights file(s)" in message
    assert "state: spec.yaml lists OSF URLs for 0 of 1" in message
    assert message.endswith(f"resume: brainzoo publish {TOY}")
    again = list(publish(toy_dataset, TOY, dry_run=True))
    assert [(r["step"], r["status"]) for r in again] == [
        ("save", "ok"), ("sibling", "notneeded"), ("push", "ok"), ("urls", "ok"), ("save", "ok")]
    assert again[1]["message"] == f"reusing osf-storage (OSF project {NODE})"
    with pytest.raises(BrainzooError, match=f"already points at OSF project {NODE}, not fghij"):
        list(publish(toy_dataset, TOY, osf_project="fghij", dry_run=True))


def change_weights(root: Path) -> None:
    """Replace the weights by other content, as a retrained model would, without touching the spec."""
    path = root / TOY_WEIGHTS
    path.unlink()
    path.write_bytes(b"retrained")


@pytest.mark.parametrize("version, options, damage, error", [
    ("neuronets/nope/1.0.0", {"osf_project": NODE}, None, "neuronets/nope/1.0.0: no such model version"),
    (TOY, {"osf_project": "ABCDE"}, None, "'ABCDE': not an OSF project id"),
    (TOY, {"osf_project": "abcd"}, None, "'abcd': not an OSF project id"),
    (TOY, {"osf_project": "https://osf.io/abcde/"}, None, "not an OSF project id"),
    (TOY, {"osf_project": NODE, "new_osf_project": "t"}, None, "not both"),
    (TOY, {}, None, "no osf-storage sibling yet"),
    (TOY, {"osf_project": NODE}, "changed weights", f"{TOY_WEIGHTS}: content has sha256 .*changed after it was published"),
    (TOY, {"osf_project": NODE}, "no credentials", "no OSF credentials: set OSF_TOKEN"),
])
def test_bad_input_is_refused_before_anything_happens(toy_dataset, request, version, options, damage, error):
    request.getfixturevalue("no_stored_credentials" if damage == "no credentials" else "osf_unreachable")
    if damage == "changed weights":
        change_weights(toy_dataset)
    before = snapshot(toy_dataset)
    for dry_run in (True, False):
        with pytest.raises(BrainzooError, match=error):
            list(publish(toy_dataset, version, dry_run=dry_run, **options))
    assert snapshot(toy_dataset) == before


OSF_HOSTS = ("api.osf.io", "files.osf.io", "osf.io")
API = "https://api.osf.io/v2"
TOKEN = "stand-in-token"
DATE = "2025-01-01T00:00:00"


@dataclass
class StandInOSF:
    """What datalad-osf and osfclient use of OSF: projects (nodes) with an ``osfstorage`` holding files,
    as documents shaped like OSF API v2 ones (trimmed to the fields osfclient reads)."""

    nodes: dict[str, dict] = field(default_factory=dict)
    writes: list[tuple[str, str | None]] = field(default_factory=list)  # (method path, Authorization)

    def add_node(self, title: str, public: bool) -> str:
        node = f"zz{len(self.nodes):03d}"
        self.nodes[node] = {"title": title, "public": public, "files": {}}
        return node

    def answer(self, method: str, path: str, query: dict, body: bytes, auth: str | None) -> tuple[int, dict]:
        if method != "GET":
            self.writes.append((f"{method} {path}", auth))
        if method == "POST" and path == "/v2/nodes/":
            attributes = json.loads(body)["data"]["attributes"]
            node = self.add_node(attributes["title"], attributes["public"])
            return 201, {"data": {"id": node, "type": "nodes", "links": {"html": f"https://osf.io/{node}/"}}}
        match = re.fullmatch(r"/v2/(?P<kind>guids|nodes)/(?P<node>\w+)/(?P<files>files/(?P<storage>osfstorage/)?)?"
                             r"|/v1/resources/(?P<upload_to>\w+)/providers/osfstorage/", path)
        node = match and (match["node"] or match["upload_to"])
        if node not in self.nodes:
            return 404, {"errors": [{"detail": "Not found."}]}
        if method == "PUT":  # a new file in the storage's root folder, named by ?name=
            file_id = f"{len(self.nodes[node]['files']):024x}"
            self.nodes[node]["files"][query["name"][0]] = {"id": file_id, "content": body}
            return 201, {"data": {"id": file_id}}
        if method == "PATCH" or match["kind"] == "guids":
            return 200, {"data": {"id": node, "type": "nodes"}}
        if match["storage"]:
            files = self.nodes[node]["files"]
            return 200, {"links": {"next": None}, "data": [self.file_document(node, name, f) for name, f in files.items()]}
        if match["files"]:
            return 200, {"data": [self.storage_document(node)]}
        return 200, {"data": {
            "id": node, "type": "nodes", "links": {"self": f"{API}/nodes/{node}/"},
            "attributes": {"title": self.nodes[node]["title"], "description": "", "public": self.nodes[node]["public"],
                           "date_created": DATE, "date_modified": DATE},
            "relationships": {"files": {"links": {"related": {"href": f"{API}/nodes/{node}/files/"}}}}}}

    @staticmethod
    def storage_document(node: str) -> dict:
        upload = f"https://files.osf.io/v1/resources/{node}/providers/osfstorage/"
        return {"id": f"{node}:osfstorage", "type": "files",
                "attributes": {"name": "osfstorage", "path": "/", "node": node, "provider": "osfstorage", "kind": "folder"},
                "relationships": {"files": {"links": {"related": {"href": f"{API}/nodes/{node}/files/osfstorage/"}}}},
                "links": {"upload": upload, "new_folder": f"{upload}?kind=folder"}}

    @staticmethod
    def file_document(node: str, name: str, stored: dict) -> dict:
        file_url = f"https://files.osf.io/v1/resources/{node}/providers/osfstorage/{stored['id']}"
        return {"id": stored["id"], "type": "files",
                "attributes": {"kind": "file", "name": name, "path": f"/{stored['id']}", "materialized_path": f"/{name}",
                               "size": len(stored["content"]), "extra": {"hashes": {"md5": None, "sha256": None}},
                               "date_created": DATE, "date_modified": DATE},
                "links": {"self": f"{API}/files/{stored['id']}/", "upload": file_url, "delete": file_url,
                          "html": f"https://osf.io/{node}/files/osfstorage/{stored['id']}"}}


def trusted_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for the OSF host names (and its key), to be trusted by this test only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "brainzoo stand-in for osf.io")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in OSF_HOSTS]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "osf-stand-in.pem", folder / "osf-stand-in.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture
def stand_in_osf(tmp_path, monkeypatch) -> Iterator[StandInOSF]:
    """An HTTPS proxy on 127.0.0.1 that answers every tunnelled request itself, as OSF would; this process
    and git-annex's special remote reach it through HTTPS_PROXY and trust it through REQUESTS_CA_BUNDLE."""
    osf = StandInOSF()
    cert_file, key_file = trusted_certificate(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_file, key_file)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_CONNECT(self):
            self.send_response(200, "Connection established")
            self.end_headers()
            Handler(tls.wrap_socket(self.connection, server_side=True), self.client_address, self.server)
            self.close_connection = True

        def answer(self):
            url = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, document = osf.answer(self.command, re.sub("/+", "/", url.path), parse_qs(url.query), body,
                                          self.headers.get("Authorization"))
            payload = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/vnd.api+json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OSF_TOKEN", TOKEN)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_file))
    for var in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{server.server_address[1]}")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    try:
        yield osf
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def steps(records: list[dict]) -> list[tuple[str, str]]:
    return [(r["step"], r["status"]) for r in records]


def osf_sources(root: Path) -> list[dict]:
    spec = yaml.safe_load((root / TOY / "spec.yaml").read_text())
    return [s for s in spec["weights"][0]["sources"] if s["type"] == "osf"]


@pytest.mark.slow
@pytest.mark.timeout(SERVER_LIFETIME_S)
# datalad-osf 0.3.0 still passes DataLad's deprecated `where=`; DataLad's pytest plugin makes that an error.
@pytest.mark.filterwarnings("ignore:'where' is deprecated:DeprecationWarning")
@pytest.mark.parametrize("project", ["new", "existing"])
def test_publish_to_the_stand_in_osf(toy_dataset, stand_in_osf, project):
    root = toy_dataset
    options = {"new_osf_project": "brainzoo toy"} if project == "new" else {"osf_project": stand_in_osf.add_node("zoo", public=True)}
    records = list(publish(root, TOY, **options))
    assert steps(records) == [("save", "notneeded"), ("sibling", "ok"), ("push", "ok"), ("urls", "ok"), ("save", "ok")], records[-1]["message"]
    [node] = stand_in_osf.nodes
    assert stand_in_osf.nodes[node]["public"]
    stored = stand_in_osf.nodes[node]["files"][toy_key(root)]
    assert stored["content"] == (root / TOY_WEIGHTS).read_bytes()
    assert stand_in_osf.writes and all(auth == f"Bearer {TOKEN}" for _, auth in stand_in_osf.writes)
    url = f"https://osf.io/download/{stored['id']}/"
    assert osf_sources(root) == [{"type": "osf", "url": url}]
    assert url in sh("git", "annex", "whereis", TOY_WEIGHTS, cwd=root).stdout
    assert sh("git", "status", "--porcelain", cwd=root).stdout == ""
    assert [r["status"] for r in validate.validate(root) if r["status"] != "ok"] == []
    head = sh("git", "rev-parse", "HEAD", cwd=root).stdout
    again = list(publish(root, TOY))
    assert [status for _, status in steps(again)] == ["notneeded"] * 5
    assert sh("git", "rev-parse", "HEAD", cwd=root).stdout == head


@pytest.mark.slow
@pytest.mark.timeout(SERVER_LIFETIME_S)
def test_a_private_project_stops_before_the_spec_and_a_rerun_finishes(toy_dataset, stand_in_osf):
    node = stand_in_osf.add_node("zoo", public=False)
    records = list(publish(toy_dataset, TOY, osf_project=node))
    assert steps(records) == [("save", "notneeded"), ("sibling", "ok"), ("push", "ok"), ("urls", "error")]
    message = records[-1]["message"]
    assert message.startswith(f"OSF project {node} is private")
    assert "state: OSF holds 1 of 1 weights file(s)" in message and "lists OSF URLs for 0 of 1" in message
    assert message.endswith(f"resume: brainzoo publish {TOY}")
    assert osf_sources(toy_dataset) == []
    stand_in_osf.nodes[node]["public"] = True
    again = list(publish(toy_dataset, TOY))
    assert steps(again) == [("save", "notneeded"), ("sibling", "notneeded"), ("push", "notneeded"), ("urls", "ok"), ("save", "ok")]
    assert len(osf_sources(toy_dataset)) == 1
