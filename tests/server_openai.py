"""Drives `highrise serve` with the official openai client, unchanged: a chat completion, the same
streamed, and the model list. Prints one JSON object for tests/server.rs to check.

usage: python3 server_openai.py BASE_URL MODEL
"""
import json
import sys

from openai import OpenAI

base_url, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key="unused")
messages = [{"role": "user", "content": "What is the capital of France?"}]

whole = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=32)
assert whole.object == "chat.completion", whole
assert whole.choices[0].message.role == "assistant"

text = []
finish = None
for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=32, stream=True):
    for choice in chunk.choices:
        if choice.delta.content:
            text.append(choice.delta.content)
        finish = choice.finish_reason or finish

print(json.dumps({
    "chat": whole.choices[0].message.content,
    "finish_reason": whole.choices[0].finish_reason,
    "completion_tokens": whole.usage.completion_tokens,
    "streamed": "".join(text),
    "streamed_finish_reason": finish,
    "models": [m.id for m in client.models.list()],
}))
