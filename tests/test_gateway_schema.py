"""Property-based run of the gateway's own OpenAPI document: no request may produce a 500.

Kept small (a few examples per operation, only the /v1 API). It runs on its own Redis database,
so the odd tasks it enqueues for invented models stay out of the other tests' queues.
Schemathesis' pytest plugin does not load under this pytest, so the operations are driven
through its Hypothesis strategies directly.
"""

from __future__ import annotations

import redis
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from test_gateway_support import GatewayServer, settings_on_db

from tasks.settings import Settings

DB = 15
EXAMPLES = 6


def test_no_request_is_a_server_error(settings: Settings) -> None:
    isolated = settings_on_db(settings.redis_url, DB)
    checked = []
    try:
        with GatewayServer(isolated) as server:
            schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
            for result in schema.include(path_regex="^/v1/").get_all_operations():
                operation = result.ok()

                @given(case=operation.as_strategy())
                @hypothesis_settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                def no_server_error(case: schemathesis.Case) -> None:
                    response = case.call(timeout=10)
                    case.validate_response(response, checks=[not_a_server_error])

                no_server_error()
                checked.append(operation.label)
    finally:
        with redis.Redis.from_url(isolated.redis_url) as client:
            client.flushdb()
    assert len(checked) >= 8, checked  # four submit routes, status, events, cancel, queues
