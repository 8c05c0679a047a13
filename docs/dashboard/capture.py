#!/usr/bin/env python3
"""Screenshots of the dashboard of a running `weft demo`, for README.

Usage: python3 docs/dashboard/capture.py [--server https://127.0.0.1:15080] [--token-file FILE]
                                         [--out docs/dashboard]

Needs chromium, chromium-driver and openssl. The browser trusts the API by the SHA-256 of
its public key (--ignore-certificate-errors-spki-list), as the tests do. It logs in with
the token in --token-file (the demo's is <its log directory>/store/admin-token) and saves
one PNG per page.
"""

import argparse
import base64
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

PAGES = [
    ("topology", "#/topology", "canvas[data-settled=true]"),
    ("service", "#/service/default/reviews?window=10m", "#service-golden"),
    ("tap", "#/tap?service=default/inventory&start=1", "#tap-requests tbody tr"),
    ("config", "#/config?kind=HTTPRoute&namespace=default&name=reviews-canary", ".gutter span"),
    ("security", "#/security", "#authz-matrix"),
    ("mesh", "#/mesh", "#mesh-proxies"),
    ("workload", "#/workload/default/reviews-v1", "#workload-configuration"),
]


def spki_hash(server):
    host_port = server.split("://", 1)[1].rstrip("/")
    pem = subprocess.run(
        f"openssl s_client -connect {host_port} </dev/null 2>/dev/null | openssl x509 -pubkey -noout"
        " | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary",
        shell=True, capture_output=True, check=True).stdout
    return base64.b64encode(pem).decode()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="https://127.0.0.1:15080")
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    token = open(args.token_file).read().strip()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    driver = subprocess.Popen(["chromedriver", f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    profile = tempfile.mkdtemp(prefix="weft-capture-")

    def wd(method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=data,
                                         headers={"content-type": "application/json"})
        return json.load(urllib.request.urlopen(request))["value"]

    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.1)
        flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1440,900", f"--user-data-dir={profile}",
                 f"--ignore-certificate-errors-spki-list={spki_hash(args.server)}"]
        session = wd("POST", "/session", {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {"args": flags}}}})
        sid = session["sessionId"]
        wd("POST", f"/session/{sid}/url", {"url": args.server + "/"})
        login = ("return fetch('/api/v1/session', {method: 'POST', headers: {'content-type': 'application/json'},"
                 " body: JSON.stringify({token: arguments[0]})}).then((r) => r.status);")
        status = wd("POST", f"/session/{sid}/execute/sync", {"script": login, "args": [token]})
        if status != 200:
            raise SystemExit(f"login answered {status}")
        for name, fragment, ready in PAGES:
            wd("POST", f"/session/{sid}/url", {"url": f"{args.server}/?capture={name}{fragment}"})
            deadline = time.time() + 30
            while not wd("POST", f"/session/{sid}/execute/sync",
                         {"script": f"return document.querySelector({json.dumps(ready)}) !== null", "args": []}):
                if time.time() > deadline:
                    raise SystemExit(f"{name}: {ready} did not appear")
                time.sleep(0.2)
            time.sleep(3 if name in ("tap", "service") else 1)
            png = base64.b64decode(wd("GET", f"/session/{sid}/screenshot"))
            with open(os.path.join(args.out, f"{name}.png"), "wb") as f:
                f.write(png)
            print(f"{name}.png")
        wd("DELETE", f"/session/{sid}")
    finally:
        driver.kill()


if __name__ == "__main__":
    main()
