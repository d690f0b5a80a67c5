"""Each workaround in tests/support/emulator.py is needed (plain kmock 0.8 lacks it) and works. What the
emulator no longer emulates (garbage collection, namespaced runs) is tested on the real control plane
(tests/cluster)."""

import asyncio

import aiohttp
import kmock

from support.emulator import Emulator, register_resources, write_kubeconfig

CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
MERGE = {"Content-Type": "application/merge-patch+json"}


class Plain:
    """A plain kmock KubernetesEmulator on a loopback port, with the resources registered."""

    async def __aenter__(self):
        self.api = kmock.KubernetesEmulator()
        register_resources(self.api)
        await self.api.__aenter__()
        self.server = kmock.Server(self.api)
        await self.server.__aenter__()
        return self.api

    async def __aexit__(self, *exc):
        await self.server.__aexit__(*exc)
        await self.api.__aexit__(*exc)


def configmap(name, **extra):
    meta = {"name": name, "namespace": "default"}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, **extra}


async def post(session, api, path, body):
    async with session.post(str(api.url).rstrip("/") + path, json=body) as resp:
        return resp.status, await resp.json()


async def test_server_filled_metadata():
    async with aiohttp.ClientSession() as session:
        async with Plain() as plain:
            _, obj = await post(session, plain, CONFIGMAPS, configmap("a", data={"k": "1"}))
            assert not {"uid", "generation", "resourceVersion", "creationTimestamp"} & obj["metadata"].keys()
        async with Emulator() as api:
            _, obj = await post(session, api, CONFIGMAPS, configmap("a", spec={"k": "1"}))
            meta = obj["metadata"]
            assert meta["uid"] and meta["generation"] == 1 and meta["resourceVersion"] and meta["creationTimestamp"]
            url = f"{str(api.url).rstrip('/')}{CONFIGMAPS}/a"
            async with session.patch(url, json={"spec": {"k": "2"}}, headers=MERGE) as resp:
                patched = (await resp.json())["metadata"]
            assert patched["generation"] == 2 and patched["uid"] == meta["uid"]
            assert int(patched["resourceVersion"]) > int(meta["resourceVersion"])
            async with session.patch(url + "/status", json={"status": {"x": 1}, "spec": {"k": "3"}},
                                     headers=MERGE) as resp:
                assert (await resp.json())["metadata"]["generation"] == 2  # /status never bumps it
            async with session.patch(url, json={"metadata": {"labels": {"a": "b"}}}, headers=MERGE) as resp:
                assert (await resp.json())["metadata"]["generation"] == 2  # metadata edits neither


async def test_resources_must_be_registered_for_discovery():
    async with aiohttp.ClientSession() as session:
        plain = kmock.KubernetesEmulator()
        async with plain, kmock.Server(plain):
            async with session.get(str(plain.url).rstrip("/") + "/apis/kompressor.io/v1alpha1") as resp:
                assert resp.status == 404
        async with Emulator() as api:
            async with session.get(str(api.url).rstrip("/") + "/apis/kompressor.io/v1alpha1") as resp:
                names = [r["name"] for r in (await resp.json())["resources"]]
            assert {"compressedmodels", "compressedmodels/status"} <= set(names)
            async with session.get(str(api.url).rstrip("/") + "/api/v1") as resp:
                # Kopf does not start handling without the namespaces resource in discovery, even cluster-wide.
                assert "namespaces" in [r["name"] for r in (await resp.json())["resources"]]


async def test_kubeconfig_points_clients_at_the_emulator(tmp_path):
    from kubernetes import client, config

    async with Emulator() as api:
        async with aiohttp.ClientSession() as session:
            await post(session, api, CONFIGMAPS, configmap("seen"))
        path = write_kubeconfig(tmp_path / "kubeconfig", str(api.url))

        def list_names():
            cfg = client.Configuration()
            config.load_kube_config(config_file=str(path), client_configuration=cfg)
            return [cm.metadata.name for cm in client.CoreV1Api(client.ApiClient(cfg)).list_namespaced_config_map(
                "default").items]

        assert await asyncio.to_thread(list_names) == ["seen"]


async def test_request_record_holds_only_requests_in_flight():
    # kmock matches each request by scanning every request it recorded: quadratic without the harness.
    async with aiohttp.ClientSession() as session:
        for harness, bounded in ((Plain, False), (Emulator, True)):
            async with harness() as api:
                for i in range(50):
                    await post(session, api, CONFIGMAPS, configmap(f"c{i}"))
                recorded = len(api._requests)
                assert (recorded == 0) if bounded else (recorded >= 50)
                async with session.get(str(api.url).rstrip("/") + CONFIGMAPS) as resp:
                    assert len((await resp.json())["items"]) == 50


async def test_failed_json_patch_test_is_a_422_conflict():
    # Kopf guards its finalizer patches with a `test` on resourceVersion and expects 422 on a race.
    async with aiohttp.ClientSession() as session:
        for harness, status in ((Plain, 500), (Emulator, 422)):
            async with harness() as api:
                await post(session, api, CONFIGMAPS, configmap("a"))
                ops = [{"op": "test", "path": "/metadata/name", "value": "b"},
                       {"op": "add", "path": "/metadata/finalizers", "value": ["x"]}]
                async with session.patch(f"{str(api.url).rstrip('/')}{CONFIGMAPS}/a", json=ops,
                                         headers={"Content-Type": "application/json-patch+json"}) as resp:
                    assert resp.status == status
