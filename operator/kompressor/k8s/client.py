"""One small async HTTP client for the Kubernetes API (aiohttp), configured like kubectl.

Credentials come from the pod's service account, else from $KUBECONFIG / ~/.kube/config
(the `kubernetes` package's loaders), i.e. the same sources Kopf logs in with.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

import aiohttp

from kompressor.k8s.access import Access


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(f"HTTP {status}: {message}")


def load_configuration():
    """In-cluster config, else the kubeconfig that $KUBECONFIG names now (the kubernetes package reads
    $KUBECONFIG once, when it is first imported), else ~/.kube/config. Our own Configuration object, not
    the process-wide default."""
    import os

    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg)
    _bearer_token_under_both_keys(cfg)
    return cfg


def _bearer_token_under_both_keys(cfg) -> None:
    """kubernetes 36's loaders put the bearer token under api_key["authorization"] while its generated
    client sends only api_key["BearerToken"] (37 fixed both ends), so a generated client of 36 would call
    in-cluster as system:anonymous. Keep the token under both keys, also after the loader's refresh hook
    re-reads a rotated token."""
    loader_hook = cfg.refresh_api_key_hook

    def sync(c) -> None:
        if loader_hook is not None:
            loader_hook(c)
        token = c.api_key.get("BearerToken") or c.api_key.get("authorization")
        if token:
            c.api_key["BearerToken"] = c.api_key["authorization"] = token

    sync(cfg)
    cfg.refresh_api_key_hook = sync


AUTH_TTL_SECONDS = 10.0  # how long the Authorization header is reused before the credentials are read again


class ApiClient:
    def __init__(self, configuration=None, limit: int = 32):
        self._cfg = configuration or load_configuration()
        # Read once: the kubernetes package's Configuration.host recomputes it (proxy lookup included) on each access.
        self._host = self._cfg.host.rstrip("/")
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None
        self._auth: tuple[float, str | None] | None = None  # (read at, header)

    def _ssl(self):
        cfg = self._cfg
        if not self._host.startswith("https"):
            return None
        if not cfg.verify_ssl:
            return False
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
        return context

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._limit, ssl=self._ssl())
            self._session = aiohttp.ClientSession(base_url=None, connector=connector,
                                                  timeout=aiohttp.ClientTimeout(total=60))
        return self._session

    def _authorization(self) -> str | None:
        """The bearer token header, re-read every AUTH_TTL_SECONDS: each read runs the kubernetes package's
        refresh hook, which re-applies the whole kubeconfig (a proxy lookup in the environment included),
        about a millisecond per API call otherwise. Rotated tokens stay valid far longer than that."""
        now = time.monotonic()
        if self._auth is None or now - self._auth[0] > AUTH_TTL_SECONDS:
            # kubernetes >= 37 keeps the bearer token (in-cluster, kubeconfig tokens) under "BearerToken";
            # 36 and older under "authorization" (as Kopf's login_via_client reads it).
            cfg = self._cfg
            self._auth = (now, cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization"))
        return self._auth[1]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, access: Access, namespace: str | None = None, name: str | None = None,
                   body: Any = None, params: dict | None = None) -> Any:
        headers = {"Accept": "application/json"}
        auth = self._authorization()
        if auth:
            headers["Authorization"] = auth
        if access.verb == "patch":
            headers["Content-Type"] = "application/merge-patch+json"
        url = self._host + access.resource.path(namespace, name, access.subresource)
        async with self.session.request(access.method, url, json=body, params=params, headers=headers) as resp:
            if resp.status >= 400:
                text = await resp.text()
                try:
                    import json

                    text = json.loads(text).get("message", text)
                except ValueError:
                    pass
                raise ApiError(resp.status, str(text)[:500])
            return await resp.json(content_type=None)
