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


def test_the_generated_client_sends_the_token_a_kubeconfig_gives(tmp_path, monkeypatch):
    """kubernetes 36's loaders store the token under "authorization", its generated client sends only
    "BearerToken": the drift sink (a generated CustomObjectsApi) called as system:anonymous."""
    from kompressor.k8s.client import load_configuration

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443', insecure-skip-tls-verify: true}}]\n"
        "users: [{name: u, user: {token: the-token}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "")  # not in a Pod
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    cfg = load_configuration()
    sent = {s["key"]: s["value"] for s in cfg.auth_settings().values() if s["in"] == "header"}
    assert sent == {"authorization": "Bearer the-token"}
