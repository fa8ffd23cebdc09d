"""The sampling fields' type check (policy/request_fields.py) against vLLM's own request
models, in vLLM's venv: for every field it checks and a spread of values, the gateway
refuses every value of the wrong kind that vLLM refuses for that field, and nothing vLLM
accepts. Stricter would refuse requests vLLM serves; looser would admit (and spend a
request of the key's rpm on) ones it refuses."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from policy.endpoints import Kind
from policy.errors import ApiError
from policy.request_fields import (
    check_field_types,
    check_vllm_rules,
    checked_fields,
    objects_only,
)
from policy.tokens import prompt_list
from tests.vllm.conftest import _require_python

VALUES: list[Any] = ["hot", "0.5", "12", "yes", "", 1.5, 2.0, 3, 0, 1, -1, True, False, None,
                     [], [1], ["a"], ["a", 1], {}, {"1": 2}, {"1": "x"}, {"1": "2.5"},
                     2**63, -(2**63), 2**63 - 1]
BASE = {Kind.CHAT: {"messages": [{"role": "user", "content": "hi"}]},
        Kind.COMPLETION: {"prompt": "hi"},
        Kind.RESPONSES: {"input": "hi"},
        Kind.EMBEDDINGS: {"input": "hi"}}

_VLLM = """
import json, sys
import pydantic
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest
models = {"chat": ChatCompletionRequest, "completion": CompletionRequest,
          "responses": ResponsesRequest, "embeddings": EmbeddingCompletionRequest}
out = []
for kind, field, body in json.load(sys.stdin):
    try:
        models[kind].model_validate(body)
        out.append(False)
    except pydantic.ValidationError as e:
        out.append(any(err["loc"] and err["loc"][0] == field for err in e.errors()))
    except (AttributeError, TypeError):
        # vLLM's own validator read the value as an object and crashed: its server
        # answers 500 (`structured_outputs: 5`; the bodies differ only in `field`).
        out.append(True)
    except Exception as e:  # vLLM's own checks before pydantic's name the parameter
        out.append(getattr(e, "parameter", None) == field)
print(json.dumps(out))
"""


def _ours(body: dict[str, Any], kind: Kind) -> bool:
    try:
        check_field_types(body, kind)
        check_vllm_rules(body, kind)
    except ApiError:
        return True
    return False


def test_the_gateway_refuses_what_vllm_refuses_for_each_field() -> None:
    python = _require_python()
    cases = [(kind, field, {**BASE[kind], field: value})
             for kind in BASE
             for field in sorted(checked_fields(kind))
             for value in VALUES]
    r = subprocess.run([str(python), "-c", _VLLM], capture_output=True, timeout=300,
                       input=json.dumps([(k.value, f, b) for k, f, b in cases]).encode())
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    vllm = json.loads(r.stdout.decode().strip().splitlines()[-1])
    differ = [(kind.value, field, body[field], "vLLM" if theirs else "gateway")
              for (kind, field, body), theirs in zip(cases, vllm, strict=True)
              if _ours(body, kind) != theirs]
    # Never stricter than vLLM; and where vLLM alone refuses, it is a value of the right
    # kind out of its range or against another field (`top_logprobs` without
    # `logprobs`, a penalty past 2, a numeric string vLLM's own check wants as a number):
    # the backend's to judge, after the hold, as before.
    stricter = [d for d in differ if d[3] == "gateway"]
    assert stricter == [], sorted({(d[0], d[1]) for d in stricter})
    # A field checked only as an object (`response_format`) leaves its members to vLLM's
    # models, which may refuse an object (`{}` without `type`): the backend's, as above.
    assert [d for d in differ
            if not isinstance(d[2], int | float) and d[2] != "12"
            and not (d[1] in objects_only(Kind(d[0])) and isinstance(d[2], dict))
            ] == [], differ


_VLLM_RULES = """
import json, sys
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
models = {"chat": ChatCompletionRequest, "completion": CompletionRequest}
out = []
for kind, body in json.load(sys.stdin):
    try:
        models[kind].model_validate(body)
        out.append(False)
    except Exception:
        out.append(True)
print(json.dumps(out))
"""

_ABSENT = object()


def _rule_bodies() -> list[tuple[Kind, dict[str, Any]]]:
    flags: list[Any] = [_ABSENT, True, False, "false", "true", 1, 0, None]
    counts: list[Any] = [_ABSENT, None, 0, 3, -1, -2, "3", 2.0, True]
    streams: list[Any] = [_ABSENT, True, False]
    chat: list[dict[str, Any]] = [
        *({"continue_final_message": c, "add_generation_prompt": a}
          for c in flags for a in flags),
        *({"logprob_token_ids": t, "logprobs": lp}
          for t in (_ABSENT, [1], [], None) for lp in flags),
        *({"tools": t} for t in (_ABSENT, [], None)),
        # vLLM's check_logprobs (real-vLLM tester)
        *({"top_logprobs": t, "logprobs": lp} for t in counts
          for lp in (_ABSENT, True, False, "false", None)),
        *({"prompt_logprobs": p, "stream": st} for p in counts for st in streams),
    ]
    completion: list[dict[str, Any]] = [
        *({"logprobs": lp, "prompt_logprobs": p} for lp in counts
          for p in (_ABSENT, None, 2, -3, "2")),
        *({"prompt_logprobs": p, "stream": st} for p in counts for st in streams),
    ]
    return [(kind, {**BASE[kind], **{k: v for k, v in fields.items() if v is not _ABSENT}})
            for kind, group in ((Kind.CHAT, chat), (Kind.COMPLETION, completion))
            for fields in group]


def test_the_gateway_refuses_the_bodies_vllm_always_refuses() -> None:
    """policy.request_fields.check_vllm_rules against vLLM's own validators (chat and
    completions): the same verdict for every combination of the fields they read."""
    python = _require_python()
    bodies = _rule_bodies()
    r = subprocess.run([str(python), "-c", _VLLM_RULES], capture_output=True, timeout=300,
                       input=json.dumps([(k.value, b) for k, b in bodies]).encode())
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    vllm = json.loads(r.stdout.decode().strip().splitlines()[-1])

    def ours(kind: Kind, body: dict[str, Any]) -> bool:
        try:
            check_field_types(body, kind)
            check_vllm_rules(body, kind)
        except ApiError:
            return True
        return False

    assert [(k, b, theirs) for (k, b), theirs in zip(bodies, vllm, strict=True)
            if ours(k, b) != theirs] == []


PROMPTS: list[Any] = [[1, 2], [True, 2], [1.0, 2], [[1.0], [False]], [1.5], [1, "a"],
                      [[1], ["a"]], ["a", "b"], "a", [2.0**70], [None], [[]], [{}],
                      ["1", 2], [1, " 7"], [["1"], ["2"]], ["1_000", 2], ["1.00", 2],
                      ["+5", 2], ["1e3", 2], ["0x10", 2], ["1.", 2], ["", 2]]


def test_the_gateway_reads_token_ids_as_vllm_does() -> None:
    """A completions `prompt` / embeddings `input` of ids (policy.tokens.prompt_list):
    never refused where vLLM's request models take it (a boolean, `1.0`: ids to vLLM,
    endpoints tester)."""
    python = _require_python()
    cases = [(kind, field, {**BASE[kind], field: p})
             for kind, field in ((Kind.COMPLETION, "prompt"), (Kind.EMBEDDINGS, "input"))
             for p in PROMPTS]
    r = subprocess.run([str(python), "-c", _VLLM], capture_output=True, timeout=300,
                       input=json.dumps([(k.value, f, b) for k, f, b in cases]).encode())
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    vllm = json.loads(r.stdout.decode().strip().splitlines()[-1])

    def ours(field: str, body: dict[str, Any]) -> bool:
        try:
            prompt_list(body[field], field)
        except ApiError:
            return True
        return False

    stricter = [(k.value, b[f]) for (k, f, b), theirs in zip(cases, vllm, strict=True)
                if ours(f, b) and not theirs]
    assert stricter == []
    assert not ours("prompt", {"prompt": [True, 1.0]})
    assert not ours("prompt", {"prompt": ["1", 2]})
