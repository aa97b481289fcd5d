#!/usr/bin/env python3
"""A consumer of flagrelay's outcome events that is not flagrelay: what a SIEM, a ticketing
bridge or a chat bot would do, with ordinary Python libraries only.

It binds its own queue to the events exchange with a routing-key pattern, then for each
message: checks the HMAC signature (when given the key), parses the body with the CloudEvents
SDK (RabbitMQ binding, structured JSON mode), validates the event against the JSON Schema its
`dataschema` names (from the repository's schemas/ directory, offline), and prints one JSON
line per event. Used by tests/it/contracts.rs against a real broker; also runnable by hand:

    FLAGRELAY_SIGNING_KEY=... python3 tests/foreign/consume_outcomes.py \\
        --url amqp://guest:guest@127.0.0.1:5672/%2f --exchange flagrelay.events \\
        --binding 'decision.#' --forever

Exit codes: 0 the expected event arrived (or --forever was stopped), 1 timeout,
2 an event failed verification, parsing or validation.
"""

import argparse
import hashlib
import hmac
import json
import os
import pathlib
import sys
import time

import jsonschema
import pika
from cloudevents.core.bindings import rabbitmq as ce_rabbitmq
from referencing import Registry, Resource

SCHEMA_BASE = "https://flagrelay.dev/schemas/"
SIGNATURE_HEADER = "x-flagrelay-signature"
KEY_ID_HEADER = "x-flagrelay-key-id"


def load_schemas(schema_dir: pathlib.Path) -> Registry:
    """Every flagrelay JSON Schema, by its $id, so references resolve without a network."""
    resources = []
    for path in sorted(schema_dir.glob("*.schema.json")):
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources)


def verify(body: bytes, headers: dict, key_id: str, key: bytes) -> None:
    """HMAC-SHA256 over the body bytes exactly as received (schemas/README.md)."""
    if headers.get(KEY_ID_HEADER) != key_id:
        raise ValueError(f"signed with key id {headers.get(KEY_ID_HEADER)!r}, expected {key_id!r}")
    expected = hmac.new(key, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, str(headers.get(SIGNATURE_HEADER, ""))):
        raise ValueError("signature does not verify")


def handle(properties, method, body: bytes, args, registry: Registry) -> dict:
    headers = {k: (v.decode() if isinstance(v, bytes) else str(v))
               for k, v in (properties.headers or {}).items()}
    if args.key is not None:
        verify(body, headers, args.key_id, args.key)

    message = ce_rabbitmq.RabbitMQMessage(
        headers=headers, content_type=properties.content_type, body=body)
    event = ce_rabbitmq.from_structured_event(message)

    schema_url = event.get_dataschema()
    if not schema_url or not schema_url.startswith(SCHEMA_BASE):
        raise ValueError(f"unexpected dataschema {schema_url!r}")
    schema = registry.contents(schema_url)
    validator = jsonschema.Draft202012Validator(
        schema, registry=registry, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    # The schema describes the whole structured envelope; `data` is checked by $defs/data.
    validator.validate(json.loads(body))

    data = event.get_data()
    return {
        "routing_key": method.routing_key,
        "decision": method.routing_key.removeprefix("decision."),
        "id": event.get_id(),
        "type": event.get_type(),
        "subject": event.get_subject(),
        "traceparent": event.get_extension("traceparent"),
        "tenant_id": data["tenant_id"],
        "user_id": data["user_id"],
        "result": data["result"],
        "action": data.get("action"),
        "rule": data.get("rule"),
        "was_active": data.get("was_active"),
        "is_active": data.get("is_active"),
        "dry_run": data["dry_run"],
        "latency_ms": data.get("latency_ms"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    parser.add_argument("--exchange", default="flagrelay.events")
    parser.add_argument("--binding", default="decision.#", help="routing-key pattern to bind with")
    parser.add_argument("--schemas", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parents[2] / "schemas")
    parser.add_argument("--key-id", default="k1")
    parser.add_argument("--expect-user", help="stop with success once an event for this user ...")
    parser.add_argument("--expect-decision", help="... with this decision (e.g. deactivated) arrives")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--forever", action="store_true", help="print events until interrupted")
    args = parser.parse_args()
    key = os.environ.get("FLAGRELAY_SIGNING_KEY")
    args.key = key.encode() if key else None

    registry = load_schemas(args.schemas)
    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    # Our own queue: exclusive, gone when we disconnect. A real subscriber would declare a
    # durable named (quorum) queue so that events published while it is down wait for it.
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    channel.queue_bind(queue=queue, exchange=args.exchange, routing_key=args.binding)
    print(json.dumps({"ready": True, "queue": queue, "binding": args.binding}), flush=True)

    deadline = time.monotonic() + args.timeout
    try:
        while args.forever or time.monotonic() < deadline:
            method, properties, body = channel.basic_get(queue=queue, auto_ack=False)
            if method is None:
                connection.sleep(0.05)
                continue
            try:
                seen = handle(properties, method, body, args, registry)
            except Exception as error:  # noqa: BLE001 - report any failure, then stop
                print(json.dumps({"error": f"{type(error).__name__}: {error}",
                                  "routing_key": method.routing_key}), flush=True)
                return 2
            channel.basic_ack(method.delivery_tag)
            print(json.dumps(seen), flush=True)
            if (args.expect_user is not None and seen["user_id"] == args.expect_user
                    and seen["decision"] == args.expect_decision):
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        connection.close()
    print(json.dumps({"timeout": args.timeout}), flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
