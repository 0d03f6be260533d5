"""A property-based fuzz of every endpoint of the hedgerl REST API, driven by the OpenAPI document that a real running
platform serves (`hedgerl hub up` on loopback: proxy, hub, gateway, service), called through the hub's proxy with a real
user's token. For each operation of the document, schemathesis generates requests that follow the schema (positive) and
requests that break it (negative: wrong types, missing fields, out-of-range values, dropped credentials); beside them
come raw malformed bodies and random headers. Every answer must be no 5xx, carry a status code the document declares for
that operation, and a body that validates against the declared schema; a malformed request must not be accepted (2xx).

Every fault is collected (not only the first) and reported with the request that shows it (a curl command). The default
run is derandomised and bounded (a few examples per operation and mode, ~60-90 s); the slow run draws fresh examples,
many more of them, on a platform whose registry is on PostgreSQL. HEDGERL_FUZZ_EXAMPLES overrides the examples per
operation."""
import json
import os
import secrets
import time
from pathlib import Path

import pytest
import requests

from platform_tools import Up, approved_user, platform_env

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings, strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,  # noqa: E402
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance)

pytestmark = [pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                 reason="the platform runs as root (workspaces are the users' own accounts)"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

API = "/services/hedgerl/api/v1"
# what every answer is checked for; schema-valid requests the service refuses (a scenario name that does not exist, a
# limit) are legitimate 4xx, so "positive data acceptance" is not one of them
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
# small limits keep jobs cheap: valid submissions run (and are cancelled at once), the rest meet the limits
LIMITS = {"HEDGERL_SERVICE_MAX_JOBS": "2", "HEDGERL_SERVICE_MAX_PATHS": "2000", "HEDGERL_SERVICE_MAX_STATES": "500",
          "HEDGERL_SERVICE_MAX_SIMULATIONS": "3"}
SCENARIO = "cao2021-gbm-1m-1d"


class Platform:
    "A running platform, its OpenAPI document, user A's token, and ids of objects of A's to aim path parameters at."
    def __init__(self, up: Up, name: str, token: str):
        self.up, self.url, self.name, self.token = up, up.url, name, token
        self.h = {"Authorization": f"token {token}"}
        self.http = requests.Session()
        r = self.http.get(f"{self.url}{API}/openapi.json", headers=self.h, timeout=30)
        assert r.status_code == 200, r.text
        self.doc = r.json()
        self.schema = schemathesis.openapi.from_dict(self.doc)
        # query parameters the document does not name are ignored, as HTTP APIs commonly do: not sent as "malformed"
        self.schema.config.generation.update(allow_extra_parameters=False)
        # a body over the limit is refused too
        self.schema.config.checks.negative_data_rejection.expected_statuses.append("413")
        self.known = seed_objects(self)


def seed_objects(p: Platform) -> dict:
    "A run, a model and an evaluation of A's (in the service's registry) and a simulation: known ids by kind."
    from hedgerl.core import load_settings
    from hedgerl.registry import Registry
    reg = Registry(load_settings(environ=p.up.env).registry.url).as_user(p.name)
    run = reg.start_run("fuzz", params={"scenario": SCENARIO, "agent": "ppo"}); run.log(1,
            **{"train/loss": 0.5}); run.finish({"ok": 1})
    artifact = sorted((Path(__file__).resolve().parent.parent / "reports" / "models").glob("*.zip"))
    model = reg.register_model(run, "ppo", SCENARIO, artifact[0]) if artifact else None
    ev = reg.record_evaluation(SCENARIO, "ppo", 1.0, {"mean": 0.1}, n_paths=10, seed=1, run=run, model=model)
    known = {"run": [run.id], "model": [model["id"]] if model else [], "evaluation": [ev], "scenario": [SCENARIO]}
    r = p.http.post(f"{p.url}{API}/simulations", json={"scenario": SCENARIO, "strategy": "delta", "seed": 1},
                    headers=p.h)
    if r.status_code == 201 and "id" in r.json(): known["simulation"] = [r.json()["id"]]
    reg.engine.dispose()
    return known


def _start(tmp_path_factory, registry_url: str | None = None) -> tuple[Up, Platform]:
    env = platform_env(tmp_path_factory.mktemp("fuzz") / "data", registry_url, **LIMITS)
    up = Up(env)
    try:
        up.wait()
        name, token = approved_user(up, f"fz{secrets.token_hex(3)}")
        return up, Platform(up, name, token)
    except BaseException:
        up.stop(); raise


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    up, p = _start(tmp_path_factory)
    yield p
    up.stop()


def path_choices(op, known: dict) -> dict:
    "For each path parameter of `op`, ids of real objects of the kind its name or route suggests (empty: none known)."
    out = {}
    for param in op.path_parameters:
        n, route = param.name.lower(), op.path.lower()
        kind = next((k for k in ("simulation", "model", "evaluation", "run", "scenario") if k in n), None)
        if kind is None:  # `{id}` or `{name}`: the resource named before it
            kind = next((k for k in ("simulation", "model", "evaluation", "scenario", "run", "backtest",
                                     "training") if f"/{k}s/{{" in route), None)
            kind = "run" if kind in ("backtest", "training") else kind  # jobs are runs
        if known.get(kind): out[param.name] = known[kind]
    return out


def unobservable(case) -> bool:
    """Whether the case broke the schema only by giving a string query parameter a value of another type: on the wire a
    query value is text either way (`{"": ""}` becomes `=`), so the service cannot tell it from a valid string."""
    kinds = {p.name: (p.definition.get("schema") or {}).get("type") for p in case.operation.query} if case.query else {}
    odd = [k for k, v in (case.query or {}).items() if not isinstance(v, str) and kinds.get(k) in ("string", None)]
    return bool(odd) and (case.body is None or type(case.body).__name__ == "NotSet")


class Fuzz:
    "Runs cases against the platform and collects every distinct failure with a request that shows it."
    def __init__(self, p: Platform):
        self.p, self.failures, self.calls = p, {}, 0

    def record(self, op_label: str, title: str, status: int, text: str, curl: str) -> None:
        self.failures.setdefault((op_label, title.split("\n")[0], status), f"{text}\n    {curl}")

    def call(self, case) -> None:
        # A's token; in negative mode schemathesis itself drops or mangles it where it tests the credentials
        h = self.p.h
        try: response = case.call(base_url=self.p.url, session=self.p.http, headers=h, timeout=60)
        except requests.RequestException as e:
            self.record(case.operation.label, f"no answer: {type(e).__name__}", 0, str(e)[:300],
                        case.as_curl_command(base_url=self.p.url)); return
        self.calls += 1
        try: case.validate_response(response, checks=CHECKS, headers=h)
        except BaseException as e:  # a Failure, or a FailureGroup of them
            if isinstance(e, (KeyboardInterrupt, SystemExit)): raise
            for f in getattr(e, "exceptions", [e]):
                if getattr(f, "title", "").startswith("Schema-violating request accepted") and unobservable(
                        case): continue
                self.record(case.operation.label, getattr(f, "title", type(f).__name__), response.status_code,
                            f"{response.status_code} {response.text[:300]}", case.as_curl_command(base_url=self.p.url))
        self.cleanup(case, response)

    def cleanup(self, case, response) -> None:
        """A job or simulation a valid request created is cancelled or deleted at once: the fuzz never fills a limit or
        the CPU."""
        if case.method.upper() != "POST" or response.status_code not in (201, 202): return
        try: created = response.json()
        except ValueError: return
        kind = case.operation.path.rstrip("/").rsplit("/", 1)[-1]
        if isinstance(created, dict) and "id" in created and kind in ("backtests", "trainings", "simulations",
                                                                      "scenarios"):
            self.p.http.delete(f"{self.p.url}{API}/{kind}/{created['id']}", headers=self.p.h, timeout=60)

    def report(self) -> str:
        return "\n".join(f"- {op}: {title} (HTTP {status})\n    {text}" for (op, title, status),
                         text in sorted(self.failures.items()))


def fuzz_operations(p: Platform, modes, examples: int, derandomize: bool) -> Fuzz:
    """Every operation of the live document, in each generation mode, `examples` cases each (half of them aimed at real
    ids where the path has some)."""
    fz = Fuzz(p)
    ops = [r.ok() for r in p.schema.get_all_operations()]
    assert len(ops) >= 10, [o.label for o in ops]
    for op in ops:
        for mode in modes:
            strategy = op.as_strategy(generation_mode=mode)
            choices = path_choices(op, p.known) if mode == GenerationMode.POSITIVE else {}
            if choices:
                strategy = st.one_of(strategy, st.fixed_dictionaries({k: st.sampled_from(v) for k,
                                                                      v in choices.items()})
                                     .flatmap(lambda pp: op.as_strategy(generation_mode=mode, path_parameters=pp)))
            @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
                      phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def run(case): fz.call(case)
            try: run()
            # hypothesis could not generate for this operation in this mode (e.g. nothing to negate)
            except Exception as e:
                if "Unsatisfiable" not in type(e).__name__ and "Unsatisfiable" not in str(e): raise
    return fz


def test_the_document_covers_the_api(platform):
    """The live document lists the issue's resources (as far as they are mounted) and every route answers JSON errors
    with a detail."""
    paths = set(platform.doc["paths"])
    for p in ("health", "me", "registry/runs"):
        assert f"{API}/{p}" in paths, sorted(paths)
    assert platform.doc["openapi"].startswith("3.")


def test_fuzz_follows_the_schema(platform):
    "Schema-valid requests (half of them aimed at A's real objects): no 5xx, declared status codes, bodies valid."
    t0 = time.monotonic()
    fz = fuzz_operations(platform, [GenerationMode.POSITIVE], int(os.environ.get("HEDGERL_FUZZ_EXAMPLES", 8)),
                         derandomize=True)
    print(f"{fz.calls} requests in {time.monotonic() - t0:.1f} s")
    assert not fz.failures, f"{len(fz.failures)} faults in {fz.calls} requests:\n{fz.report()}"


def test_fuzz_breaks_the_schema(platform):
    """Requests that break the schema (types, ranges, missing fields, dropped credentials): refused with a declared
    4xx, never a 5xx or a 2xx."""
    t0 = time.monotonic()
    fz = fuzz_operations(platform, [GenerationMode.NEGATIVE], int(os.environ.get("HEDGERL_FUZZ_EXAMPLES", 6)),
                         derandomize=True)
    print(f"{fz.calls} requests in {time.monotonic() - t0:.1f} s")
    assert not fz.failures, f"{len(fz.failures)} faults in {fz.calls} requests:\n{fz.report()}"


JUNK_BODIES = [b"", b"{", b"[]", b"null", b"\xff\xfe\x00", b'{"a": NaN}', b'{"scenario": 1e999}',
               b"[" * 5000 + b"]" * 5000,
               json.dumps({"x": "y" * 100}).encode(), b'{"n_paths": 1, "n_paths": "two"}']
JUNK_HEADERS = [{"Authorization": ""}, {"Authorization": "token"}, {"Authorization": "Bearer  "},
                {"Authorization": "token " + "x" * 5000},
                {"Authorization": "Basic YTpi"}, {"Authorization": "token \u00e9\u00e9"}, {"Accept": "text/html"},
                {"Accept": "application/xml"}, {"Content-Type": "text/plain"},
                {"Content-Type": "application/json; charset=latin-1"},
                {"X-Forwarded-For": "not-an-ip"}, {"Cookie": "jupyterhub-services=garbage; jupyterhub-session-id=x"}]


def _route(path: str, known: dict) -> str:
    "A concrete URL path for a documented route: a real id where one is known, else 1."
    import re
    def sub(m):
        n = m[1].lower()
        kind = next((k for k in ("simulation", "model", "evaluation", "scenario",
                                 "run") if k in n or f"/{k}s/{{{m[1]}}}" in path), "run")
        return str((known.get(kind) or [1])[0])
    return re.sub(r"\{([^}]*)\}", sub, path)


def test_malformed_bodies_and_headers(platform):
    """Raw malformed bodies on every operation that takes one, and odd headers on every operation: a declared status
    with a JSON detail, never a 5xx."""
    p, bad, n, k = platform, {}, 0, 0
    for path, ops in p.doc["paths"].items():
        url = p.url + _route(path, p.known)
        for method, spec in ops.items():
            k += 1  # four of the odd headers per operation, in turn (every one meets many operations)
            cases = [(JUNK_HEADERS[(4 * k + i) % len(JUNK_HEADERS)], None) for i in range(4)]
            if "requestBody" in spec: cases += [({"Content-Type": "application/json"}, b) for b in JUNK_BODIES]
            declared = set(spec.get("responses", {}))
            for headers, body in cases:
                r = p.http.request(method.upper(), url, headers={**p.h, **headers}, data=body, timeout=60); n += 1
                if r.status_code >= 500: why = f"{r.status_code} {r.text[:150]!r}"
                elif not ({str(r.status_code), f"{str(r.status_code)[0]}XX",
                           "default"} & declared): why = f"{r.status_code} not declared {sorted(declared)}"
                elif r.status_code >= 400 and "detail" not in _json_or_none(
                        r): why = f"{r.status_code} without a JSON detail: {r.text[:150]!r}"
                else: why = None
                if why: bad.setdefault((method.upper(), path,
                                        why.split(" ")[0] + (" undeclared" if "not declared" in why else "")), (headers,
                                                body, url, why))
                if method == "post" and r.status_code in (201, 202) and isinstance(_json_or_none(r),
                                                                                   dict) and "id" in r.json():
                    p.http.delete(f"{url}/{r.json()['id']}", headers=p.h)
    lines = [f"- {m} {path}: {why}\n    e.g. curl -X {m} {url!r} "
             f"{' '.join(repr(f'-H {k}: {v[:40]}') for k, v in h.items())} -d {(b or b'')[:60]!r}"
             for (m, path, _), (h, b, url, why) in sorted(bad.items())]
    assert not bad, f"{len(bad)} faults in {n} requests:\n" + "\n".join(lines)


def _json_or_none(r):
    try: return r.json()
    except ValueError: return {}


@pytest.mark.slow
def test_fuzz_deep_on_postgresql(tmp_path_factory):
    "Many more fresh (random) examples per operation, both modes, with the registry on PostgreSQL."
    from conftest import fresh_pg_database
    with fresh_pg_database("hedgerl_fuzz", "the API must be fuzzed with the registry on PostgreSQL") as url:
        up, p = _start(tmp_path_factory, url)
        try:
            fz = fuzz_operations(p, [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                 int(os.environ.get("HEDGERL_FUZZ_EXAMPLES", 100)), derandomize=False)
            assert not fz.failures, f"{len(fz.failures)} faults in {fz.calls} requests:\n{fz.report()}"
        finally: up.stop()
