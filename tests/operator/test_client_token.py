"""The operator's own API client sends the bearer token the kubernetes client loaded (in-cluster or from a
kubeconfig). kubernetes >= 36 keeps it under "BearerToken": read only as "authorization", an in-cluster
operator made every call as system:anonymous (found on the real apiserver, e2e/cluster)."""

from __future__ import annotations

from aiohttp import web

from kompressor.k8s import resources as r
from kompressor.k8s.access import Access
from kompressor.k8s.client import ApiClient


async def test_the_bearer_token_is_sent():
    from kubernetes import client

    seen = []

    async def handler(request):
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"items": []})

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/default/services", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        cfg = client.Configuration()
        cfg.host = f"http://127.0.0.1:{port}"
        cfg.api_key["BearerToken"] = "bearer the-token"  # where load_incluster_config/load_kube_config put it
        api = ApiClient(cfg)
        try:
            await api.call(Access(r.Resource("", "v1", "services"), "list"), namespace="default")
        finally:
            await api.close()
    finally:
        await runner.cleanup()
    assert seen == ["bearer the-token"]
