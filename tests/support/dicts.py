"""Building test manifests from a base and overrides."""

import copy


def merge(base: dict, override: dict) -> dict:
    """A deep copy of ``base`` with ``override`` merged in; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
