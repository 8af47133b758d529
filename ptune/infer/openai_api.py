"""OpenAI-compatible endpoints of `ptune serve`: the `openai` client and the tools built on it work unchanged,
with `model` naming an adapter.

    GET  /v1/models        {"object": "list", "data": [{"id": "<adapter>", "object": "model", ...}]}
    POST /v1/completions   {"model": "<adapter>", "prompt": "..." | ["...", ...], "max_tokens": 32,
                            "stream": false, "stop": ["."]}
                        -> {"object": "text_completion", "choices": [{"text", "index", "finish_reason"}], "usage"}

`prompt` fills the adapter's one input field (E2E's `mr`, SST-2's `sentence`); a task of several fields
(RTE's premise and hypothesis) takes them as `fields` instead ({"premise": ..., "hypothesis": ...} or a list
of such, one per choice; the openai client sends it with `extra_body`). A generation adapter answers with
its decoded line (as `ptune predict`: greedy, continuously batched, up to `max_tokens` new tokens, default
its task's max_new_tokens, at most the server's max_tokens; a task.decoding=beam run with its beams,
alone, to its task's max_new_tokens); a classification adapter answers with its label.
`stop` (up to 4 strings) ends a line where one first appears. `stream: true` sends server-sent events,
one chunk per piece of text as the continuous decoder produces it, a last chunk per choice with its
finish_reason, a usage chunk with `stream_options: {"include_usage": true}`, then `data: [DONE]`.

What ptune's decoding does not do is refused in one line (400), not accepted and ignored: temperature or
top_p other than greedy's (0 / 1), n or best_of above 1, logprobs, echo, suffix, penalties, logit_bias,
seed, user (nothing here would read it), stream_options without stream, and any key OpenAI does not define.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ptune.errors import PtuneError
from ptune.infer.bodies import Refused, check_rows, parse_json

# keys of OpenAI's completions request that ptune's decoding does not read; value: the values it accepts (no effect)
GREEDY = {"temperature": (0, 0.0, None), "top_p": (1, 1.0, None), "n": (1, None), "best_of": (1, None),
          "logprobs": (None,), "echo": (False, None), "suffix": (None, ""), "presence_penalty": (0, 0.0, None),
          "frequency_penalty": (0, 0.0, None), "logit_bias": (None, {}), "seed": (None,), "user": (None,)}
READ = {"model", "prompt", "max_tokens", "stream", "stop", "stream_options", "fields"}


def routes(service) -> list[Route]:
    pool = service.pool

    async def models(request):
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "ptune",
                 "task": a.task.name, "method": a.method.name} for name, a in pool.adapters.items()]
        return JSONResponse({"object": "list", "data": data})

    def parse(data) -> tuple[str, list[dict], dict]:
        if not isinstance(data, dict):
            raise Refused(400, "the body must be a JSON object: {\"model\": \"<adapter>\", \"prompt\": \"...\"}")
        unknown = sorted(set(data) - READ - set(GREEDY))
        if unknown:
            raise Refused(400, f"{unknown[0]!r} is not an OpenAI completions key ptune reads; it reads "
                               f"{', '.join(sorted(READ | set(GREEDY)))}")
        for key, allowed in GREEDY.items():
            if key in data and data[key] not in allowed:
                raise Refused(400, f"{key}={data[key]!r} is not served: ptune decodes greedily, one choice per prompt "
                                   f"(accepted: {', '.join(repr(a) for a in allowed)})")
        name = data.get("model")
        if not isinstance(name, str) or name not in pool.adapters:
            raise Refused(404 if isinstance(name, str) else 400,
                          f"model {name!r} is not served; GET /v1/models lists the adapters: {', '.join(pool.names)}")
        fields = pool.adapters[name].info()["fields"]
        if "fields" in data:
            given = data["fields"] if isinstance(data["fields"], list) else [data["fields"]]
            if data.get("prompt") is not None:
                raise Refused(400, "send either prompt or fields, not both")
            rows = [{**f, "adapter": name} if isinstance(f, dict) else f for f in given]
        else:
            prompt = data.get("prompt")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise Refused(400, "prompt must be a string or a list of strings")
            if len(fields) != 1:
                raise Refused(400, f"adapter {name!r} (task {pool.adapters[name].task.name}) reads the fields "
                                   f"{', '.join(fields)}: send them as \"fields\": {{...}} instead of prompt")
            rows = [{fields[0]: p, "adapter": name} for p in prompts]
        rows = check_rows(rows, service.max_batch, service.max_input_chars, what="prompts")
        max_tokens = data.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or not 1 <= max_tokens <= service.max_tokens):
            raise Refused(400, f"max_tokens={max_tokens!r} is invalid: an integer from 1 to this server's "
                               f"max_tokens={service.max_tokens}")
        if max_tokens is not None and pool.adapters[name].decodes_alone:
            raise Refused(400, f"adapter {name!r} decodes with beam search up to its task's max_new_tokens="
                               f"{pool.adapters[name].task.max_new_tokens}; max_tokens is not applied to it: drop it")
        stop = data.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise Refused(400, "stop must be a non-empty string or a list of up to 4 of them")
        options = data.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise Refused(400, "stream_options takes only include_usage")
        if options and not data.get("stream"):
            raise Refused(400, "stream_options applies to streamed answers: add \"stream\": true or drop it")
        return name, rows, {"max_tokens": max_tokens, "stop": stop, "stream": bool(data.get("stream")),
                            "usage": bool(options.get("include_usage"))}

    async def completions(request):
        name, rows, opts = parse(parse_json(await service.body(request)))
        try:
            pool.check(rows)
        except PtuneError as e:
            raise Refused(400, str(e)) from None
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        if not opts["stream"]:
            results = await service.run(rows, max_tokens=opts["max_tokens"], stop=opts["stop"])
            choices = [{"text": r.text, "index": i, "logprobs": None, "finish_reason": r.finish}
                       for i, r in enumerate(results)]
            return JSONResponse({**head, "choices": choices, "usage": _usage(results)})
        return StreamingResponse(_stream(service, rows, opts, head), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return [Route("/v1/models", models, methods=["GET"]), Route("/v1/completions", completions, methods=["POST"])]


def _usage(results) -> dict:
    p, c = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _event(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _stream(service, rows: list[dict], opts: dict, head: dict):
    """Server-sent events of one streamed request; a client that goes away cancels its rows."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    sent = [""] * len(rows)

    def on_text(i: int, delta: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, ("text", i, delta))

    async def run():
        try:
            queue.put_nowait(("done", await service.run(rows, on_text, opts["max_tokens"], opts["stop"]), None))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 -- reported in the stream: its status line is already sent
            queue.put_nowait(("done", None, e))

    task = asyncio.ensure_future(run())
    try:
        while True:
            kind, a, b = await queue.get()
            if kind == "text":
                sent[a] += b
                yield _event({**head, "choices": [{"text": b, "index": a, "logprobs": None, "finish_reason": None}]})
                continue
            if b is not None:
                line = str(b).splitlines()[0] if str(b) else type(b).__name__
                yield _event({"error": {"message": line, "type": "invalid_request_error" if isinstance(b, PtuneError)
                                        else "server_error", "param": None, "code": None}})
                break
            for i, r in enumerate(a):  # classification labels, and what a generated line still had
                rest = r.text[len(sent[i]):] if r.text.startswith(sent[i]) else ""
                yield _event({**head, "choices": [{"text": rest, "index": i, "logprobs": None,
                                                   "finish_reason": r.finish}]})
            if opts["usage"]:
                yield _event({**head, "choices": [], "usage": _usage(a)})
            break
        yield "data: [DONE]\n\n"
    finally:
        if not task.done():
            task.cancel()
