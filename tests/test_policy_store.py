"""Policy files: the documented example loads as written; every bad file is refused with a message that names it."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from gateway.control.adapters import Catalog, scan
from gateway.control.live import LiveView
from gateway.control.policies import load_policies
from gateway.errors import ConfigError
from gateway.keys import KeyRing, digest_of
from gateway.policy import Sticky, Switches, Timeouts
from tests.adapter_factory import adapter_policy, make_adapter
from tests.conftest import CRM_POLICY

ROOT = Path(__file__).resolve().parent.parent
ENGINES = {"default": "http://127.0.0.1:8001"}
DEFAULTS = Timeouts(2.0, 60.0, 300.0)


def load(tmp_path: Path, **files: str) -> object:
    for name, text in files.items():
        (tmp_path / f"{name}.toml").write_text(text)
    return load_policies(tmp_path, ENGINES, DEFAULTS)


def test_the_shipped_example_loads_as_written() -> None:
    snapshot = load_policies(ROOT / "loadtests" / "sim" / "policies", ENGINES, DEFAULTS)
    route = snapshot.routes["crm-assistant"]
    assert route.sticky == Sticky("header", "x-user-id")
    assert route.tool_calls == "annotate" and route.fallback == ("baseline",)
    baseline, formatter = route.variants
    assert (baseline.name, baseline.model, baseline.engine, baseline.weight) == (
        "baseline",
        "crm-base",
        "default",
        90,
    )
    assert baseline.system_prompt and baseline.price and baseline.price.currency == "EUR"
    assert (formatter.name, formatter.model, formatter.engine, formatter.weight) == (
        "formatter",
        "crm-formatter",
        "default",
        10,
    )
    assert formatter.price is not None and formatter.price.output_per_mtok == 0.90
    assert route.timeouts == DEFAULTS


def test_the_version_is_a_content_hash(tmp_path: Path) -> None:
    a = load_policies(ROOT / "loadtests" / "sim" / "policies", ENGINES, DEFAULTS)
    (tmp_path / "crm-assistant.toml").write_text(
        (ROOT / "loadtests" / "sim" / "policies" / "crm-assistant.toml").read_text()
    )
    assert load_policies(tmp_path, ENGINES, DEFAULTS).version == a.version
    (tmp_path / "crm-assistant.toml").write_text(CRM_POLICY.replace("weight = 10", "weight = 11"))
    assert load_policies(tmp_path, ENGINES, DEFAULTS).version != a.version


BAD = [
    ("weight = 10", "weight = -1", "greater than or equal to 0"),
    ("weight = 10", "weight = nan", "finite"),
    ("weight = 10", "weight = inf", "finite"),
    ('fallback = ["baseline"]', 'fallback = ["ghost"]', "ghost"),
    ('engine = "default"', 'engine = "gpu-2"', "gpu-2"),
    ('sticky = "header:x-user-id"', 'sticky = "cookie:x"', "sticky"),
    ('tool_calls = "annotate"', 'tool_calls = "block"', "tool_calls"),
    ("weight = 90", "weight = 90\nwieght = 3", "wieght"),
    ("weight = 90", "weight = 0", None),  # with formatter at 10 this is fine...
    ('currency = "EUR" }\n\n[variants.formatter]', 'currency = "euro" }\n\n[variants.formatter]', "currency"),
    ('route = "crm-assistant"', 'route = "crm assistant"', "route"),
    ('model = "crm-base"', "model = 3", "model"),
]


@pytest.mark.parametrize(("old", "new", "message"), BAD)
def test_bad_policies_are_refused_naming_the_problem(
    tmp_path: Path, old: str, new: str, message: str | None
) -> None:
    assert old in CRM_POLICY
    text = CRM_POLICY.replace(old, new, 1)
    if message is None:
        load(tmp_path, crm=text)
        return
    with pytest.raises(ConfigError) as err:
        load(tmp_path, crm=text)
    assert "crm.toml" in err.value.message and message in err.value.message


def test_all_weights_zero_is_refused(tmp_path: Path) -> None:
    text = CRM_POLICY.replace("weight = 90", "weight = 0").replace("weight = 10", "weight = 0")
    with pytest.raises(ConfigError, match="positive weight"):
        load(tmp_path, crm=text)


def test_two_files_cannot_claim_one_route(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="already defined"):
        load(tmp_path, a=CRM_POLICY, b=CRM_POLICY)


def test_broken_toml_and_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(tmp_path, crm="route = ")
    with pytest.raises(ConfigError, match="does not exist"):
        load_policies(tmp_path / "nope", ENGINES, DEFAULTS)


def test_route_timeouts_override_the_defaults(tmp_path: Path) -> None:
    snap = load(tmp_path, crm=CRM_POLICY + "\n[timeouts]\nfirst_byte = 5\n")
    assert snap.routes["crm-assistant"].timeouts == Timeouts(2.0, 5.0, 300.0)  # type: ignore[attr-defined]


def test_a_live_view_swaps_whole_snapshots(tmp_path: Path) -> None:
    first = load_policies(ROOT / "loadtests" / "sim" / "policies", ENGINES, DEFAULTS)
    live = LiveView(first, Switches())
    seen = live.view
    (tmp_path / "crm.toml").write_text(CRM_POLICY.replace("weight = 10", "weight = 30"))
    live.set_policy(load_policies(tmp_path, ENGINES, DEFAULTS))
    assert seen.policy is first and seen.plans["crm-assistant"].shares["formatter"] == pytest.approx(0.1)
    assert live.view.plans["crm-assistant"].shares["formatter"] == pytest.approx(0.25)
    live.set_switches(Switches(variants=frozenset({("crm-assistant", "formatter")})))
    assert live.view.policy is not first and "formatter" not in live.view.plans["crm-assistant"].shares


def test_keys_file_authentication(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(
        f'[keys.crm-service]\nsha256 = "{digest_of("sk-1")}"\ntenant = "acme"\nroutes = ["crm-assistant"]\n'
        "can_force_variant = false\n"
    )
    ring = KeyRing.load(path)
    key = ring.authenticate("Bearer sk-1")
    assert (key.name, key.tenant, key.can_force_variant) == ("crm-service", "acme", False)
    key.check_route("crm-assistant")
    from gateway.errors import AuthenticationError, UnknownRoute

    with pytest.raises(UnknownRoute):  # answered like a route that does not exist
        key.check_route("billing")
    for header in (None, "", "Bearer", "Basic sk-1", "Bearer sk-2"):
        with pytest.raises(AuthenticationError):
            ring.authenticate(header)
    path.write_text('[keys.x]\nsha256 = "not-hex"\ntenant = "a"\nroutes = ["*"]\n')
    with pytest.raises(ConfigError):
        KeyRing.load(path)
    with pytest.raises(ConfigError):
        KeyRing.load(tmp_path / "missing.toml")


def adapter_catalog(tmp_path: Path) -> Catalog:
    root = tmp_path / "adapters"
    make_adapter(root, version="2", invalid_rate=0.012)
    make_adapter(root, version="3", invalid_rate=0.31)  # the regression
    make_adapter(root, version="4", invalid_rate=0.01, n=50)
    make_adapter(root, version="5", invalid_rate=0.01, approvers=())
    return scan(root)


def test_a_variant_may_name_an_adapter_version(tmp_path: Path) -> None:
    policies = tmp_path / "p"
    policies.mkdir()
    (policies / "crm.toml").write_text(adapter_policy("2"))
    snap = load_policies(policies, ENGINES, DEFAULTS, adapter_catalog(tmp_path))
    formatter = snap.routes["crm-assistant"].variant("formatter")
    assert (
        formatter is not None
        and formatter.adapter == "crm-formatter@2"
        and formatter.model == "crm-formatter@2"
    )


@pytest.mark.parametrize(
    ("version", "threshold"),
    [("3", "max_invalid_call_rate"), ("4", "min_eval_n"), ("5", "require_approvers")],
)
def test_the_release_gate_refuses_a_version_whose_lineage_falls_short(
    tmp_path: Path, version: str, threshold: str
) -> None:
    policies = tmp_path / "p"
    policies.mkdir()
    (policies / "crm.toml").write_text(adapter_policy(version))
    with pytest.raises(ConfigError) as err:
        load_policies(policies, ENGINES, DEFAULTS, adapter_catalog(tmp_path))
    assert f"crm-formatter@{version}" in err.value.message and threshold in err.value.message


def test_a_zero_weight_variant_is_not_gated_and_unknown_adapters_are_refused(tmp_path: Path) -> None:
    policies = tmp_path / "p"
    policies.mkdir()
    catalog = adapter_catalog(tmp_path)
    (policies / "crm.toml").write_text(adapter_policy("3", weight=0))
    load_policies(policies, ENGINES, DEFAULTS, catalog)  # forced traffic only: load tests
    (policies / "crm.toml").write_text(adapter_policy("9"))
    with pytest.raises(ConfigError, match="not in the adapter catalog"):
        load_policies(policies, ENGINES, DEFAULTS, catalog)
    (policies / "crm.toml").write_text(
        adapter_policy("2").replace('adapter = "crm', 'model = "m"\nadapter = "crm')
    )
    with pytest.raises(ConfigError, match="exactly one"):
        load_policies(policies, ENGINES, DEFAULTS, catalog)


RAG_POLICY = """
route = "crm-assistant"
[variants.baseline]
model = "crm-base"
weight = 1
system_prompt = "Use these notes:\\n{context}\\nThen call update_crm."
retrieval = { documents = "KB", top_k = 2 }
"""


def test_a_retrieval_variant_fills_its_prompt_from_the_knowledge_base(tmp_path: Path) -> None:
    from gateway.rewrite import engine_body

    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "stages.md").write_text(
        "# Deal stages\n\nA deal in negotiation has an agreed scope and open terms.\n"
    )
    (kb / "amounts.md").write_text(
        "# Amounts\n\nWrite amounts as plain numbers in EUR, never with a currency sign.\n"
    )
    policies = tmp_path / "p"
    policies.mkdir()
    (policies / "crm.toml").write_text(RAG_POLICY.replace("KB", str(kb)))
    snap = load_policies(policies, ENGINES, DEFAULTS)
    variant = snap.routes["crm-assistant"].variants[0]
    assert variant.retrieval is not None
    messages = [{"role": "user", "content": "What amount format, EUR sign or not?"}]
    context = variant.retrieval.context_for(messages)
    assert "plain numbers in EUR" in context
    sent = orjson.loads(
        engine_body({"model": "x", "messages": messages}, variant, stream=False, context=context)
    )
    assert sent["messages"][0]["content"].startswith("Use these notes:\n[amounts.md]")
    (kb / "amounts.md").write_text("# Amounts\n\nPlain numbers.\n")
    assert (
        load_policies(policies, ENGINES, DEFAULTS).version != snap.version
    )  # a KB change is a policy change


def test_retrieval_and_the_context_placeholder_go_together(tmp_path: Path) -> None:
    policies = tmp_path / "p"
    policies.mkdir()
    (policies / "crm.toml").write_text(
        RAG_POLICY.replace("{context}", "nothing").replace("KB", str(tmp_path))
    )
    with pytest.raises(ConfigError, match="placeholder"):
        load_policies(policies, ENGINES, DEFAULTS)
    (policies / "crm.toml").write_text(RAG_POLICY.replace("KB", str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="retrieval"):
        load_policies(policies, ENGINES, DEFAULTS)
