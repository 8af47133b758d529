"""The bodies of requests to `ptune serve`, read as untrusted input: JSON that may be anything, rows that
may be too many or too long. Every refusal is a `Refused` with the HTTP status and one line."""

from __future__ import annotations

import json
from http import HTTPStatus


class Refused(Exception):
    """A request the server answers with `status` and a one-line error; close: drop the connection after it."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status = int(status)
        self.close = close


def parse_json(body: bytes):
    """The body's JSON, or Refused with the one line that says what is wrong."""
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Refused(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise Refused(HTTPStatus.BAD_REQUEST, "the body's JSON nests too deeply; send flat rows") from None
    except ValueError as e:  # e.g. an integer past Python's digit limit for int(str)
        raise Refused(HTTPStatus.BAD_REQUEST, f"the body's JSON cannot be read: {str(e).splitlines()[0]}") from None


def check_rows(rows, max_batch: int, max_input_chars: int, what: str = "inputs") -> list[dict]:
    if not rows:
        raise Refused(HTTPStatus.BAD_REQUEST, f"{what} is empty; send at least one row")
    if len(rows) > max_batch:
        raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                      f"{len(rows)} {what}, more than this server's max_batch={max_batch}; split the request")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise Refused(HTTPStatus.BAD_REQUEST, f"input {i} is not an object of named fields")
        for key, value in row.items():
            if isinstance(value, str) and len(value) > max_input_chars:
                raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"input {i} field {key!r} has {len(value)} characters, more than this server's "
                              f"max_input_chars={max_input_chars}")
    return rows


def parse_inputs(body: bytes, max_batch: int, max_input_chars: int) -> list[dict]:
    """POST /predict's rows, or Refused."""
    data = parse_json(body)
    if not isinstance(data, dict) or not isinstance(data.get("inputs"), list):
        raise Refused(HTTPStatus.BAD_REQUEST, 'the body must be {"inputs": [{"adapter": "<name>", ...fields}, ...]}')
    return check_rows(data["inputs"], max_batch, max_input_chars)
