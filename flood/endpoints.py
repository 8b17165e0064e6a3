"""Where a profile's requests go: its endpoint's URL and the proxy on the way, decided without
botocore (the supervisor checks them at start and never imports it; flood.connection builds
on them)."""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from collections.abc import Mapping

from flood.credentials import Profile, proxy_url


def amazon_host(region: str) -> str:
    """Amazon S3's regional host."""
    return f"s3.{region}.amazonaws.com"


def endpoint_of(profile: Profile) -> str:
    """The URL a profile's requests go to: its aws_endpoint, else Amazon's regional host."""
    return profile.endpoint or f"https://{amazon_host(profile.region)}"


def proxy_for(profile: Profile, url: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The proxy a request to `url` goes through: the profile's `proxy` key, else
    $HTTPS_PROXY or $HTTP_PROXY by the URL's scheme (lower case first, as curl and botocore
    read them), unless $NO_PROXY names the host. ConfigError for a proxy that is not a URL."""
    if profile.proxy:
        return profile.proxy
    env = os.environ if environ is None else environ
    scheme = urllib.parse.urlsplit(url).scheme
    for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY"):
        if env.get(name):
            found = proxy_url(env[name], f"${name}")
            break
    else:
        return None
    host = urllib.parse.urlsplit(url).hostname or ""
    if bypassed(host, env.get("no_proxy") or env.get("NO_PROXY") or ""):
        return None
    return found


def bypassed(host: str, no_proxy: str) -> bool:
    """Whether $NO_PROXY names this host: `*`, the host itself, a domain it is in (with or
    without a leading dot), or for an IP address the address or a network (10.0.0.0/8)."""
    host = host.strip("[]").lower().rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (e.strip().lower() for e in no_proxy.replace(" ", ",").split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry.strip("[]"), strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = entry.lstrip(".").split(":")[0].rstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


def shown_url(url: str) -> str:
    """A URL without the user and password it may carry, for logs and messages."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
