"""The node probed as an attacker and a careless user would: each test is a defect found so,
run against the node as a subprocess where the process matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sagakit.node.framing import MAX_LINE
from sagakit.node.host import NodeSettings
from sagakit.node.protocol import MAX_ID
from tests.test_node import MAIN, REPO, execute, msg, run_node

GOOD = execute(5, "after", ["a"]).rstrip("\n")


@pytest.mark.parametrize(
    "crowd",
    [
        "1 " * 5000,  # values back to back, none a message
        "{}" * 5000,  # objects without src and dest
        '{"src": 1} ' * 5000,
        "[] " * 4999 + "]",  # ending in input that is not JSON
    ],
    ids=["ints", "empty objects", "bad src", "then not JSON"],
)
def test_a_line_of_many_bad_values_logs_one_warning_with_a_count(crowd: str) -> None:
    """One line is at most one warning however many bad values it holds: it was one
    warning per value, so a line of a few megabytes wrote millions of lines on stderr."""
    run = run_node(execute(1, "before", ["a"]) + GOOD + " " + crowd + "\n" + GOOD + "\n")
    assert run.code == 0, run.stderr
    # Messages on the crowded line are still served: only the warnings are folded.
    assert [b["in_reply_to"] for b in run.replies()] == [1, 5, 5]
    err = run.stderr.splitlines()
    assert len(err) == 1, err[:5]
    assert "skipped 5000 values on one line" in err[0], err
    assert len(err[0]) < 600


def test_a_line_with_one_bad_value_among_messages_logs_it_as_before() -> None:
    run = run_node(GOOD + " 42 " + GOOD + "\n")
    assert [b["in_reply_to"] for b in run.replies()] == [5, 5]
    err = run.stderr.splitlines()
    assert len(err) == 1, err
    assert "skipped a JSON int: messages are objects" in err[0]


def test_bad_values_on_separate_lines_are_each_reported() -> None:
    # The bound is per line: a line's own warning still says what was wrong with it.
    run = run_node("1\n{}\n" + json.dumps([1]) + "\n")
    assert len(run.stderr.splitlines()) == 3, run.stderr


# A finder that refuses one module, as an interpreter without that extra would:
# the test is of sagakit's message, not of the driver.
def _python(script: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``python -c script args`` from the checkout, on empty input."""
    return subprocess.run(
        [sys.executable, "-c", script, *args], input=b"", capture_output=True, timeout=30, cwd=REPO
    )


_WITHOUT = """
import sys
blocked = sys.argv.pop(1)


class Without:
    def find_spec(self, name, path=None, target=None):
        if name == blocked or name.startswith(blocked + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, Without())
sys.argv[0] = "sagakit"
from sagakit.cli import main
main()
"""


_DLQ = ["dlq", "list", "--group", "g", "--bus"]


@pytest.mark.parametrize(
    ("module", "args", "extra", "distribution"),
    [
        ("asyncpg", ["node", "--store", "postgresql://u@127.0.0.1:1/db"], "postgres", "asyncpg"),
        ("nats", [*_DLQ, "nats://127.0.0.1:1"], "nats", "nats-py"),
        ("redis", [*_DLQ, "redis://127.0.0.1:1"], "redis", "redis"),
        ("aio_pika", [*_DLQ, "amqp://127.0.0.1:1"], "rabbitmq", "aio-pika"),
    ],
)
def test_a_missing_extra_names_the_distribution_and_the_pip_command(
    module: str, args: list[str], extra: str, distribution: str
) -> None:
    """The message named the module to import ('nats', 'aio_pika'), which is not what pip
    installs (nats-py, aio-pika): a user who ran 'pip install nats' got another package."""
    proc = _python(_WITHOUT, module, *args)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert f"pip install 'sagakit[{extra}]'" in err
    assert f"the {distribution} distribution" in err, err
    assert f"import {module}: No module named {module!r}" in err, err


@pytest.mark.parametrize(
    "bad",
    [
        'oops \x1b[2J\x1b]0;pwned\x07 \r{"forged": "log line"}',  # not JSON: quoted as read
        "\x1b[31m" * 3 + " 1 2",  # on a line of several values
        '{"src": "c\x1b[2J", "dest": 1}',  # an object that is not a message (raw ESC: not JSON)
    ],
    ids=["not JSON", "several", "no dest"],
)
def test_bad_input_reaches_stderr_without_control_characters(bad: str) -> None:
    """Input quoted in a warning had its control characters written as they came: a line
    could clear the terminal, retitle it, or with a carriage return print over the log's
    own words (a forged log line). They are escaped, as repr escapes them."""
    run = run_node(bad + "\n" + GOOD + "\n")
    assert [b["in_reply_to"] for b in run.replies()] == [5]
    err = run.stderr
    assert err.count("\n") == 1, err
    assert all(c.isprintable() for c in err.rstrip("\n")), repr(err)
    assert "\\x1b" in err, err


def test_input_in_an_info_log_line_cannot_forge_a_line() -> None:
    # The orchestrator logs a failed step's saga id and step name at info level.
    saga_id = "s\x1b[31m\nFAKE ERROR everything is fine\r"
    step = "a\x1b]0;title\x07"
    line = execute(1, saga_id, [step], fail_step=step)
    proc = subprocess.run(
        MAIN,
        input=line.encode(),
        capture_output=True,
        timeout=20,
        cwd=REPO,
        env={**os.environ, "SAGAKIT_LOG": "info"},
    )
    assert json.loads(proc.stdout)["body"]["type"] == "saga_compensated"
    err = proc.stderr.decode()
    lines = err.splitlines()
    assert lines
    assert all(c.isprintable() for line in lines for c in line), repr(err)
    assert not any(line.startswith("FAKE") for line in lines), err
    assert "\\nFAKE ERROR" in err, err


@pytest.mark.parametrize(
    ("dest", "body", "code"),
    [
        ("saga", {"msg_id": 1, "saga_id": "s1", "steps": ["a"]}, 12),  # no type
        ("saga", {"type": 7, "msg_id": 1, "saga_id": "s1"}, 12),
        ("saga", {"type": "reserve_inventory", "msg_id": 1, "saga_id": "s1", "sku": "x"}, 10),
        ("inventory", {"type": "execute", "msg_id": 1, "saga_id": "s1", "steps": ["a"]}, 10),
        ("nobody", {"type": "execute", "msg_id": 1, "saga_id": "s1", "steps": ["a"]}, 10),
        ("event_bus", {"type": "init", "msg_id": 1, "saga_id": "s1", "services": 3}, 12),
    ],
)
def test_every_error_reply_echoes_a_usable_saga_id(
    dest: str, body: dict[str, object], code: int
) -> None:
    """docs/node.md promises the request's saga_id in every error reply (seed 002, hint 5:
    it is how a reply is correlated); the router's own refusals (no type, a type the node
    does not handle) left it out."""
    run = run_node(json.dumps({"src": "c", "dest": dest, "body": body}) + "\n")
    (reply,) = run.replies()
    assert (reply["type"], reply["code"], reply["in_reply_to"]) == ("error", code, 1), reply
    assert reply["saga_id"] == "s1", reply


_SAGA = '{"src": "c", "dest": "saga", "body": {"type": "execute", "saga_id": "s1", "steps": ["a"], '


@pytest.mark.parametrize(
    ("fields", "in_reply_to", "reason"),
    [
        ('"msg_id": 1, "timestamp": 1e999', 1, "number 1e999 overflows a float"),
        ('"msg_id": 1, "amount": -1e400', 1, "number -1e400 overflows a float"),
        ('"msg_id": 1e999', None, "number 1e999 overflows a float"),
        ('"msg_id": ' + "9" * 5000, None, "4300"),
        ('"msg_id": 1, "n": ' + "9" * 5000, 1, "4300"),
        # Not JSON, but what Python's json.dumps writes for a float it cannot carry.
        ('"msg_id": 1, "amount": NaN', 1, "NaN is not JSON"),
        ('"msg_id": 1, "amount": -Infinity', 1, "-Infinity is not JSON"),
    ],
    ids=["float field", "negative", "msg_id", "long msg_id", "long field", "NaN", "-Infinity"],
)
def test_a_message_with_a_number_out_of_range_is_answered_code_12(
    fields: str, in_reply_to: int | None, reason: str
) -> None:
    """JSON's grammar allows any number; one the node cannot hold (a float that overflows,
    an integer past the interpreter's digit limit) made the whole message 'not JSON',
    skipped with a warning: the client got no reply and waited for one. A message whose
    envelope reads is now answered: error 12, naming why, with its msg_id and saga_id."""
    run = run_node(_SAGA + fields + "}}\n" + GOOD + "\n")
    assert run.code == 0, run.stderr
    first, after = run.replies()
    assert (first["type"], first["code"], first["saga_id"]) == ("error", 12, "s1"), first
    assert first.get("in_reply_to") == in_reply_to, first
    assert reason in first["text"], first
    assert len(first["text"]) < 300, first
    assert after["in_reply_to"] == 5
    # Reported on stderr as before, once.
    assert len(run.stderr.splitlines()) == 1, run.stderr


def _steps_request(msg_id: int, steps: list[str]) -> str:
    return execute(msg_id, f"long{msg_id}", steps, fail_step=steps[-1])


def test_a_step_name_past_the_id_cap_is_refused() -> None:
    """A step name had no cap, though a saga_id has one for the reason it applies here too:
    the log keeps it with every saga it answers retries from. 64 steps of 250,000
    characters (a 16 MB line) were kept whole, and the step-list cache keeps 4,096 lists."""
    run = run_node(_steps_request(1, ["a", "b" * (MAX_ID + 1)]) + GOOD + "\n")
    first, after = run.replies()
    assert (first["code"], first["saga_id"]) == (12, "long1"), first
    assert first["text"] == f"steps[1]: at most {MAX_ID} characters, got {MAX_ID + 1}"
    assert after["in_reply_to"] == 5


@pytest.mark.parametrize("junk", ["> ", "\x00", "DEBUG sent: ", "}"])
def test_a_message_after_junk_on_its_line_is_served(junk: str) -> None:
    """A prompt, a log prefix or a stray byte before a message made the whole line bad
    input: the message was never answered, though what follows bad input is served."""
    run = run_node(execute(1, "before", ["a"]) + junk + GOOD + "\n")
    assert [b["in_reply_to"] for b in run.replies()] == [1, 5]
    assert len(run.stderr.splitlines()) == 1, run.stderr


def test_junk_and_messages_in_turn_on_one_line_are_read_in_linear_time() -> None:
    # Each failed decode counted the line before it: 80,000 short turns took 38 s
    # (run_node gives the node 10 s).
    run = run_node(("xx " + GOOD) * 50_000 + "\n")
    assert len(run.replies()) == 50_000


def _reserve(msg_id: int, **fields: object) -> str:
    body = {"type": "reserve_inventory", "msg_id": msg_id, "saga_id": f"z{msg_id}", "sku": "a"}
    return json.dumps({"src": "c", "dest": "inventory", "body": {**body, **fields}}) + "\n"


def test_a_deep_value_in_a_flag_is_malformed_not_a_crash() -> None:
    """The refusal quoted the value with repr, which raised RecursionError on a list
    nested 1,000 deep (the parser takes up to 1,024): answered code 13 with a
    traceback on stderr, for input that is merely wrong."""
    line = _reserve(1, fail_payment="X").replace('"X"', "[" * 1000 + "]" * 1000)
    run = run_node(line)
    (reply,) = run.replies()
    assert (reply["code"], reply["in_reply_to"]) == (12, 1), reply
    assert reply["text"].startswith("fail_payment: must be true or false, got [[")
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "line",
    [
        _reserve(1, fail_payment=list(range(300_000))),
        json.dumps({"src": "c", "dest": "d" * 2_000_000, "body": {"type": "x", "msg_id": 1}})
        + "\n",
        json.dumps({"src": "c", "dest": "event_bus", "body": {"type": "init", "msg_id": 1}})[:-2]
        + ', "services": '
        + json.dumps([f"svc{i}" for i in range(200_000)])
        + "}}\n",
        execute(1, "s", [f"a{i}" for i in range(2_000)])
        + execute(2, "s", [f"b{i}" for i in range(2_000)]),
    ],
    ids=["a flag", "a dest", "services", "a conflict"],
)
def test_an_error_text_does_not_echo_a_huge_value(line: str) -> None:
    """Refusals quoted the offending value whole: a flag of 300,000 numbers was answered
    with a 2.3 MB error, a step-list conflict with both lists. A text is at most 1,000
    characters, the value cut short."""
    run = run_node(line)
    error = run.replies()[-1]
    assert error["type"] == "error", error
    assert len(error["text"]) <= 1000, (len(error["text"]), error["text"][:300])


# As _WITHOUT, but the driver is there in a version older than the extra asks for.
_OLD = """
import importlib.metadata
import sys

distribution, found = sys.argv.pop(1), sys.argv.pop(1)
real = importlib.metadata.version
importlib.metadata.version = lambda name: found if name == distribution else real(name)
sys.argv[0] = "sagakit"
from sagakit.cli import main
main()
"""


@pytest.mark.parametrize(
    ("distribution", "args", "extra", "minimum"),
    [
        ("asyncpg", ["node", "--store", "postgresql://u@127.0.0.1:1/db"], "postgres", "0.30"),
        ("nats-py", [*_DLQ, "nats://127.0.0.1:1"], "nats", "2.7"),
    ],
)
def test_a_driver_older_than_the_extra_asks_for_is_named(
    distribution: str, args: list[str], extra: str, minimum: str
) -> None:
    """pyproject.toml asks for asyncpg>=0.30 (create_pool(reset=...)); an older one
    imported fine and failed later with a TypeError from inside the saga log."""
    proc = _python(_OLD, distribution, "0.1.2", *args)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert f"needs {distribution}>={minimum}, found 0.1.2" in err, err
    assert f"pip install -U 'sagakit[{extra}]'" in err, err


@pytest.mark.parametrize("raw", ["\t", "\x01", "\x1b"])
def test_a_message_with_a_raw_control_character_in_a_string_is_answered(raw: str) -> None:
    """A tab typed into a string (JSON wants it escaped) made the message 'not JSON',
    skipped with a warning only: a hand-written request was never answered."""
    line = execute(1, "s1", ["a"]).replace('"a"', f'"a{raw}b"')
    run = run_node(line + GOOD + "\n")
    first, after = run.replies()
    assert (first["code"], first["in_reply_to"], first["saga_id"]) == (12, 1, "s1"), first
    assert first["text"].startswith("a raw control character in a string (Invalid control"), first
    assert after["in_reply_to"] == 5


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


_DEEP_REQUESTS = {
    "plain node": ("n1", {"type": "init", "msg_id": 1}),
    "saga": ("saga", {"type": "execute", "msg_id": 1, "saga_id": "s1", "steps": ["a"]}),
    "inventory": (
        "inventory",
        {"type": "reserve_inventory", "msg_id": 1, "saga_id": "s1", "sku": "a", "quantity": 1},
    ),
    "event_bus": ("event_bus", {"type": "init", "msg_id": 1, "services": ["inventory"]}),
    "shop service": ("payment", {"type": "init", "msg_id": 1}),
}


@pytest.mark.parametrize(("dest", "body"), _DEEP_REQUESTS.values(), ids=_DEEP_REQUESTS)
@pytest.mark.parametrize("where", ["a body field", "a request's own field", "beside the body"])
def test_a_message_nested_past_the_parsers_depth_is_answered(
    dest: str, body: dict[str, object], where: str
) -> None:
    """A message nested deeper than the parser takes was skipped as 'not JSON (nested too
    deeply)' with a warning only, though its envelope reads: its sender waited for a reply.
    It is answered error 12 naming the limit, with its msg_id and saga_id."""
    message: dict[str, object] = {"src": "c", "dest": dest, "body": dict(body)}
    if where == "a body field":
        message["body"]["echo"] = "DEEP"  # type: ignore[index]
    elif where == "a request's own field":
        field = {"saga": "steps", "event_bus": "services", "inventory": "sku"}.get(dest, "node_ids")
        message["body"][field] = "DEEP"  # type: ignore[index]
    else:
        message["meta"] = {"trace": "DEEP"}
    line = json.dumps(message).replace('"DEEP"', _deep(2000))
    run = run_node(line + "\n" + GOOD + "\n")
    assert run.code == 0, run.stderr
    first, after = run.replies()
    assert (first["type"], first["code"], first["in_reply_to"]) == ("error", 12, 1), first
    assert first["text"] == "a value nested deeper than 1024 levels", first
    assert first.get("saga_id") == body.get("saga_id"), first
    assert after["in_reply_to"] == 5
    # Nothing of it ran: no event, no node made by it.
    assert [m["dest"] for m in run.messages] == ["c", "c"], run.stdout
    (warning,) = run.stderr.splitlines()
    assert "refused a message with a value nested deeper than 1024 levels" in warning
    assert len(warning) < 600


def test_a_deep_message_on_a_bare_interpreter_names_the_standard_librarys_limit() -> None:
    # No orjson: the standard library's parser stops at the recursion limit, under 1,024.
    line = execute(1, "s1", ["a"], echo="DEEP").replace('"DEEP"', _deep(1500))
    proc = subprocess.run(
        [sys.executable, "-S", str(REPO / "main.py")],
        input=(line + GOOD + "\n").encode(),
        capture_output=True,
        timeout=20,
    )
    first, after = (json.loads(out)["body"] for out in proc.stdout.splitlines())
    assert (first["code"], first["in_reply_to"], first["saga_id"]) == (12, 1, "s1"), first
    limit = int(first["text"].removeprefix("a value nested deeper than ").removesuffix(" levels"))
    assert 900 < limit < 1024, first
    assert after["in_reply_to"] == 5


@pytest.mark.parametrize(
    ("line", "in_reply_to"),
    [
        # A body that is not an object: answered as {"body": []} is, without in_reply_to.
        ('{"src": "c", "dest": "saga", "body": DEEP}', None),
        # Unreadable for a number as well: the second read (for the number) recursed too.
        (execute(1, "s1", ["a"], n="NAN", echo="DEEP").replace('"NAN"', "NaN"), 1),
        # Over several lines, after junk on its line, after a truncated message.
        (json.dumps({"src": "c", "dest": "n1", "body": {"msg_id": 1, "x": "DEEP"}}, indent=2), 1),
        ("> " + msg("n1", {"type": "init", "msg_id": 1, "x": "DEEP"}), 1),
        ('{"src": "c", "dest": "n1", "body": {\n' + msg("n1", {"msg_id": 1, "x": "DEEP"}), 1),
        # Past 64 bits: read by the standard library's parser, whose limit it names.
        (msg("n1", {"type": "init", "msg_id": 2**64, "x": "DEEP"}), 2**64),
    ],
    ids=["body", "NaN too", "pretty-printed", "after junk", "after a truncation", "huge msg_id"],
)
def test_a_deep_message_in_other_shapes_is_answered(line: str, in_reply_to: int | None) -> None:
    run = run_node(line.replace('"DEEP"', _deep(1100)).replace("DEEP", _deep(1100)) + "\n" + GOOD)
    first, after = run.replies()
    assert (first["code"], first.get("in_reply_to")) == (12, in_reply_to), first
    limit = "1024" if in_reply_to != 2**64 else "9"  # the standard library's: 9xx
    assert first["text"].startswith("a value nested deeper than " + limit), first
    assert first["text"].endswith(" levels"), first
    assert after["in_reply_to"] == 5


@pytest.mark.parametrize(
    "bad",
    [
        _deep(2000),  # not an object
        '{"src": "c", "body": {"msg_id": 1, "x": ' + _deep(2000) + "}}",  # no dest
        '{"src": "c", "dest": ' + _deep(2000) + ', "body": {"msg_id": 1}}',
        '{"src": "c", "dest": "n1", "body": {"msg_id": 1, "x": ' + _deep(2000) + "}",  # open
        '{"src": "c", "dest": "n1" "body": {"msg_id": 1, "x": ' + _deep(2000) + "}}",  # no comma
    ],
    ids=["array", "no dest", "deep dest", "unclosed", "not JSON"],
)
def test_deep_input_that_is_not_an_addressable_message_is_skipped_as_before(bad: str) -> None:
    run = run_node(execute(1, "before", ["a"]) + bad + "\n" + GOOD + "\n")
    assert [b["in_reply_to"] for b in run.replies()] == [1, 5]
    assert "skipped" in run.stderr
    assert len(run.stderr.splitlines()) == 1, run.stderr


def test_nesting_inside_a_string_is_no_nesting() -> None:
    line = execute(1, "s1", ["a"], echo="[" * 100_000 + "{" * 100_000 + '\\"]]')
    run = run_node(line + GOOD + "\n")
    assert [(b["type"], b["in_reply_to"]) for b in run.replies()] == [
        ("saga_completed", 1),
        ("saga_completed", 5),
    ]
    assert run.stderr == ""


@pytest.mark.parametrize("shape", ["open", "closed", "a message"])
def test_sixteen_megabytes_of_brackets_neither_crash_nor_stall_the_node(shape: str) -> None:
    """The envelope is read with no recursion per level, in a time linear in the line:
    a 16 MB line of brackets (the longest the node reads) takes well under the 10 s
    run_node allows, and the node serves the next line."""
    if shape == "open":
        line = "[" * MAX_LINE
    elif shape == "closed":  # read as far as its envelope, which it has not
        line = _deep(MAX_LINE // 2)
    else:
        line = msg("n1", {"type": "init", "msg_id": 1, "x": "DEEP"}).rstrip("\n")
        line = line.replace('"DEEP"', _deep(MAX_LINE // 2 - 100))
    assert len(line) <= MAX_LINE
    run = run_node(line + "\n" + GOOD + "\n")
    assert run.code == 0, run.stderr[-2000:]
    replies = run.replies()
    assert replies[-1]["in_reply_to"] == 5
    if shape == "a message":
        assert [(b["code"], b["in_reply_to"]) for b in replies[:-1]] == [(12, 1)]
    else:
        assert len(replies) == 1
    assert "Traceback" not in run.stderr
    assert len(run.stderr) < 1000


@pytest.mark.parametrize("dest", ["n1", "saga", "event_bus", "inventory", "payment"])
@pytest.mark.parametrize("msg_id", [None, True, 1.0, "1"], ids=["absent", "bool", "float", "str"])
def test_an_init_without_an_integer_msg_id_is_malformed(dest: str, msg_id: object) -> None:
    """An init without a usable msg_id was answered init_ok with "in_reply_to": null, a
    reply to nothing, where every other request is refused code 12 naming msg_id; and the
    node took the node_id (the event bus its services) from the refused request."""
    body: dict[str, object] = {"type": "init", "node_id": "x", "services": ["inventory"]}
    if msg_id is not None:
        body["msg_id"] = msg_id
    run = run_node(msg(dest, body) + msg(dest, {"type": "init", "msg_id": 2}))
    refused, after = run.replies()
    assert (refused["type"], refused["code"], refused["text"]) == (
        "error",
        12,
        "msg_id: required, an integer",
    ), refused
    assert "in_reply_to" not in refused
    # Nothing of the refused init was taken: the next is the node's first init_ok.
    assert after == {"type": "init_ok", "in_reply_to": 2, "msg_id": 0}, after


def _line_of(length: int, msg_id: int) -> str:
    line = execute(msg_id, f"p{msg_id}", ["a"], pad="").rstrip("\n")
    return line.replace('"pad": ""', '"pad": "' + "x" * (length - len(line)) + '"')


@pytest.mark.parametrize("cut", ["whole", "before the CR", "between CR and LF"])
def test_a_line_at_the_cap_ended_by_crlf_is_served(cut: str) -> None:
    """--max-line counted a CRLF line's "\\r" as one of its characters: a line of exactly
    the cap was served when ended by "\\n" and refused as over the cap when ended by "\\r\\n"."""
    from tests.test_node_hardening import serve_in_process

    at_cap, over = _line_of(1000, 2), _line_of(1001, 3)
    assert (len(at_cap), len(over)) == (1000, 1001)
    data = (
        execute(1, "s1", ["a"]).replace("\n", "\r\n") + at_cap + "\r\n" + over + "\r\n"
    ).encode()
    data += GOOD.encode() + b"\r\n"
    if cut == "whole":
        pieces = [data]
    else:
        end = data.index(at_cap.encode()) + len(at_cap) + (cut != "before the CR")
        pieces = [data[:end], data[end:]]
    output = serve_in_process(pieces, NodeSettings(max_line=1000)).decode()
    replies = [json.loads(line)["body"] for line in output.splitlines()]
    assert [(b["type"], b["in_reply_to"]) for b in replies] == [
        ("saga_completed", 1),
        ("saga_completed", 2),
        ("saga_completed", 5),
    ]


def test_a_stream_of_bad_lines_writes_a_bounded_share_of_it_on_stderr() -> None:
    """Each bad line was one warning: 200,000 lines of "1" (400 KB) wrote 17 MB on stderr,
    in 8 s. Past the first 1,000 warnings, one is written per 1,000 more, and
    the rest are counted at the end; the messages among the bad lines are all served."""
    bad = "1\n" * 2000 + execute(1, "s1", ["a"]) + "{}\n" * 1000 + GOOD + "\n" + "[]\n" * 7
    run = run_node(bad)
    assert run.code == 0, run.stderr[-2000:]
    assert [b["in_reply_to"] for b in run.replies()] == [1, 5]
    err = run.stderr.splitlines()
    assert len(err) == 1000 + 2 + 1, len(err)
    assert all("skipped a JSON int" in line for line in err[:1000])
    more = "1000 more bad inputs (past the first 1000, one in 1000 is shown); the last: "
    assert err[1000].endswith(more + "skipped a JSON int: messages are objects"), err[1000]
    assert err[1001].endswith(more + "skipped a message without string src and dest: {}")
    assert err[1002].endswith("7 more bad inputs (past the first 1000, one in 1000 is shown)")
