"""Test handler: a request whose prompt is "slow" waits 3 s before the engine sees it (a stand-in
for anything that delays a request's first token: a cold start, a long prefill)."""

import time


def preprocess(request: dict) -> dict:
    if request.get("prompt") == "slow":
        time.sleep(3)
    return request
