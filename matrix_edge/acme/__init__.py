"""Certificates from an ACME certificate authority (RFC 8555), obtained
and renewed by the edge: the account and certificates on disk
(L{store}), the challenges answered (L{challenges}), the conversation with
the CA (L{client}) and when to have it (L{manager})."""
