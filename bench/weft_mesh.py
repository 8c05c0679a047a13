"""Starting weft for the benchmarks: free ports, readiness, and a mutual-TLS mesh (a real
control plane, join tokens, an inbound and an outbound proxy). bench.py and
instructions.py both measure the mutual-TLS pair; this is the one place that knows how to
stand it up, so both measure the same thing.
"""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def free_port():
    """A port nothing listens on now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, what="a process", timeout=15, log_dir=None):
    """Waits until something accepts connections on the port; exits naming `what` if not."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    logs = f"; see the logs in {log_dir}" if log_dir else ""
    raise SystemExit(f"{what}: nothing listens on port {port} after {timeout}s{logs}")


class OtlpSink:
    """An OTLP/HTTP receiver that takes every export (200) and counts the bytes: the
    benchmarks' trace receiver, in this process, so it costs the measured proxies
    nothing but the export itself."""

    def __init__(self):
        sink = self
        self.exports, self.bytes = 0, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                self.rfile.read(length)
                sink.exports += 1
                sink.bytes += length
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def mesh_config(self, rate):
        """A MeshConfig sending spans here, sampling `rate` of requests."""
        return (f"apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n"
                f"  tracing: {{endpoint: \"http://127.0.0.1:{self.port}\", protocol: http, samplingRate: {rate}}}\n")

    def stop(self):
        self.server.shutdown()


def mtls_pair(weft, tmp, name, upstream, spawn_control, spawn_proxy, tcp=False, timeout=30, proxy_args=(),
              resources=None):
    """A control plane, an inbound proxy registered as `upstream` for the application on
    port `upstream`, and an outbound proxy, each joined with its own token: every hop
    between the proxies is mutual TLS. The spawn callbacks start a process from its
    arguments (the caller decides what is measured). Returns the port a client uses: the
    outbound listener (Host `upstream`), or with tcp=True an opaque TCP port the outbound
    forwards to `upstream`. Waits (up to `timeout` seconds) until a request through the
    mesh succeeds, since the outbound discovers `upstream` on first use. `proxy_args` go to
    both proxies (e.g. `--telemetry-interval 0`); `resources` (YAML) is applied before
    they start (e.g. a MeshConfig that turns tracing on)."""
    data = os.path.join(tmp, f"{name}-control")
    api, grpc = free_port(), free_port()
    spawn_control([weft, "control", "--api-addr", f"127.0.0.1:{api}", "--grpc-addr", f"127.0.0.1:{grpc}",
                   "--data-dir", data, "--log", "warn"])
    wait_port(api, name, timeout=timeout, log_dir=tmp)
    env = dict(os.environ, WEFT_SERVER=f"https://127.0.0.1:{api}", WEFT_TOKEN_FILE=os.path.join(data, "admin-token"),
               WEFT_CONFIG=os.path.join(tmp, f"{name}-weft-config.yaml"))

    def token(service):
        # The API may answer its port a moment before it serves (its certificate is
        # issued as it starts): a refused first call is tried again, and a last refusal
        # says why.
        for attempt in range(20):
            made = subprocess.run([weft, "token", "create", "--service", service], env=env,
                                  capture_output=True, text=True)
            if made.returncode == 0:
                break
            if attempt == 0:
                print(f"{name}: weft token create refused at first ({made.stderr.strip()}); trying again",
                      file=sys.stderr, flush=True)
            time.sleep(0.25)
        else:
            raise SystemExit(f"{name}: weft token create --service {service} failed: {made.stderr.strip()}")
        out = made.stdout.strip()
        path = os.path.join(tmp, f"{name}-{service}.token")
        with open(path, "w") as f:
            f.write(out)
        return path

    # The first token waits for the control plane's admin token; apply needs it too.
    upstream_token = token("upstream")
    if resources:
        applied = subprocess.run([weft, "apply", "-f", "-"], env=env, input=resources, capture_output=True, text=True)
        if applied.returncode != 0:
            raise SystemExit(f"{name}: weft apply failed: {applied.stderr.strip()}")
    inbound, outbound, tcp_port = free_port(), free_port(), free_port()
    spawn_proxy([weft, "proxy", "--control", f"127.0.0.1:{grpc}", "--token-file", upstream_token,
                 "--service", "upstream", "--app-addr", f"127.0.0.1:{upstream}", "--inbound-addr",
                 f"127.0.0.1:{inbound}", "--outbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
                 "--log", "warn", *proxy_args])
    args = [weft, "proxy", "--control", f"127.0.0.1:{grpc}", "--token-file", token("client"),
            "--outbound-addr", f"127.0.0.1:{outbound}", "--admin-addr", "127.0.0.1:0", "--log", "warn", *proxy_args]
    if tcp:
        args += ["--upstream", f"upstream:80=127.0.0.1:{tcp_port}"]
    spawn_proxy(args)
    wait_port(outbound, name, timeout=timeout, log_dir=tmp)
    deadline = time.time() + timeout
    while True:
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{outbound}/", headers={"Host": "upstream"})
            if urllib.request.urlopen(request, timeout=10).status == 200:
                break
        except OSError:
            pass
        if time.time() > deadline:
            raise SystemExit(f"{name}: upstream not served through the mesh; see the logs in {tmp}")
        time.sleep(0.2)
    if tcp:
        wait_port(tcp_port, name, timeout=timeout, log_dir=tmp)
        return tcp_port
    return outbound
