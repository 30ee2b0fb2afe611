"""A local stand-in for the Hugging Face hub's HTTP API (repo info, file tree, file resolve),
enough for huggingface_hub's snapshot_download to download from it with HF_ENDPOINT pointing
here: tests exercise the online path without the real hub. It records every file it sends."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    """Serves `repos`: {repo_id: (commit, {path: bytes})}, at branch `main` and at the commit."""

    def __init__(self, repos: dict[str, tuple[str, dict[str, bytes]]]) -> None:
        self.repos = repos
        self.sent: list[tuple[str, str]] = []  # (repo_id, path) of each file body sent
        self.unknown: list[str] = []  # requests for anything else
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _commit(self, repo_id: str, revision: str) -> str | None:
        commit, _ = self.repos[repo_id]
        return commit if revision in ("main", commit) else None

    def _answer(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        parts = [unquote(p) for p in urlparse(request.path).path.strip("/").split("/")]
        if (
            parts[:2] == ["api", "models"] and len(parts) >= 6
        ):  # api/models/org/name/(revision|tree)/rev[/...]
            repo_id, kind, revision = "/".join(parts[2:4]), parts[4], parts[5]
        elif len(parts) >= 5 and parts[2] == "resolve":  # org/name/resolve/rev/path...
            repo_id, kind, revision = "/".join(parts[:2]), parts[2], parts[3]
        else:  # what the hub has besides (e.g. telemetry): not served here
            with self._lock:
                self.unknown.append(request.path)
            return _send(request, 404, b"", {}, body)
        if repo_id not in self.repos:
            return _send(request, 404, b"", {"X-Error-Code": "RepoNotFound"}, body)
        commit = self._commit(repo_id, revision)
        if commit is None:
            return _send(request, 404, b"", {"X-Error-Code": "RevisionNotFound"}, body)
        files = self.repos[repo_id][1]
        if kind == "revision":
            info = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": path} for path in files]}
            return _send(request, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if kind == "tree":
            tree = [
                {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for path, data in files.items()
            ]
            return _send(request, 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
        path = "/".join(parts[4:])
        if path not in files:
            return _send(request, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, body)
        data = files[path]
        if body:
            with self._lock:
                self.sent.append((repo_id, path))
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        return _send(request, 200, data, headers, body)


def _send(
    request: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str], body: bool
) -> None:
    request.send_response(status)
    for name, value in headers.items():
        request.send_header(name, value)
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    if body:
        request.wfile.write(data)
