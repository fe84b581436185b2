"""A stand-in for the kubelet's read-only port: GET /pods answers the pod list in PODS_JSON.

    python3 fake_kubelet.py PORT PODS_JSON

For beds that create pods with crictl (no kubelet), whose daemon runs in selectors mode and
needs what only the kubelet knows (service account, node name). The file is read on every
request, so a test adds a pod by rewriting it (write a temporary file, then rename). Only
127.0.0.1 is served. The real kubelet's answers are proven against the daemon elsewhere
(tests/e2e/k8s.sh); this serves the same shape: {"kind": "PodList", "items": [...]}.
"""

import http.server
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (the http.server API)
        if self.path.split("?")[0] != "/pods":
            self.send_error(404)
            return
        try:
            with open(PODS, "rb") as f:
                body = f.read()
        except FileNotFoundError:
            body = b'{"kind": "PodList", "items": null}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("fake-kubelet: " + (fmt % args) + "\n")


if __name__ == "__main__":
    PORT, PODS = int(sys.argv[1]), sys.argv[2]
    http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
