"""Model names that may come from the Hugging Face hub: a local folder first, the hub only when it
answers within seconds, its cache otherwise. Never a wait on an unreachable hub."""

import os
import socket
import urllib.parse
import urllib.request

from utils.errors import CheckpointError, OptionError

HUB_TIMEOUT = 3  # seconds the check that the model hub is reachable waits for a connection


def hub_unavailable(value, field, what="LXMERT's weights"):
    """Whether `value` (of the request's `field`) must load without the model hub (a folder, or the hub out
    of reach).

    A folder loads as it is. A value that is not a folder but names one (an absolute or
    relative path, a path below a folder that exists) is refused at once, as is a file. What
    remains can be a hub name: it is looked up on the hub only when the hub answers, else in
    transformers' cache alone, so that no request waits on an unreachable hub.
    """
    if os.path.isdir(value):
        return True
    if os.path.exists(value):
        raise CheckpointError.naming(
            f"{{{field}}} {{value}}: a file, not a folder; {{what}} are a folder (see docs/lxmert.md)",
            value=value,
            what=what,
        )
    if not is_hub_name(value):
        raise CheckpointError.naming(f"{{{field}}} {{value}}: folder not found", value=value)
    return not hub_reachable()


def is_hub_name(value):
    """Whether `value` can name a model on the hub (`name` or `owner/name`) rather than only a path."""
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id  # transformers' dependency
    except ImportError:
        raise OptionError(
            "models from the hub need the transformers package: python3 -m pip install transformers"
        ) from None

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    owner = value.split("/")[0]
    return not ("/" in value and os.path.isdir(owner))


def hub_offline():
    """Whether HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE forbids the model hub."""
    return any(
        os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout=HUB_TIMEOUT):
    """Whether the model hub (HF_ENDPOINT, through the HTTPS proxy if one is set) takes a connection
    within `timeout` s."""
    if hub_offline():
        return False
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    address = urllib.parse.urlsplit(proxy) if proxy else endpoint
    port = address.port or (443 if address.scheme == "https" else 80)
    try:
        with socket.create_connection((address.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False
