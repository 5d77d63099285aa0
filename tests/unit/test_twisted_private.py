"""The private names of Twisted that matrix_edge.twisted_private
relies on: if a Twisted release removes or renames one, this fails first,
with the name, rather than the edge misbehaving."""

from __future__ import annotations

from matrix_edge import twisted_private


def test_twistd_builds_its_default_observer(tmp_path):
    """The observer twistd would use for ``--logfile``, built by its code."""
    observer = twisted_private.twistd_default_observer(
        {"logfile": str(tmp_path / "twistd.log"), "nodaemon": True}
    )
    assert callable(observer)
