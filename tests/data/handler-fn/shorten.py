"""Test handler: cap every request at 2 new tokens; reject prompts that say 'forbidden'."""


def preprocess(request: dict) -> dict:
    if "forbidden" in str(request.get("prompt", "")):
        raise ValueError("this prompt is not allowed")
    request["params"] = {**request.get("params", {}), "max_tokens": 2, "ignore_eos": True}
    return request
