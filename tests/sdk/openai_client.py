"""Drives the gateway with the official OpenAI Python SDK.

Run by tests/it/openai_sdk.rs against an in-process gateway in front of
mock-llm. Prints one JSON object with what it observed and exits non-zero on
the first unexpected behaviour, with a message saying what went wrong.
"""

import argparse
import json
import sys

import openai


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--model", required=True)
    a = p.parse_args()

    client = openai.OpenAI(base_url=a.base_url, api_key=a.key, max_retries=0, timeout=20)
    seen = {}

    models = [m.id for m in client.models.list()]
    seen["models"] = models
    if a.model not in models:
        return fail(f"/v1/models does not list {a.model}: {models}")

    r = client.chat.completions.create(
        model=a.model, messages=[{"role": "user", "content": "say hello"}]
    )
    seen["non_stream_content"] = r.choices[0].message.content
    seen["non_stream_usage"] = r.usage.model_dump() if r.usage else None
    if not r.choices[0].message.content or r.usage is None:
        return fail(f"non-stream reply lacks content or usage: {r}")

    chunks = list(
        client.chat.completions.create(
            model=a.model, stream=True, messages=[{"role": "user", "content": "stream please"}]
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    seen["stream_chunks"] = len(chunks)
    seen["stream_text"] = text
    # The client did not ask for usage, so no usage-only chunk may reach it
    # (the gateway asked upstream for one and must have removed it).
    if any(not c.choices for c in chunks):
        return fail("a usage-only chunk reached a client that did not ask for it")
    if not text:
        return fail("the stream carried no text")

    chunks = list(
        client.chat.completions.create(
            model=a.model,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "stream with usage"}],
        )
    )
    usage = [c.usage for c in chunks if c.usage is not None]
    seen["stream_usage"] = usage[-1].model_dump() if usage else None
    if not usage:
        return fail("include_usage was requested but no usage chunk arrived")

    # Speech to text: a multipart form, routed by its `model` field (here an
    # alias, which the gateway renames for the backend).
    audio = b"RIFF" + bytes(range(256)) * 64
    t = client.audio.transcriptions.create(
        model="gpt-4o-mini", file=("clip.wav", audio, "audio/wav"), language="en"
    )
    seen["transcription"] = t.text
    if not t.text.startswith("mock transcription of "):
        return fail(f"unexpected transcription: {t}")

    try:
        openai.OpenAI(base_url=a.base_url, api_key="sk-wrong", max_retries=0).models.list()
        return fail("a wrong key was accepted")
    except openai.AuthenticationError as e:
        seen["bad_key_status"] = e.status_code
        seen["bad_key_code"] = (e.body or {}).get("code") if isinstance(e.body, dict) else None

    print(json.dumps(seen))
    return 0


def fail(msg: str) -> int:
    print(f"openai_client.py: {msg}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
