"""Settings, connecting with backoff, and the strict index templates on a real store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from elasticsearch import AsyncElasticsearch, BadRequestError

from mesh.errors import InvalidArgument, Unavailable
from registry.connect import StoreSettings, backoff_delays, connect
from registry.embedded import free_port
from registry.instances import Instance, to_document, with_lease
from registry.schema import Indices, ensure_schema


def test_settings_validate_and_hide_secrets() -> None:
    settings = StoreSettings.from_env(
        {"MESHSERVE_ES_URL": "https://elastic:pw@es.example:9200", "MESHSERVE_ES_PREFIX": "prod"},
    )
    assert settings.prefix == "prod"
    assert settings.display_url == "https://es.example:9200"
    assert "pw" not in repr(StoreSettings("http://h:1", username="u", password="secret"))
    with pytest.raises(InvalidArgument, match="MESHSERVE_ES_URL"):
        StoreSettings.from_env({})
    with pytest.raises(InvalidArgument, match="prefix"):
        StoreSettings("http://h:1", prefix="Upper")
    with pytest.raises(InvalidArgument, match="http"):
        StoreSettings("h:1")


def test_backoff_grows_and_caps() -> None:
    delays = backoff_delays(0.1, 2.0, 0.5)
    assert [next(delays) for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]


async def test_unreachable_store_is_retried_then_named() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    slept: list[float] = []
    now = [0.0]

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    with pytest.raises(Unavailable, match=url.replace(".", r"\.")):
        await connect(StoreSettings(url), deadline_s=2.0, sleep=fake_sleep, clock=lambda: now[0])
    assert slept[:3] == [0.1, 0.2, 0.4]  # backed off, did not hammer
    assert sum(slept) <= 2.0


async def test_connect_to_the_store_answers(store_url: str) -> None:
    client = await connect(StoreSettings(store_url))
    try:
        assert "version" in await client.info()
    finally:
        await client.close()


async def test_templates_are_strict_and_idempotent(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    await ensure_schema(es, indices)  # second call: no error, nothing changes
    settings = await es.indices.get_settings(index=indices.instances)
    assert settings[indices.instances]["settings"]["index"]["refresh_interval"] == "1s"
    mapping = await es.indices.get_mapping(index=indices.instances)
    properties = mapping[indices.instances]["mappings"]["properties"]
    assert mapping[indices.instances]["mappings"]["dynamic"] == "strict"
    assert properties["service"]["type"] == "keyword"
    assert properties["heartbeat_at"]["type"] == "date"
    with pytest.raises(BadRequestError, match="strict"):
        await es.index(index=indices.instances, document={"service": "x", "surprise": 1})


async def test_arbitrary_label_keys_fit_the_strict_mapping(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    labels = {"app.kubernetes.io/name": "resnet", "version": "v2", "weird key!": "x=y"}
    instance = with_lease(
        Instance("svc", "i1", "h:1", labels=labels), datetime.now(UTC), _seconds(60)
    )
    await es.index(index=indices.instances, id="i1", document=to_document(instance), refresh=True)
    found = await es.search(index=indices.instances, query={"term": {"labels": "version=v2"}})
    assert [h["_id"] for h in found["hits"]["hits"]] == ["i1"]
    assert found["hits"]["hits"][0]["_source"]["label_map"] == labels


async def test_prefixes_isolate_meshes(es: AsyncElasticsearch, indices: Indices) -> None:
    other = Indices(indices.prefix + "-other")
    await ensure_schema(es, other)
    try:
        await es.index(index=other.instances, document=_doc(), refresh=True)
        mine = await es.count(index=indices.instances)
        assert mine["count"] == 0
    finally:
        await es.indices.delete(index=",".join(other.all()), ignore_unavailable=True)
        for name in other.all():
            await es.indices.delete_index_template(name=name)


def _seconds(n: float) -> timedelta:
    return timedelta(seconds=n)


def _doc() -> dict[str, object]:
    return to_document(with_lease(Instance("s", "x", "h:1"), datetime.now(UTC), _seconds(5)))
