"""The official openai client against the AILB, for tests/gateway.rs.

    python3 client.py BASE_URL KEY COMMAND [ARGS...]

Prints one JSON object: what the call returned, or {"error": class, "status": code, "message": ...}.
Retries are off so every refusal reaches the test as it was sent.
"""

import json
import sys

import openai

base_url, key, command, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)


def failure(error):
    return {
        "error": type(error).__name__,
        "status": getattr(error, "status_code", None),
        "message": str(error),
    }


def chat(model):
    answer = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi."},
        ],
        max_tokens=50,
    )
    return {
        "content": answer.choices[0].message.content,
        "finish_reason": answer.choices[0].finish_reason,
        "usage": answer.usage.model_dump() if answer.usage else None,
        "model": answer.model,
    }


def stream(model):
    text, finish, usage, chunks = "", None, None, 0
    try:
        events = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say hi."}],
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in events:
            chunks += 1
            if chunk.usage:
                usage = chunk.usage.model_dump()
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
    except openai.APIError as error:
        return {"content": text, "chunks": chunks, **failure(error)}
    return {"content": text, "finish_reason": finish, "usage": usage, "chunks": chunks}


def many(model, count):
    contents = {}
    for _ in range(int(count)):
        content = chat(model)["content"]
        contents[content] = contents.get(content, 0) + 1
    return {"contents": contents}


def run():
    try:
        if command == "chat":
            return chat(args[0])
        if command == "stream":
            return stream(args[0])
        if command == "many":
            return many(args[0], args[1])
        if command == "models":
            return {"models": sorted(m.id for m in client.models.list())}
        if command == "embed":
            answer = client.embeddings.create(model=args[0], input="hello")
            return {"embedding": answer.data[0].embedding, "usage": answer.usage.model_dump()}
        if command == "complete":
            answer = client.completions.create(model=args[0], prompt="Say hi.")
            return {"text": answer.choices[0].text}
    except openai.APIError as error:
        return failure(error)
    raise SystemExit(f"unknown command {command}")


print(json.dumps(run()))
