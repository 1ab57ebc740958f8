"""A stand-in for the few Hugging Face Hub endpoints that ``huggingface_hub``'s upload client calls.

``HubServer`` is a ``ThreadingHTTPServer`` on 127.0.0.1 (port 0: the OS picks a free one) in a daemon thread.
Point ``HF_ENDPOINT`` (or ``huggingface_hub.constants.ENDPOINT``) at ``server.endpoint`` and the real client
code runs against it: nothing of ``huggingface_hub`` is mocked. It answers what huggingface_hub 2.4 calls to
create a repository and commit a folder (``HfApi.create_repo``, ``upload_folder``, ``create_commit``):

- ``POST /api/repos/create``                         → ``{"url": …}``; 409 when the repo exists (``exist_ok`` handles it)
- ``POST /api/validate-yaml``                        → the README metadata must parse as a YAML mapping, else 400
- ``POST /api/models/{repo}/preupload/{revision}``   → every file ``"uploadMode": "regular"`` (no LFS, no Xet)
- ``POST /api/models/{repo}/commit/{revision}``      → ndjson: a header line, then files as base64 ``content``
- ``POST /api/models/{repo}/branch/{branch}``         → create_branch; 409 when it exists (``exist_ok`` handles it)
- ``GET  /api/whoami-v2``, ``GET /api/models/{repo}[/revision/{revision}]`` (repo_info), for completeness

Every request is recorded (method, path, headers, body) so a test can assert what arrived, and that a token
sent in the ``Authorization`` header appears nowhere else. Anything else gets a 404 and is recorded too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

USER = "tester"
_REPO_OP = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit)/(?P<revision>[^/]+)$")
_BRANCH = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>[^/]+)$")
_REPO_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<revision>[^/]+))?$")


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)  # {"oid", "summary", "paths"}
    branches: set[str] = field(default_factory=lambda: {"main"})  # create_branch's; commits take any revision


class HubServer:
    """``with HubServer() as hub: …`` — ``hub.endpoint``, ``hub.requests``, ``hub.repos[repo_id].files``."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.repos: dict[str, Repo] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def paths(self) -> list[str]:
        """``"METHOD /path"`` of every request, in order (the query string dropped)."""
        return [f"{r.method} {r.path.split('?')[0]}" for r in self.requests]

    # -- the endpoints ------------------------------------------------------------------------------------

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        path = path.split("?")[0]
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
            with self._lock:
                if repo_id in self.repos:
                    return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}
                self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body)["content"])
        if method == "GET" and path == "/api/whoami-v2":
            return 200, {"type": "user", "name": USER, "orgs": [], "auth": {"type": "access_token"}}
        match = _REPO_OP.match(path)
        if method == "POST" and match:
            repo = self.repos.get(match["repo"])
            if repo is None:
                return 404, {"error": f"Repository not found: {match['repo']}"}
            if match["op"] == "preupload":
                files = json.loads(body)["files"]
                return 200, {
                    "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                }
            return self._commit(match["repo"], repo, body)
        match = _BRANCH.match(path)
        if method == "POST" and match:  # create_branch: the commits below accept any revision
            if match["repo"] not in self.repos:
                return 404, {"error": f"Repository not found: {match['repo']}"}
            with self._lock:
                branches = self.repos[match["repo"]].branches
                if match["branch"] in branches:
                    return 409, {"error": f"Reference already exists: {match['branch']}"}
                branches.add(match["branch"])
            return 200, {}
        match = _REPO_INFO.match(path)
        if method == "GET" and match and match["repo"] in self.repos:
            repo = self.repos[match["repo"]]
            sha = repo.commits[-1]["oid"] if repo.commits else "0" * 40
            siblings = [{"rfilename": name} for name in sorted(repo.files)]
            return 200, {
                "id": match["repo"],
                "modelId": match["repo"],
                "sha": sha,
                "private": repo.private,
                "siblings": siblings,
            }
        return 404, {"error": f"not served by the test Hub: {method} {path}"}

    def _validate_yaml(self, content: str) -> tuple[int, dict]:
        if not content.startswith("---\n"):
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            metadata = yaml.safe_load(content.split("---\n")[1])
        except yaml.YAMLError as error:
            return 400, {"errors": [{"message": f"YAML does not parse: {error}"}]}
        if not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "metadata must be a YAML mapping"}]}
        return 200, {"errors": [], "warnings": []}

    def _commit(self, repo_id: str, repo: Repo, body: bytes) -> tuple[int, dict]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {}
        for line in lines:
            if line["key"] == "file":
                value = line["value"]
                if value.get("encoding") != "base64":
                    return 400, {"error": f"unexpected encoding {value.get('encoding')!r}"}
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] != "header":
                return 400, {"error": f"the test Hub takes regular files only, got {line['key']!r}"}
        oid = hashlib.sha1(body).hexdigest()
        with self._lock:
            repo.files.update(files)
            repo.commits.append({"oid": oid, "summary": header["summary"], "paths": sorted(files)})
        return 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}


def _handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with server._lock:
                server.requests.append(Request(self.command, self.path, dict(self.headers.items()), body))
            status, payload = server.answer(self.command, self.path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args) -> None:  # keep test output clean
            pass

    return Handler
