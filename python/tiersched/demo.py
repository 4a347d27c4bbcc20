"""`python -m tiersched.demo`: start the tiny MoE on a real upstream SGLang server with tiersched loaded, send a
few requests, print what came back, and stop the server. Proves the install end to end in about a minute."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request

from tiersched.rig.server import ServerStartError, launch_server
from tiersched.rig.tiny_model import make_tiny_moe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiersched.demo", description=__doc__)
    parser.add_argument("--dp-size", type=int, default=1, help="data-parallel ranks (each is a scheduler process)")
    parser.add_argument("--requests", type=int, default=4)
    args = parser.parse_args(argv)
    model = make_tiny_moe(tempfile.mkdtemp(prefix="tiersched-tiny-"))
    extra = ["--dp-size", str(args.dp_size)] if args.dp_size > 1 else []
    print(f"starting upstream sglang.launch_server on 127.0.0.1 (tiny Qwen3-MoE, dp={args.dp_size}) ...", flush=True)
    t0 = time.time()
    try:
        with launch_server(model, extra_args=extra) as srv:
            print(f"ready after {time.time() - t0:.1f} s at {srv.url}")
            for i in range(args.requests):
                body = {"text": f"Hello world, request {i}", "sampling_params": {"max_new_tokens": 12, "temperature": 0}}
                req = urllib.request.Request(srv.url + "/generate", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=120) as r:
                    out = json.loads(r.read())
                meta = out["meta_info"]
                print(f"request {i}: {meta['completion_tokens']} tokens, dp_rank={meta.get('dp_rank')}, "
                      f"e2e {meta['e2e_latency'] * 1000:.0f} ms")
            loaded = [line for line in srv.log_tail(400).splitlines() if "[tiersched] active tiers" in line]
            print(f"tiersched plugin loaded in {len(loaded)} process(es): {loaded[-1] if loaded else 'NOT LOADED'}")
    except ServerStartError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
