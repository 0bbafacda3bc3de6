"""vLLM's chat-completion and legacy completion answers, streamed and whole.

The hot path: each streamed token is one ``b"".join`` of a precomputed prefix, the
pre-encoded token and a precomputed suffix.
"""

from __future__ import annotations

import orjson

from simulator import text
from simulator.errors import error_body, sse_error_event
from simulator.protocol import ChoicePlan, GenerationPlan

DONE = b"data: [DONE]\n\n"


def chat_finish_reason(choice: ChoicePlan) -> str:
    """The reason vLLM's chat layer reports: "tool_calls" for a call ``"required"`` forced
    that ran to its end, "stop" for one forced by name, the engine's reason otherwise."""
    call = choice.tool_call
    if call is not None and not call.named and choice.finish_reason == "stop":
        return "tool_calls"
    return choice.finish_reason


def tool_call_object(choice: ChoicePlan) -> list[dict[str, object]]:
    """A message's ``tool_calls`` list (empty for a text reply)."""
    call = choice.tool_call
    if call is None:
        return []
    return [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
    ]


class OpenAIReply:
    """The answer of ``/v1/chat/completions`` or ``/v1/completions`` to one plan."""

    __slots__ = ("_created", "_head", "_id", "chat", "plan", "prefixes", "suffix")

    def __init__(self, plan: GenerationPlan, response_id: str, created: int) -> None:
        """Precompute the bytes every streamed event of ``plan`` shares."""
        self.plan = plan
        self._id = response_id
        self._created = created
        self.chat = plan.endpoint == "chat"
        obj = b"chat.completion.chunk" if self.chat else b"text_completion"
        self._head = b"".join(
            (
                b'data: {"id":"',
                response_id.encode(),
                b'","object":"',
                obj,
                b'","created":',
                b"%d" % created,
                b',"model":',
                orjson.dumps(plan.model),
                b',"choices":[',
            )
        )
        text_field = b',"delta":{"content":' if self.chat else b',"text":'
        self.prefixes = {
            choice.index: b'%s{"index":%d%s' % (self._head, choice.index, text_field)
            for choice in plan.choices
        }
        if self.chat:
            self.suffix = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            self.suffix = b',"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'

    def opening(self) -> list[bytes]:
        """Chat's first event per choice: ``delta: {"role": "assistant", "content": ""}``."""
        if not self.chat:
            return []
        return [
            b'%s{"index":%d,"delta":{"role":"assistant","content":""},' % (self._head, c.index)
            + b'"logprobs":null,"finish_reason":null}]}\n\n'
            for c in self.plan.choices
        ]

    def token(self, choice: ChoicePlan, step: int) -> bytes:
        """One token's chunk: a content (or text) delta, or a piece of tool-call arguments."""
        if choice.tool_call is not None:
            return self._tool_delta(choice, step)
        table = text.REST_JSON if step else text.FIRST_JSON
        return b"".join((self.prefixes[choice.index], table[choice.token_ids[step]], self.suffix))

    def _tool_delta(self, choice: ChoicePlan, step: int) -> bytes:
        call = choice.tool_call
        assert call is not None
        delta: dict[str, object] = {"index": 0, "function": {"arguments": call.pieces[step]}}
        if step == 0:
            delta = {
                "index": 0,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.pieces[0]},
            }
        return b'%s{"index":%d,"delta":{"tool_calls":[%s]},%s' % (
            self._head,
            choice.index,
            orjson.dumps(delta),
            b'"logprobs":null,"finish_reason":null}]}\n\n',
        )

    def choice_end(self, choice: ChoicePlan) -> list[bytes]:
        """The event that closes a choice, carrying its ``finish_reason``."""
        body = b'"delta":{}' if self.chat else b'"text":""'
        reason = chat_finish_reason(choice) if self.chat else choice.finish_reason
        return [
            b'%s{"index":%d,%s,"logprobs":null,"finish_reason":"%s","stop_reason":null}]}\n\n'
            % (self._head, choice.index, body, reason.encode())
        ]

    def closing(self, generated: int) -> list[bytes]:
        """The ``include_usage`` event (empty ``choices`` and the totals), then ``[DONE]``."""
        if not self.plan.include_usage:
            return [DONE]
        prompt_tokens = self.plan.prompt_tokens
        usage = orjson.dumps(
            {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + generated,
                "completion_tokens": generated,
            }
        )
        return [self._head + b'],"usage":' + usage + b"}\n\n", DONE]

    def stream_error(self, message: str) -> list[bytes]:
        """vLLM's ``data: {"error": ...}`` event, then ``[DONE]``."""
        return [sse_error_event(message, 500), DONE]

    def error_body(self, message: str, status: int) -> bytes:
        """vLLM's error object."""
        return error_body(message, status)

    def body(self) -> bytes:
        """The whole ``chat.completion`` or ``text_completion`` object."""
        plan = self.plan
        choices: list[dict[str, object]] = []
        for choice in plan.choices:
            content = text.render_text(choice.token_ids)
            if self.chat:
                choices.append(
                    {
                        "index": choice.index,
                        "message": {
                            "role": "assistant",
                            "reasoning_content": None,
                            "content": content,
                            "tool_calls": tool_call_object(choice),
                        },
                        "logprobs": None,
                        "finish_reason": chat_finish_reason(choice),
                        "stop_reason": None,
                    }
                )
            else:
                choices.append(
                    {
                        "index": choice.index,
                        "text": content,
                        "logprobs": None,
                        "finish_reason": choice.finish_reason,
                        "stop_reason": None,
                        "prompt_logprobs": None,
                    }
                )
        completion_tokens = plan.completion_tokens
        body: dict[str, object] = {
            "id": self._id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self._created,
            "model": plan.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": plan.prompt_tokens,
                "total_tokens": plan.prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens,
                "prompt_tokens_details": None,
            },
        }
        if self.chat:
            body["prompt_logprobs"] = None
        body["kv_transfer_params"] = None
        return orjson.dumps(body)
