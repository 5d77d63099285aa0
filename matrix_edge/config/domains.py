"""Host names that certificates are ordered for."""

from __future__ import annotations

import re

from matrix_edge.config._base import KeyPath, fail, read_str

# RFC 1123 host names, as a CA will issue for them: letters, digits and
# hyphens, labels of at most 63, at least two labels.
LABEL = re.compile(r"\A(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


def parse_domain(value: object, path: KeyPath) -> str:
    """A name a certificate can be ordered for with the challenges the edge
    answers: a host name, not a wildcard or an IP address."""
    name = read_str(value, path).lower().rstrip(".")
    if name.startswith("*."):
        fail(
            path,
            f"{name}: wildcard certificates need the dns-01 challenge, which "
            "matrix-edge does not answer; list the names instead",
        )
    labels = name.split(".")
    if len(name) > 253:
        fail(path, f"a host name has at most 253 characters, got {len(name)}")
    if len(labels) < 2 or not all(LABEL.match(label) for label in labels):
        fail(path, f"expected a host name such as matrix.example.org, got {name!r}")
    if labels[-1].isdigit():
        fail(path, f"{name}: IP addresses are not supported, name the host")
    return name
